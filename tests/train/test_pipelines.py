"""fer_train.data pipelines and build_loader: what reaches the model is the specified transform of the
right samples, in a reproducible, resumable, per-rank order; DALI (CPU graph) agrees with PyTorch's."""

from pathlib import Path

import pytest
import torch

from fer_kernels import reference
from fer_train.data import MixedTargets, build_loader, open_dataset
from fer_train.data.dali_pipeline import dali_available, linear_colour
from fer_train.data.images import decode
from fer_train.data.order import EpochOrder, sample_weights
from fer_train.errors import DataError
from fer_train.recipe.augmentation import AugmentConfig, full_boxes, sample_keys, sample_params
from fer_train.recipe.fmix import FMix
from helpers import jpeg, make_ferplus, pattern, png, write

CONFIG = AugmentConfig(out_size=40, resize=46)  # small batches keep the CPU tests fast
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")


def _ferplus(tmp_path: Path, n: int = 12):
    lines = [f'img{k}.png,"(0, 0, 48, 48)",' + ",".join(str(v) for v in [0] * (k % 8) + [9] + [0] * (9 - k % 8))
             for k in range(n)]
    make_ferplus(tmp_path / "ferplus", lines, folder="FER2013Train")
    return open_dataset("ferplus", tmp_path / "ferplus", "train")


def _smooth(height: int, width: int, seed: int) -> torch.Tensor:
    """Colour gradients without the sawtooth's jumps, like a face photograph."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    phase = torch.tensor([0.0, 2.1, 4.2])[:, None, None] + seed
    return (127.5 + 110 * torch.sin(3 * x + 2 * y + phase)).round().to(torch.uint8)


def _rgb_set(tmp_path: Path, n: int = 10, encode=png, draw=pattern):
    """facial_expressions layout with RGB images of odd sizes (PNG: lossless, so DALI's decoder and
    torchvision's see the same pixels; JPEG decoders differ by a few levels at sharp edges)."""
    root = tmp_path / "fe"
    rows = ["user.id,image,emotion"]
    for k in range(n):
        image = pattern(3, 60 + 7 * k, 50 + 3 * k, seed=k) if draw is pattern else draw(60 + 7 * k, 50 + 3 * k, k)
        write(root / "images" / f"face{k}.img", encode(image))
        rows.append(f"1,face{k}.img,{['neutral', 'happiness', 'surprise', 'sadness', 'anger'][k % 5]}")
    write(root / "data" / "legend.csv", ("\n".join(rows) + "\n").encode())
    return open_dataset("facial_expressions", root, "train")


def _loader(dataset, train, backend="torch", **kw):
    kw.setdefault("num_workers", 0 if backend == "torch" else 1)
    kw.setdefault("config", CONFIG)
    return build_loader(dataset, kw.pop("batch_size", 4), train, device="cpu", backend=backend, **kw)


def _expected(dataset, indices, train, seed=0, epoch=0, repeats=None):
    """The specification applied to the samples' decoded files."""
    images = [decode(dataset.encoded(i), None) for i in indices]
    boxes = full_boxes([im.shape[1:] for im in images])
    params = sample_params(boxes, train, sample_keys(seed, epoch, indices, repeats) if train else None, CONFIG)
    return torch.stack([reference.augment(im, params.matrices[k], params.colour[k], CONFIG.out_size)
                        for k, im in enumerate(images)]).float()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torch_pipeline_applies_the_specification(tmp_path, train):
    dataset = _rgb_set(tmp_path, encode=jpeg)
    loader = _loader(dataset, train)
    order = EpochOrder(len(dataset), 4, train, seed=0)
    for (images, targets), indices in zip(loader, order.batches(0)):
        torch.testing.assert_close(images, _expected(dataset, indices.tolist(), train), rtol=0, atol=1e-4)
        assert targets.tolist() == [dataset.records[i].label for i in indices.tolist()]
    assert loader.epoch == 1


def test_decoded_images_are_kept_so_later_epochs_read_no_file(tmp_path):
    """Without workers the main process keeps what it decoded, up to data.decoded_cache_mb: the second
    epoch gives the same batches with the files gone; with the cache off it reads them again."""
    dataset = _ferplus(tmp_path, n=8)
    files = sorted((tmp_path / "ferplus" / "FER2013Train").glob("*.png"))
    kept, uncached = _loader(dataset, False), _loader(dataset, False, decoded_cache_mb=0)
    first = [images for images, _ in kept]
    assert len(kept.pipeline.decoded) == 8 and not uncached.pipeline.decoded
    torch.testing.assert_close(torch.cat(first), torch.cat([images for images, _ in uncached]), rtol=0, atol=0)
    for path in files:
        path.write_bytes(b"")
    torch.testing.assert_close(torch.cat([images for images, _ in kept]), torch.cat(first), rtol=0, atol=0)
    with pytest.raises(DataError, match="img0.png"):
        next(iter(uncached))
    two = 2 * 48 * 48 / 2 ** 20  # room for two of the 48 x 48 grey images
    capped = _loader(_ferplus(tmp_path / "again", n=8), False, decoded_cache_mb=two)
    list(capped)
    assert len(capped.pipeline.decoded) == 2


def test_auto_reads_in_the_main_process_through_pytorch_on_the_cpu(tmp_path):
    """On the CPU the training step keeps every core busy: auto takes the PyTorch pipeline without workers
    (DALI's CPU graph and worker processes only compete with it); what is asked for is kept."""
    dataset = _ferplus(tmp_path, n=4)
    auto = build_loader(dataset, 4, True, device="cpu", config=CONFIG)
    assert (auto.backend, auto.pipeline.num_workers) == ("torch", 0)
    asked = build_loader(dataset, 4, True, device="cpu", backend="torch", num_workers=1, config=CONFIG)
    assert asked.pipeline.num_workers == 1


def test_order_is_reproducible_and_resumable(tmp_path):
    dataset = _ferplus(tmp_path)
    first = [x for x, _ in _loader(dataset, True, seed=3)]
    again = [x for x, _ in _loader(dataset, True, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    stopped = _loader(dataset, True, seed=3)
    next(iter(stopped))
    state = stopped.state_dict()
    resumed = _loader(dataset, True, seed=3)
    resumed.load_state_dict(state)
    rest = [x for x, _ in resumed]
    assert len(rest) == len(first) - 1 and all(torch.equal(a, b) for a, b in zip(rest, first[1:]))
    second_epoch = [x for x, _ in resumed]  # the next epoch: another order and other draws
    assert not torch.equal(second_epoch[0], first[0])


def test_ranks_read_disjoint_shards():
    train = [EpochOrder(103, 5, True, seed=1, rank=r, world=3).indices(0) for r in range(3)]
    assert all(len(t) == 30 for t in train) and len(set(torch.cat(train).tolist())) == 90
    one = EpochOrder(103, 5, True, seed=1).batches(0)  # rank r's batch q is one process's batch q * world + r
    assert all(torch.equal(b, one[q * 3 + r]) for r in range(3) for q, b in
               enumerate(EpochOrder(103, 5, True, seed=1, rank=r, world=3).batches(0)))
    evaluation = [EpochOrder(103, 5, False, rank=r, world=3).indices(0) for r in range(3)]
    assert sorted(torch.cat(evaluation).tolist()) == list(range(103))
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochOrder(9, 5, True, world=2)


def test_class_balanced_sampling_draws_every_class_equally_often():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)  # 90 : 9 : 1
    order = EpochOrder(len(labels), 10, True, seed=2, weights=sample_weights(labels, 1.0))
    drawn = torch.cat([labels[order.indices(epoch)] for epoch in range(30)])
    shares = torch.bincount(drawn, minlength=3).double() / len(drawn)  # 30,000 draws
    assert torch.allclose(shares, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02), shares
    root = EpochOrder(len(labels), 10, True, seed=2, weights=sample_weights(labels, 0.5))
    drawn = torch.cat([labels[root.indices(epoch)] for epoch in range(30)])
    # the square root: 900 ** 0.5 : 90 ** 0.5 : 10 ** 0.5 of the draws, i.e. 30 : 9.5 : 3.2
    expected = torch.tensor([900, 90, 10], dtype=torch.float64).sqrt()
    shares = torch.bincount(drawn, minlength=3).double() / len(drawn)
    assert torch.allclose(shares, expected / expected.sum(), atol=0.02), shares
    assert len(order) == len(EpochOrder(len(labels), 10, True)) == 100  # as many batches as a plain epoch
    assert torch.equal(order.indices(4), EpochOrder(len(labels), 10, True, seed=2,
                                                    weights=sample_weights(labels, 1.0)).indices(4))
    assert torch.equal(sample_weights(labels, 0.0), torch.ones(1000, dtype=torch.float64))


def test_class_balanced_ranks_deal_one_draw():
    weights = sample_weights(torch.arange(103) % 4, 1.0)
    one = EpochOrder(103, 5, True, seed=1, weights=weights).batches(0)
    assert all(torch.equal(b, one[q * 3 + r]) for r in range(3) for q, b in
               enumerate(EpochOrder(103, 5, True, seed=1, rank=r, world=3, weights=weights).batches(0)))
    for bad in (torch.ones(5), -weights, torch.zeros(103), torch.full((103,), float("nan"))):
        with pytest.raises(ValueError, match="weights must be 103 non-negative numbers"):
            EpochOrder(103, 5, True, weights=bad)


def test_class_balanced_repeats_number_each_samples_draws_in_the_epoch():
    """repeats(): how often each draw's sample was drawn before in the epoch, over every rank's batches in
    their order (rank r's batch q is the epoch's batch q * world + r), aligned with indices()."""
    weights = sample_weights(torch.arange(103) % 4 + 4 * (torch.arange(103) >= 100), 1.0)  # 3 images of class 4
    one = EpochOrder(103, 5, True, seed=1, weights=weights)
    draws, seen, counted = one.indices(0), {}, []
    for sample in draws.tolist():
        counted.append(seen.get(sample, 0))
        seen[sample] = seen.get(sample, 0) + 1
    assert one.repeats(0).tolist() == counted and max(counted) >= 3  # the 3 class-4 images repeat
    batches = one.batch_repeats(0)
    for r in range(3):
        rank = EpochOrder(103, 5, True, seed=1, rank=r, world=3, weights=weights)
        assert all(torch.equal(b, batches[q * 3 + r]) for q, b in enumerate(rank.batch_repeats(0)))
        assert torch.equal(rank.repeats(0), torch.cat(rank.batch_repeats(0)))
    assert EpochOrder(103, 5, True, seed=1).repeats(0) is None  # the permutation: nothing repeats
    assert EpochOrder(103, 5, False, weights=weights).batch_repeats(0) == [None] * 21


@pytest.mark.parametrize("workers", [0, 1])
def test_a_sample_drawn_again_in_an_epoch_is_augmented_anew(tmp_path, workers):
    """Class-balanced sampling repeats a rare class's images within an epoch; each draw is its own crop, flip
    and colour (as the specification with that draw's repeat number), never a copy of the earlier one."""
    dataset = _rgb_set(tmp_path, n=10, encode=jpeg)  # classes k % 5: 2 images each
    loader = _loader(dataset, True, seed=4, class_balance=1.0, num_workers=workers)
    order = loader.pipeline.order
    images = torch.cat([x for x, _ in loader])
    indices, repeats = order.indices(0), order.repeats(0)
    torch.testing.assert_close(images, _expected(dataset, indices.tolist(), True, seed=4, repeats=repeats),
                               rtol=0, atol=1e-4)
    pairs = [(a, b) for a in range(len(indices)) for b in range(a) if indices[a] == indices[b]]
    assert pairs and all(not torch.allclose(images[a], images[b], atol=0.1) for a, b in pairs)


def test_class_balanced_loader_is_reproducible_and_resumable(tmp_path):
    dataset = _ferplus(tmp_path, n=24)  # labels k % 8
    epoch = [t for _, t in _loader(dataset, True, seed=3, class_balance=1.0)]
    again = [t for _, t in _loader(dataset, True, seed=3, class_balance=1.0)]
    plain = [t for _, t in _loader(dataset, True, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(epoch, again))
    assert not all(torch.equal(a, b) for a, b in zip(epoch, plain))
    stopped = _loader(dataset, True, seed=3, class_balance=1.0)
    next(iter(stopped))
    resumed = _loader(dataset, True, seed=3, class_balance=1.0)
    resumed.load_state_dict(stopped.state_dict())
    rest = [t for _, t in resumed]
    assert len(rest) == len(epoch) - 1 and all(torch.equal(a, b) for a, b in zip(rest, epoch[1:]))


def test_face_box_is_the_crop(tmp_path):
    """AffectNet's face box (left, top, right, bottom) selects the region that eval resizes and crops."""
    root = tmp_path / "affectnet"
    image = pattern(3, 120, 160, seed=4)
    write(root / "Manually_Annotated_Images" / "1" / "a.png", png(image))
    header = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"
    write(root / "Manually_Annotated_file_lists" / "validation.csv", f"{header}\n1/a.png,30,20,92,92,,1,0,0\n".encode())
    dataset = open_dataset("affectnet", root, "val")
    images, targets = next(iter(_loader(dataset, False, batch_size=1)))
    params = sample_params([[30, 20, 122, 112]], False, config=CONFIG)
    torch.testing.assert_close(images[0], reference.augment(image, params.matrices[0], params.colour[0], 40).float(),
                               rtol=0, atol=1e-4)
    assert targets.tolist() == [1]


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_data_crop_sets_how_far_evaluation_zooms_into_the_face(tmp_path, backend):
    """crop 1: the 48 x 48 face itself, pixel for pixel; crop 0.8: the centre 48 of the face resized to 60."""
    dataset = _ferplus(tmp_path, 2)
    faces = [decode(dataset.encoded(i), None) for i in range(2)]
    mean = torch.tensor(reference.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(reference.IMAGENET_STD)[:, None, None]
    for crop, resize in ((1.0, 48), (0.8, 60)):
        images, _ = next(iter(build_loader(dataset, 2, False, 48, "cpu", backend, num_workers=int(backend == "dali"),
                                           crop=crop)))
        config = AugmentConfig(out_size=48, resize=resize)
        params = sample_params(full_boxes([[48, 48]] * 2), False, config=config)
        want = torch.stack([reference.augment(face, params.matrices[k], params.colour[k], 48).float()
                            for k, face in enumerate(faces)])
        torch.testing.assert_close(images, want, rtol=0, atol=1e-4 if backend == "torch" else 2e-2)
        if crop == 1.0:
            torch.testing.assert_close(want, (torch.stack(faces).float().expand(-1, 3, -1, -1) / 255 - mean) / std,
                                       rtol=0, atol=1e-5)


def test_soft_and_hard_targets_combine(tmp_path):
    soft = open_dataset("ferplus", make_ferplus(tmp_path / "fp").parent, "train", label_mode="soft")
    hard = _rgb_set(tmp_path, n=4)
    _, targets = next(iter(build_loader([soft, hard], 32, False, device="cpu", backend="torch", num_workers=0,
                                        config=CONFIG)))
    assert targets.shape == (len(soft) + 4, 8) and torch.allclose(targets.sum(1), torch.ones(len(targets)))
    assert targets[-4:].max(1).values.eq(1).all()  # hard labels become one-hot


def test_fmix_batches_carry_mixed_targets(tmp_path):
    dataset = _ferplus(tmp_path, n=8)  # 8 distinct labels: a batch's labels identify its samples
    images, targets = next(iter(_loader(dataset, True, fmix=FMix(), batch_size=6)))
    plain, labels = next(iter(_loader(dataset, True, batch_size=6)))
    assert isinstance(targets, MixedTargets) and torch.equal(targets.targets, labels)
    assert 0 <= float(targets.lam) <= 1
    perm = [labels.tolist().index(t) for t in targets.targets_perm.tolist()]  # labels here are all distinct
    from_self = (images == plain).all(1)
    from_partner = (images == plain[perm]).all(1)
    assert (from_self | from_partner).all()


def test_build_loader_errors(tmp_path):
    dataset = _ferplus(tmp_path)
    with pytest.raises(ValueError, match="backend must be one of"):
        build_loader(dataset, 4, True, backend="opencv")
    with pytest.raises(ValueError, match="fewer than one batch"):
        build_loader(dataset, 64, True, device="cpu", backend="torch")


def test_linear_colour_is_the_identity_for_neutral_factors():
    torch.testing.assert_close(linear_colour(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))[0], torch.eye(3))
    grey = torch.full((3,), 0.4)
    for colour in ([1.2, 1.0, 0.8, 0.05], [0.9, 1.1, 1.05, -0.03]):  # grey stays grey, scaled by brightness
        out = linear_colour(torch.tensor([colour]))[0] @ grey
        torch.testing.assert_close(out, grey * colour[0] * colour[1], rtol=0, atol=1e-5)


@needs_dali
@pytest.mark.parametrize("train,config,balance", [
    (False, CONFIG, 0.0), (True, CONFIG, 0.0), (True, AugmentConfig(out_size=40, resize=46, zoom=0.2, translate=0.15),
                                                  0.0), (True, CONFIG, 1.0)],
    ids=["eval", "train", "train-random-crops", "train-class-balance"])
def test_dali_cpu_graph_agrees_with_the_pytorch_pipeline(tmp_path, train, config, balance):
    """The same samples and geometry (random crops and repeated draws included); colour within the linear
    approximation's error (module docstring). Colour goes before the warp in DALI and after it in the
    specification: the same for a linear map, but not where it clamps next to a sharp edge, so train uses smooth
    images (eval does no colour)."""
    dataset = _rgb_set(tmp_path, n=8, draw=_smooth if train else pattern)
    dali = [x for x, _ in _loader(dataset, train, backend="dali", config=config, class_balance=balance)]
    torch_batches = [x for x, _ in _loader(dataset, train, config=config, class_balance=balance)]
    assert len(dali) == len(torch_batches) == 2
    for a, b in zip(dali, torch_batches):
        diff = (a - b).abs()
        # eval: uint8 rounding of the warp alone (1/255 of [0, 1] is 0.017 once normalised). train, measured on
        # these strongly coloured images: 0.11 mean, 0.32 max, nearly all from the hue (turn about the grey
        # axis for HSV's shift: 0.018 mean without it); the rest is where the specification clamps after a
        # step and DALI only at the end. 0.15 normalised is 0.034 of [0, 1].
        assert diff.mean() < (0.15 if train else 0.01) and diff.max() < (0.5 if train else 0.02), (diff.mean(), diff.max())


@needs_dali
def test_closing_a_dali_loader_ends_its_workers_and_reading_goes_on_where_it_stopped(tmp_path):
    dataset = _rgb_set(tmp_path, n=12)
    straight = [x for x, _ in _loader(dataset, True, backend="dali")]
    loader = _loader(dataset, True, backend="dali")
    batches = iter(loader)
    first = next(batches)[0]
    workers = loader.pipeline._workers()
    assert workers and all(p.exitcode is None for p in workers)
    loader.close()
    assert all(p.exitcode is not None for p in workers)  # ended now, not at the end of the process
    rest = [x for x, _ in loader]  # a new pipeline, from the first batch not handed out
    assert len(straight) == 3 and len(rest) == 2
    for a, b in zip(straight, [first, *rest]):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
def test_items_sent_to_a_gpu_are_pinned():
    """The PyTorch pipeline's workers send items that the main process copies to the GPU: the DataLoader's
    pin_memory pins their data (an unpinned copy waits for the host)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from fer_train.data.torch_pipeline import _Item

    item = _Item(torch.zeros(1, 4, 4, dtype=torch.uint8), False, (0, 0, 4, 4), "face.png")
    (items, targets, failures) = pin_memory(([item], [torch.tensor(1)], []))
    assert items[0].data.is_pinned()
    assert (items[0].box, items[0].path, items[0].encoded) == ((0, 0, 4, 4), "face.png", False)
