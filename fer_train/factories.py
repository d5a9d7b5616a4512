"""The model, the optimizer, what the training steps call and the autocast dtype a run's settings describe."""

from __future__ import annotations

import itertools

import torch

from fer_train.config import ModelConfig, OptimConfig, TrainConfig
from fer_train.host import native_bfloat16

__all__ = ["amp_dtype", "build_ema", "build_model", "build_net", "build_optimizer"]


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


def build_net(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig, device: torch.device,
              amp: torch.dtype | None, world: int, accumulation: int) -> torch.nn.Module:
    """What the training steps call: the model under DDP across processes; on the CPU under bf16 autocast in one
    process, one pass per step, with the fused optimizer and train.bf16_weights, the model with bfloat16 weight
    copies (fer_kernels.optim.BFloat16Weights: the same steps, the whole engine 1.08x as fast at 48 px and 1.05x
    at 224 px on 2 cores, benchmarks/results/cpu-bf16-weight-copies/); else the model itself. Compiled with
    train.compile."""
    from fer_kernels.optim import BFloat16Weights, GCRAdam, Ranger

    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True)  # gradients are views of the buckets: no copy into them each step
    elif (train.bf16_weights and device.type == "cpu" and amp == torch.bfloat16 and accumulation == 1
          and not train.compile and isinstance(optimizer, (Ranger, GCRAdam))):
        net = BFloat16Weights(model, optimizer)
    else:
        net = model
    return torch.compile(net) if train.compile else net


class _WeightAverage(torch.optim.swa_utils.AveragedModel):
    """AveragedModel (its state dict, module and n_averaged buffer) with an update that never waits for a GPU:
    the count stays on the CPU and the decay is a Python number. AveragedModel's own update copies the count
    to the parameters' device with a blocking copy, which waits for every queued kernel, at every step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__(model, use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        n = int(self.n_averaged)  # a CPU tensor: no wait
        pairs = list(zip(itertools.chain(self.module.parameters(), self.module.buffers()),
                         itertools.chain(model.parameters(), model.buffers()), strict=True))
        if n == 0:  # the first update copies, as AveragedModel's
            floats, copied = [], pairs
        else:  # counters such as batch norm's num_batches_tracked take the current value
            floats = [(a, c) for a, c in pairs if a.is_floating_point()]
            copied = [(a, c) for a, c in pairs if not a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c.detach() for _, c in floats],
                                 1.0 - min(self.decay, (1.0 + n) / (10.0 + n)))
        for a, c in copied:
            a.copy_(c)
        self.n_averaged += 1


def build_ema(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of the model's weights and buffers (batch-norm statistics too). Its decay
    rises from about 0.1 at the start to `decay` ((1 + n) / (10 + n) after n updates, as timm's), so that a
    short run's average is not dominated by the random initial weights."""
    return _WeightAverage(model, decay)
