"""Turn an existing model's activations into the fused Mish, in place."""

from __future__ import annotations

import logging
import warnings
from collections import Counter

from torch import nn

from fer_kernels.nn.layers import Mish

__all__ = ["replace_activations"]

log = logging.getLogger(__name__)


def replace_activations(model: nn.Module, activations: tuple[type[nn.Module], ...] = (nn.ReLU, nn.Mish),
                        backend: str | None = None) -> nn.Module:
    """Replace, in place, every submodule that is an instance of one of ``activations`` by
    :class:`fer_kernels.nn.Mish` and return the model.

    ReLU becomes Mish (the paper's change of activation); nn.Mish becomes the fused Mish with the same
    values. Activations called as functions inside ``forward`` (``F.relu(x)``) are not modules and stay as
    they are. A module object shared by several parents (torchvision's BasicBlock uses one ReLU twice)
    is replaced everywhere by one shared Mish. What was replaced (places per class) is logged at INFO level on
    the "fer_kernels.nn.convert" logger; a model with none of ``activations`` gets a warning.
    """
    if isinstance(model, activations):
        raise ValueError("replace_activations: the model itself is an activation; use fer_kernels.nn.Mish() instead")
    replacements, counts = {}, Counter()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, activations):
                if id(child) not in replacements:
                    replacements[id(child)] = Mish(backend=backend)
                counts[type(child).__name__] += 1
                setattr(parent, name, replacements[id(child)])
    if not replacements:
        names = ", ".join(a.__name__ for a in activations)
        warnings.warn(f"replace_activations: the model has no {names} module to replace; it is unchanged",
                      stacklevel=2)
    else:
        log.info("replace_activations: %s replaced by the fused Mish",
                 ", ".join(f"{n} {c} place{'s' if c > 1 else ''}" for c, n in sorted(
                     ((c, n) for n, c in counts.items()), reverse=True)))
    return model
