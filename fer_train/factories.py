"""The model, the optimizer and the autocast dtype a run's settings describe."""

from __future__ import annotations

import torch

from fer_train.config import ModelConfig, OptimConfig

__all__ = ["amp_dtype", "build_model", "build_optimizer"]


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of train.amp; auto: bf16 on GPUs that have it, fp16 on older ones, none on CPUs
    (CPU autocast is slower than float32 for these convolutions)."""
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[mode]


def build_model(config: ModelConfig, pretrained: bool = True) -> torch.nn.Module:
    from fer_kernels.models import resnet18, resnet50

    weights = None
    if pretrained and config.pretrained == "imagenet":
        import torchvision.models as tvm
        weights = (tvm.ResNet18_Weights if config.arch == "resnet18" else tvm.ResNet50_Weights).IMAGENET1K_V1
    elif pretrained and config.pretrained is not None:
        weights = config.pretrained
    builder = resnet18 if config.arch == "resnet18" else resnet50
    return builder(num_classes=8, act=config.act, booster=config.booster, fused=config.fused, weights=weights)


def build_optimizer(model: torch.nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    from fer_kernels.optim import GCRAdam, Ranger

    params = [p for p in model.parameters() if p.requires_grad]
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    common = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay,
                  gc=config.gc)
    if config.name == "radam":
        return GCRAdam(params, **common)
    return Ranger(params, k=config.k, alpha=config.alpha, **common)
