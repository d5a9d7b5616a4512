"""The model, the optimizer and the autocast dtype a run's settings describe."""

from __future__ import annotations

import torch

from fer_train.config import ModelConfig, OptimConfig
from fer_train.host import native_bfloat16

__all__ = ["amp_dtype", "build_ema", "build_model", "build_optimizer"]


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of train.amp; auto: bf16 on GPUs that have it, fp16 on older ones; on CPUs bf16
    where the CPU computes it natively (fer_train.host.native_bfloat16), else float32 (emulated bfloat16
    is slower than float32)."""
    if mode == "auto":
        if device.type != "cuda":
            return torch.bfloat16 if native_bfloat16() else None
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
    return builder(num_classes=8, act=config.act, booster=config.booster, fused=config.fused, weights=weights,
                   stem=config.stem)


def build_optimizer(model: torch.nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    from fer_kernels.optim import GCRAdam, Ranger

    params = [p for p in model.parameters() if p.requires_grad]
    if config.weight_decay:
        # Decay convolution and linear weights only: biases and batch-norm scales set no capacity, and decaying
        # them only pulls the activations' scale towards zero. (Without decay one group, as checkpoints hold.)
        params = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    common = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay,
                  decoupled_weight_decay=config.decoupled_weight_decay, gc=config.gc)
    if config.name == "radam":
        return GCRAdam(params, **common)
    return Ranger(params, k=config.k, alpha=config.alpha, **common)


def build_ema(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of the model's weights and buffers (batch-norm statistics too). Its decay
    rises from about 0.1 at the start to `decay` ((1 + n) / (10 + n) after n updates, as timm's), so that a
    short run's average is not dominated by the random initial weights."""
    average = None

    def ema_update(averaged: list, current: list, num_averaged) -> None:
        # the count from the average's own buffer, kept on the CPU: num_averaged is its copy on the parameters'
        # device, and int() of that would make the host wait for a GPU at every step
        n = int(average.n_averaged)
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - min(decay, (1.0 + n) / (10.0 + n)))
        for a, c in zip(averaged, current):
            if not a.is_floating_point():  # counters such as batch norm's num_batches_tracked: the current value
                a.copy_(c)

    average = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)
    return average
