"""Optimizer state that stays in float32 for float16/bfloat16 parameters (float64 for float64 ones)."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from fer_kernels._accuracy import math_dtype


def state_like(param: torch.Tensor, value: torch.Tensor | None = None) -> torch.Tensor:
    """A state tensor for `param`: its shape and strides (the kernels walk both as one flat buffer), the
    state dtype, zeros or a copy of `value`."""
    out = torch.empty_like(param, dtype=math_dtype(param.dtype), memory_format=torch.preserve_format)
    return out.zero_() if value is None else out.copy_(value)


def load_state_keeping_dtypes(optimizer: Optimizer, state_dict: dict, keys: tuple[str, ...], load) -> None:
    """Runs `load(state_dict)` (an Optimizer.load_state_dict) without letting it cast the float32 state in
    `keys` to each parameter's dtype, as torch.optim.Optimizer does: those tensors are set aside and put
    back, on the parameter's device, in its layout and in the state dtype."""
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(saved_ids) != len(params):
        raise ValueError(f"{type(optimizer).__name__}.load_state_dict: the state holds {len(saved_ids)} parameters, "
                         f"this optimizer {len(params)}")
    kept = {i: {k: v for k, v in s.items() if k in keys} for i, s in state_dict["state"].items()}
    rest = {i: {k: v for k, v in s.items() if k not in keys} for i, s in state_dict["state"].items()}
    load({**state_dict, "state": rest})
    for saved_id, param in zip(saved_ids, params):
        for key, value in kept.get(saved_id, {}).items():
            optimizer.state[param][key] = state_like(param, value)
