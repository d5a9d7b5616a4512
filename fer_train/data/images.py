"""Image files: their headers (the size as decoded, the EXIF orientation), the cheap whole-file checks made
when a data set is opened, and the one decoder every pipeline and prediction uses, so that every path sees
the same pixels.

decode() gives what PIL gives after ImageOps.exif_transpose and a conversion to "L" for grey images or
"RGB" for every other kind (palettes expanded, alpha dropped, CMYK converted), except that 16-bit samples
are rounded to 8 bits (v * 255 / 65535) where PIL truncates 16-bit colour. The DALI pipeline hands DALI
what it would read otherwise as a PNG of decode()'s pixels (Header.plain), so every path sees these pixels.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg, decode_png, decode_webp

from fer_train.config import DataConfig
from fer_train.errors import DataError

__all__ = ["Header", "ImageError", "MAX_IMAGE_PIXELS", "check_file", "decode", "load", "parse_header"]

MAX_IMAGE_PIXELS = DataConfig.max_image_pixels
_JPEG, _PNG = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
# Bytes searched for a JPEG's end marker at the end of the file. Some writers append data after it; a
# window too small rejects files that decode, one too large can find a thumbnail's marker in a short
# truncated file, which is safe: truncated JPEGs fail cleanly (DataError) when decoded.
_TAIL = 4096
# Bytes of a JPEG read first for its header; files whose header is longer (a large EXIF block) are read whole.
_HEAD = 16384


class ImageError(DataError):
    """An image that cannot be used, with the reason it is counted under when bad images are skipped."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # pickled, an exception is rebuilt from its arguments: keep the reason
        return type(self), (self.reason, str(self))


@dataclass(frozen=True)
class Header:
    format: str        # "jpeg", "png" or "webp"
    height: int        # as decoded: after the EXIF orientation
    width: int
    orientation: int   # EXIF orientation 1-8 (1: as stored)
    # the kinds every decoder here reads alike (torchvision, DALI's CPU decoder; measured): JPEG of 8-bit
    # grey or YCbCr (baseline, extended or progressive), any PNG, a simple WebP (no extended-format chunks)
    plain: bool
    palette: bool      # a palette PNG

    @property
    def pixels(self) -> int:
        return self.height * self.width


class _Short(Exception):
    """The bytes end before the header does."""


def parse_header(data: bytes) -> Header | None:
    """The header of a whole JPEG, PNG or WebP file's bytes; None if it is none of these or its header is
    broken or cut short."""
    try:
        return _parse(data)
    except _Short:
        return None


def _parse(data: bytes) -> Header | None:
    if data.startswith(_JPEG):
        return _jpeg(data)
    if data.startswith(_PNG):
        return _png(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data)
    return None


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # start-of-frame markers


def _jpeg(data: bytes) -> Header | None:
    """Markers up to the first scan: the frame (size, precision, components) and the first Exif block (as
    PIL reads them)."""
    pos, frame, exif = 2, None, None
    while True:
        if pos + 4 > len(data):
            raise _Short
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in (0xD8, 0xD9):
            return None
        if marker == 0xDA:  # the first scan: the header is over
            break
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end > len(data):
            raise _Short
        if marker in _SOF and frame is None:
            if end - pos < 10:
                return None
            frame = marker, data[pos + 4], _u16(data, pos + 5), _u16(data, pos + 7), data[pos + 9]
        elif marker == 0xE1 and exif is None and data.startswith(b"Exif\0\0", pos + 4):
            exif = data[pos + 10:end]
        pos = end
    if frame is None or not frame[2] or not frame[3]:
        return None
    marker, precision, height, width, components = frame
    plain = marker in (0xC0, 0xC1, 0xC2) and precision == 8 and components in (1, 3)
    return _oriented("jpeg", height, width, _orientation(exif), plain)


def _png(data: bytes) -> Header | None:
    if len(data) < 33:
        raise _Short
    if data[8:16] != b"\0\0\0\x0dIHDR":
        return None
    width, height, colour = _u32(data, 16), _u32(data, 20), data[25]
    if not width or not height:
        return None
    # an eXIf chunk anywhere before IEND counts, as in PIL; most files have none, which a search tells for a
    # tenth of the cost of walking the chunks
    exif, pos = None, 33 if b"eXIf" in data else len(data)
    while pos + 8 <= len(data):
        length, kind = _u32(data, pos), data[pos + 4:pos + 8]
        if kind == b"IEND":
            break
        if kind == b"eXIf":
            exif = data[pos + 8:pos + 8 + length]
            break
        pos += 12 + length
    return _oriented("png", height, width, _orientation(exif), True, palette=colour == 3)


def _webp(data: bytes) -> Header | None:
    if len(data) < 30:
        raise _Short
    kind = data[12:16]
    if kind == b"VP8 ":  # lossy: a frame tag, a start code, 14-bit width and height
        if data[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
        return _oriented("webp", height, width, 1, True) if width and height else None
    if kind == b"VP8L":  # lossless: a signature byte, then width - 1 and height - 1 in 14 bits each
        if data[20] != 0x2F:
            return None
        bits = int.from_bytes(data[21:25], "little")
        return _oriented("webp", (bits >> 14 & 0x3FFF) + 1, (bits & 0x3FFF) + 1, 1, True)
    if kind == b"VP8X":  # extended: the canvas size, then chunks (alpha, animation, EXIF, ...)
        width, height = int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        exif, pos = None, 12
        while pos + 8 <= len(data):
            size = int.from_bytes(data[pos + 4:pos + 8], "little")
            if data[pos:pos + 4] == b"EXIF":
                exif = data[pos + 8:pos + 8 + size]
                exif = exif[6:] if exif.startswith(b"Exif\0\0") else exif
                break
            pos += 8 + size + (size & 1)
        return _oriented("webp", height, width, _orientation(exif), False)
    return None


def _orientation(tiff: bytes | None) -> int:
    """The Orientation tag of IFD0 of an Exif (TIFF) block, 1 when there is none or it is out of range."""
    if not tiff or len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "little" if tiff[:2] == b"II" else "big"
    number = lambda at, size: int.from_bytes(tiff[at:at + size], order)  # noqa: E731
    ifd = number(4, 4)
    for entry in range(ifd + 2, ifd + 2 + 12 * number(ifd, 2), 12):
        if entry + 12 > len(tiff):
            break
        if number(entry, 2) == 0x0112:
            value = number(entry + 8, 2 if number(entry + 2, 2) == 3 else 4)  # SHORT, else LONG
            return value if 1 <= value <= 8 else 1
    return 1


def _oriented(kind: str, height: int, width: int, orientation: int, plain: bool, palette: bool = False) -> Header:
    if orientation >= 5:  # the orientations that turn the image by a quarter
        height, width = width, height
    return Header(kind, height, width, orientation, plain, palette)


def _u16(data: bytes, at: int) -> int:
    return int.from_bytes(data[at:at + 2], "big")


def _u32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at:at + 4], "big")


def check_file(path: str | Path,
               max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[Header | None, tuple[str, str] | None]:
    """(the file's header, None) if it looks like a whole JPEG, PNG or WebP image of at most max_pixels
    pixels, else (the header or None, (reason, what is wrong)). Reads the header, then judges JPEG and WebP
    by their first and last bytes and PNG in full (_png_problem); decodes nothing."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            data = file.read(_HEAD)
            if data.startswith(_PNG) or data[:4] == b"RIFF" and data[8:12] == b"WEBP":
                data += file.read()  # PNG is checked in full; WebP keeps its EXIF chunk at the end
            try:
                header = _parse(data)
            except _Short:
                data += file.read()
                header = parse_header(data)
            if len(data) < size:
                file.seek(max(0, size - _TAIL))
                tail = file.read()
            else:
                tail = data[-_TAIL:]
    except FileNotFoundError:
        return None, ("missing image", "does not exist")
    except OSError as err:
        return None, ("unreadable image", f"cannot be read ({err.strerror})")
    if size == 0:
        return None, ("corrupt image", "is empty")
    webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    if not (data.startswith((_JPEG, _PNG)) or webp):
        return None, ("corrupt image", f"is not a JPEG, PNG or WebP file (it starts with {data[:8].hex(' ')})")
    if webp and int.from_bytes(data[4:8], "little") + 8 > size:  # the RIFF header states the whole length
        return header, ("corrupt image", "is a truncated WebP file (shorter than its RIFF header says)")
    if header is None:
        return None, ("corrupt image", "has an unreadable header (not a whole JPEG, PNG or WebP header)")
    if max_pixels is not None and header.pixels > max_pixels:
        return header, ("image too large", f"is {header.width} x {header.height} pixels by its header, more than "
                                           f"data.max_image_pixels ({max_pixels:,}): a decompression bomb or a "
                                           f"wrong header")
    if header.format == "png":
        return header, _png_problem(data)
    if webp:
        return header, None
    if b"\xff\xd9" not in tail:
        return header, ("corrupt image", "is a truncated JPEG file (no end marker FFD9)")
    return header, None


_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # colour type -> bits
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_problem(data: bytes) -> tuple[str, str] | None:
    """What libpng would stop at in a PNG file, or None. torchvision 0.29's decode_png kills the process
    (SIGSEGV) on any libpng error, seen with a CRC error and with a corrupt deflate stream, so a PNG is
    checked in full before anything decodes it: chunk structure, the CRCs of the critical chunks (libpng
    only warns about the others), the header, and the inflated image data's length and row filters.
    For FERPlus's 2 KB files this is as cheap as reading them. The caller has checked the pixel count
    first: a small file can inflate to gigabytes."""
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


# EXIF orientation -> the turn or flip that shows the image upright (PIL's ImageOps.exif_transpose), on C x H x W
_UPRIGHT = {
    2: lambda x: x.flip(-1), 3: lambda x: x.flip(-2, -1), 4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1), 6: lambda x: x.transpose(-2, -1).flip(-1),
    7: lambda x: x.transpose(-2, -1).flip(-2, -1), 8: lambda x: x.transpose(-2, -1).flip(-2)}


_DECODERS = {"jpeg": decode_jpeg, "png": decode_png, "webp": decode_webp}


def decode(data: bytes | torch.Tensor, path: str | None, max_pixels: int | None = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """uint8 C x H x W, C 1 for grey images and 3 for every other kind (module docstring). ImageError naming
    the file when the bytes are not a whole image or it has more than max_pixels pixels."""
    if isinstance(data, torch.Tensor):
        data = data.numpy().tobytes()
    header = parse_header(data)
    if header is None:
        raise ImageError("corrupt image", f"{path}: not a whole JPEG, PNG or WebP image (its header is unreadable)")
    if max_pixels is not None and header.pixels > max_pixels:
        raise ImageError("image too large", f"{path}: the image is {header.width} x {header.height} pixels by its "
                                            f"header, more than data.max_image_pixels ({max_pixels:,})")
    problem = _png_problem(data) if header.format == "png" else None
    if problem is not None:
        raise ImageError(problem[0], f"{path}: {problem[1].removeprefix('is ')}")
    # palettes come as their indices unless RGB is asked for; orientation is applied below, the same way
    # for every format (torchvision reads it from JPEG and PNG only, and from a PNG's eXIf before IDAT only).
    # The format's own decoder: decode_image costs 40 us more per FERPlus image (measured: 97 against 58).
    mode = ImageReadMode.RGB if header.palette else ImageReadMode.UNCHANGED
    try:
        image = _DECODERS[header.format](torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except (RuntimeError, ValueError) as err:
        why = re.sub(r"^\w+, \S+:\d+, ", "", str(err))  # torchvision starts with its function and source line
        raise ImageError("corrupt image", f"{path}: cannot decode the image ({why})") from err
    if image.dtype == torch.uint16:  # v * 255 / 65535 rounded; never a tie, as 65535 = 255 * 257
        image = ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    image = image[:1] if image.shape[0] == 2 else image[:3]
    if header.orientation in _UPRIGHT:
        image = _UPRIGHT[header.orientation](image)
    return image.contiguous()


def load(path: str | Path, max_pixels: int | None = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """decode() of an image file; ImageError naming the file when it cannot be read or decoded."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as err:
        raise ImageError("missing image", f"{path}: no such file") from err
    except OSError as err:
        raise ImageError("unreadable image", f"{path}: cannot read the file ({err.strerror})") from err
    if not data:
        raise ImageError("corrupt image", f"{path}: the file is empty, not an image")
    return decode(data, str(path), max_pixels)
