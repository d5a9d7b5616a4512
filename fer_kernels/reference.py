"""Plain-PyTorch reference of every op: the specification that each fast path is tested against.

Each op computes in the dtype it is given, op by op, as eager PyTorch would. The tests run it in float64
for the "true" value and in the low-precision dtype for the error that plain PyTorch itself makes; the
"reference" backend (fer_kernels/_backends.py) runs it in float32 for half-precision inputs. The
optimizer step (ranger_step) always computes in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "centralize_gradient", "mish", "mish_backward", "radam_rectifier", "ranger_step",
           "recalibrate", "recalibrate_backward"]

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


# ---------------------------------------------------------------------------------------------- optimizer

def centralize_gradient(grad: torch.Tensor, conv_only: bool = False) -> torch.Tensor:
    """Gradient Centralization (Yong et al. 2020): subtract the mean over all dims but dim 0 from a gradient
    of more than one dimension (more than three with conv_only); other gradients are returned as they are."""
    if grad.dim() <= (3 if conv_only else 1):
        return grad
    return grad - grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True)


def radam_rectifier(step: int, beta2: float) -> float | None:
    """RAdam's variance rectifier r_t at step t (counted from 1), or None while rho_t < 5, the steps that
    take un-adapted momentum (SPEC section 3)."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    beta2_t = beta2 ** step
    rho_t = rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t)
    if rho_t < 5.0:
        return None
    return math.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))


def ranger_step(param: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, betas: tuple[float, float],
                eps: float, weight_decay: float, decoupled_weight_decay: bool, gc: bool, gc_conv_only: bool,
                k: int, alpha: float) -> None:
    """One Ranger update of one parameter, in place, computed in float64 (SPEC section 3).

    state holds "step" (updates so far), "exp_avg", "exp_avg_sq" and, with Lookahead (k > 0),
    "slow_buffer"; missing entries start as 0 / a copy of the parameter. The state tensors keep their
    dtype; the parameter is rounded to its own dtype once, at the end.
    """
    beta1, beta2 = betas
    p = param.detach().double()
    g = grad.detach().double()
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
        if k:
            state["slow_buffer"] = p.clone()
    if weight_decay and not decoupled_weight_decay:
        g = g + weight_decay * p
    if gc:
        g = centralize_gradient(g, conv_only=gc_conv_only)
    step = state["step"] + 1
    m = beta1 * state["exp_avg"].double() + (1 - beta1) * g
    v = beta2 * state["exp_avg_sq"].double() + (1 - beta2) * g * g
    if weight_decay and decoupled_weight_decay:
        p = p * (1 - lr * weight_decay)
    m_hat = m / (1 - beta1 ** step)
    rectifier = radam_rectifier(step, beta2)
    if rectifier is None:
        p = p - lr * m_hat
    else:
        v_hat = v / (1 - beta2 ** step)
        p = p - lr * rectifier * m_hat / (v_hat.sqrt() + eps)
    if k and step % k == 0:
        slow = state["slow_buffer"].double()
        slow = slow + alpha * (p - slow)
        state["slow_buffer"].copy_(slow)
        p = slow
    state["step"] = step
    state["exp_avg"].copy_(m)
    state["exp_avg_sq"].copy_(v)
    param.detach().copy_(p)
