"""Training-mode batch norm followed by Mish: the fused CPU op against PyTorch eager, F.mish(F.batch_norm(x)) as
the unfused model runs it, and torch.compile of that; forward, backward and both, NCHW and channels-last, on the
shapes where ResNet-50 at 224 x 224 runs BatchNorm + Mish (common.MISH_SHAPES; batch 8 on the CPU at 2 threads).
The fused op is a CPU kernel only; on cuda this times eager and compile.

    python benchmarks/bench_batch_norm_act.py [--device cpu|cuda] [--quick] [--dtypes float32,bfloat16]

Writes benchmarks/results/<device>-batch_norm_act.json (see common.py for what each figure means).
"""

import torch
import torch.nn.functional as F

from fer_kernels import reference
from fer_kernels.ops.batch_norm_act import batch_norm_act

import common

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
EPS = 1e-5

byte_floor = common.mish_bytes  # (shape, dtype, pass) -> int: Mish's, see the notes in main


def make_inputs(shape, dtype, layout, device):
    """(x, weight, bias) and a fixed grad; weight and bias float32, as a model's under autocast."""
    x = torch.randn(shape, device=device).mul(2).add(0.5).to(dtype).contiguous(memory_format=LAYOUTS[layout])
    weight = torch.rand(shape[1], device=device).add(0.5)
    bias = torch.randn(shape[1], device=device)
    grad = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=LAYOUTS[layout])
    return (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()), grad


def eager(x, weight, bias):
    return F.mish(F.batch_norm(x, None, None, weight, bias, training=True, eps=EPS))


def reference_forward(x, weight, bias):
    return reference.batch_norm_act(x, weight, bias, EPS, "mish")[0]


def reference_backward(grad, x, weight, bias):
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    return torch.autograd.grad(reference_forward(*leaves), leaves, grad)


def make_variants(device_type):
    variants = {}
    if device_type == "cpu":
        variants["fused-cpu"] = common.Variant(lambda x, weight, bias: batch_norm_act(x, weight, bias, EPS, "mish")[0])
    return {**variants, **common.eager_and_compiled(eager)}


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    common.benchmark_op(
        "batch_norm_act", args, common.QUICK_MISH_SHAPES if args.quick else common.MISH_SHAPES, tuple(LAYOUTS),
        make_inputs, make_variants, reference_forward, reference_backward, byte_floor,
        notes=["byte floor per element as Mish's: fwd 2, bwd 3, fwd+bwd 5 elements of the dtype (the per-channel "
               "parameters and statistics are not counted); the fused op reads x twice forward and dz and x twice "
               "backward",
               "eager is F.mish(F.batch_norm(x, training=True)), the unfused model's BatchNorm + Mish; the fused "
               "model's path before this op was the same with the fused Mish",
               "every variant's backward is autograd over a retained graph"])


if __name__ == "__main__":
    main()
