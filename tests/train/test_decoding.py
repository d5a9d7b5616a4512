"""fer_train.data.images: the one decoder gives what PIL gives for every kind of file the readers accept
(palette, alpha, 16-bit, CMYK, EXIF orientation, grey, WebP), the DALI pipeline sees the same pixels, and
an image whose header claims a huge size is refused before anything decodes it."""

import io
import struct
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, features

from fer_train.data import DataError, build_loader, dali_available, open_dataset
from fer_train.data.images import ImageError, check_file, decode, load, parse_header
from fer_train.recipe.augmentation import AugmentConfig
from helpers import ferplus_line, huge_header, jpeg, make_ferplus, pattern, png, write

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")


def _smooth(channels: int, height: int = 20, width: int = 30) -> np.ndarray:
    """uint8 H x W x C colour gradients: no sharp edges, where JPEG and WebP decoders round differently."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([127.5 + 110 * np.sin(0.2 * x + 0.13 * y + 2.1 * c) for c in range(channels)], -1).astype(np.uint8)


def _wide(channels: int) -> np.ndarray:
    """uint16 H x W x C with every low byte used, so that truncating to 8 bits differs from rounding."""
    noise = np.random.default_rng(channels).integers(0, 257, (20, 30, channels))
    return (_smooth(channels).astype(np.int64) * 257 + noise).clip(0, 65535).astype(np.uint16)


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _png_16bit(samples: np.ndarray) -> bytes:
    """A 16-bit PNG of H x W x C samples (C 1-4), written by hand: PIL writes 16-bit grey only."""
    height, width, channels = samples.shape
    rows = samples.astype(">u2").reshape(height, -1).view(np.uint8)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, {1: 0, 2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    data = zlib.compress(b"".join(b"\0" + row.tobytes() for row in rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _rounded(samples: np.ndarray) -> np.ndarray:
    return np.round(samples.astype(np.float64) * 255 / 65535).astype(np.uint8)


rgb, rgba = _smooth(3), np.dstack([_smooth(3), _smooth(1)])
CASES = {  # name -> (the file, or a function making it; the reference's samples where PIL cannot give them)
    "palette png": lambda: _save(Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"),
    "palette png, transparency": lambda: _save(
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", transparency=3),
    "grey+alpha png": lambda: _save(Image.fromarray(np.dstack([_smooth(1), _smooth(3)[..., 1:2]])), "PNG"),
    "rgba png": lambda: _save(Image.fromarray(rgba), "PNG"),
    "1-bit png": lambda: _save(Image.fromarray(_smooth(1)[..., 0] > 128), "PNG"),
    "16-bit grey png": lambda: _save(Image.fromarray(_wide(1)[..., 0]), "PNG"),
    # PIL reads 16-bit colour truncated to 8 bits: the reference is the written samples, rounded
    "16-bit rgb png": (lambda: _png_16bit(_wide(3)), _rounded(_wide(3))),
    "16-bit grey+alpha png": (lambda: _png_16bit(_wide(2)), _rounded(_wide(2)[..., :1])),
    "16-bit rgba png": (lambda: _png_16bit(_wide(4)), _rounded(_wide(4)[..., :3])),
    "png, exif orientation 6": lambda: _save(Image.fromarray(rgb), "PNG", exif=_exif(6)),
    "grey jpeg": lambda: _save(Image.fromarray(_smooth(1)[..., 0]), "JPEG", quality=95),
    "cmyk jpeg": lambda: _save(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95),
    "cmyk jpeg, exif orientation 6": lambda: _save(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95,
                                                   exif=_exif(6)),
    "progressive jpeg": lambda: _save(Image.fromarray(rgb), "JPEG", quality=90, progressive=True),
    "grey jpeg, exif orientation 8": lambda: _save(Image.fromarray(_smooth(1)[..., 0]), "JPEG", quality=95,
                                                   exif=_exif(8)),
    **{f"jpeg, exif orientation {k}": (lambda k=k: _save(Image.fromarray(rgb), "JPEG", quality=95, exif=_exif(k)))
       for k in range(1, 9)},
    "lossy webp": lambda: _save(Image.fromarray(rgb), "WEBP", quality=90),
    "lossless webp, alpha": lambda: _save(Image.fromarray(rgba), "WEBP", lossless=True),
    "lossy webp, alpha": lambda: _save(Image.fromarray(rgba), "WEBP", quality=90),  # the extended format
    "lossless webp, exif orientation 6": lambda: _save(Image.fromarray(rgb), "WEBP", lossless=True, exif=_exif(6)),
}
GREY = {"grey+alpha png", "1-bit png", "16-bit grey png", "16-bit grey+alpha png", "grey jpeg",
        "grey jpeg, exif orientation 8"}
# what DALI reads otherwise than decode(), or may (measured on its CPU decoder): it gets a PNG of decode()'s pixels
NOT_PLAIN = {"cmyk jpeg", "cmyk jpeg, exif orientation 6", "lossy webp, alpha", "lossless webp, exif orientation 6"}


def _file(name: str) -> tuple[bytes, np.ndarray]:
    """(the file's bytes, the reference: uint8 H x W x C)."""
    case = CASES[name]
    if "webp" in name and not features.check("webp"):
        pytest.skip("PIL was built without WebP")
    if isinstance(case, tuple):
        return case[0](), case[1]
    data = case()
    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode == "I;16":  # PIL keeps 16-bit grey whole: rounded as decode() does
            return data, _rounded(np.asarray(image))[..., None]
        grey = image.mode in ("1", "L", "LA")
        reference = np.asarray(image.convert("L" if grey else "RGB"))
    return data, reference[..., None] if grey else reference


@pytest.mark.parametrize("name", CASES)
def test_decode_gives_what_pil_gives(name):
    data, reference = _file(name)
    image = decode(data, name)
    assert image.dtype == torch.uint8 and image.shape[0] == (1 if name in GREY else 3)
    assert image.shape[1:] == reference.shape[:2], "orientation"
    # JPEG and lossy WebP: PIL's and torchvision's builds of libjpeg-turbo / libwebp may round colour
    # conversion and upsampling differently by a level (measured: identical here); the rest is exact
    tolerance = 1 if "jpeg" in name or "lossy" in name else 0
    torch.testing.assert_close(image, torch.tensor(reference).permute(2, 0, 1), rtol=0, atol=tolerance)
    header = parse_header(data)
    assert (header.height, header.width) == tuple(image.shape[1:])
    assert header.plain == (name not in NOT_PLAIN)


def test_load_is_decode_of_the_file(tmp_path):
    data, reference = _file("16-bit rgb png")
    path = write(tmp_path / "wide.png", data)
    assert torch.equal(load(path), decode(data, None))
    with pytest.raises(ImageError, match=r"gone\.png: no such file") as caught:
        load(tmp_path / "gone.png")
    assert caught.value.reason == "missing image"


def _unusual_set(tmp_path: Path):
    """facial_expressions layout holding one file of each kind (names without their format's extension:
    the readers go by content)."""
    root = tmp_path / "fe"
    rows = ["user.id,image,emotion"]
    for k, name in enumerate(CASES):
        if "webp" in name and not features.check("webp"):
            continue
        write(root / "images" / f"case{k}.img", _file(name)[0])
        rows.append(f"u,case{k}.img,{['neutral', 'happiness', 'surprise', 'sadness'][k % 4]}")
    write(root / "data" / "legend.csv", ("\n".join(rows) + "\n").encode())
    return open_dataset("facial_expressions", root, "train")


@needs_dali
def test_dali_sees_the_pixels_decode_gives(tmp_path):
    """Eval batches of both pipelines on every kind of file: the same samples and pixels, within the uint8
    rounding of DALI's warp (as in test_pipelines); an orientation, palette or 16-bit error shows as a
    difference of a good part of the range."""
    dataset = _unusual_set(tmp_path)
    config = AugmentConfig(out_size=40, resize=46)
    batches = {backend: list(build_loader(dataset, 4, False, device="cpu", backend=backend, config=config,
                                          num_workers=1)) for backend in ("torch", "dali")}
    assert len(batches["dali"]) == len(batches["torch"]) == -(-len(dataset) // 4)
    for (a, labels_a), (b, labels_b) in zip(batches["dali"], batches["torch"]):
        assert torch.equal(labels_a, labels_b)
        diff = (a - b).abs()
        assert diff.mean() < 0.01 and diff.max() < 0.02, (diff.mean(), diff.max())


# ---------------------------------------------------------------------------------------------------
# Decompression bombs: refused by their header, before anything decodes them

def _bomb_jpeg() -> bytes:
    return huge_header(jpeg(pattern(3, 16, 16)), 60000, 60000)


def _bomb_png() -> bytes:
    return huge_header(png(pattern(1, 48, 48)), 60000, 60000)


def test_a_bomb_is_refused_when_opened(tmp_path):
    """FERPlus (PNG, face boxes) and facial_expressions (JPEG, whole images): DataError naming the file and
    its size, or counted as "image too large"; PIL's DecompressionBombWarning and Error never reach here."""
    votes = (9,) + (0,) * 9
    make_ferplus(tmp_path / "ferplus", [ferplus_line("a.png", votes), ferplus_line("bomb.png", votes)])
    write(tmp_path / "ferplus" / "FER2013Train" / "bomb.png", _bomb_png())
    fe = tmp_path / "fe"
    write(fe / "images" / "a.jpg", jpeg(pattern(3, 16, 16)))
    write(fe / "images" / "bomb.jpg", _bomb_jpeg())
    write(fe / "data" / "legend.csv", b"user.id,image,emotion\nu,a.jpg,anger\nu,bomb.jpg,fear\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        for name, root, line in (("ferplus", tmp_path / "ferplus", 2), ("facial_expressions", fe, 3)):
            with pytest.raises(DataError, match=rf"line {line}: image .*bomb\.(png|jpg) is 60000 x 60000 pixels by its "
                                                r"header, more than data.max_image_pixels \(50,000,000\)"):
                open_dataset(name, root, "train")
            dataset = open_dataset(name, root, "train", on_error="skip")
            assert len(dataset) == 1 and dataset.skipped == Counter({"image too large": 1})


def test_the_pixel_limit_is_an_option(tmp_path):
    make_ferplus(tmp_path, [ferplus_line("a.png", (9,) + (0,) * 9)])  # 48 x 48: 2,304 pixels
    with pytest.raises(DataError, match=r"a\.png is 48 x 48 pixels by its header, more than data.max_image_pixels "
                                        r"\(2,000\)"):
        open_dataset("ferplus", tmp_path, "train", max_image_pixels=2000)
    assert len(open_dataset("ferplus", tmp_path, "train", max_image_pixels=2304)) == 1
    assert len(open_dataset("ferplus", tmp_path, "train", max_image_pixels=None)) == 1
    with pytest.raises(ValueError, match="max_image_pixels must be positive or None"):
        open_dataset("ferplus", tmp_path, "train", max_image_pixels=0)


def test_a_run_opens_its_sets_with_the_configured_pixel_limit(tmp_path):
    """data.max_image_pixels reaches every split a run opens (fer_train.run_data), not only open_dataset."""
    from fer_train.config import build_config
    from fer_train.run_data import open_run_data

    make_ferplus(tmp_path, [ferplus_line("a.png", (9,) + (0,) * 9)])
    config = build_config("default", overrides={"data": {"ferplus": str(tmp_path), "max_image_pixels": 2000}})
    with pytest.raises(DataError, match=r"a\.png is 48 x 48 pixels by its header, more than data.max_image_pixels"):
        open_run_data(config)
    config.data.max_image_pixels = 2304
    assert len(open_run_data(config).train) == 1


@pytest.mark.parametrize("make", [_bomb_jpeg, _bomb_png], ids=["jpeg", "png"])
def test_decode_refuses_a_bomb_without_decoding_it(make):
    with pytest.raises(ImageError, match=r"bomb: the image is 60000 x 60000 pixels by its header") as caught:
        decode(make(), "bomb")
    assert caught.value.reason == "image too large"


def test_check_file_reports_what_is_wrong(tmp_path):
    good = write(tmp_path / "good.jpg", jpeg(pattern(3, 16, 24)))
    header, problem = check_file(good)
    assert problem is None and (header.format, header.height, header.width) == ("jpeg", 16, 24)
    assert check_file(tmp_path / "none.jpg") == (None, ("missing image", "does not exist"))
    bomb = write(tmp_path / "bomb.jpg", _bomb_jpeg())
    assert check_file(bomb)[1][0] == "image too large" and check_file(bomb, max_pixels=None)[1] is None
