"""The fused augmentation in Triton: geometry, colour and normalisation of a batch in one pass.

Each output pixel is mapped to its source position by the sample's 2 x 3 matrix, the source (any size,
uint8, CHW or HWC, grey or RGB, a face-box view of a larger image) is read through an address table and
sampled bilinearly with mirrored borders, then brightness, contrast, saturation and hue are applied and
the result normalised and stored. A first, small kernel takes each source's mean grey (for contrast).
The specification is fer_kernels.reference.augment; the op and its checks: fer_kernels/ops/augment.py.
"""

import torch
import triton
import triton.language as tl

# 1024 output pixels per program, 4 warps. Not tuned yet;
# benchmarks/bench_pipeline.py measures it.
BLOCK = 1024
NUM_WARPS = 4
META_COLUMNS = 6  # height, width, channel stride, row stride, column stride, channels


@triton.jit
def _source(table_ptr, meta_ptr, n):
    base = tl.load(table_ptr + n).to(tl.pointer_type(tl.uint8))
    meta = meta_ptr + n * 6
    return (base, tl.load(meta), tl.load(meta + 1), tl.load(meta + 2), tl.load(meta + 3), tl.load(meta + 4),
            tl.load(meta + 5))


@triton.jit
def _grey(r, g, b):
    return 0.2989 * r + 0.587 * g + 0.114 * b


@triton.jit
def _grey_mean_kernel(table_ptr, meta_ptr, out_ptr, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    base, h, w, cs, rs, xs, channels = _source(table_ptr, meta_ptr, n)
    gs = tl.where(channels == 1, 0, cs)  # grey sources: every channel reads channel 0
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, h * w, BLOCK):
        p = start + tl.arange(0, BLOCK)
        mask = p < h * w
        offs = (p // w) * rs + (p % w) * xs
        r = tl.load(base + offs, mask=mask, other=0).to(tl.float32)
        g = tl.load(base + offs + gs, mask=mask, other=0).to(tl.float32)
        b = tl.load(base + offs + 2 * gs, mask=mask, other=0).to(tl.float32)
        acc += _grey(r, g, b)
    tl.store(out_ptr + n, tl.sum(acc, axis=0) / (255.0 * h * w))


@triton.jit
def _mirror(x, size):
    """Mirror x (pixel index coordinates) about -0.5 and size - 0.5, then clamp to [0, size - 1]."""
    period = 2.0 * size
    t = x + 0.5
    t = t - tl.floor(t / period) * period
    t = tl.where(t >= size, period - t, t) - 0.5
    return tl.minimum(tl.maximum(t, 0.0), size - 1.0)


@triton.jit
def _bilinear(base, offs00, offs01, offs10, offs11, fx, fy, mask):
    p00 = tl.load(base + offs00, mask=mask, other=0).to(tl.float32)
    p01 = tl.load(base + offs01, mask=mask, other=0).to(tl.float32)
    p10 = tl.load(base + offs10, mask=mask, other=0).to(tl.float32)
    p11 = tl.load(base + offs11, mask=mask, other=0).to(tl.float32)
    top = p00 + fx * (p01 - p00)
    bottom = p10 + fx * (p11 - p10)
    return (top + fy * (bottom - top)) / 255.0


@triton.jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def _shift_hue(r, g, b, shift):
    """HSV hue rotation, as torchvision's adjust_hue (fer_kernels.reference.shift_hue)."""
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    chroma = maxc - minc
    s = tl.where(maxc > 0, chroma / tl.where(maxc > 0, maxc, 1.0), 0.0)
    safe = tl.where(chroma > 0, chroma, 1.0)
    rc = (maxc - r) / safe
    gc = (maxc - g) / safe
    bc = (maxc - b) / safe
    h = tl.where(maxc == r, bc - gc, tl.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = tl.where(chroma > 0, h / 6.0, 0.0) + shift
    h = h - tl.floor(h)
    sector = tl.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = sector - tl.floor(sector / 6.0) * 6.0
    p = maxc * (1.0 - s)
    q = maxc * (1.0 - s * f)
    t = maxc * (1.0 - s * (1.0 - f))
    v = maxc
    r2 = tl.where(sector == 0, v, tl.where(sector == 1, q, tl.where(sector == 2, p, tl.where(
        sector == 3, p, tl.where(sector == 4, t, v)))))
    g2 = tl.where(sector == 0, t, tl.where(sector == 1, v, tl.where(sector == 2, v, tl.where(
        sector == 3, q, tl.where(sector == 4, p, p)))))
    b2 = tl.where(sector == 0, p, tl.where(sector == 1, p, tl.where(sector == 2, t, tl.where(
        sector == 3, v, tl.where(sector == 4, v, q)))))
    return r2, g2, b2


@triton.jit
def _augment_kernel(table_ptr, meta_ptr, matrix_ptr, colour_ptr, grey_ptr, out_ptr, S, so_n, so_c, so_h, so_w,
                    mean0, mean1, mean2, inv_std0, inv_std1, inv_std2, BLOCK: tl.constexpr):
    n = tl.program_id(1)
    base, h, w, cs, rs, xs, channels = _source(table_ptr, meta_ptr, n)
    gs = tl.where(channels == 1, 0, cs)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < S * S
    u = (idx % S).to(tl.float32)
    v = (idx // S).to(tl.float32)
    mat = matrix_ptr + n * 6
    x = tl.load(mat) * u + tl.load(mat + 1) * v + tl.load(mat + 2)
    y = tl.load(mat + 3) * u + tl.load(mat + 4) * v + tl.load(mat + 5)
    x = _mirror(x, w.to(tl.float32))
    y = _mirror(y, h.to(tl.float32))
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    fx = x - x0
    fy = y - y0
    xi0 = x0.to(tl.int64)
    yi0 = y0.to(tl.int64)
    xi1 = tl.minimum(xi0 + 1, w - 1)
    yi1 = tl.minimum(yi0 + 1, h - 1)
    o00 = yi0 * rs + xi0 * xs
    o01 = yi0 * rs + xi1 * xs
    o10 = yi1 * rs + xi0 * xs
    o11 = yi1 * rs + xi1 * xs
    r = _bilinear(base, o00, o01, o10, o11, fx, fy, mask)
    g = _bilinear(base + gs, o00, o01, o10, o11, fx, fy, mask)
    b = _bilinear(base + 2 * gs, o00, o01, o10, o11, fx, fy, mask)

    colour = colour_ptr + n * 4
    brightness = tl.load(colour)
    contrast = tl.load(colour + 1)
    saturation = tl.load(colour + 2)
    hue = tl.load(colour + 3)
    r = _clamp01(r * brightness)
    g = _clamp01(g * brightness)
    b = _clamp01(b * brightness)
    m = _clamp01(tl.load(grey_ptr + n) * brightness)
    r = _clamp01(m + contrast * (r - m))
    g = _clamp01(m + contrast * (g - m))
    b = _clamp01(m + contrast * (b - m))
    grey = _grey(r, g, b)
    r = _clamp01(grey + saturation * (r - grey))
    g = _clamp01(grey + saturation * (g - grey))
    b = _clamp01(grey + saturation * (b - grey))
    r, g, b = _shift_hue(r, g, b, hue)

    out = out_ptr + n.to(tl.int64) * so_n + (idx // S) * so_h + (idx % S) * so_w
    dtype = out_ptr.dtype.element_ty
    tl.store(out, ((_clamp01(r) - mean0) * inv_std0).to(dtype), mask=mask)
    tl.store(out + so_c, ((_clamp01(g) - mean1) * inv_std1).to(dtype), mask=mask)
    tl.store(out + 2 * so_c, ((_clamp01(b) - mean2) * inv_std2).to(dtype), mask=mask)


def source_tables(images, device):
    """Address and geometry (height, width, strides, channels) of each source image (uint8 C x H x W, checked
    by fer_kernels.augment), on `device`."""
    addresses = torch.tensor([im.data_ptr() for im in images], dtype=torch.int64)
    meta = torch.tensor([[im.shape[1], im.shape[2], im.stride(0), im.stride(1), im.stride(2), im.shape[0]]
                         for im in images], dtype=torch.int64)
    return addresses.to(device, non_blocking=True), meta.to(device, non_blocking=True)


def augment_triton(images, matrices, colour, out, mean, std):
    """Writes the augmented batch into `out` (N x 3 x S x S, any strides); see fer_kernels.augment."""
    n, s = out.shape[0], out.shape[-1]
    if n == 0:
        return out
    table, meta = source_tables(images, out.device)
    grey = torch.empty(n, dtype=torch.float32, device=out.device)
    _grey_mean_kernel[(n,)](table, meta, grey, BLOCK=BLOCK, num_warps=NUM_WARPS)
    _augment_kernel[(triton.cdiv(s * s, BLOCK), n)](
        table, meta, matrices.contiguous(), colour.contiguous(), grey, out, s, *out.stride(), *mean,
        *(1.0 / v for v in std), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out
