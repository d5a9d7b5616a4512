"""Optimizers: Ranger (Lookahead + RAdam + Gradient Centralization) and GCRAdam as one fused step for a
whole model, a Lookahead wrapper for any optimizer, and BFloat16Weights, bfloat16 weight copies for CPU
autocast that the fused step writes."""

from fer_kernels.optim.bfloat16_weights import BFloat16Weights
from fer_kernels.optim.lookahead import Lookahead
from fer_kernels.optim.ranger import GCRAdam, Ranger

__all__ = ["BFloat16Weights", "GCRAdam", "Lookahead", "Ranger"]
