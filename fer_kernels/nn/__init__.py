"""Layers: the fused Mish, the Accuracy Booster gate, the fused block tail; batch norm fused with the activation,
max pooling and Conv2d with faster passes on the CPU; and model conversion."""

from fer_kernels.nn.conv import Conv2d
from fer_kernels.nn.convert import replace_activations
from fer_kernels.nn.layers import AccuracyBooster, MaxPool2d, Mish, Recalibrate, batch_norm_act

__all__ = ["AccuracyBooster", "Conv2d", "MaxPool2d", "Mish", "Recalibrate", "batch_norm_act", "replace_activations"]
