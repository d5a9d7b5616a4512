"""The Accuracy-Booster block tail mish(x * gate + identity): the fused op (each backend of the device)
against PyTorch eager, F.mish(x * gate + identity) as the unfused model runs it, and torch.compile of that;
forward, backward and both, NCHW and channels-last, on the bottleneck outputs of ResNet-50 at 224 x 224
(common.TAIL_SHAPES; batch 256 on cuda, 8 on cpu at 2 threads).

    python benchmarks/bench_recalibrate.py [--device cpu|cuda] [--quick] [--dtypes float32,bfloat16]

Writes benchmarks/results/<device>-recalibrate.json (see common.py for what each figure means).
"""

import torch
import torch.nn.functional as F

import fer_kernels
from fer_kernels import reference

import common
from bench_mish import FUSED_BACKENDS

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}

byte_floor = common.tail_bytes  # bytes the op must move: (shape, dtype, pass) -> int


def make_inputs(shape, dtype, layout, device):
    """(x, gate, identity) and a fixed grad; gate is N x C x 1 x 1 in (0, 1) like a sigmoid gate, in x's dtype
    as under autocast."""
    def activation():
        return torch.randn(shape, device=device).to(dtype).contiguous(memory_format=LAYOUTS[layout])
    gate = torch.sigmoid(torch.randn(shape[0], shape[1], 1, 1, device=device)).to(dtype)
    return (activation().requires_grad_(), gate.requires_grad_(), activation().requires_grad_()), activation()


def eager(x, gate, identity):
    return F.mish(x * gate + identity)


def make_variants(device_type):
    variants = {f"fused-{b}": common.Variant(
        lambda x, gate, identity, b=b: fer_kernels.recalibrate(x, gate, identity, "mish", backend=b),
        lambda g, x, gate, identity, b=b: torch.ops.fer_kernels.recalibrate_backward(g, x, gate, identity, "mish", b))
        for b in FUSED_BACKENDS[device_type]}
    return {**variants, **common.eager_and_compiled(eager)}


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    common.benchmark_op(
        "recalibrate", args, common.QUICK_TAIL_SHAPES if args.quick else common.TAIL_SHAPES, tuple(LAYOUTS),
        make_inputs, make_variants, reference.recalibrate, reference.recalibrate_backward, byte_floor,
        notes=["block-tail byte floor per element: fwd 3, bwd 5, fwd+bwd 8 elements of the dtype (fp32: 12, 20, "
               "32 B), plus the N x C gate: read in fwd, read and its gradient written in bwd",
               "eager is F.mish(x * gate + identity), the tail of the unfused model (fused=False)"])


if __name__ == "__main__":
    main()
