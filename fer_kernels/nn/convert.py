"""Turn an existing model's activations into the fused Mish, in place."""

from __future__ import annotations

import warnings

from torch import nn

from fer_kernels.nn.layers import Mish

__all__ = ["replace_activations"]


def replace_activations(model: nn.Module, activations: tuple[type[nn.Module], ...] = (nn.ReLU, nn.Mish),
                        backend: str | None = None) -> nn.Module:
    """Replace, in place, every submodule that is an instance of one of ``activations`` by
    :class:`fer_kernels.nn.Mish` and return the model.

    ReLU becomes Mish (the paper's change of activation); nn.Mish becomes the fused Mish with the same
    values. Activations called as functions inside ``forward`` (``F.relu(x)``) are not modules and stay as
    they are. A module object shared by several parents (torchvision's BasicBlock uses one ReLU twice)
    is replaced everywhere by one shared Mish.
    """
    if isinstance(model, activations):
        raise ValueError("replace_activations: the model itself is an activation; use fer_kernels.nn.Mish() instead")
    replacements = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, activations):
                if id(child) not in replacements:
                    replacements[id(child)] = Mish(backend=backend)
                setattr(parent, name, replacements[id(child)])
    if not replacements:
        names = ", ".join(a.__name__ for a in activations)
        warnings.warn(f"replace_activations: the model has no {names} module to replace", stacklevel=2)
    return model
