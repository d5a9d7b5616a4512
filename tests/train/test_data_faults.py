"""Images that break after a set was opened (overwritten with a corrupt body, deleted, replaced by a
decompression bomb), on both pipelines with a worker process: one DataError naming the file
(on_error="raise"), or the next sample in its place, counted once in Loader.skipped (on_error="skip")."""

from collections import Counter
from pathlib import Path

import pytest
import torch

from fer_train.data import DataError, build_loader, dali_available, open_dataset
from fer_train.recipe.augmentation import AugmentConfig
from helpers import corrupt_jpeg_body, huge_header, jpeg, pattern, write

CONFIG = AugmentConfig(out_size=24, resize=28)
EMOTIONS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                   reason="nvidia-dali is not installed"))]


def _faces(tmp_path: Path, on_error: str, n: int = 12):
    """facial_expressions layout: face{k}.jpg of class k % 8, each image distinct."""
    root = tmp_path / "fe"
    for k in range(n):
        write(root / "images" / f"face{k}.jpg", jpeg(pattern(3, 24, 24, seed=k)))
    rows = ["user.id,image,emotion"] + [f"u,face{k}.jpg,{EMOTIONS[k % 8]}" for k in range(n)]
    write(root / "data" / "legend.csv", ("\n".join(rows) + "\n").encode())
    return root / "images", open_dataset("facial_expressions", root, "train", on_error=on_error)


def _loader(dataset, backend: str, train: bool = False):
    return build_loader(dataset, 4, train, device="cpu", backend=backend, config=CONFIG, num_workers=1, seed=1)


def _break(images: Path, corrupt: int | None = None, delete: int | None = None, bomb: int | None = None) -> None:
    if corrupt is not None:
        path = images / f"face{corrupt}.jpg"
        path.write_bytes(corrupt_jpeg_body(path.read_bytes()))
    if delete is not None:
        (images / f"face{delete}.jpg").unlink()
    if bomb is not None:
        path = images / f"face{bomb}.jpg"
        path.write_bytes(huge_header(path.read_bytes(), 60000, 60000))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_broken_mid_run_raises_one_clear_error(tmp_path, backend):
    images, dataset = _faces(tmp_path, "raise")
    loader = _loader(dataset, backend)
    assert [len(t) for _, t in loader] == [4, 4, 4]  # the first epoch reads every file
    _break(images, corrupt=5)
    with pytest.raises(DataError) as caught:
        list(loader)
    message = str(caught.value)
    assert message.startswith(f"{images / 'face5.jpg'}: cannot decode the image (") and "Traceback" not in message
    assert message.endswith("; restore the file, or open the set with on_error='skip' to leave it out")
    (images / "face5.jpg").write_bytes(jpeg(pattern(3, 24, 24, seed=5)))
    assert [len(t) for _, t in loader] == [4, 4]  # the epoch goes on at the batch that failed, restored
    _break(images, delete=2)
    with pytest.raises(DataError, match=rf"^{images / 'face2.jpg'}: the image has gone \(no such file\) since the set "
                                        r"was opened; restore the file"):
        list(loader)
    (images / "face2.jpg").write_bytes(jpeg(pattern(3, 24, 24, seed=2)))
    _break(images, bomb=9)
    with pytest.raises(DataError, match=r"face9\.jpg: the image is 60000 x 60000 pixels by its header, more than "
                                        r"data.max_image_pixels \(50,000,000\); replace the file or raise"):
        list(loader)
    assert loader.skipped == Counter()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_broken_mid_run_is_replaced_and_counted(tmp_path, backend):
    """In eval order sample k is slot k: a broken sample's slot holds the next sample (its image and its
    label), batches keep their size, and each broken file is counted once however often it is met."""
    images, dataset = _faces(tmp_path, "skip")
    loader = _loader(dataset, backend)
    first = list(loader)
    _break(images, corrupt=5, delete=2, bomb=9)
    for epoch in range(2):
        batches = list(loader)
        pictures, labels = torch.cat([x for x, _ in batches]), torch.cat([t for _, t in batches])
        assert [len(t) for _, t in batches] == [4, 4, 4]
        assert labels.tolist() == [k % 8 for k in (0, 1, 3, 3, 4, 6, 6, 7, 8, 10, 10, 11)]
        for broken in (2, 5, 9):
            assert torch.equal(pictures[broken], pictures[broken + 1])
        assert torch.equal(pictures[:2], first[0][0][:2])
        assert loader.skipped == Counter({"corrupt image": 1, "missing image": 1, "image too large": 1}), epoch


def test_skipping_keeps_a_resumed_run_exact(tmp_path):
    """Shuffled batches with broken files in them: a loader resumed from a checkpoint's position reads the
    batches the first one read, the same samples standing in."""
    images, dataset = _faces(tmp_path, "skip", n=16)
    _break(images, corrupt=3, delete=7)
    straight = _loader(dataset, "torch", train=True)
    expected = [x for x, _ in straight]
    stopped = _loader(dataset, "torch", train=True)
    next(iter(stopped))
    resumed = _loader(dataset, "torch", train=True)
    resumed.load_state_dict(stopped.state_dict())
    rest = [x for x, _ in resumed]
    assert len(rest) == len(expected) - 1 and all(torch.equal(a, b) for a, b in zip(rest, expected[1:]))
    assert straight.skipped == Counter({"corrupt image": 1, "missing image": 1})
    assert stopped.skipped + resumed.skipped == straight.skipped  # each broken sample in one batch


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_file_the_gpu_decoder_refuses_is_found_on_the_cpu(tmp_path, on_error):
    """On a GPU the PyTorch pipeline decodes a batch's JPEGs in one call in the main process; when it fails,
    each is decoded on the CPU to find the file, which raises or is replaced like any other. (Run here with
    the batch decoder on the CPU, which fails alike.)"""
    from fer_train.data.torch_pipeline import _Fetch

    images, dataset = _faces(tmp_path, on_error)
    _break(images, corrupt=1)
    pipeline = _loader(dataset, "torch").pipeline
    fetch = _Fetch(pipeline, gpu_jpeg=True)
    items, targets, failures = fetch((torch.arange(4), None))  # (samples, earlier draws of each: none)
    assert all(item.encoded for item in items) and not failures  # its header passes: left to the batch decoder
    if on_error == "raise":
        with pytest.raises(DataError, match=r"face1\.jpg: cannot decode the image"):
            pipeline._decode(items, torch.arange(4), targets)
        return
    decoded = pipeline._decode(items, torch.arange(4), targets)
    assert torch.equal(decoded[1], decoded[2]) and [int(t) for t in targets] == [0, 2, 2, 3]
    assert pipeline.skipped == Counter({"corrupt image": 1})
