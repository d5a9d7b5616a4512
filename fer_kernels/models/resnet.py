"""ResNet-18 / ResNet-50 with Mish and the Accuracy Booster (docs/method.md section 2), in torchvision's layout.

Every block ends in ``act(bn(conv(...)) * gate + identity)``: with ``fused=True`` that tail is one
kernel (fer_kernels.recalibrate), every other ``act(bn(...))`` is fer_kernels.nn.batch_norm_act (one fused
op when training on the CPU), the stem's pooling is fer_kernels.nn.MaxPool2d and Mish elsewhere the fused
Mish; with ``fused=False`` the same model is built from plain PyTorch ops. State-dict keys equal
torchvision's for every layer torchvision has (``conv1``, ``layer1.0.bn2``, ``layer2.0.downsample.0``,
``fc``, ...); the gate adds ``layerX.Y.booster.conv.weight`` and ``layerX.Y.booster.bn.*``. So torchvision
weights load, and a fused and an unfused model share one state dict.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

from fer_kernels.nn.conv import Conv2d
from fer_kernels.nn.layers import AccuracyBooster, MaxPool2d, Mish, Recalibrate, batch_norm_act
from fer_kernels.reference import ACTIVATIONS

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "STEMS", "resnet18", "resnet50", "load_torchvision_weights"]

BOOSTERS = (None, "depthwise", "plus")


def _activation(act: str, fused: bool, backend: str | None) -> nn.Module:
    if act == "mish":
        return Mish(backend=backend) if fused else nn.Mish()
    return nn.ReLU(inplace=True)  # a single PyTorch kernel already; nothing to fuse


def _bn_act(owner: nn.Module, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """act(bn(x)) for a block or the stem: fused when the model is, else the plain modules."""
    if owner.fused:
        return batch_norm_act(bn, x, owner.act_name, owner.backend)
    return owner.act(bn(x))


def _conv3x3(cin, cout, stride=1):
    return Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin, cout, stride=1):
    return Conv2d(cin, cout, 1, stride=stride, bias=False)


class _Block(nn.Module):
    """What both block types share: the gate, the downsample branch and the (fused or plain) tail."""

    def _init_tail(self, out_channels, downsample, act, booster, fused, backend):
        self.downsample = downsample
        self.booster = AccuracyBooster(out_channels, booster) if booster else None
        self.act_name = act
        self.fused = fused
        self.backend = backend
        self.tail = Recalibrate(act, backend=backend) if fused else None

    def _finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        gate = self.booster(out) if self.booster is not None else None
        if self.fused:
            return self.tail(out, gate, identity)
        if gate is not None:
            out = out * gate
        return self.act(out + identity)


class BasicBlock(_Block):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, act="mish", booster=None, fused=True,
                 backend=None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act = _activation(act, fused, backend)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self._init_tail(planes, downsample, act, booster, fused, backend)

    def forward(self, x):
        out = _bn_act(self, self.bn1, self.conv1(x))
        return self._finish(self.bn2(self.conv2(out)), x)


class Bottleneck(_Block):
    """torchvision's "v1.5" bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, act="mish", booster=None, fused=True,
                 backend=None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.act = _activation(act, fused, backend)
        self._init_tail(planes * self.expansion, downsample, act, booster, fused, backend)

    def forward(self, x):
        out = _bn_act(self, self.bn1, self.conv1(x))
        out = _bn_act(self, self.bn2, self.conv2(out))
        return self._finish(self.bn3(self.conv3(out)), x)


STEMS = ("imagenet", "cifar")


class ResNet(nn.Module):
    """stem: "imagenet" (the paper's: 7x7/2 conv, BN, act, 3x3/2 max-pool; 224 px inputs reach stage 4 at
    7 x 7) or "cifar" (3x3/1 conv, BN, act, no pool: for small inputs, where the ImageNet stem would leave
    a 48 px face 2 x 2 at stage 4; 16 times the stages' work at the same input size)."""

    def __init__(self, block, layers, num_classes=8, act="mish", booster="plus", fused=True, backend=None,
                 stem="imagenet"):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"ResNet: stem must be one of {STEMS}, got {stem!r}")
        if act not in ("mish", "relu"):
            raise ValueError(f"ResNet: act must be 'mish' or 'relu', got {act!r}")
        booster = None if booster in (None, "none") else booster
        if booster not in BOOSTERS:
            raise ValueError(f"ResNet: booster must be None, 'depthwise' or 'plus', got {booster!r}")
        if num_classes < 1:
            raise ValueError(f"ResNet: num_classes must be >= 1, got {num_classes}")
        self.act_name, self.booster, self.fused, self.stem, self.backend = act, booster, fused, stem, backend
        options = dict(act=act, booster=booster, fused=fused, backend=backend)
        self.inplanes = 64
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = (MaxPool2d if fused else nn.MaxPool2d)(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self.act = _activation(act, fused, backend)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, options)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, options)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, options)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, options)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes, blocks, stride, options):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, **options)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **options) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(_bn_act(self, self.bn1, self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def load_torchvision_weights(model: ResNet, weights) -> list[str]:
    """Load a torchvision ResNet state dict (a mapping, a file path, or a torchvision ``Weights`` enum,
    which downloads) into ``model``. The classifier is skipped when its shape differs (8 classes here,
    1000 for ImageNet); the gate's parameters, which torchvision lacks, keep their initial values.
    Returns the keys of ``model`` that were not loaded. Any other mismatch is an error."""
    if isinstance(weights, (str, os.PathLike)):
        state = torch.load(weights, map_location="cpu", weights_only=True)
    elif isinstance(weights, Mapping):
        state = weights
    elif hasattr(weights, "get_state_dict"):
        state = weights.get_state_dict(progress=True)
    else:
        raise TypeError(f"load_torchvision_weights: weights must be a state dict, a path or a torchvision Weights "
                        f"enum, got {type(weights).__name__}")
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith("fc.") and k in own and v.shape != own[k].shape)}
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    lacking = [k for k in own if k not in state and ".booster." not in k and not k.startswith("fc.")]
    for problem, keys in (("have keys this model lacks", unexpected), ("have other shapes", mismatched),
                          ("lack keys", lacking)):
        if keys:
            raise ValueError(f"load_torchvision_weights: the weights {problem}: {', '.join(keys[:4])}"
                             f"{' ...' if len(keys) > 4 else ''} (a resnet18 model needs resnet18 weights, a "
                             "resnet50 model resnet50 weights)")
    result = model.load_state_dict(state, strict=False)
    return list(result.missing_keys)


def _build(block, layers, num_classes, act, booster, fused, backend, weights, stem):
    if weights is not None and stem != "imagenet":
        raise ValueError(f"torchvision weights have the ImageNet stem; stem={stem!r} has another first convolution")
    model = ResNet(block, layers, num_classes=num_classes, act=act, booster=booster, fused=fused, backend=backend,
                   stem=stem)
    if weights is not None:
        load_torchvision_weights(model, weights)
    return model


def resnet18(*, num_classes: int = 8, act: str = "mish", booster: str | None = "plus", fused: bool = True,
             backend: str | None = None, weights=None, stem: str = "imagenet") -> ResNet:
    """ResNet-18 (basic blocks [2, 2, 2, 2]); defaults are the paper's ResNet-18 + Mish + ABP with 8 classes.

    act: "mish" or "relu"; booster: None, "depthwise" (AB) or "plus" (ABP); fused: the fused kernels or
    plain PyTorch ops (same parameters, same outputs); backend: forwarded to the fused ops; weights:
    torchvision ResNet-18 weights to start from (see load_torchvision_weights); stem: "imagenet" (the
    paper's) or "cifar" (for small inputs, see ResNet)."""
    return _build(BasicBlock, [2, 2, 2, 2], num_classes, act, booster, fused, backend, weights, stem)


def resnet50(*, num_classes: int = 8, act: str = "mish", booster: str | None = "plus", fused: bool = True,
             backend: str | None = None, weights=None, stem: str = "imagenet") -> ResNet:
    """ResNet-50 (bottlenecks [3, 4, 6, 3], stride on the 3x3 conv); arguments as resnet18."""
    return _build(Bottleneck, [3, 4, 6, 3], num_classes, act, booster, fused, backend, weights, stem)
