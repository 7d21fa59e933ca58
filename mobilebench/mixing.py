"""MixUp and CutMix on a whole training batch, with every draw from the run's data generator.

The maths of torchvision.transforms.v2's MixUp/CutMix (each image is paired with its neighbour
in the shuffled batch; the mixing weight comes from Beta(alpha, alpha); CutMix's weight is the
area actually pasted after the box is clipped), but drawn from the loader's CPU generator instead
of torch's global RNG: the generator's state is in every checkpoint, so a resumed run mixes the
same pairs with the same weights as one never stopped, and a seed fixes them everywhere.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mobilebench.config import AugmentConfig


@dataclass(frozen=True)
class Mixer:
    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0  # chance that a batch is mixed at all

    @classmethod
    def from_config(cls, aug: AugmentConfig, num_classes: int) -> Mixer | None:
        """None when neither is on, so a run without them takes exactly the old path."""
        if aug.mixup_alpha <= 0 and aug.cutmix_alpha <= 0:
            return None
        return cls(num_classes, aug.mixup_alpha, aug.cutmix_alpha, aug.mix_prob)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed batch, soft targets [B, num_classes]); `x` is a normalized float batch, changed in place."""
        u_apply, u_which = torch.rand(2, generator=gen).tolist()
        # Python's Beta sampler, seeded from the generator: torch's Beta has no generator argument.
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=gen)))
        target = F.one_hot(y, self.num_classes).to(torch.float32)
        if u_apply >= self.prob:
            return x, target
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or u_which < 0.5)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = rng.betavariate(alpha, alpha)
        partner = x.roll(1, 0)
        if use_cutmix:
            lam = paste_box(x, partner, lam, rng)
        else:
            x.mul_(lam).add_(partner, alpha=1.0 - lam)
        return x, target.mul_(lam).add_(target.roll(1, 0), alpha=1.0 - lam)


def paste_box(x: torch.Tensor, partner: torch.Tensor, lam: float, rng: random.Random) -> float:
    """Paste one box of `partner` into every image of `x` (same box for the batch, as torchvision
    does); returns the weight of `x`'s own label, 1 - the box's share of the image after clipping."""
    h, w = x.shape[-2:]
    side = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * side), int(w * side)
    cy, cx = rng.randrange(h), rng.randrange(w)
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    x[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
    return 1.0 - (y1 - y0) * (x1 - x0) / (h * w)

