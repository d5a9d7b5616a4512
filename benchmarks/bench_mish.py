"""Mish: the fused op (each backend of the device) against PyTorch eager (F.mish) and torch.compile of it,
forward, backward and both, on the Mish inputs of ResNet-50 at 224 x 224 (common.MISH_SHAPES; batch 256 on
cuda, 8 on cpu at 2 threads).

    python benchmarks/bench_mish.py [--device cpu|cuda] [--quick] [--dtypes float32,bfloat16]

Writes benchmarks/results/<device>-mish.json (see common.py for what each figure means).
"""

import torch
import torch.nn.functional as F

import fer_kernels
from fer_kernels import reference

import common

# The fused backends that serve each device type (Triton's CPU interpreter is not worth timing).
FUSED_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}

byte_floor = common.mish_bytes  # bytes the op must move: (shape, dtype, pass) -> int


def make_inputs(shape, dtype, layout, device):
    """(x,) and a fixed grad; x spans both regimes of softplus. Mish is elementwise, so layout is moot."""
    x = (2 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    return (x,), torch.randn(shape, device=device).to(dtype)


def eager(x):
    # Wrapped in a function of ours: torch.compile of the torch.nn.functional function itself could be
    # skipped by Dynamo and silently run eager.
    return F.mish(x)


def make_variants(device_type):
    variants = {f"fused-{b}": common.Variant(lambda x, b=b: fer_kernels.mish(x, backend=b),
                                             lambda g, x, b=b: torch.ops.fer_kernels.mish_backward(g, x, b))
                for b in FUSED_BACKENDS[device_type]}
    variants["eager"] = common.Variant(eager, torch.ops.aten.mish_backward)
    variants["compile"] = common.Variant(common.compiled(eager))
    return variants


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    common.benchmark_op(
        "mish", args, common.QUICK_MISH_SHAPES if args.quick else common.MISH_SHAPES, ("nchw",), make_inputs,
        make_variants, reference.mish, reference.mish_backward, byte_floor,
        notes=["mish byte floor per element: fwd 2, bwd 3, fwd+bwd 5 elements of the dtype (fp32: 8, 12, 20 B)"])


if __name__ == "__main__":
    main()
