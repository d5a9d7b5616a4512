"""Layers: the fused Mish, the Accuracy Booster gate, the fused block tail, Conv2d with faster passes for small
maps on the CPU, and model conversion."""

from fer_kernels.nn.conv import Conv2d
from fer_kernels.nn.convert import replace_activations
from fer_kernels.nn.layers import AccuracyBooster, Mish, Recalibrate

__all__ = ["AccuracyBooster", "Conv2d", "Mish", "Recalibrate", "replace_activations"]
