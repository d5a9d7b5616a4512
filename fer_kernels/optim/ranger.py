"""Ranger = Lookahead + RAdam, with Gradient Centralization (docs/method.md section 3), as one fused step.

The step of a whole model is one kernel launch per bucket of parameters that share a group, a dtype, a
device and a step count (usually one bucket per group and dtype): fer_kernels.ops.optim.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from fer_kernels._dispatch import Inputs, requested
from fer_kernels.ops._layout import is_dense, like
from fer_kernels.ops.optim import OPTIM, RangerBucket, plan_rows, step_scalars
from fer_kernels.optim._state import load_state_keeping_dtypes, state_like

__all__ = ["GCRAdam", "Ranger"]

STATE_TENSORS = ("exp_avg", "exp_avg_sq", "slow_buffer")
# The keyword names of the public Ranger / RAdam implementations people migrate from, and ours.
_MIGRATED_NAMES = {"use_gc": "gc", "N_sma_threshhold": "rectifier_threshold", "N_sma_threshold": "rectifier_threshold"}


def _migrated(name: str, options: dict, given: dict) -> dict:
    """`given` ({our name: value}) updated from `options` spelled as the public implementations spell them."""
    for key, value in options.items():
        ours = _MIGRATED_NAMES.get(key)
        if ours is None:
            raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")
        given[ours] = value
    return given


def _centralized(param: torch.Tensor, group: dict) -> bool:
    return bool(group["gc"]) and param.dim() > (3 if group["gc_conv_only"] else 1)


def _check_group(name: str, group: dict, index: int) -> None:
    where = f"{name}: param group {index}"
    lr, (beta1, beta2), eps = float(group["lr"]), group["betas"], group["eps"]
    checks = [(lr >= 0, f"lr must be >= 0, got {lr}"), (0 <= beta1 < 1, f"betas[0] must be in [0, 1), got {beta1}"),
              (0 <= beta2 < 1, f"betas[1] must be in [0, 1), got {beta2}"), (eps >= 0, f"eps must be >= 0, got {eps}"),
              (group["weight_decay"] >= 0, f"weight_decay must be >= 0, got {group['weight_decay']}"),
              (isinstance(group["k"], int) and group["k"] >= 0, f"k must be an int >= 1, got {group['k']!r}"),
              (0 < group["alpha"] <= 1, f"alpha must be in (0, 1], got {group['alpha']}"),
              (group.get("rectifier_threshold", 5.0) >= 4, "rectifier_threshold must be >= 4 (below 4 rho_t has no "
                                                            f"rectifier), got {group.get('rectifier_threshold')}")]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{where}: {message}")


class _FusedRanger(Optimizer):
    """What GCRAdam and Ranger share: state, buckets, plans and the step (k = 0: no Lookahead)."""

    _name = ""

    def __init__(self, params, defaults: dict, backend: str | None):
        self.backend = requested("optim", backend) if backend else None
        self._plans: dict[tuple, torch.Tensor] = {}
        self._copies: dict[torch.Tensor, torch.Tensor] = {}
        super().__init__(params, {**defaults, "betas": tuple(defaults["betas"])})

    def keep_copies(self, copies: dict) -> None:
        """Takes {float32 parameter: its bfloat16 copy} (fer_kernels.optim.BFloat16Weights): from now on the
        gradient of such a parameter is its copy's, and each step writes the updated parameter, rounded, into
        the copy. The parameter stays the master: state, Lookahead and state_dict are as without copies."""
        for param, copy in copies.items():
            if not (param.dtype == torch.float32 and copy.dtype == torch.bfloat16 and copy.shape == param.shape
                    and copy.stride() == param.stride() and copy.device == param.device):
                raise ValueError(f"{self._name}.keep_copies: a copy must be bfloat16 with the shape, strides and "
                                 f"device of its float32 parameter; got {copy.dtype} {tuple(copy.shape)} "
                                 f"{copy.stride()} for {param.dtype} {tuple(param.shape)} {param.stride()}")
        self._copies = dict(copies)
        self._plans.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for copy in self._copies.values():
            if copy.grad is not None:
                copy.grad = None if set_to_none else copy.grad.zero_()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            _check_group(self._name, self.param_groups[-1], len(self.param_groups) - 1)
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_param(self, param: torch.Tensor, grad: torch.Tensor, index: int) -> None:
        where = f"{self._name}: a parameter of shape {tuple(param.shape)} in param group {index}"
        if grad.is_sparse:
            raise RuntimeError(f"{where} has a sparse gradient, which {self._name} does not support")
        if param.is_complex():
            raise RuntimeError(f"{where} is complex, which {self._name} does not support")
        if not param.is_floating_point():
            raise RuntimeError(f"{where} is {param.dtype}, not floating point")
        rows_outermost = param.dim() < 2 or param.numel() == 0 or param.stride(0) == param.numel() // param.shape[0]
        if not (is_dense(param) and rows_outermost):
            raise RuntimeError(f"{where} has strides {param.stride()}: the fused step needs each parameter dense "
                               "with dim 0 outermost (call .contiguous() on it, or use backend='reference')")

    def _buckets(self) -> list[RangerBucket]:
        found: dict[tuple, list] = {}
        for index, group in enumerate(self.param_groups):
            for param in group["params"]:
                copy = self._copies.get(param)
                grad = param.grad if copy is None else copy.grad
                if grad is None:
                    continue
                self._check_param(param, grad, index)
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = state_like(param)
                    state["exp_avg_sq"] = state_like(param)
                if group["k"] and "slow_buffer" not in state:
                    state["slow_buffer"] = state_like(param, param.detach())  # before its first update
                key = (index, param.device, param.dtype, state["step"], copy is not None)
                found.setdefault(key, []).append((param, grad, copy))
        buckets = []
        for (index, device, _, step, with_copies), members in found.items():
            params, grads, copies = (list(column) for column in zip(*members))
            group = self.param_groups[index]
            centralize = [_centralized(p, group) for p in params]
            key = (tuple(id(p) for p in params), tuple(centralize), device)
            if key not in self._plans:
                self._plans[key] = plan_rows(params, centralize, device)
            scalars = step_scalars(group, step + 1)
            states = [self.state[p] for p in params]
            hyper = {k: group[k] for k in ("betas", "eps", "weight_decay", "decoupled_weight_decay", "gc",
                                            "gc_conv_only", "k", "alpha")}
            hyper["rectifier_threshold"] = group.get("rectifier_threshold", 5.0)  # absent in older state dicts
            buckets.append(RangerBucket(
                params=params, states=states,
                grads=[like(g, p if c is None else c) for g, p, c in zip(grads, params, copies)],
                slows=[s["slow_buffer"] for s in states] if scalars["sync"] else [], plan=self._plans[key],
                scalars=scalars, hyper={**hyper, "lr": float(group["lr"])}, step=step + 1,
                copies=copies if with_copies else []))
        return buckets

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns closure()'s loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for bucket in self._buckets():
            param = bucket.params[0]
            OPTIM("step", self.backend, Inputs(param.device, param.dtype), bucket)
            for state in bucket.states:
                state["step"] = bucket.step
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim.Optimizer's, but float32 state stays float32 for half-precision parameters (and
        moves to each parameter's device and layout)."""
        load_state_keeping_dtypes(self, state_dict, STATE_TENSORS, super().load_state_dict)
        self._plans.clear()


class GCRAdam(_FusedRanger):
    """RAdam with Gradient Centralization as one fused step for the whole model (Ranger adds Lookahead).

    Args:
        params: parameters or param groups (a group may set any argument below but backend).
        lr, betas, eps: RAdam's; eps is added outside the square root. The first steps, while
            rho_t < rectifier_threshold (5: the first 5 at beta2 = 0.999), take un-adapted momentum,
            ``p -= lr * m_hat``; then the rectified step.
        weight_decay: 0 (default) for none; L2 (added to the gradient before centralization), or
            decoupled (AdamW's ``p *= 1 - lr * weight_decay``) with ``decoupled_weight_decay=True``.
        gc: Gradient Centralization of every gradient of more than one dimension (conv kernels, linear
            weights); ``gc_conv_only=True`` limits it to those of more than three (conv kernels).
        backend: None / "auto", "cuda", "triton", "cpu" or "reference" (fer_kernels.backends()).
        use_gc, N_sma_threshhold: the public Ranger's names for gc and rectifier_threshold, accepted with the
            same meaning.

    float16 / bfloat16 parameters keep float32 state; parameters without a gradient are skipped (their
    step count does not advance); sparse and complex gradients are an error. With torch.amp.GradScaler,
    the scaler unscales the gradients and skips the step when one is not finite, as for any optimizer.
    """

    _name = "GCRAdam"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, decoupled_weight_decay: bool = False, gc: bool = True,
                 gc_conv_only: bool = False, rectifier_threshold: float = 5.0, backend: str | None = None,
                 **migrated):
        super().__init__(params, _migrated("GCRAdam", migrated, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
            gc=gc, gc_conv_only=gc_conv_only, rectifier_threshold=rectifier_threshold, k=0, alpha=0.5)), backend)


class Ranger(_FusedRanger):
    """Ranger: Lookahead around RAdam with Gradient Centralization (docs/method.md section 3), one fused step.

    The defaults are the paper's best (Table 3): lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay,
    Lookahead every k = 6 steps with alpha = 0.5, centralization of every gradient of more than one
    dimension. Every k updates of a parameter its slow copy (float32 state, starting as the parameter)
    moves alpha of the way to it and the parameter is reset to the slow copy; a parameter skipped for
    lack of a gradient keeps its own count. Other arguments as GCRAdam.

    Coming from the public Ranger (lessw2020/Ranger-Deep-Learning-Optimizer): its keywords use_gc and
    N_sma_threshhold are accepted, but its defaults differ from these: betas (0.95, 0.999) and eps 1e-5 there,
    (0.9, 0.999) and 1e-8 here (the paper's); and it adds eps to sqrt(v) before v's bias correction, here
    after (as RAdam). GC is on in both, for every gradient of more than one dimension.
    """

    _name = "Ranger"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, k: int = 6, alpha: float = 0.5, gc: bool = True, *,
                 gc_conv_only: bool = False, decoupled_weight_decay: bool = False, rectifier_threshold: float = 5.0,
                 backend: str | None = None, **migrated):
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"Ranger: k must be an int >= 1, got {k!r}")
        super().__init__(params, _migrated("Ranger", migrated, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
            gc=gc, gc_conv_only=gc_conv_only, rectifier_threshold=rectifier_threshold, k=k, alpha=alpha)), backend)
