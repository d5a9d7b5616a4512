"""Plain-PyTorch reference of every op: the specification that each fast path is tested against.

Each op computes in the dtype it is given, op by op, as eager PyTorch would. The tests run it in float64
for the "true" value and in the low-precision dtype for the error that plain PyTorch itself makes; the
"reference" backend (fer_kernels/_dispatch.py) runs it in float32 for half-precision inputs. The
optimizer step (ranger_step) always computes in float64, the augmentation (augment) in the dtype it is
asked for (float64 for the specification).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "IMAGENET_MEAN", "IMAGENET_STD", "augment", "batch_norm_act", "centralize_gradient",
           "fmix_mix", "mish", "mish_backward", "radam_rectifier", "ranger_step", "recalibrate", "recalibrate_backward",
           "rgb_to_grey", "shift_hue"]

ACTIVATIONS = ("mish", "relu", "none")


def mish(x: torch.Tensor) -> torch.Tensor:
    """mish(x) = x * tanh(softplus(x))  (Misra 2019)."""
    return x * torch.tanh(F.softplus(x))


def mish_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d mish / dx = tanh(sp) + x * sigmoid(x) * (1 - tanh(sp)^2), sp = softplus(x)."""
    tsp = torch.tanh(F.softplus(x))
    return grad * (tsp + x * torch.sigmoid(x) * (1 - tsp * tsp))


def _activation(z: torch.Tensor, act: str) -> torch.Tensor:
    if act == "mish":
        return mish(z)
    if act == "relu":
        return torch.relu(z)
    if act == "none":
        return z
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def _activation_backward(grad: torch.Tensor, z: torch.Tensor, act: str) -> torch.Tensor:
    if act == "mish":
        return mish_backward(grad, z)
    if act == "relu":
        # as torch's threshold_backward: the gradient passes where z > 0, and where z is NaN
        return torch.where(z <= 0, torch.zeros_like(grad), grad)
    if act == "none":
        return grad
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def batch_norm_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                   act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode batch normalisation over every dim but 1, then act: (output, batch mean, biased variance)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims)
    var = (x - mean.view(shape)).square().mean(dims)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return _activation(y, act), mean, var


def _broadcast_gate(gate: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | float:
    if gate is None:
        return 1.0
    return gate.reshape(x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))


def recalibrate(x: torch.Tensor, gate: torch.Tensor | None, identity: torch.Tensor, act: str = "mish") -> torch.Tensor:
    """The Accuracy-Booster block tail: act(x * gate[n, c] + identity); gate None means 1."""
    return _activation(x * _broadcast_gate(gate, x) + identity, act)


def recalibrate_backward(grad: torch.Tensor, x: torch.Tensor, gate: torch.Tensor | None, identity: torch.Tensor,
                         act: str = "mish") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Returns (dx, dgate, didentity); dgate has gate's shape (None without a gate)."""
    g = _broadcast_gate(gate, x)
    dz = _activation_backward(grad, x * g + identity, act)
    dgate = None
    if gate is not None:
        prod = dz * x
        # sum over the spatial dims (an empty dim list would sum over everything, so N x C is kept as is)
        dgate = prod.sum(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else prod
        dgate = dgate.reshape(gate.shape).to(gate.dtype)
    return dz * g, dgate, dz


# ---------------------------------------------------------------------------------------------- optimizer

def centralize_gradient(grad: torch.Tensor, conv_only: bool = False) -> torch.Tensor:
    """Gradient Centralization (Yong et al. 2020): subtract the mean over all dims but dim 0 from a gradient
    of more than one dimension (more than three with conv_only); other gradients are returned as they are."""
    if grad.dim() <= (3 if conv_only else 1):
        return grad
    return grad - grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True)


def radam_rectifier(step: int, beta2: float, threshold: float = 5.0) -> float | None:
    """RAdam's variance rectifier r_t at step t (counted from 1), or None while rho_t < threshold (5: the
    first 5 steps at beta2 = 0.999), the steps that take un-adapted momentum (docs/method.md section 3)."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    beta2_t = beta2 ** step
    rho_t = rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t)
    if rho_t < max(threshold, 4.0):  # below 4 the rectifier's square root has no real value
        return None
    return math.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))


def ranger_step(param: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, betas: tuple[float, float],
                eps: float, weight_decay: float, decoupled_weight_decay: bool, gc: bool, gc_conv_only: bool,
                k: int, alpha: float, rectifier_threshold: float = 5.0) -> None:
    """One Ranger update of one parameter, in place, computed in float64 (docs/method.md section 3).

    state holds "step" (updates so far), "exp_avg", "exp_avg_sq" and, with Lookahead (k > 0),
    "slow_buffer"; missing entries start as 0 / a copy of the parameter. The state tensors keep their
    dtype; the parameter is rounded to its own dtype once, at the end.
    """
    beta1, beta2 = betas
    p = param.detach().double()
    g = grad.detach().double()
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
        if k:
            state["slow_buffer"] = p.clone()
    if weight_decay and not decoupled_weight_decay:
        g = g + weight_decay * p
    if gc:
        g = centralize_gradient(g, conv_only=gc_conv_only)
    step = state["step"] + 1
    m = beta1 * state["exp_avg"].double() + (1 - beta1) * g
    v = beta2 * state["exp_avg_sq"].double() + (1 - beta2) * g * g
    if weight_decay and decoupled_weight_decay:
        p = p * (1 - lr * weight_decay)
    m_hat = m / (1 - beta1 ** step)
    rectifier = radam_rectifier(step, beta2, rectifier_threshold)
    if rectifier is None:
        p = p - lr * m_hat
    else:
        v_hat = v / (1 - beta2 ** step)
        p = p - lr * rectifier * m_hat / (v_hat.sqrt() + eps)
    if k and step % k == 0:
        slow = state["slow_buffer"].double()
        slow = slow + alpha * (p - slow)
        state["slow_buffer"].copy_(slow)
        p = slow
    state["step"] = step
    state["exp_avg"].copy_(m)
    state["exp_avg_sq"].copy_(v)
    param.detach().copy_(p)


# --------------------------------------------------------------------------------------------------- FMix

def fmix_mix(x: torch.Tensor, mask: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """FMix's mix (docs/method.md section 5): out = m * x + (1 - m) * x[perm], the mask broadcast over the channels.

    x: N x C x H x W; mask: H x W (one mask for the whole batch, the official mode) or N x H x W (one per
    sample), values in [0, 1] (FMix's masks are binary); perm: N indices into the batch, normally a
    permutation. Floating x computes in x's dtype (the mask cast to it); integer x (uint8 images) computes
    in float32 and rounds half up, which for a binary mask is an exact selection.
    """
    m = mask[:, None] if mask.dim() == 3 else mask
    if x.is_floating_point():
        m = m.to(x.dtype)
        return m * x + (1 - m) * x[perm]
    m = m.float()
    return torch.floor(m * x + (1 - m) * x[perm] + 0.5).to(x.dtype)


# ---------------------------------------------------------------------------------------------- augmentation

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def rgb_to_grey(rgb: torch.Tensor) -> torch.Tensor:
    """Luma with torchvision's rgb_to_grayscale weights (ITU-R 601, 0.299 as torchvision has it, 0.2989);
    rgb is 3 x ... in [0, 1]."""
    return 0.2989 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def shift_hue(rgb: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotates the hue of rgb (3 x ... in [0, 1]) by `shift` of the hue circle, through HSV as torchvision's
    adjust_hue does."""
    r, g, b = rgb[0], rgb[1], rgb[2]
    maxc, minc = rgb.max(0).values, rgb.min(0).values
    chroma = maxc - minc
    s = torch.where(maxc > 0, chroma / torch.where(maxc > 0, maxc, 1), 0)
    safe = torch.where(chroma > 0, chroma, 1)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2 + rc - bc, 4 + gc - rc))
    h = torch.where(chroma > 0, h / 6, 0)
    h = torch.remainder(h + shift, 1.0)
    v = maxc
    i = torch.floor(h * 6)
    f = h * 6 - i
    i = torch.remainder(i, 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    pick = lambda *c: torch.where(i == 0, c[0], torch.where(i == 1, c[1], torch.where(i == 2, c[2], torch.where(  # noqa: E731
        i == 3, c[3], torch.where(i == 4, c[4], c[5])))))
    return torch.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)])


def augment(image: torch.Tensor, matrix: torch.Tensor, colour: torch.Tensor, out_size: int,
            mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One image of the fused augmentation (fer_kernels.augment) in plain PyTorch: the specification (in
    float64; the op's reference backend runs it in float32).

    image: uint8 C x H x W (C = 1 or 3), already cut to the face box. matrix: 2 x 3, maps an output pixel
    (column u, row v) to the source position x = m00 u + m01 v + m02, y = m10 u + m11 v + m12 in pixel
    index coordinates (pixel i covers [i - 0.5, i + 0.5]); outside the image the source is mirrored about
    its edges, then sampled bilinearly. colour: brightness, contrast, saturation, hue shift, each applied
    in that order to the sampled RGB in [0, 1] and clamped to [0, 1]; contrast blends with the mean grey
    of the whole source image after brightness. Returns 3 x out_size x out_size, normalised by mean/std.
    """
    src = image.to(dtype) / 255.0
    if src.shape[0] == 1:
        src = src.expand(3, -1, -1)
    _, h, w = src.shape
    pixels = torch.arange(out_size, dtype=dtype, device=src.device)
    v, u = torch.meshgrid(pixels, pixels, indexing="ij")
    m = matrix.to(dtype)
    x = m[0, 0] * u + m[0, 1] * v + m[0, 2]
    y = m[1, 0] * u + m[1, 1] * v + m[1, 2]
    # grid_sample's reflection padding with align_corners=False mirrors about the pixel edges -0.5 and
    # size - 0.5, then clamps: the "symmetric" border of docs/method.md section 6.
    grid = torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], -1)[None]
    rgb = F.grid_sample(src[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]
    brightness, contrast, saturation, hue = (float(c) for c in colour)
    rgb = (rgb * brightness).clamp(0, 1)
    grey_mean = (rgb_to_grey(src).mean() * brightness).clamp(0, 1)
    rgb = (grey_mean + contrast * (rgb - grey_mean)).clamp(0, 1)
    grey = rgb_to_grey(rgb)
    rgb = (grey + saturation * (rgb - grey)).clamp(0, 1)
    rgb = shift_hue(rgb, hue).clamp(0, 1)
    mean_t = torch.tensor(mean, dtype=dtype, device=src.device)[:, None, None]
    std_t = torch.tensor(std, dtype=dtype, device=src.device)[:, None, None]
    return (rgb - mean_t) / std_t
