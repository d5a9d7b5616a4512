"""The ops, each registered once with the backends that serve it (fer_kernels/_dispatch.py): the fused Mish and
block tail (torch.library custom ops with autograd and fake kernels), the optimizer step, the augmentation
pass and FMix's mix; and two CPU kernels, batch norm fused with the activation (batch_norm_act.py) and max
pooling with one-byte indices (max_pool.py). Eager calls of the differentiable ones take an autograd Function over
the same pieces (_eager.py)."""

from fer_kernels.ops.augment import augment
from fer_kernels.ops.fmix_mix import fmix_mix
from fer_kernels.ops.mish import mish
from fer_kernels.ops.recalibrate import recalibrate
from fer_kernels.ops import optim as _optim  # noqa: F401  (registers the optimizer step)

__all__ = ["augment", "fmix_mix", "mish", "recalibrate"]
