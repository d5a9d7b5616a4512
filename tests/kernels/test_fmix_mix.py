"""fer_kernels.fmix_mix, FMix's mix (docs/method.md section 5): the Triton kernel and the C++ twin against the
reference in every dtype and layout, empty and odd batches, auto's choice and the gradient, argument errors."""

import pytest
import torch

import fer_kernels
from fer_kernels import reference
from fer_kernels import fmix_mix
from helpers import TRITON_DEVICE, assert_accurate, generator, random_batch


def _mask(shape, per_sample, binary, device, seed=1):
    n, _, h, w = shape
    size = (n, h, w) if per_sample else (h, w)
    m = torch.rand(size, generator=generator(seed), dtype=torch.float64)
    return (m < 0.5).float().to(device) if binary else m.float().to(device)


# ----------------------------------------------------------------------------------------------------- mix

# odd sizes, N = 1, C = 1; tiles over several samples, H * W and C cut into several tiles
SHAPES = [(3, 5, 7, 9), (1, 3, 5, 4), (4, 1, 3, 3), (5, 19, 2, 3), (2, 3, 37, 29), (2, 300, 3, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.uint8], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_fused_mix_matches_reference(backend, shape, per_sample, channels_last, dtype):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x = random_batch(shape, dtype, device, channels_last)
    perm = torch.randperm(shape[0], generator=generator(2)).to(device)
    mask = _mask(shape, per_sample, True, device)
    out = fmix_mix(x, mask, perm, backend=backend)
    # a binary mask selects: every element is an exact copy of x's or its partner's
    assert torch.equal(out, reference.fmix_mix(x, mask, perm))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.dtype == x.dtype and out.is_contiguous(memory_format=fmt)

    soft = _mask(shape, per_sample, False, device)
    out = fmix_mix(x, soft, perm, backend=backend)
    if dtype == torch.uint8:  # float32 math rounded half up, as the reference; one unit of slack for FMA
        assert (out.int() - reference.fmix_mix(x, soft, perm).int()).abs().max() <= 1
    else:
        assert_accurate(out, reference.fmix_mix(x.double(), soft.double(), perm),
                        reference.fmix_mix(x, soft, perm), f"soft mask {dtype}")


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("backend", ["triton", "cpu", "reference", None], ids=str)
def test_mix_empty_batch_and_single_sample(backend, per_sample):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    for shape in [(0, 3, 5, 4), (2, 0, 5, 4)]:
        x = torch.randn(shape, device=device)
        out = fmix_mix(x, _mask(shape, per_sample, True, device), torch.randperm(shape[0], device=device),
                       backend=backend)
        assert out.shape == x.shape
    x = torch.randn(1, 3, 5, 4, device=device)
    out = fmix_mix(x, _mask(x.shape, per_sample, True, device), torch.zeros(1, dtype=torch.int64, device=device),
                   backend=backend)
    assert torch.equal(out, x)  # the only partner of a batch of one is itself


def test_mix_inputs_of_any_layout():
    x = torch.randn(3, 4, 10, 7, device=TRITON_DEVICE)[:, :, ::2]  # not dense
    mask = _mask((3, 4, 5, 7), True, False, TRITON_DEVICE)
    perm = torch.tensor([2, 0, 1], device=TRITON_DEVICE)
    bool_mask = mask > 0.5
    assert torch.equal(fmix_mix(x, mask, perm, backend="triton"), reference.fmix_mix(x, mask, perm))
    assert torch.equal(fmix_mix(x, bool_mask, perm.int(), backend="triton"), reference.fmix_mix(x, bool_mask, perm))
    x, mask, perm, bool_mask = x.cpu(), mask.cpu(), perm.cpu(), bool_mask.cpu()
    # a soft mask: the C++ twin may fuse a multiply-add, so within an ulp of the reference's float32 steps
    torch.testing.assert_close(fmix_mix(x, mask, perm, backend="cpu"), reference.fmix_mix(x, mask, perm),
                               rtol=2e-7, atol=2e-7)
    assert torch.equal(fmix_mix(x, bool_mask, perm.int(), backend="cpu"), reference.fmix_mix(x, bool_mask, perm))


def test_mix_auto_backend_and_gradient():
    x = torch.randn(3, 2, 4, 5, requires_grad=True)
    mask = _mask(x.shape, False, True, "cpu")
    perm = torch.tensor([1, 2, 0])
    assert fer_kernels.backends()["fmix_mix"]["cpu"] == "cpu"  # auto's first choice on the CPU: the C++ twin
    out = fmix_mix(x, mask, perm)  # auto: the reference for inputs that require grad
    out.sum().backward()
    # each element of x is read once where the mask is 1 and once, by its partner, where it is 0
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(fer_kernels.BackendUnavailableError, match="requires grad"):
        fmix_mix(x.to(TRITON_DEVICE), mask.to(TRITON_DEVICE), perm.to(TRITON_DEVICE), backend="triton")
    with pytest.raises(fer_kernels.BackendUnavailableError, match="requires grad"):
        fmix_mix(x, mask, perm, backend="cpu")
    assert torch.equal(fmix_mix(x.detach(), mask, perm), out)  # auto: the C++ twin


def test_mix_errors_name_the_argument():
    x = torch.randn(3, 2, 4, 5)
    mask = torch.ones(4, 5)
    perm = torch.tensor([1, 2, 0])
    with pytest.raises(ValueError, match="x must be N x C x H x W"):
        fmix_mix(x[0], mask, perm)
    with pytest.raises(TypeError, match="x must be float16"):
        fmix_mix(x.int(), mask, perm)
    with pytest.raises(ValueError, match="mask must be H x W"):
        fmix_mix(x, torch.ones(5, 4), perm)
    with pytest.raises(ValueError, match="mask must be H x W"):
        fmix_mix(x, torch.ones(2, 4, 5), perm)
    with pytest.raises(TypeError, match="mask must be a floating-point or bool"):
        fmix_mix(x, mask.long(), perm)
    with pytest.raises(ValueError, match="perm must be 3 int64 indices"):
        fmix_mix(x, mask, perm[:2])
    with pytest.raises(ValueError, match="perm must be 3 int64 indices"):
        fmix_mix(x, mask, perm.float())
    with pytest.raises(ValueError, match=r"perm must hold indices in \[0, 3\)"):
        fmix_mix(x, mask, torch.tensor([0, 1, 3]))
    with pytest.raises(fer_kernels.BackendUnavailableError, match="fmix_mix has no 'cuda' implementation"):
        fmix_mix(x, mask, perm, backend="cuda")
