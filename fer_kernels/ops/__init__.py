"""The fused ops, registered as torch.library custom ops (autograd, fake tensors, torch.compile)."""

from fer_kernels.ops.mish import mish
from fer_kernels.ops.recalibrate import recalibrate

__all__ = ["mish", "recalibrate"]
