"""The FMix recipe (fer_train.recipe.fmix, docs/method.md section 5): the masks' statistics against the
method (binary, mean lambda within one pixel, 50/50 rounding, 1/f^d spectrum, a few blobs), lambda's
distribution, determinism, the loss and the FMix modes."""

import math

import pytest
import torch
import torch.nn.functional as F

from fer_kernels import reference
from fer_train.recipe.fmix import FMix, fmix_loss, fmix_masks, low_frequency_images, sample_lambda
from helpers import TRITON_DEVICE, generator, random_batch


# --------------------------------------------------------------------------------------------------- masks

@pytest.mark.parametrize("hw", [(32, 32), (31, 45), (45, 31), (1, 7), (7, 1), (1, 1), (224, 224)], ids=str)
def test_masks_are_binary_with_mean_lambda(hw):
    h, w = hw
    lam = torch.cat([torch.linspace(0, 1, 41), torch.rand(23, generator=generator(3))])  # the ends, and odd values
    masks = fmix_masks(hw, lam, generator=generator(4))
    assert masks.shape == (len(lam), h, w) and masks.dtype == torch.float32
    assert torch.equal(masks, masks.round().clamp(0, 1))
    # within one pixel: |k - lam * h * w| < 1
    assert (masks.double().sum((1, 2)) - lam.double() * h * w).abs().max() < 1
    shared = fmix_masks((2, 3, h, w), 0.3, generator=generator(5))  # a scalar lam and a batch shape: one H x W mask
    assert shared.shape == (h, w) and abs(shared.sum().item() - 0.3 * h * w) < 1



@pytest.mark.parametrize("m", [1, 2, 7, 2304], ids=str)
def test_one_cpu_mask_by_selection_keeps_what_the_sort_keeps(m):
    """The one mask of a batch on the CPU is chosen by kthvalue, not the sort: the same pixels, ties (many
    here: the values take 5 levels) in index order, for every count from none to all."""
    from fer_train.recipe import fmix

    values = torch.randint(0, 5, (1, m), generator=generator(13)).float()
    for count in sorted({0, 1, m // 3, m // 2, m - 1, m}):
        k = torch.tensor([float(count)], dtype=torch.float64)
        order = values.argsort(dim=1, descending=True, stable=True)
        want = torch.zeros(1, m).scatter_(1, order, (torch.arange(m)[None, :] < count).float())
        got = fmix._largest(values, k, torch.float32)
        assert got.dtype == torch.float32 and torch.equal(got, want), count
        smooth = torch.randn(1, m, generator=generator(count))  # and without ties
        order = smooth.argsort(dim=1, descending=True, stable=True)
        want = torch.zeros(1, m).scatter_(1, order, (torch.arange(m)[None, :] < count).float())
        assert torch.equal(fmix._largest(smooth, k, torch.float32), want), count

def test_mask_pixel_count_rounds_up_or_down_50_50():
    h, w, draws = 10, 10, 4000
    counts = fmix_masks((h, w), torch.full((draws,), 0.255), generator=generator(6)).sum((1, 2))
    assert set(counts.tolist()) == {25.0, 26.0}  # 0.255 * 100 = 25.5
    up = (counts == 26).double().mean().item()
    assert abs(up - 0.5) < 4 * math.sqrt(0.25 / draws), up  # 4 standard deviations of a fair coin's mean
    exact = fmix_masks((h, w), torch.full((50,), 0.25), generator=generator(7)).sum((1, 2))
    assert torch.equal(exact, torch.full((50,), 25.0))  # 25 pixels exactly, whichever way it rounds


@pytest.mark.parametrize("decay_power", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("hw", [(64, 48), (63, 80)], ids=str)
def test_grey_mask_spectrum_falls_as_f_to_minus_2_decay(hw, decay_power):
    """Fit log(power) = slope * log(f) + c over the mean power spectrum of 64 grey masks, at every frequency
    from the floor 1/max(h, w) up (the zero frequency is floored). Expected slope: -2 * decay_power.

    Tolerance 0.1: each frequency's power is |complex Gaussian|^2 * scale^2, so the log of a mean of 64 has
    a standard deviation of about 1/8 (0.2-0.25 measured, with the columns irfft2 symmetrises); over the
    ~1,500-2,500 frequencies spread over ~0.6 in log f, the slope's standard error is about 0.01 (printed
    below on failure). 0.1 is 10 of those, while a wrong exponent (amplitude vs power, f vs f^2) is off by 2
    or more."""
    h, w = hw
    grey = low_frequency_images(64, h, w, decay_power, generator=generator(8))
    assert grey.shape == (64, h, w) and grey.min() == 0 and grey.max() == 1
    power = torch.fft.rfft2(grey.double()).abs().pow(2).mean(0)
    f = torch.sqrt(torch.fft.fftfreq(h, dtype=torch.float64)[:, None] ** 2
                   + torch.fft.rfftfreq(w, dtype=torch.float64)[None, :] ** 2)
    keep = f >= 1.0 / max(h, w)
    log_f, log_p = f[keep].log(), power[keep].log()
    design = torch.stack([log_f, torch.ones_like(log_f)], 1)
    slope, intercept = torch.linalg.lstsq(design, log_p[:, None]).solution[:, 0].tolist()
    residual = log_p - (slope * log_f + intercept)
    stderr = residual.std().item() / (math.sqrt(len(log_f)) * log_f.std().item())
    assert abs(slope + 2 * decay_power) < 0.1, f"slope {slope:.3f}, expected {-2 * decay_power}, stderr {stderr:.3f}"


def _components(masks):
    """Number of 4-connected regions of ones in each binary mask (labels spread to their largest neighbour
    until nothing changes)."""
    n, h, w = masks.shape
    on = masks.bool()
    labels = torch.where(on, torch.arange(1.0, h * w + 1, dtype=torch.float64).reshape(1, h, w), 0.0)
    while True:
        p = F.pad(labels, (1, 1, 1, 1))
        spread = torch.stack([labels, p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amax(0)
        spread = torch.where(on, spread, 0.0)
        if torch.equal(spread, labels):
            return torch.tensor([len(set(row.tolist()) - {0.0}) for row in labels.reshape(n, -1)])
        labels = spread


def _edge_fraction(masks):
    """Fraction of neighbouring pixel pairs that differ: short boundaries mean smooth blobs."""
    rows = (masks[:, 1:] != masks[:, :-1]).double().mean()
    return 0.5 * (rows + (masks[:, :, 1:] != masks[:, :, :-1]).double().mean())


def test_masks_are_a_few_low_frequency_blobs():
    lam = torch.linspace(0.2, 0.8, 32)
    masks = fmix_masks((64, 64), lam, generator=generator(9))
    ones, zeros = _components(masks), _components(1 - masks)
    # measured at decay 3: about 2 regions of each value on average, 5 at most (the image wraps around,
    # so a blob cut by an edge counts twice); at decay 1 about 100 of each, at decay 0 (white noise) ~300
    assert ones.double().mean() <= 4 and zeros.double().mean() <= 4 and max(ones.max(), zeros.max()) <= 8
    assert _edge_fraction(masks) < 0.05  # 0.026 measured; 0.25 at decay 1, 0.5 for white noise
    noise = fmix_masks((64, 64), lam, decay_power=0.0, generator=generator(9))
    assert _components(noise).double().mean() > 100 and _edge_fraction(noise) > 0.4


def test_masks_are_deterministic_with_a_seeded_generator():
    lam = torch.rand(5, generator=generator(10))
    a = fmix_masks((17, 23), lam, generator=generator(11))
    assert torch.equal(a, fmix_masks((17, 23), lam, generator=generator(11)))
    assert not torch.equal(a, fmix_masks((17, 23), lam, generator=generator(12)))
    assert not torch.equal(a[0], a[1])  # per-sample masks are drawn independently


def test_mask_errors_name_the_argument():
    with pytest.raises(ValueError, match="shape_or_hw"):
        fmix_masks((5,), 0.5)
    with pytest.raises(ValueError, match="lam must lie in"):
        fmix_masks((5, 5), 1.5)
    with pytest.raises(ValueError, match="lam must be a number or a 1-D tensor"):
        fmix_masks((5, 5), torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="generator is on cpu"):
        fmix_masks((5, 5), 0.5, generator=generator(0), device="meta")


# -------------------------------------------------------------------------------------------------- lambda

@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_lambda_is_beta_alpha_alpha(alpha):
    draws = 20000
    lam = sample_lambda(alpha, size=draws, generator=generator(13)).double()
    assert lam.shape == (draws,) and lam.min() >= 0 and lam.max() <= 1
    var = 1 / (4 * (2 * alpha + 1))  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
    assert abs(lam.mean().item() - 0.5) < 4 * math.sqrt(var / draws)
    # the sample variance's standard deviation is below sqrt(mu4 / n) <= sqrt(var / n) (lam in [0, 1])
    assert abs(lam.var().item() - var) < 4 * math.sqrt(var / draws)
    one = sample_lambda(alpha, generator=generator(14))
    assert one.shape == () and one.dtype == torch.float32
    assert torch.equal(one, sample_lambda(alpha, generator=generator(14)))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        sample_lambda(0.0)


# ---------------------------------------------------------------------------------------------------- loss

def _hand_loss(logits, target, target_perm, lam, weight):
    """lam * CE_w(y) + (1 - lam) * CE_w(y[perm]) written out: -w[y] log p[y] over sum w[y] (hard), or
    -sum_c w_c q_c log p_c over N (soft); lam scales each sample's term."""
    logp = logits.double().log_softmax(1)
    w = weight.double()
    lam = torch.as_tensor(lam, dtype=torch.float64).expand(len(logits))

    def ce(t, f):
        if t.is_floating_point():
            return (f * -(w * t.double() * logp).sum(1)).sum() / len(logits)
        return (f * -w[t] * logp.gather(1, t[:, None])[:, 0]).sum() / w[t].sum()
    return ce(target, lam) + ce(target_perm, 1 - lam)


@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
def test_loss_equals_the_weighted_sum(soft):
    n, k = 6, 8
    gen = generator(15)
    logits = torch.randn(n, k, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(k, generator=gen, dtype=torch.float64) + 0.1
    y = torch.randint(0, k, (n,), generator=gen)
    perm = torch.randperm(n, generator=gen)
    if soft:
        y = torch.rand(n, k, generator=gen, dtype=torch.float64).softmax(1)
    lam = 0.37
    loss = fmix_loss(logits, y, y[perm], lam, weight)
    assert torch.allclose(loss, _hand_loss(logits, y, y[perm], lam, weight), rtol=1e-12)
    official = lam * F.cross_entropy(logits, y, weight=weight) + (1 - lam) * F.cross_entropy(logits, y[perm],
                                                                                            weight=weight)
    assert torch.allclose(loss, official, rtol=1e-12)
    per_sample = torch.rand(n, generator=gen, dtype=torch.float64)
    assert torch.allclose(fmix_loss(logits, y, y[perm], per_sample, weight),
                          _hand_loss(logits, y, y[perm], per_sample, weight), rtol=1e-12)
    assert torch.allclose(fmix_loss(logits, y, y[perm], torch.full((n,), lam), weight), loss, rtol=1e-12)
    unweighted = fmix_loss(logits, y, y[perm], torch.tensor(lam))
    assert torch.allclose(unweighted, _hand_loss(logits, y, y[perm], lam, torch.ones(k)), rtol=1e-12)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    y32 = y.float() if soft else y
    half = fmix_loss(logits.detach().bfloat16(), y32, y32[perm], lam, weight.float())
    assert half.dtype == torch.float32 and abs(half.item() - loss.item()) < 0.05 * abs(loss.item())


def test_loss_errors_name_the_argument():
    logits = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="logits must be N x K"):
        fmix_loss(logits[0], y, y, 0.5)
    with pytest.raises(ValueError, match="target must be 4 class indices"):
        fmix_loss(logits, y[:3], y, 0.5)
    with pytest.raises(ValueError, match="target_perm must be 4 class indices"):
        fmix_loss(logits, y, y.float(), 0.5)
    with pytest.raises(ValueError, match="lam must be a number or 4 values"):
        fmix_loss(logits, y, y, torch.rand(3))


# --------------------------------------------------------------------------------------------------- FMix

@pytest.mark.parametrize("per_sample", [False, True], ids=["official", "per-sample"])
def test_fmix_modes(per_sample):
    n, c, h, w = 8, 3, 24, 31
    x = torch.arange(1.0, n + 1).reshape(n, 1, 1, 1).expand(n, c, h, w).contiguous()
    y = torch.arange(n)
    out, y_same, y_perm, lam = FMix(per_sample=per_sample)(x, y, generator=generator(16))
    assert y_same is y and sorted(y_perm.tolist()) == list(range(n))
    assert lam.shape == ((n,) if per_sample else ())
    # every pixel comes from the sample or its partner, the same for every channel
    own = out == x
    assert torch.equal(own | (out == x[y_perm]), torch.ones_like(own))
    moved = y_perm != y  # samples paired with themselves show no mask
    masks = own[:, 0][moved].float()
    assert torch.equal(own, own[:, :1].expand_as(own)) and moved.sum() >= n - 2
    lams = (lam.expand(n) if not per_sample else lam)[moved].double()
    assert (masks.sum((1, 2)) - lams * h * w).abs().max() < 1
    if per_sample:
        assert len({tuple(m.flatten().tolist()) for m in masks}) == len(masks)  # a mask of its own each
    else:
        assert torch.equal(masks, masks[:1].expand_as(masks))  # one mask shared by the batch

    # the draws, in order: lambda, the mask(s), the permutation
    gen = generator(16)
    lam2 = sample_lambda(1.0, n if per_sample else None, generator=gen)
    mask2 = fmix_masks(x.shape, lam2, generator=gen)
    perm2 = torch.randperm(n, generator=gen)
    assert torch.equal(lam, lam2) and torch.equal(y_perm, perm2)
    assert torch.equal(out, reference.fmix_mix(x, mask2, perm2))


@pytest.mark.parametrize("per_sample", [False, True], ids=["official", "per-sample"])
def test_fmix_is_deterministic_and_triton_matches(per_sample):
    x = random_batch((5, 3, 13, 11), torch.bfloat16, "cpu", channels_last=True)
    y = torch.randint(0, 8, (5,), generator=generator(17))
    ref = FMix(per_sample=per_sample, backend="reference")(x, y, generator=generator(18))
    again = FMix(per_sample=per_sample)(x, y, generator=generator(18))
    for a, b in zip(ref, again):
        assert torch.equal(a, b)
    tri = FMix(per_sample=per_sample, backend="triton")(x.to(TRITON_DEVICE), y.to(TRITON_DEVICE),
                                                         generator=generator(18, TRITON_DEVICE))
    if TRITON_DEVICE == "cpu":  # the same generator: the same draws
        for a, b in zip(ref, tri):
            assert torch.equal(a, b)
    assert tri[0].is_contiguous(memory_format=torch.channels_last)
    other = FMix(per_sample=per_sample)(x, y, generator=generator(19))
    assert not torch.equal(ref[0], other[0])


@pytest.mark.parametrize("per_sample", [False, True], ids=["official", "per-sample"])
def test_fmix_empty_batch(per_sample):
    out, _, y_perm, lam = FMix(per_sample=per_sample)(torch.randn(0, 3, 8, 9), torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, 3, 8, 9) and y_perm.shape == (0,) and lam.shape == ((0,) if per_sample else ())


def test_fmix_errors_name_the_argument():
    with pytest.raises(ValueError, match="alpha"):
        FMix(alpha=0)
    with pytest.raises(ValueError, match="decay_power"):
        FMix(decay_power=-1)
    with pytest.raises(ValueError, match="backend"):
        FMix(backend="cuda")  # the mix has no CUDA kernel (Triton serves GPUs)
    with pytest.raises(ValueError, match="x must be an N x C x H x W"):
        FMix()(torch.randn(3, 4, 5), torch.zeros(3))
    with pytest.raises(ValueError, match="y must hold one label per sample"):
        FMix()(torch.randn(3, 2, 4, 5), torch.zeros(2))
