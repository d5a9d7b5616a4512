"""The FMix recipe (Harris et al. 2020; docs/method.md section 5): lambda, the low-frequency masks, the
permutation, and the loss. The mix itself is the kernel op fer_kernels.fmix_mix.

With the official defaults (alpha 1, decay power 3, max_soft 0):

    fmix = FMix()                                            # one lambda and one mask per batch (official)
    x_mixed, y, y_perm, lam = fmix(x, y, generator=gen)      # x: N x C x H x W on any device
    loss = fmix_loss(model(x_mixed), y, y_perm, lam, weight=class_weights)

The pieces: sample_lambda (Beta(alpha, alpha)), low_frequency_images (the grey masks before binarisation),
fmix_masks (binary masks, batched, drawn with torch.fft on the tensors' device) and fmix_loss.
FMix(per_sample=True) draws one lambda and one mask per sample instead of per batch.

Every random draw comes from the `generator` argument, a torch.Generator on the device the tensors are made
on, or from torch's default generator of that device: a seeded generator makes every draw repeatable.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fer_kernels.ops.fmix_mix import MIX, check_mix, mix

__all__ = ["FMix", "fmix_loss", "fmix_masks", "low_frequency_images", "sample_lambda"]


def _device(device, generator: torch.Generator | None, op: str) -> torch.device:
    """Where to draw: `device`, else the generator's device, else the CPU. The generator must live there."""
    if device is None:
        return generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"{op}: generator is on {generator.device} but the draws are made on {device}; pass a "
                         f"generator of that device, torch.Generator(device={str(device)!r}).manual_seed(seed)")
    return device


def sample_lambda(alpha: float = 1.0, size: int | None = None, generator: torch.Generator | None = None,
                  device=None) -> torch.Tensor:
    """lambda ~ Beta(alpha, alpha): a 0-dim float32 tensor (one per batch), or `size` values (one per sample).

    Drawn on the device with the generator (torch.distributions.Beta takes no generator; Beta(a, a) is the
    first coordinate of Dirichlet(a, a), which torch samples with one)."""
    if not alpha > 0:
        raise ValueError(f"sample_lambda: alpha must be > 0, got {alpha}")
    if size is not None and size < 0:
        raise ValueError(f"sample_lambda: size must be >= 0 or None, got {size}")
    device = _device(device, generator, "sample_lambda")
    concentration = torch.full((1 if size is None else size, 2), float(alpha), device=device)
    lam = torch._sample_dirichlet(concentration, generator=generator)[:, 0]
    return lam[0] if size is None else lam


def _spectral_images(n: int, h: int, w: int, decay_power: float, generator, device) -> torch.Tensor:
    if n == 0:  # no FFT of an empty batch: oneMKL's (torch 2.11 on the CPU) rejects it as a bad configuration
        return torch.zeros(0, h, w, device=device)
    fy = torch.fft.fftfreq(h, device=device)[:, None]
    fx = torch.fft.rfftfreq(w, device=device)[None, :]
    scale = torch.sqrt(fy * fy + fx * fx).clamp(min=1.0 / max(h, w)).pow(-decay_power)
    spectrum = torch.view_as_complex(torch.randn(n, h, w // 2 + 1, 2, generator=generator, device=device))
    return torch.fft.irfft2(spectrum * scale, s=(h, w))


def low_frequency_images(n: int, h: int, w: int, decay_power: float = 3.0, generator: torch.Generator | None = None,
                         device=None) -> torch.Tensor:
    """n grey low-frequency images, n x h x w float32, each min-max normalised to [0, 1]: FMix's masks
    before binarisation.

    A complex Gaussian spectrum (real and imaginary parts N(0, 1), as in the official code) over the rFFT
    grid of an h x w image, each frequency scaled by 1 / max(f, 1 / max(h, w)) ** decay_power, where f is
    the radial frequency in cycles per pixel (torch.fft.fftfreq down the rows, rfftfreq along the
    columns) and the floor 1 / max(h, w) keeps the zero frequency finite; then the inverse rFFT. The image's
    power spectrum therefore falls as f ** (-2 * decay_power)."""
    if n < 0 or h < 1 or w < 1:
        raise ValueError(f"low_frequency_images: need n >= 0 and h, w >= 1, got n={n}, h={h}, w={w}")
    device = _device(device, generator, "low_frequency_images")
    grey = _spectral_images(n, h, w, decay_power, generator, device)
    if n == 0:
        return grey
    lo = grey.amin((1, 2), keepdim=True)
    span = (grey.amax((1, 2), keepdim=True) - lo).clamp(min=torch.finfo(grey.dtype).tiny)
    return (grey - lo) / span


def fmix_masks(shape_or_hw: Sequence[int], lam, decay_power: float = 3.0, generator: torch.Generator | None = None,
               device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Binary FMix masks: one H x W mask for a scalar lam (the official mode, shared by the whole batch), or
    n x H x W masks for a 1-D tensor of n lambdas (one per sample).

    shape_or_hw: (H, W), or a batch's shape such as x.shape (the last two sizes are used). Each mask is a
    low_frequency_images() image whose top k pixels become 1 and the rest 0, with k = lam * H * W rounded
    up or down at random, 50/50, so its mean is lam to within one pixel (1 / (H * W)). Batched on the
    device (one sort; the one mask of a batch on the CPU by a selection), no loop over samples. device:
    lam's device if it is a tensor, else the generator's, else the CPU.
    """
    if len(shape_or_hw) < 2:
        raise ValueError(f"fmix_masks: shape_or_hw must be (H, W) or a shape ending in H, W, got {tuple(shape_or_hw)}")
    h, w = int(shape_or_hw[-2]), int(shape_or_hw[-1])
    if h < 1 or w < 1:
        raise ValueError(f"fmix_masks: H and W must be >= 1, got {h} x {w}")
    if device is None and isinstance(lam, torch.Tensor):
        device = lam.device
    device = _device(device, generator, "fmix_masks")
    if not isinstance(lam, torch.Tensor):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"fmix_masks: lam must lie in [0, 1], got {lam}")
        lam = torch.tensor(float(lam), dtype=torch.float64)  # as the official code's Python floats
    lam = lam.to(device)
    if lam.dim() > 1:
        raise ValueError(f"fmix_masks: lam must be a number or a 1-D tensor (one per sample), got shape "
                         f"{tuple(lam.shape)}")
    lams = lam.reshape(-1).double()  # float64: lam * H * W rounds once, at the ceil / floor below
    n, hw = lams.numel(), h * w
    grey = _spectral_images(n, h, w, decay_power, generator, device).reshape(n, hw)
    up = torch.rand(n, generator=generator, device=device) < 0.5
    k = torch.where(up, torch.ceil(lams * hw), torch.floor(lams * hw)).clamp(0, hw)
    masks = _largest(grey, k, dtype)
    return masks.reshape(n, h, w) if lam.dim() == 1 else masks.reshape(h, w)


def _largest(values: torch.Tensor, k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """n x m masks with 1 at the k[i] largest of row i of `values` (n x m, finite), ties taken in index order:
    the first k[i] entries of a stable descending argsort. One row on the CPU (the batch's one mask of the
    official mode) by a selection (kthvalue), 4x faster than the sort for a 224 x 224 mask; several rows, or
    another device, by the sort, one batched kernel."""
    n, m = values.shape
    if n != 1 or values.device.type != "cpu":
        order = values.argsort(dim=1, descending=True, stable=True)
        keep = (torch.arange(m, device=values.device)[None, :] < k[:, None]).to(dtype)
        return torch.zeros(n, m, dtype=dtype, device=values.device).scatter_(1, order, keep)
    row, count = values[0], int(k[0])
    if count == 0:
        return torch.zeros(1, m, dtype=dtype)
    threshold = row.kthvalue(m - count + 1).values  # the count-th largest
    above, ties = row > threshold, row == threshold
    room = count - int(above.sum())  # how many of the values equal to the threshold are taken, the first ones
    return (above | (ties & (ties.cumsum(0) <= room))).to(dtype)[None]


def _cross_entropy_terms(logits, target, weight, factor, label_smoothing=0.0):
    """F.cross_entropy(logits, target, weight) ("mean") with each sample's term multiplied by `factor`:
    sum_i f_i w[y_i] l_i / sum_i w[y_i] for class indices, sum_i f_i l_i / N for class probabilities (torch
    weights each probability inside the sum, and divides by N)."""
    terms = F.cross_entropy(logits, target, weight=weight, reduction="none", label_smoothing=label_smoothing)
    if target.is_floating_point() or weight is None:
        total = logits.new_tensor(float(logits.shape[0]))
    else:
        total = weight.to(terms.dtype)[target].sum()
    return (factor * terms).sum() / total


def fmix_loss(logits: torch.Tensor, target: torch.Tensor, target_perm: torch.Tensor, lam,
              weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """FMix's loss, lam * CE_w(logits, target) + (1 - lam) * CE_w(logits, target_perm) (docs/method.md section 5).

    logits: N x K. target, target_perm: N class indices, or N x K class probabilities (soft labels); the
    second is the first taken at FMix's perm. lam: a number or 0-dim tensor (one per batch), or N values (one
    per sample). weight: K class weights (docs/method.md section 4, eq. 3 / eq. 4), or None.
    Each CE_w is torch's F.cross_entropy(..., weight) mean, so with one lam this equals
    lam * F.cross_entropy(logits, target, weight) + (1 - lam) * F.cross_entropy(logits, target_perm, weight);
    with per-sample lam each sample's term is scaled by its lam (resp. 1 - lam) inside the same mean.
    label_smoothing: as F.cross_entropy's (that share of each target spread evenly over the classes).
    Half-precision logits compute in float32.
    """
    if logits.dim() != 2:
        raise ValueError(f"fmix_loss: logits must be N x K, got shape {tuple(logits.shape)}")
    n, k = logits.shape
    for name, t in (("target", target), ("target_perm", target_perm)):
        if tuple(t.shape) not in ((n,), (n, k)) or (t.dim() == 1) == t.is_floating_point():
            raise ValueError(f"fmix_loss: {name} must be {n} class indices or {n} x {k} class probabilities, "
                             f"got shape {tuple(t.shape)} and dtype {t.dtype}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    lam = torch.as_tensor(lam, dtype=logits.dtype, device=logits.device)
    if lam.shape not in ((), (n,)):
        raise ValueError(f"fmix_loss: lam must be a number or {n} values (one per sample), got shape "
                         f"{tuple(lam.shape)}")
    return (_cross_entropy_terms(logits, target, weight, lam, label_smoothing)
            + _cross_entropy_terms(logits, target_perm, weight, 1 - lam, label_smoothing))


class FMix:
    """FMix of a batch (docs/method.md section 5): draws lambda, the mask(s) and a permutation, mixes on the device.

    per_sample=False is the official mode: one lambda and one mask for the whole batch, shared by every
    sample and channel. per_sample=True draws one lambda and one mask per sample, and lam is then a tensor
    of N values (fmix_loss takes either). backend: as fer_kernels.fmix_mix's.

        x_mixed, y, y_perm, lam = FMix()(x, y, generator=gen)
        loss = fmix_loss(model(x_mixed), y, y_perm, lam, weight)
    """

    def __init__(self, alpha: float = 1.0, decay_power: float = 3.0, per_sample: bool = False,
                 backend: str | None = None):
        if not alpha > 0:
            raise ValueError(f"FMix: alpha must be > 0, got {alpha}")
        if not decay_power >= 0:
            raise ValueError(f"FMix: decay_power must be >= 0, got {decay_power}")
        MIX.check_backend(backend)
        self.alpha, self.decay_power, self.per_sample, self.backend = alpha, decay_power, per_sample, backend

    def __repr__(self):
        return (f"FMix(alpha={self.alpha}, decay_power={self.decay_power}, per_sample={self.per_sample}, "
                f"backend={self.backend!r})")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: N x C x H x W; y: N labels (indices or probabilities). generator: on x's device, or None.
        Returns (mixed x, y, y[perm], lam); lam is 0-dim, or N values with per_sample."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"FMix: x must be an N x C x H x W tensor, got {getattr(x, 'shape', type(x))}")
        if len(y) != x.shape[0]:
            raise ValueError(f"FMix: y must hold one label per sample ({x.shape[0]}), got {len(y)}")
        n = x.shape[0]
        device = _device(x.device, generator, "FMix")
        lam = sample_lambda(self.alpha, n if self.per_sample else None, generator, device)
        masks = fmix_masks(x.shape, lam, self.decay_power, generator, device)
        perm = torch.randperm(n, generator=generator, device=device)
        check_mix(x, masks, perm, "FMix")
        return mix(x, masks, perm, self.backend), y, y[perm.to(y.device)], lam
