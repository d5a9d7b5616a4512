"""The paper's models."""

from fer_kernels.models.resnet import (BasicBlock, Bottleneck, ResNet, load_torchvision_weights, resnet18,
                                       resnet50)

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "load_torchvision_weights", "resnet18", "resnet50"]
