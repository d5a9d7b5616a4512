"""fer-kernels: fused kernels, layers, ResNets and optimizers for facial expression recognition.

    fer_kernels.mish(x)                                  fused Mish (forward and backward)
    fer_kernels.recalibrate(x, gate, identity, act)      fused Accuracy-Booster block tail
    fer_kernels.augment(images, matrices, colour, size)  the augmentation pass: warp, colour, normalise
    fer_kernels.fmix_mix(x, mask, perm)                  FMix's mix
    fer_kernels.nn                                       Mish, AccuracyBooster, Recalibrate, replace_activations
    fer_kernels.models                                   resnet18 / resnet50 (Mish, AB / ABP, fused or not)
    fer_kernels.optim                                    Ranger, GCRAdam (one fused step per model), Lookahead
    fer_kernels.backends()                               which backend serves each op on each device
    fer_kernels.reference                                the plain-PyTorch specification of every op
"""

from fer_kernels._dispatch import BackendUnavailableError, backends
from fer_kernels.ops import augment, fmix_mix, mish, recalibrate
from fer_kernels import reference

__version__ = "0.2.0"
__all__ = ["BackendUnavailableError", "augment", "backends", "fmix_mix", "mish", "recalibrate", "reference", "nn",
           "models", "optim"]


def __getattr__(name):
    # nn, models and optim import torch.nn / torch.optim machinery; load them on first use.
    if name in ("nn", "models", "optim"):
        import importlib
        return importlib.import_module(f"fer_kernels.{name}")
    raise AttributeError(f"module 'fer_kernels' has no attribute {name!r}")
