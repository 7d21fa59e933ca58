"""Knowledge distillation: the loss, the frozen teacher, exact resume and the teacher checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mobilebench import engine
from mobilebench.checkpoint import load_checkpoint
from mobilebench.distill import DistillationLoss, TeacherModel, file_sha256
from tests.conftest import interrupt_in_epoch, run_cli, train_run

SHORT = ["trainer.max_steps_per_epoch=2"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher of another family (v2) than the students (v3_small), on the same synthetic classes."""
    run = tmp_path_factory.mktemp("teacher")
    train_run(run, "model=v2", "trainer.max_steps_per_epoch=3")
    return run / "checkpoints" / "best.pt"  # what its run dir resolves to


def _log_softmax(row: list[float], t: float) -> list[float]:
    z = [v / t for v in row]
    top = max(z)
    log_sum = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - log_sum for v in z]


def test_the_loss_is_the_formula_on_a_hand_computed_batch() -> None:
    student = [[2.0, -1.0, 0.5], [0.1, 0.3, -0.7]]
    teacher = [[3.0, 0.0, -2.0], [-1.0, 2.5, 0.0]]
    labels, alpha, t, eps = [0, 1], 0.7, 3.0, 0.1
    ce = kl = 0.0
    for s_row, t_row, y in zip(student, teacher, labels):
        log_p = _log_softmax(s_row, 1.0)
        ce += (1 - eps) * -log_p[y] + eps * -sum(log_p) / 3  # label smoothing spreads eps over all classes
        log_s, log_t = _log_softmax(s_row, t), _log_softmax(t_row, t)
        kl += sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_t, log_s))
    expected = (1 - alpha) * ce / 2 + alpha * t * t * kl / 2
    loss = DistillationLoss(alpha, t, label_smoothing=eps)(torch.tensor(student), torch.tensor(labels), torch.tensor(teacher))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # MixUp's soft targets go through the same cross-entropy
    soft = torch.nn.functional.one_hot(torch.tensor(labels), 3).float()
    assert DistillationLoss(alpha, t, eps)(torch.tensor(student), soft, torch.tensor(teacher)).item() == pytest.approx(expected, rel=1e-6)


def test_the_teacher_never_changes_and_gets_its_logits_from_the_same_batch() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    student(torch.zeros(2, 3, 8, 8))
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    seen: list[int] = []
    net.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
    frozen = TeacherModel(net)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    parts = engine.Parts(model=student, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                         scaler=torch.amp.GradScaler("cpu", enabled=False), loss_fn=DistillationLoss(0.5, 2.0),
                         device=torch.device("cpu"), amp_dtype=None, teacher=frozen)
    # (student's 8 px batch, labels, the 12 px batch it was shrunk from), as a keep_full loader yields
    batches = [(torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,)), torch.randn(6, 3, 12, 12)) for _ in range(3)]
    stats = engine.train_one_epoch(parts, batches, engine.TrainState(), engine.StopFlag(), lambda info: None)
    after = frozen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm running stats
    assert not frozen.training and all(p.grad is None for p in frozen.parameters())
    assert seen == [12, 12, 12] and stats.teacher_s > 0


def test_a_keep_full_loader_adds_the_batch_before_progressive_resizing() -> None:
    from mobilebench.config import AugmentConfig
    from mobilebench.data import Split
    from mobilebench.loader import TensorLoader, resize_batch

    split = Split(torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8), torch.arange(40) % 4)

    def loader(keep_full: bool) -> TensorLoader:
        made = TensorLoader(split, 8, AugmentConfig(), [0.5] * 3, [0.25] * 3, torch.device("cpu"),
                            torch.Generator().manual_seed(0), keep_full=keep_full)
        made.image_size = 8
        return made

    plain, kept = list(loader(False)), list(loader(True))
    assert len(plain[0]) == 2 and len(kept[0]) == 3
    for (x, y), (xs, ys, full) in zip(plain, kept):
        assert full.shape[-1] == 16 and torch.equal(x, xs) and torch.equal(y, ys)
        assert torch.equal(resize_batch(full, 8, True), xs)  # the same augmented images, only not shrunk


def test_alpha_zero_is_the_plain_run_bit_for_bit_and_alpha_above_zero_is_not(teacher: Path, tmp_path: Path) -> None:
    plain, zero, kd = tmp_path / "plain", tmp_path / "zero", tmp_path / "kd"
    sha = file_sha256(teacher)
    train_run(plain, *SHORT)
    train_run(zero, *SHORT, f"distill.teacher={teacher}", "distill.alpha=0")
    train_run(kd, *SHORT, f"distill.teacher={teacher.parent.parent}", "distill.temperature=2")  # a run dir
    a, b, c = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (plain, zero, kd))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())

    # The distilled run records its teacher and what the teacher cost.
    summary = json.loads((kd / "summary.json").read_text())
    record = summary["teacher"]
    assert record["path"] == str(teacher.resolve()) and record["sha256"] == sha and record["model"] == "v2"
    assert 0.0 <= record["test_acc"] <= 1.0 and record["temperature"] == 2.0 and record["alpha"] == 0.9
    assert load_checkpoint(kd / "checkpoints" / "last.pt")["teacher"] == record
    assert 0 < summary["teacher_s"] < summary["compute_s"]
    assert all(json.loads(line)["teacher_s"] > 0 for line in (kd / "metrics.jsonl").read_text().splitlines())
    assert json.loads((plain / "summary.json").read_text())["teacher"] is None
    assert file_sha256(teacher) == sha  # the teacher's file is only read


def test_resume_with_a_teacher_is_exact_and_needs_the_same_teacher(teacher: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from mobilebench.errors import UserError

    kd = [*SHORT, "trainer.epochs=2", f"distill.teacher={teacher}"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train_run(whole, *kd)
    interrupt_in_epoch(monkeypatch, at_epoch=2)
    with pytest.raises(UserError, match="interrupted by SIGTERM"):
        train_run(split, *kd)
    monkeypatch.undo()
    with pytest.raises(UserError, match="resume with that teacher"):
        train_run(split, *SHORT, "trainer.epochs=2", "trainer.resume=auto")
    other = whole / "checkpoints" / "last.pt"  # a checkpoint of the same classes, but not the teacher
    with pytest.raises(UserError, match="is not the teacher"):
        train_run(split, *SHORT, "trainer.epochs=2", "trainer.resume=auto", f"distill.teacher={other}")
    train_run(split, *kd, "trainer.resume=auto")
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (whole, split))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_teacher_trained_on_other_classes_is_one_line_and_exit_2(tmp_path: Path) -> None:
    five = tmp_path / "five"
    train_run(five, "data.num_classes=5", "trainer.max_steps_per_epoch=1")
    out = tmp_path / "student"
    proc = run_cli("train", "data=synthetic", "data.train_subset=96", "data.val_size=32", "data.test_subset=64",
                   "model.width_mult=0.25", "trainer.threads=1", f"distill.teacher={five}", f"hydra.run.dir={out}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1
    assert "trained on 5 classes" in lines[0] and "has 10" in lines[0] and "same classes" in lines[0]
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize(("override", "says"), [("distill.alpha=1.5", "distill.alpha=1.5 is out of range"),
                                                ("distill.temperature=0", "distill.temperature=0.0 is out of range"),
                                                ("distill.teacher_input=both", "distill.teacher_input='both' is not valid")])
def test_bad_distill_settings_are_one_line(override: str, says: str) -> None:
    from mobilebench.errors import UserError
    from tests.conftest import compose_config

    with pytest.raises(UserError, match=says.replace(".", r"\.")):
        compose_config([override])
