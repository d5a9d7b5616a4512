"""fer_kernels.augment, the fused augmentation pass: the Triton kernel (under the interpreter here) and the C++
CPU twin against the float64 specification for arbitrary geometry and colour, the reference path, the colour
steps against torchvision's functions, and the argument errors."""

import pytest
import torch
import torchvision.transforms.v2.functional as TF

import fer_kernels
from fer_kernels import reference
from helpers import TRITON_DEVICE, augment_sources

MEAN = torch.tensor(reference.IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(reference.IMAGENET_STD)[:, None, None]


def _random_geometry(images, size, seed=0):
    """Per image a matrix that scales the image onto the output, rotates, shears and maybe flips it, and
    reaches past the borders (the mirrored border is read); and random colour factors."""
    g = torch.Generator().manual_seed(seed)
    n = len(images)
    u = torch.rand(n, 6, generator=g, dtype=torch.float64)
    angle, shear = (u[:, 0] - 0.5) * 0.6, (u[:, 1] - 0.5) * 0.6
    flip = torch.where(u[:, 2] < 0.5, -1.0, 1.0)
    scale = torch.tensor([min(im.shape[1:]) / size for im in images], dtype=torch.float64) * (0.8 + 0.5 * u[:, 3])
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
    lin = torch.stack([torch.stack([cos * flip, cos * tan - sin], -1), torch.stack([sin * flip, sin * tan + cos], -1)], -2)
    lin = lin * scale[:, None, None]
    shift = torch.stack([u[:, 4] * 10 - 5, u[:, 5] * 10 - 5], -1)
    matrices = torch.cat([lin, shift[..., None]], -1).float()
    colour = torch.stack([0.75 + 0.5 * torch.rand(n, generator=g), 0.75 + 0.5 * torch.rand(n, generator=g),
                          0.95 + 0.1 * torch.rand(n, generator=g), 0.1 * torch.rand(n, generator=g) - 0.05], 1)
    return matrices, colour


def _identity(n):
    """A matrix that copies a source and neutral colour factors."""
    return (torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]).expand(n, 2, 3).clone(),
            torch.tensor([[1.0, 1.0, 1.0, 0.0]]).expand(n, 4).clone())


# float32 source positions of up to 500 pixels are off by up to ~3e-5 pixel, which on noise of 255 levels
# per pixel moves a normalised value by up to ~1.5e-4; bfloat16 adds one rounding of values up to ~2.7.
@pytest.mark.parametrize("out_dtype,channels_last,tol", [(torch.float32, False, 5e-4), (torch.float32, True, 5e-4),
                                                         (torch.bfloat16, False, 0.05)], ids=["fp32", "nhwc", "bf16"])
def test_triton_matches_reference(out_dtype, channels_last, tol):
    images = augment_sources(TRITON_DEVICE)
    matrices, colour = _random_geometry(images, 40)
    out = fer_kernels.augment(images, matrices, colour, 40, out_dtype=out_dtype, channels_last=channels_last,
                              backend="triton")
    assert out.shape == (len(images), 3, 40, 40) and out.dtype == out_dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    want = torch.stack([reference.augment(im.cpu(), matrices[i], colour[i], 40) for i, im in enumerate(images)])
    torch.testing.assert_close(out.cpu().double(), want, rtol=0, atol=tol)


# The twin computes source positions in float64: float32 output is off by its own rounding and float32
# colour math (~1e-6 of values up to ~2.7), float64 output by nothing visible; half precision by a rounding.
@pytest.mark.parametrize("out_dtype,channels_last,tol", [
    (torch.float64, False, 1e-9), (torch.float32, False, 1e-5), (torch.float32, True, 1e-5),
    (torch.bfloat16, True, 0.02), (torch.float16, False, 3e-3)], ids=["fp64", "fp32", "nhwc", "bf16", "fp16"])
def test_cpu_twin_matches_reference(out_dtype, channels_last, tol):
    images = augment_sources(seed=3)
    matrices, colour = _random_geometry(images, 37, seed=4)
    out = fer_kernels.augment(images, matrices, colour, 37, out_dtype=out_dtype, channels_last=channels_last,
                              backend="cpu")
    assert out.shape == (len(images), 3, 37, 37) and out.dtype == out_dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    want = torch.stack([reference.augment(im, matrices[i], colour[i], 37) for i, im in enumerate(images)])
    torch.testing.assert_close(out.double(), want, rtol=0, atol=tol)


def test_cpu_twin_is_what_auto_takes_on_the_cpu():
    images = augment_sources(seed=5)
    matrices, colour = _random_geometry(images, 16, seed=6)
    torch.testing.assert_close(fer_kernels.augment(images, matrices, colour, 16),
                               fer_kernels.augment(images, matrices, colour, 16, backend="cpu"), rtol=0, atol=0)


def test_cpu_twin_writes_any_output_strides_and_survives_broken_matrices():
    """The extension's entry point directly: an output with transposed rows and columns gets the same
    values; a matrix of NaN and inf reads inside the image (finite output) instead of outside it."""
    images = augment_sources(seed=7)
    matrices, colour = _random_geometry(images, 20, seed=8)
    mean, std = list(reference.IMAGENET_MEAN), list(reference.IMAGENET_STD)
    want = fer_kernels.augment(images, matrices, colour, 20, backend="cpu")
    out = torch.full((len(images), 3, 20, 20), float("nan")).transpose(2, 3)
    fer_kernels._C.augment_cpu(images, matrices, colour, out, mean, std)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    broken = matrices.clone()
    broken[0, 0, 0], broken[1, 1, 2], broken[2, 0, 2] = float("nan"), float("inf"), -float("inf")
    out = fer_kernels.augment(images, broken, colour, 20, backend="cpu")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[3:], want[3:], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"augment_cpu: images\[0\] must be a non-empty uint8"):
        fer_kernels._C.augment_cpu([images[0].float()], matrices[:1], colour[:1], out[:1], mean, std)
    with pytest.raises(RuntimeError, match="augment_cpu: matrices must be a contiguous float32"):
        fer_kernels._C.augment_cpu(images[:1], matrices[:1].double(), colour[:1], out[:1], mean, std)


def test_reference_path_is_the_specification_in_float32():
    images = augment_sources()
    matrices, colour = _random_geometry(images, 24, seed=1)
    out = fer_kernels.augment(images, matrices, colour, 24, backend="reference")
    want = torch.stack([reference.augment(im, matrices[i], colour[i], 24) for i, im in enumerate(images)])
    torch.testing.assert_close(out.double(), want, rtol=0, atol=5e-4)  # float32 positions, as above
    for backend in ("cpu", "reference"):
        assert fer_kernels.augment([], torch.zeros(0, 2, 3), torch.zeros(0, 4), 24, backend=backend).shape == \
            (0, 3, 24, 24)


@pytest.mark.parametrize("channels", [1, 3])
def test_reference_makes_its_tensors_on_the_images_device(channels):
    """The reference runs on CUDA tensors too (backend "reference", and the first-use check of the fast
    kernels): every tensor it makes must be on the image's device. The meta device checks that without a GPU:
    a tensor made on the CPU and mixed with meta ones raises as it would with CUDA ones."""
    image = torch.empty(channels, 30, 40, dtype=torch.uint8, device="meta")
    matrix = torch.empty(2, 3, dtype=torch.float64, device="meta")
    out = reference.augment(image, matrix, [1.1, 0.9, 1.2, 0.05], 24)
    assert out.device.type == "meta" and out.shape == (3, 24, 24) and out.dtype == torch.float64


def test_a_grey_image_is_replicated():
    grey = torch.randint(0, 256, (1, 30, 30), dtype=torch.uint8)
    out = fer_kernels.augment([grey], *_identity(1), 30)[0] * STD + MEAN
    torch.testing.assert_close(out, (grey / 255).expand(3, -1, -1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("factor", [0.75, 1.25])
def test_colour_steps_follow_torchvision(factor):
    """With identity geometry, each colour step equals torchvision's function of the same name."""
    g = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8, generator=g)
    x = image / 255
    steps = {0: TF.adjust_brightness(x, factor), 1: TF.adjust_contrast(x, factor), 2: TF.adjust_saturation(x, factor),
             3: TF.adjust_hue(x, (factor - 1) / 5)}
    for column, expected in steps.items():
        matrices, colour = _identity(1)
        colour[0, column] = factor if column < 3 else (factor - 1) / 5
        out = fer_kernels.augment([image], matrices, colour, 20)[0] * STD + MEAN
        torch.testing.assert_close(out, expected, rtol=0, atol=2e-5, msg=f"colour step {column}")


def test_errors():
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"2 images need matrices of shape \(2, 2, 3\)"):
        fer_kernels.augment([image, image], *_identity(1), 8)
    with pytest.raises(ValueError, match=r"images\[0\] must be uint8"):
        fer_kernels.augment([image.float()], *_identity(1), 8, backend="triton")
    with pytest.raises(fer_kernels.BackendUnavailableError, match="augment has no 'cuda' implementation"):
        fer_kernels.augment([image], *_identity(1), 8, backend="cuda")
