"""Plain-PyTorch reference of every op: the specification that each fast path is tested against.

Each function computes in the dtype it is given, op by op, as eager PyTorch would. The tests run it in
float64 for the "true" value and in the low-precision dtype for the error that plain PyTorch itself
makes; the "reference" backend (fer_kernels/_backends.py) runs it in float32 for half-precision inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "mish", "mish_backward", "recalibrate", "recalibrate_backward"]

ACTIVATIONS = ("mish", "relu", "none")


def mish(x: torch.Tensor) -> torch.Tensor:
    """mish(x) = x * tanh(softplus(x))  (Misra 2019)."""
    return x * torch.tanh(F.softplus(x))


def mish_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d mish / dx = tanh(sp) + x * sigmoid(x) * (1 - tanh(sp)^2), sp = softplus(x)."""
    tsp = torch.tanh(F.softplus(x))
    return grad * (tsp + x * torch.sigmoid(x) * (1 - tsp * tsp))


def _activation(z: torch.Tensor, act: str) -> torch.Tensor:
    if act == "mish":
        return mish(z)
    if act == "relu":
        return torch.relu(z)
    if act == "none":
        return z
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def _activation_backward(grad: torch.Tensor, z: torch.Tensor, act: str) -> torch.Tensor:
    if act == "mish":
        return mish_backward(grad, z)
    if act == "relu":
        # as torch's threshold_backward: the gradient passes where z > 0, and where z is NaN
        return torch.where(z <= 0, torch.zeros_like(grad), grad)
    if act == "none":
        return grad
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def _broadcast_gate(gate: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | float:
    if gate is None:
        return 1.0
    return gate.reshape(x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))


def recalibrate(x: torch.Tensor, gate: torch.Tensor | None, identity: torch.Tensor, act: str = "mish") -> torch.Tensor:
    """The Accuracy-Booster block tail: act(x * gate[n, c] + identity); gate None means 1."""
    return _activation(x * _broadcast_gate(gate, x) + identity, act)


def recalibrate_backward(grad: torch.Tensor, x: torch.Tensor, gate: torch.Tensor | None, identity: torch.Tensor,
                         act: str = "mish") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Returns (dx, dgate, didentity); dgate has gate's shape (None without a gate)."""
    g = _broadcast_gate(gate, x)
    dz = _activation_backward(grad, x * g + identity, act)
    dgate = None
    if gate is not None:
        prod = dz * x
        # sum over the spatial dims (an empty dim list would sum over everything, so N x C is kept as is)
        dgate = prod.sum(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else prod
        dgate = dgate.reshape(gate.shape).to(gate.dtype)
    return dz * g, dgate, dz
