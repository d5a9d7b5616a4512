"""Test setup: which backends run on which device here, and the accuracy rule every fast path meets.

Without a GPU, the Triton kernels run on CPU tensors in Triton's interpreter; TRITON_INTERPRET must be
set before triton is imported, so it is set here, before anything imports fer_kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("FER_KERNELS_BACKEND", None)  # tests choose backends explicitly

import pytest  # noqa: E402

import fer_kernels  # noqa: E402,F401

HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

# (backend, device) pairs that must match the reference. The reference backend is in the list too: it
# is what machines without the extension run.
BACKEND_DEVICES = [("cpu", "cpu"), ("triton", TRITON_DEVICE), ("reference", "cpu")]
if HAS_CUDA:
    BACKEND_DEVICES += [("cuda", "cuda"), ("reference", "cuda")]
FAST_BACKEND_DEVICES = [bd for bd in BACKEND_DEVICES if bd[0] != "reference"]


def ids(pairs):
    return [f"{b}-{d}" for b, d in pairs]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


# Tolerance floors per dtype: below these, differences are rounding noise of the storage format.
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_accurate(ours, ref64, plain, name="", dtype=None):
    """The flash-attention rule: the kernel's max error against the float64 reference is at most twice
    the error that plain PyTorch makes in the same dtype, plus one rounding of the storage dtype
    (eps * |value|) and a small absolute floor, so a single lucky element of plain PyTorch cannot make the
    bound zero. (Triton's CPU interpreter rounds float32 -> bfloat16 by truncation, up to one ulp; GPUs
    round to nearest.)

    ours: the kernel's result; ref64: the reference in float64; plain: the reference run in ours' dtype.
    dtype: the precision the result was computed from, when it differs from its storage (a float64 gate
    gradient of bfloat16 activations). NaN and inf must sit where the reference has them.
    """
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    ours64, plain64 = ours.double(), plain.double()
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isnan(ours64), torch.isnan(ref64)), f"{name}: NaN positions differ"
    assert torch.equal(ours64[~finite & ~torch.isnan(ref64)], ref64[~finite & ~torch.isnan(ref64)]), \
        f"{name}: infinities differ"
    if finite.any():
        both = finite & torch.isfinite(plain64)
        plain_err = (plain64[both] - ref64[both]).abs().max().item() if both.any() else 0.0
        dtype = dtype or ours.dtype
        eps = torch.finfo(dtype).eps
        excess = (ours64[finite] - ref64[finite]).abs() - eps * ref64[finite].abs()
        worst = excess.max().item()
        bound = 2 * plain_err + ATOL[dtype]
        assert worst <= bound, (f"{name}: max error beyond one rounding {worst:.3g} > 2 x plain PyTorch's error "
                                f"{plain_err:.3g} + {ATOL[dtype]:g}")
