"""Optimizers: Ranger (Lookahead + RAdam + Gradient Centralization) and GCRAdam as one fused step for a
whole model, and a Lookahead wrapper for any optimizer."""

from fer_kernels.optim.lookahead import Lookahead
from fer_kernels.optim.ranger import GCRAdam, Ranger

__all__ = ["GCRAdam", "Lookahead", "Ranger"]
