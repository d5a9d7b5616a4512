"""The fused Ranger / GC-RAdam step as an op of the registry: what one launch is given (a bucket of
parameters with their state and the step's scalars), and the backends that run it.

A bucket holds the parameters of one param group, dtype, device and step count. Every parameter is cut
into plan rows: each row of a centralized gradient (all dims but 0) is one plan row, whose mean the
kernel takes before the update; other parameters are cut into chunks. The kernels (csrc/optim.h,
fer_kernels/triton/optim.py) follow the float64 specification fer_kernels.reference.ranger_step, which the
"reference" backend runs parameter by parameter. The step updates its inputs, so auto neither times nor
checks it by running it twice: the test suite checks every backend against the reference.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from fer_kernels import reference
from fer_kernels._dispatch import Op, extension

__all__ = ["OPTIM", "RangerBucket", "plan_rows", "step_scalars"]

# Elements per plan row of a parameter whose gradient is not centralized: long enough to amortise a
# program, short enough to spread a large bias or embedding over many.
CHUNK = 8192


@dataclass
class RangerBucket:
    """One kernel launch: parameters of one group, dtype, device and step count, with their state."""

    params: list
    grads: list
    states: list
    slows: list
    plan: torch.Tensor
    scalars: dict
    hyper: dict  # the group's hyperparameters, for the reference backend
    step: int  # the step count after this update (t, from 1)
    # bfloat16 copies of float32 params that the passes used (fer_kernels.optim.BFloat16Weights): grads are then
    # the copies' gradients, and the step writes each updated param, rounded, into its copy
    copies: list = field(default_factory=list)
    exp_avgs: list = field(init=False)
    exp_avg_sqs: list = field(init=False)

    def __post_init__(self):
        self.exp_avgs = [s["exp_avg"] for s in self.states]
        self.exp_avg_sqs = [s["exp_avg_sq"] for s in self.states]

    def kernel_args(self):
        return self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.slows, self.plan, self.scalars


def plan_rows(params: list, centralize: list, device: torch.device) -> torch.Tensor:
    """Plan rows (tensor index, start, length, centralize) covering every element of every parameter."""
    rows = []
    for index, (param, central) in enumerate(zip(params, centralize)):
        n = param.numel()
        if n == 0:
            continue
        length = n // param.shape[0] if central else CHUNK
        starts = torch.arange(0, n, length, dtype=torch.int64)
        lengths = (n - starts).clamp(max=length)
        rows.append(torch.stack([torch.full_like(starts, index), starts, lengths, torch.full_like(starts, central)], 1))
    plan = torch.cat(rows) if rows else torch.empty(0, 4, dtype=torch.int64)
    return plan.to(device)


def step_scalars(group: dict, step: int) -> dict:
    """Everything the kernels need that depends only on the hyperparameters and the step count t."""
    lr = float(group["lr"])
    beta1, beta2 = (float(b) for b in group["betas"])
    weight_decay = float(group["weight_decay"])
    decoupled = group["decoupled_weight_decay"]
    rectifier = reference.radam_rectifier(step, beta2, group.get("rectifier_threshold", 5.0))
    k = group["k"]
    return {
        "beta1": beta1, "beta2": beta2, "one_minus_beta1": 1.0 - beta1, "one_minus_beta2": 1.0 - beta2,
        "eps": float(group["eps"]),
        "l2": 0.0 if decoupled else weight_decay,
        "decay": 1.0 - lr * weight_decay if decoupled else 1.0,
        "step_size": lr * (rectifier or 1.0) / (1.0 - beta1 ** step),
        "inv_sqrt_bc2": 1.0 / math.sqrt(1.0 - beta2 ** step),
        "alpha": float(group["alpha"]),
        "rectified": rectifier is not None,
        "sync": bool(k) and step % k == 0,
    }


def _widening_copies(step):
    """`step` for a backend without bfloat16 copies: the update from the gradients widened to float32, then the
    copies rounded from the updated parameters (the CPU kernel does both in its pass)."""
    def run(bucket: RangerBucket) -> None:
        if not bucket.copies:
            return step(bucket)
        step(dataclasses.replace(bucket, grads=[g.to(p.dtype) for g, p in zip(bucket.grads, bucket.params)],
                                 copies=[]))
        for copy, param in zip(bucket.copies, bucket.params):
            copy.copy_(param)
    return run


def _reference_step(bucket: RangerBucket) -> None:
    """The specification, parameter by parameter, from the hyperparameters (not the step's scalars)."""
    for param, grad, state in zip(bucket.params, bucket.grads, bucket.states):
        reference.ranger_step(param, grad, state, **bucket.hyper)


def _extension(name):
    kernel = extension(name)
    return lambda bucket: kernel(*bucket.kernel_args())


def _triton(bucket):
    from fer_kernels.triton.optim import ranger_step_triton
    ranger_step_triton(*bucket.kernel_args())


def _cpu(bucket):
    extension("ranger_step_cpu")(*bucket.kernel_args(), bucket.copies)


OPTIM = Op("optim", mutates=True)
OPTIM.implement("cuda", step=_widening_copies(_extension("ranger_step_cuda")))
OPTIM.implement("triton", step=_widening_copies(_triton))
OPTIM.implement("cpu", step=_cpu)
OPTIM.implement("reference", step=_widening_copies(_reference_step))
