"""The fused Ranger step in Triton: one launch per bucket of parameters (csrc/optim.h has the same math).

Program s takes plan row s (one row of a centralized gradient, or a chunk of a plain one) and finds its
tensors in address tables, so the whole model is one launch however many parameters it has.
"""

import torch
import triton
import triton.language as tl

# 1024 elements per loop iteration, 4 warps: 8 per thread. Not tuned yet;
# benchmarks/bench_optim.py measures it.
BLOCK = 1024
NUM_WARPS = 4

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float64: tl.float64}


# The order of the step's scalars in the tensor the kernel reads them from (in the state dtype: Triton
# would pass Python floats as float32, too coarse for float64 parameters).
SCALARS = ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps", "l2", "decay", "step_size",
           "inv_sqrt_bc2", "alpha")


@triton.jit
def _ranger_kernel(table_ptr, tensors, plan_ptr, scalars_ptr, PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
                   HAS_L2: tl.constexpr, RECTIFIED: tl.constexpr, SYNC: tl.constexpr, BLOCK: tl.constexpr):
    beta1 = tl.load(scalars_ptr)
    beta2 = tl.load(scalars_ptr + 1)
    one_minus_beta1 = tl.load(scalars_ptr + 2)  # computed in double: 1 - float(0.999) is off by 1.3e-5
    one_minus_beta2 = tl.load(scalars_ptr + 3)
    eps = tl.load(scalars_ptr + 4)
    l2 = tl.load(scalars_ptr + 5)
    decay = tl.load(scalars_ptr + 6)
    step_size = tl.load(scalars_ptr + 7)
    inv_sqrt_bc2 = tl.load(scalars_ptr + 8)
    alpha = tl.load(scalars_ptr + 9)
    row = plan_ptr + tl.program_id(0).to(tl.int64) * 4
    t = tl.load(row)
    start = tl.load(row + 1)
    n = tl.load(row + 2)
    centralize = tl.load(row + 3)
    p_ptr = tl.load(table_ptr + t).to(tl.pointer_type(PARAM_DTYPE)) + start
    g_ptr = tl.load(table_ptr + tensors + t).to(tl.pointer_type(PARAM_DTYPE)) + start
    m_ptr = tl.load(table_ptr + 2 * tensors + t).to(tl.pointer_type(STATE_DTYPE)) + start
    v_ptr = tl.load(table_ptr + 3 * tensors + t).to(tl.pointer_type(STATE_DTYPE)) + start
    s_ptr = tl.load(table_ptr + 4 * tensors + t).to(tl.pointer_type(STATE_DTYPE)) + start
    offs = tl.arange(0, BLOCK)

    # Gradient Centralization: the row's mean of g + l2 * p, summed in float64. The loop runs only for a
    # centralized row (centralize is 0 or 1), so a plain chunk gets a mean of 0 without a branch.
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for lo in range(0, n * centralize, BLOCK):
        mask = lo + offs < n
        g = tl.load(g_ptr + lo + offs, mask=mask, other=0.0).to(STATE_DTYPE)
        if HAS_L2:  # p is read only with L2 decay
            g = g + l2 * tl.load(p_ptr + lo + offs, mask=mask, other=0.0).to(STATE_DTYPE)
        acc += g.to(tl.float64)
    mean = (tl.sum(acc, axis=0) / n).to(STATE_DTYPE)

    for lo in range(0, n, BLOCK):
        mask = lo + offs < n
        p = tl.load(p_ptr + lo + offs, mask=mask).to(STATE_DTYPE)
        g = tl.load(g_ptr + lo + offs, mask=mask).to(STATE_DTYPE)
        m = tl.load(m_ptr + lo + offs, mask=mask)
        v = tl.load(v_ptr + lo + offs, mask=mask)
        g = g + l2 * p - mean
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * v + one_minus_beta2 * g * g
        p = p * decay
        if RECTIFIED:
            p = p - step_size * m / (tl.sqrt(v) * inv_sqrt_bc2 + eps)
        else:
            p = p - step_size * m
        if SYNC:
            slow = tl.load(s_ptr + lo + offs, mask=mask)
            slow = slow + alpha * (p - slow)
            tl.store(s_ptr + lo + offs, slow, mask=mask)
            p = slow
        tl.store(p_ptr + lo + offs, p.to(PARAM_DTYPE), mask=mask)
        tl.store(m_ptr + lo + offs, m, mask=mask)
        tl.store(v_ptr + lo + offs, v, mask=mask)


def _table(lists, device):
    """Addresses of every tensor of every role, one row per role (0 where a role is absent)."""
    rows = [[t.data_ptr() for t in tensors] if tensors else [0] * len(lists[0]) for tensors in lists]
    return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)


def ranger_step_triton(params, grads, exp_avgs, exp_avg_sqs, slows, plan, scalars):
    """One step for one bucket (same device, parameter dtype, group and step count); see csrc/ops.h."""
    if plan.shape[0] == 0:
        return
    sync = bool(scalars["sync"])
    table = _table([params, grads, exp_avgs, exp_avg_sqs, slows if sync else []], params[0].device)
    state_dtype = exp_avgs[0].dtype
    values = torch.tensor([scalars[k] for k in SCALARS], dtype=state_dtype).to(params[0].device, non_blocking=True)
    _ranger_kernel[(plan.shape[0],)](table, len(params), plan, values, PARAM_DTYPE=_TL_DTYPES[params[0].dtype],
                                     STATE_DTYPE=_TL_DTYPES[state_dtype], HAS_L2=scalars["l2"] != 0,
                                     RECTIFIED=bool(scalars["rectified"]),
                                     SYNC=sync, BLOCK=BLOCK, num_warps=NUM_WARPS)
