"""Layers: the fused Mish, the Accuracy Booster gate, the fused block tail, and model conversion."""

from fer_kernels.nn.convert import replace_activations
from fer_kernels.nn.layers import AccuracyBooster, Mish, Recalibrate

__all__ = ["AccuracyBooster", "Mish", "Recalibrate", "replace_activations"]
