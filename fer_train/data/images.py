"""Image files: cheap whole-file checks made when a data set is opened, and the one decoder every pipeline
and prediction uses, so that every path sees the same pixels."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from fer_train.errors import DataError

__all__ = ["decode", "image_problem", "image_size", "load"]

_JPEG, _PNG = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
# Bytes searched for a JPEG's end marker at the end of the file. Some writers append data after it; a
# window too small rejects files that decode, one too large can find a thumbnail's marker in a short
# truncated file, which is safe: truncated JPEGs fail cleanly (DataError) when decoded.
_TAIL = 4096


def image_problem(path: Path) -> tuple[str, str] | None:
    """(reason, what is wrong) if the file cannot be a whole JPEG, PNG or WebP image, None if it looks
    whole. JPEG and WebP are judged by their first and last bytes, PNG in full (_png_problem)."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            head = file.read(16)
            if head.startswith(_PNG):
                return _png_problem(head + file.read())
            file.seek(max(0, size - _TAIL))
            tail = file.read()
    except FileNotFoundError:
        return "missing image", "does not exist"
    except OSError as err:
        return "corrupt image", f"cannot be read ({err.strerror})"
    if size == 0:
        return "corrupt image", "is empty"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        if int.from_bytes(head[4:8], "little") + 8 > size:  # the RIFF header states the whole length
            return "corrupt image", "is a truncated WebP file (shorter than its RIFF header says)"
        return None
    if not head.startswith(_JPEG):
        return "corrupt image", f"is not a JPEG, PNG or WebP file (it starts with {head[:8].hex(' ')})"
    if b"\xff\xd9" not in tail:
        return "corrupt image", "is a truncated JPEG file (no end marker FFD9)"
    return None


_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # colour type -> bits
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_problem(data: bytes) -> tuple[str, str] | None:
    """What libpng would stop at in a PNG file, or None. torchvision 0.29's decode_png kills the process
    (SIGSEGV) on any libpng error, seen with a CRC error and with a corrupt deflate stream, so a PNG is
    checked in full before anything decodes it: chunk structure, the CRCs of the critical chunks (libpng
    only warns about the others), the header, and the inflated image data's length and row filters.
    For FERPlus's 2 KB files this is as cheap as reading them."""
    pos, header, palette, idat = len(_PNG), None, False, []
    while pos + 12 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data):
            return "corrupt image", "is a truncated PNG file (a chunk runs past the end)"
        body = data[pos + 8:end - 4]
        if not kind[0] & 0x20 and zlib.crc32(kind + body) != int.from_bytes(data[end - 4:end], "big"):
            return "corrupt image", f"is a corrupt PNG file (CRC error in its {kind.decode('latin-1')} chunk)"
        if kind == b"IEND":
            break
        header = body if kind == b"IHDR" else header
        palette |= kind == b"PLTE"
        if kind == b"IDAT":
            idat.append(body)
        pos = end
    else:
        return "corrupt image", "is a truncated PNG file (no IEND chunk)"
    if header is None or len(header) != 13:
        return "corrupt image", "is a corrupt PNG file (no valid IHDR chunk)"
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, interlaced = header[8], header[9], header[12]
    if not width or not height or depth not in _PNG_DEPTHS.get(colour, ()) or interlaced > 1 or \
            (colour == 3 and not palette):
        return "corrupt image", f"is a corrupt PNG file (invalid header: {width} x {height}, colour type " \
                                f"{colour}, bit depth {depth})"
    try:
        pixels = zlib.decompress(b"".join(idat))
    except zlib.error as err:
        return "corrupt image", f"is a corrupt PNG file (its image data does not inflate: {err})"
    start = 0
    for x0, y0, dx, dy in _ADAM7 if interlaced else ((0, 0, 1, 1),):
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns <= 0 or rows <= 0:
            continue
        row = 1 + -(-(columns * _PNG_CHANNELS[colour] * depth) // 8)  # a filter byte, then the samples
        if len(pixels) < start + rows * row:
            return "corrupt image", "is a corrupt PNG file (too little image data)"
        filters = pixels[start:start + rows * row:row]
        if max(filters) > 4:
            return "corrupt image", f"is a corrupt PNG file (unknown row filter {max(filters)})"
        start += rows * row
    return None


def image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) from the file's header, None if the header is unreadable. PNG's is read directly
    (through PIL it took as long as the whole _png_problem check); other formats through PIL, which
    reads no pixels."""
    try:
        with open(path, "rb") as file:
            head = file.read(24)
        if head.startswith(_PNG) and head[12:16] == b"IHDR":
            return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, SyntaxError, ValueError):  # PIL reports broken headers with any of these
        return None


def decode(data: bytes | torch.Tensor, path: str | None) -> torch.Tensor:
    """uint8 C x H x W with C 1 (grey) or 3 (RGB), alpha channels dropped; DataError naming the file when the
    bytes do not decode."""
    if not isinstance(data, torch.Tensor):
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        image = decode_image(data, mode=ImageReadMode.UNCHANGED)
    except RuntimeError as err:
        raise DataError(f"{path}: cannot decode the image ({err})") from err
    return image[:1] if image.shape[0] == 2 else image[:3]


def load(path: str | Path) -> torch.Tensor:
    """decode() of an image file; DataError naming the file when it cannot be read or decoded."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror})") from err
    if not data:  # torch.frombuffer rejects empty buffers with an error about tensors, not the file
        raise DataError(f"{path}: the file is empty, not an image")
    return decode(data, str(path))
