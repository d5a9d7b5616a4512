"""Lookahead (Zhang et al. 2019) around any torch.optim optimizer."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from fer_kernels.optim._state import load_state_keeping_dtypes, state_like

__all__ = ["Lookahead"]


class Lookahead(Optimizer):
    """Every k updates of a parameter by `optimizer`, its slow copy moves alpha of the way to it, and the
    parameter is reset to the slow copy: ``slow += alpha * (fast - slow); fast = slow``.

    A parameter counts as updated in a step when it has a gradient (what torch.optim optimizers update),
    so one skipped for lack of a gradient keeps its own phase. Slow copies start as the parameters before
    their first update and are float32 for float16/bfloat16 parameters. param_groups are the wrapped
    optimizer's own (LR schedulers and GradScaler see through the wrapper); state_dict holds both states.
    For GC-RAdam, fer_kernels.optim.Ranger does the same inside the fused step.
    """

    def __init__(self, optimizer: Optimizer, k: int = 6, alpha: float = 0.5):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"Lookahead: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"Lookahead: k must be an int >= 1, got {k!r}")
        if not 0 < alpha <= 1:
            raise ValueError(f"Lookahead: alpha must be in (0, 1], got {alpha}")
        self.optimizer, self.k, self.alpha = optimizer, k, alpha
        # Optimizer.__init__ sets up the hooks and state of this object; the groups it builds from the
        # wrapped optimizer's are then replaced by those very groups, so that both share them.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups is getattr(getattr(self, "optimizer", None), "param_groups", None):
            self.optimizer.add_param_group(param_group)  # shared list: the group appears here too
        else:
            super().add_param_group(param_group)  # only while __init__ runs

    @torch.no_grad()
    def step(self, closure=None):
        updated = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        for p in updated:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["slow_buffer"] = state_like(p, p)  # before the first update
        loss = self.optimizer.step(closure)
        syncing = []
        for p in updated:
            state = self.state[p]
            state["step"] += 1
            if state["step"] % self.k == 0:
                syncing.append(p)
        self._sync(syncing)
        return loss

    def _sync(self, params: list[torch.Tensor]) -> None:
        grouped: dict[tuple, tuple[list, list]] = {}
        for p in params:
            slows, fasts = grouped.setdefault((p.device, p.dtype), ([], []))
            slows.append(self.state[p]["slow_buffer"])
            fasts.append(p)
        for slows, fasts in grouped.values():
            fast_math = fasts if fasts[0].dtype == slows[0].dtype else [f.to(slows[0].dtype) for f in fasts]
            torch._foreach_lerp_(slows, fast_math, self.alpha)
            torch._foreach_copy_(fasts, slows)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "lookahead": super().state_dict(),
                "k": self.k, "alpha": self.alpha}

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict["optimizer"])
        load_state_keeping_dtypes(self, state_dict["lookahead"], ("slow_buffer",), super().load_state_dict)
        self.param_groups = self.optimizer.param_groups  # Optimizer.load_state_dict built new group dicts
        self.k, self.alpha = state_dict["k"], state_dict["alpha"]

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, optimizer={self.optimizer!r})"
