"""The augmentation recipe (fer_train.recipe.augmentation, docs/method.md section 6): evaluation is resize and
centre crop, the training draws' geometry and colour ranges, draws that depend on (seed, epoch, index) only,
and the whole pass (Triton under the interpreter here) against the float64 specification."""

import pytest
import torch

from fer_kernels import reference
from fer_train.recipe.augmentation import AugmentConfig, AugmentParams, apply, full_boxes, sample_keys, sample_params
from helpers import TRITON_DEVICE, augment_sources

MEAN = torch.tensor(reference.IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(reference.IMAGENET_STD)[:, None, None]


def _sources(device="cpu", seed=0):
    """The helpers' sources, with a face box inside the large image."""
    images = augment_sources(device, seed)
    boxes = full_boxes([im.shape[1:] for im in images])
    boxes[2] = torch.tensor([20.0, 10.0, 300.0, 250.0])  # a face box inside a larger image
    return images, boxes


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("out_dtype,channels_last,tol", [(torch.float32, False, 2e-4), (torch.float32, True, 2e-4),
                                                         (torch.bfloat16, False, 0.05)], ids=["fp32", "nhwc", "bf16"])
def test_triton_matches_reference(train, out_dtype, channels_last, tol):
    images, boxes = _sources(TRITON_DEVICE)
    config = AugmentConfig(out_size=40, resize=46)
    params = sample_params(boxes, train, sample_keys(3, 1, range(len(images))) if train else None, config)
    out = apply(images, params, out_dtype, channels_last, backend="triton")
    assert out.shape == (len(images), 3, 40, 40) and out.dtype == out_dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    want = torch.stack([reference.augment(im.cpu(), params.matrices[i], params.colour[i], 40) for i, im in enumerate(images)])
    torch.testing.assert_close(out.cpu().double(), want, rtol=0, atol=tol)


def test_eval_is_resize_and_centre_crop():
    """A 256 x 256 image needs no resize: eval output is its central 224 x 224, normalised; a face box
    selects its own region of a larger image."""
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8, generator=g)
    out = apply([image], sample_params(full_boxes([[256, 256]]), False))
    torch.testing.assert_close(out[0], (image[:, 16:240, 16:240] / 255 - MEAN) / STD, rtol=0, atol=1e-5)
    large = torch.randint(0, 256, (3, 400, 500), dtype=torch.uint8, generator=g)
    out = apply([large], sample_params([[100, 50, 356, 306]], False))
    torch.testing.assert_close(out[0], (large[:, 66:290, 116:340] / 255 - MEAN) / STD, rtol=0, atol=1e-3)


def test_geometry_of_training_draws():
    """Flip mirrors the crop; rotation and shear keep the crop's centre in place; the border mirrors."""
    n = 400
    boxes = full_boxes([[256, 256]] * n)
    params = sample_params(boxes, True, sample_keys(0, 0, range(n)))
    m = params.matrices.double()
    centre = m @ torch.tensor([111.5, 111.5, 1.0], dtype=torch.float64)  # the output's central point
    torch.testing.assert_close(centre, torch.full((n, 2), 127.5, dtype=torch.float64), rtol=0, atol=1e-4)
    flips = torch.linalg.det(m[:, :, :2]) < 0
    assert 0.4 < flips.double().mean() < 0.6
    colour = params.colour
    assert ((colour[:, :3] >= torch.tensor([0.75, 0.75, 0.95])) & (colour[:, :3] <= torch.tensor([1.25, 1.25, 1.05]))).all()
    assert colour[:, 3].abs().max() <= 0.05 and colour[:, 3].std() > 0.02


def test_zoom_and_translate():
    """The random crops (data.zoom, data.translate): with rotation, shear and flip off, each output pixel steps
    1 / zoom source pixels and the output's centre shows the source point moved back by the shift over the zoom,
    both drawn over their whole ranges; off (the paper's recipe), the draws of the other parameters do not move."""
    n = 400
    boxes = full_boxes([[256, 256]] * n)
    keys = sample_keys(0, 0, range(n))
    config = AugmentConfig(flip=0.0, rotation=0.0, shear=0.0, zoom=0.2, translate=0.1)
    m = sample_params(boxes, True, keys, config).matrices.double()
    step = m[:, 0, 0]
    torch.testing.assert_close(m[:, 1, 1], step, rtol=0, atol=1e-6)
    assert m[:, 0, 1].abs().max() < 1e-6 and m[:, 1, 0].abs().max() < 1e-6
    zoom = 1 / step
    assert zoom.min() >= 0.8 - 1e-5 and zoom.max() <= 1.2 + 1e-5
    assert zoom.min() < 0.82 and zoom.max() > 1.18
    shift = (m @ torch.tensor([111.5, 111.5, 1.0], dtype=torch.float64) - 127.5) * -zoom[:, None]
    assert shift.abs().max() <= 22.4 + 1e-3 and shift.abs().max() > 21.0
    assert abs(shift.mean()) < 2.0 and shift[:, 0].std() > 10 and (shift[:, 0] - shift[:, 1]).abs().mean() > 5
    plain = sample_params(boxes, True, keys)
    with_crops = sample_params(boxes, True, keys, AugmentConfig(zoom=0.2, translate=0.1))
    torch.testing.assert_close(with_crops.colour, plain.colour)
    assert torch.equal(torch.linalg.det(with_crops.matrices[:, :, :2].double()) < 0,
                       torch.linalg.det(plain.matrices[:, :, :2].double()) < 0)  # the same flips


def test_draws_depend_on_seed_epoch_and_index_only():
    boxes = full_boxes([[48, 48]] * 4)
    a = sample_params(boxes, True, sample_keys(5, 2, [10, 11, 12, 13]))
    b = sample_params(boxes[:2], True, sample_keys(5, 2, [12, 13]))
    torch.testing.assert_close(a.matrices[2:], b.matrices)
    c = sample_params(boxes, True, sample_keys(5, 3, [10, 11, 12, 13]))
    assert not torch.equal(a.matrices, c.matrices)
    with pytest.raises(ValueError, match="one key per box"):
        sample_params(boxes, True)


def test_a_repeated_draw_of_a_sample_gets_its_own_keys():
    """Class-balanced sampling draws a sample again within an epoch: each repeat has its own key (so its own
    crop, flip and colour), and a first draw (repeat 0) keeps the key it has without repeats."""
    first = sample_keys(5, 2, [7, 8])
    assert torch.equal(sample_keys(5, 2, [7, 8], [0, 0]), first)
    again = sample_keys(5, 2, [7, 7, 7, 8], [0, 1, 2, 1])
    assert again[0] == first[0] and len(set(again[:3].tolist())) == 3 and again[3] != first[1]
    params = sample_params(full_boxes([[48, 48]] * 3), True, again[:3])
    assert not torch.equal(params.matrices[0], params.matrices[1]) and not torch.equal(params.colour[1],
                                                                                          params.colour[2])


def test_errors():
    with pytest.raises(ValueError, match="empty boxes"):
        sample_params([[5, 5, 5, 9]], False)
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    params = AugmentParams(torch.zeros(1, 2, 3), torch.ones(1, 4), AugmentConfig(out_size=8, resize=8))
    with pytest.raises(ValueError, match="2 images but parameters for 1"):
        apply([image, image], params)
