"""The optimizers bench_optim.py compares the fused Ranger with, written as their users write them.

- composed: torch.optim.RAdam(foreach=True), Gradient Centralization applied to the gradients in Python
  before each step, and Lookahead (fer_kernels.optim.Lookahead, torch._foreach ops) around it.
- per_parameter: a Python loop over the parameters doing RAdam + GC + Lookahead with a dozen tensor ops
  each, the structure of the public Ranger implementations (lessw2017/Ranger-Deep-Learning-Optimizer).
"""

import math

import torch

from fer_kernels.optim import Lookahead
from fer_kernels.reference import radam_rectifier


def _centralized(params):
    return [p for p in params if p.dim() > 1]


def composed(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, k=6, alpha=0.5):
    """Returns step() of RAdam(foreach) + GC + Lookahead composed from torch.optim pieces."""
    params = list(params)
    optimizer = Lookahead(torch.optim.RAdam(params, lr=lr, betas=betas, eps=eps, foreach=True), k=k, alpha=alpha)
    centralized = _centralized(params)

    @torch.no_grad()
    def step():
        for p in centralized:
            p.grad.sub_(p.grad.mean(dim=tuple(range(1, p.dim())), keepdim=True))
        optimizer.step()

    return step


class PerParameterRanger(torch.optim.Optimizer):
    """RAdam + Gradient Centralization + Lookahead, one parameter at a time (float32 math)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, k=6, alpha=0.5):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, k=k, alpha=alpha))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                weights = p.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(weights)
                    state["exp_avg_sq"] = torch.zeros_like(weights)
                    state["slow_buffer"] = weights.clone()
                if grad.dim() > 1:
                    grad.add_(-grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True))
                state["step"] += 1
                step = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                rectifier = radam_rectifier(step, beta2)
                if rectifier is not None:  # the public code folds v's bias correction into the step size
                    rect = rectifier * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
                    denom = exp_avg_sq.sqrt().add_(group["eps"])
                    weights.addcdiv_(exp_avg, denom, value=-rect * group["lr"])
                else:
                    weights.add_(exp_avg, alpha=-group["lr"] / (1 - beta1 ** step))
                p.copy_(weights)
                if step % group["k"] == 0:
                    slow = state["slow_buffer"]
                    slow.add_(p - slow, alpha=group["alpha"])
                    p.copy_(slow)
