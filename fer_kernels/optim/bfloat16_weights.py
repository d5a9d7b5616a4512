"""BFloat16Weights: a model trained under CPU bfloat16 autocast with bfloat16 copies of its convolution and linear
weights, which the fused Ranger / GCRAdam step writes as it updates the float32 weights.

Under ``torch.autocast("cpu", torch.bfloat16)`` every convolution and linear layer rounds its float32 weight to
bfloat16 in the forward pass, and its weight gradient, computed in bfloat16, is widened to float32 for the
optimizer: two copies of every weight at every step, which on a 2-core CPU took about 10 ms of an 85 ms step of
ResNet-18 at 48 x 48, batch 32 (the 512-channel 3x3 weights of stage 4 alone 9 ms). Here the model runs with the
copies in place of those weights (each layer's parameter slot holds its copy for the call, as
torch.func.functional_call would, at 10 us a call for ResNet-18 instead of its 0.4 ms): the passes see the same
bfloat16 weights and give the same bfloat16 gradients as under autocast; the optimizer reads the copies'
gradients, widens them exactly, updates the float32 weights (still the model's parameters, its state_dict, what
an EMA averages) and writes each one rounded into its copy in the same pass (csrc/cpu/optim.cpp). Training is
the same bit for bit.

A copy whose weight changed other than by the optimizer's step (load_state_dict, an edit by hand) is rounded
again before the next forward pass: the weight's version counter moved.
"""

from __future__ import annotations

import torch
from torch import nn

from fer_kernels.optim.ranger import _FusedRanger

__all__ = ["BFloat16Weights"]


class BFloat16Weights(nn.Module):
    """Wraps ``model`` for training steps under CPU bfloat16 autocast with ``optimizer`` (a fer_kernels Ranger or
    GCRAdam over the model's parameters): every float32 weight of an ``nn.Conv2d`` or ``nn.Linear`` that requires
    grad gets a bfloat16 copy, used by the forward and backward passes and written by ``optimizer.step()``.

    Call it like the model, inside ``torch.autocast("cpu", dtype=torch.bfloat16)``; evaluate and save the model
    itself (``.module``). Gradients of the copied weights are on the copies, not on ``param.grad``; the
    optimizer's ``zero_grad`` clears both. One process, one backward pass per step: bfloat16 gradients summed
    over micro-batches would round where autocast's float32 sums do not, and DDP reduces ``param.grad``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        super().__init__()
        if not isinstance(optimizer, _FusedRanger):
            raise TypeError(f"BFloat16Weights: the optimizer must be a fer_kernels Ranger or GCRAdam, which writes "
                            f"the copies; got {type(optimizer).__name__}")
        self.module = model
        self._weights = {f"{name}.weight" if name else "weight": layer.weight for name, layer in model.named_modules()
                         if isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.weight.dtype == torch.float32
                         and layer.weight.requires_grad}
        self._copies = {name: w.detach().to(torch.bfloat16).requires_grad_() for name, w in self._weights.items()}
        # (layer, parameter name, copy): the slots that hold the copies during a call
        self._slots = [(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], copy)
                       for name, copy in self._copies.items()]
        self._versions = {name: w._version for name, w in self._weights.items()}
        optimizer.keep_copies({w: self._copies[name] for name, w in self._weights.items()})

    def copies(self) -> dict[str, torch.Tensor]:
        """{parameter name: its bfloat16 copy}."""
        return dict(self._copies)

    @torch.no_grad()
    def _round_changed(self) -> None:
        for name, weight in self._weights.items():
            if weight._version != self._versions[name]:
                self._copies[name].copy_(weight)
                self._versions[name] = weight._version

    def forward(self, *args, **kwargs):
        if not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
            raise RuntimeError("BFloat16Weights: call it inside torch.autocast('cpu', dtype=torch.bfloat16), where "
                               "the passes compute in bfloat16; evaluate the model itself (.module) elsewhere")
        self._round_changed()
        weights = [layer._parameters[attr] for layer, attr, _ in self._slots]
        try:
            for layer, attr, copy in self._slots:
                layer._parameters[attr] = copy
            return self.module(*args, **kwargs)
        finally:
            for (layer, attr, _), weight in zip(self._slots, weights):
                layer._parameters[attr] = weight
