"""MixUp / CutMix: the maths on real batches, reproducibility, exact resume, and the train loop's use of soft targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mobilebench.checkpoint import load_checkpoint
from mobilebench.config import AugmentConfig
from mobilebench.data import Split
from mobilebench.loader import TensorLoader
from mobilebench.mixing import Mixer
from tests.conftest import interrupt_in_epoch, train_run

C = 5


def _batch(seed: int = 0, b: int = 15, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g), torch.arange(b) % C


def _own_weight(target: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Weight each image's own label got (images whose partner has another label)."""
    return target[torch.arange(len(y)), y]


def test_mixup_is_the_convex_combination_its_targets_state() -> None:
    x, y = _batch()
    mixed, target = Mixer(C, mixup_alpha=0.4)(x.clone(), y, torch.Generator().manual_seed(3))
    assert y.roll(1, 0).ne(y).all()  # every partner has another label, so the weights can be read off
    lam = _own_weight(target, y)
    assert torch.allclose(lam, lam[0].expand_as(lam)) and 0 < lam[0] < 1
    assert torch.allclose(target.sum(1), torch.ones(len(y)))
    assert torch.allclose(mixed, lam[0] * x + (1 - lam[0]) * x.roll(1, 0), atol=1e-6)


def test_cutmix_pastes_one_box_and_weights_labels_by_its_area() -> None:
    x, y = _batch(size=16)
    for seed in range(10):
        mixed, target = Mixer(C, cutmix_alpha=1.0)(x.clone(), y, torch.Generator().manual_seed(seed))
        changed = (mixed != x).any(1)  # [B, H, W]
        pasted_from_partner = torch.where(changed[:, None], mixed == x.roll(1, 0), True).all()
        assert pasted_from_partner
        assert (changed == changed[0]).all()  # the same box in every image
        rows, cols = changed[0].any(1).nonzero(), changed[0].any(0).nonzero()
        if len(rows):
            box = changed[0][rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all()  # a filled rectangle
        area = changed[0].float().mean()
        assert torch.allclose(_own_weight(target, y), (1 - area).expand(len(y)), atol=1e-6)


def test_both_on_uses_each_and_mix_prob_zero_leaves_batches_alone() -> None:
    x, y = _batch(size=16)
    kinds = set()
    gen = torch.Generator().manual_seed(0)
    mixer = Mixer(C, mixup_alpha=0.5, cutmix_alpha=1.0)
    for _ in range(20):
        mixed, _ = mixer(x.clone(), y, gen)
        changed = (mixed != x).any(1)[0]
        kinds.add("mixup" if changed.all() else "cutmix")
    assert kinds == {"mixup", "cutmix"}
    mixed, target = Mixer(C, mixup_alpha=0.5, prob=0.0)(x.clone(), y, gen)
    assert torch.equal(mixed, x) and torch.equal(target, torch.nn.functional.one_hot(y, C).float())


def test_off_by_default_so_the_loader_yields_class_indices() -> None:
    assert Mixer.from_config(AugmentConfig(), C) is None
    assert Mixer.from_config(AugmentConfig(cutmix_alpha=1.0), C) == Mixer(C, 0.0, 1.0, 1.0)


def _loader(seed: int) -> TensorLoader:
    g = torch.Generator().manual_seed(99)
    split = Split(torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(64) % C)
    return TensorLoader(split, 16, AugmentConfig(), [0.5] * 3, [0.25] * 3, torch.device("cpu"),
                        torch.Generator().manual_seed(seed), mixer=Mixer(C, mixup_alpha=0.2, cutmix_alpha=1.0))


def test_mixed_batches_are_reproducible_and_replayable_mid_epoch() -> None:
    a, b = list(_loader(7)), list(_loader(7))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert a[0][1].shape == (16, C) and not torch.equal(a[0][1], list(_loader(8))[0][1])
    # What a mid-epoch resume does: restore the generator to the epoch's start and replay the draws.
    loader = _loader(7)
    start = loader.gen.get_state()
    first = list(loader)
    loader.gen.set_state(start)
    it = iter(loader)
    for _ in range(2):
        next(it)
    x, y = next(it)
    assert torch.equal(x, first[2][0]) and torch.equal(y, first[2][1])


MIX = ["augment.cutmix_alpha=1.0", "augment.mixup_alpha=0.2", "trainer.label_smoothing=0.1",
       "trainer.max_steps_per_epoch=2"]


def test_training_with_mixing_resumes_exactly_mid_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mobilebench.errors import UserError

    whole, split = tmp_path / "whole", tmp_path / "split"
    train_run(whole, *MIX, "trainer.epochs=2")
    interrupt_in_epoch(monkeypatch, at_epoch=2)  # the loop's own SIGTERM at epoch 2, step 1
    with pytest.raises(UserError, match="interrupted by SIGTERM"):
        train_run(split, *MIX, "trainer.epochs=2")
    assert load_checkpoint(split / "checkpoints" / "last.pt")["state"]["step_in_epoch"] == 1
    monkeypatch.undo()
    train_run(split, *MIX, "trainer.epochs=2", "trainer.resume=auto")
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (whole, split))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["train_acc"] <= 1.0 for r in rows)


def test_mixing_changes_what_is_trained(tmp_path: Path) -> None:
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    train_run(plain, "trainer.max_steps_per_epoch=2")
    train_run(mixed, *MIX)
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (plain, mixed))
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_engine_counts_soft_targets_against_their_dominant_label() -> None:
    from mobilebench import engine

    class Fixed(torch.nn.Module):  # predicts class i for image i, whatever the input
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.eye(4)[: x.shape[0]] * 10 + self.w

    model = Fixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    parts = engine.Parts(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), torch.amp.GradScaler("cpu", enabled=False),
                         torch.nn.CrossEntropyLoss(), torch.device("cpu"), None)
    # Dominant labels 0, 1, 3, 3: images 0, 1 and 3 are counted right, image 2 wrong.
    soft = torch.tensor([[0.7, 0.3, 0, 0], [0.4, 0.6, 0, 0], [0, 0, 0.1, 0.9], [0.2, 0, 0, 0.8]])
    stats = engine.train_one_epoch(parts, [(torch.zeros(4, 1), soft)], engine.TrainState(), engine.StopFlag(), lambda i: None)
    assert stats.acc == pytest.approx(0.75)
    expected = -(soft * torch.log_softmax(torch.eye(4) * 10, 1)).sum(1).mean()
    assert stats.loss == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(("override", "says"), [("augment.mix_prob=1.5", "augment.mix_prob=1.5 must be a probability"),
                                                ("augment.cutmix_alpha=-1", "augment.cutmix_alpha=-1.0 is out of range")])
def test_bad_mixing_settings_are_one_line(override: str, says: str) -> None:
    from mobilebench.errors import UserError
    from tests.conftest import compose_config

    with pytest.raises(UserError, match=says.replace(".", r"\.")):
        compose_config([override])
