"""Metadata texts of PNG, JPEG and WebP files, read by the files' own length fields with every read bounded
(pipeline/image_metadata.py parses them; its docstring says why this is not left to Pillow).

``extract(path)`` -> ((width, height), Texts): PNG tEXt / zTXt / iTXt (and eXIf) chunks, JPEG APP1 EXIF and
COM segments, WebP EXIF chunks; image data is seeked over, never read.  A text over MAX_TEXT_BYTES (raw or
inflated: zlib output is capped), metadata over MAX_METADATA_BYTES in all, or a truncated or foreign file is
a MetadataError with the reason; at most MAX_CHUNKS chunks are looked at.  EXIF UserComment honours its
character-code prefix (ASCII, UNICODE in either byte order, undefined as UTF-8).
"""

from __future__ import annotations

import os
import stat
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

from pipeline.inputs import InputError, check_input_file

MAX_TEXT_BYTES = 2 * 1024 * 1024
MAX_METADATA_BYTES = 8 * 1024 * 1024  # all of one image's metadata texts together
MAX_CHUNKS = 4096  # chunks or segments looked at in one file


class MetadataError(ValueError):
    """The image's metadata is refused (too large, broken); the message is the reason."""


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n >= 2**20 else f"{n:,} bytes"


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) < n:
        raise MetadataError("truncated file")
    return data


class Texts:
    """Metadata texts of one file, with the size caps enforced as they are added."""

    def __init__(self) -> None:
        self.items: dict[str, str] = {}
        self.total = 0
        self.exif: bytes | None = None

    def check(self, what: str, size: int) -> None:
        if size > MAX_TEXT_BYTES:
            raise MetadataError(f"metadata {what} is {_mb(size)}, above the {_mb(MAX_TEXT_BYTES)} limit")
        if self.total + size > MAX_METADATA_BYTES:
            raise MetadataError(f"metadata above {_mb(MAX_METADATA_BYTES)} in all")
        self.total += size

    def add(self, key: str, text: str) -> None:
        self.items.setdefault(key, text)  # the first of a repeated key, as Pillow keeps it


def _inflate(data: bytes, what: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_TEXT_BYTES + 1)
    except zlib.error as exc:
        raise MetadataError(f"metadata {what}: broken compressed text ({exc})") from None
    if len(out) > MAX_TEXT_BYTES or inflater.unconsumed_tail:
        raise MetadataError(f"metadata {what} inflates to more than {_mb(MAX_TEXT_BYTES)}, the limit")
    return out


def _png(f: BinaryIO, texts: Texts) -> tuple[int, int]:
    size = None
    for _ in range(MAX_CHUNKS):
        header = f.read(8)
        if len(header) < 8:
            break  # no IEND: what was read stands
        length, kind = struct.unpack(">I4s", header)
        name = kind.decode("latin-1")
        if kind == b"IHDR":
            width, height = struct.unpack(">II", _read(f, 8))
            size = (width, height)
            f.seek(length - 8 + 4, os.SEEK_CUR)
        elif kind in (b"tEXt", b"zTXt", b"iTXt", b"eXIf"):
            texts.check(f"{name} chunk", length)
            _png_text(kind, _read(f, length), texts)
            f.seek(4, os.SEEK_CUR)
        elif kind == b"IEND":
            break
        else:
            f.seek(length + 4, os.SEEK_CUR)  # image data and the rest: never read
    if size is None:
        raise MetadataError("a PNG without its IHDR header")
    return size


def _png_text(kind: bytes, data: bytes, texts: Texts) -> None:
    if kind == b"eXIf":
        texts.exif = texts.exif or data
        return
    key, sep, rest = data.partition(b"\0")
    if not sep or not key:
        return  # a malformed chunk carries nothing
    what = f"{kind.decode()} chunk {key[:40].decode('latin-1')!r}"
    if kind == b"tEXt":
        text = rest.decode("latin-1")
    elif kind == b"zTXt":
        text = _inflate(rest[1:], what).decode("latin-1")
    else:  # iTXt: flag, method, language\0, translated keyword\0, UTF-8 text
        if len(rest) < 2:
            return
        flag, body = rest[0], rest[2:]
        _, _, body = body.partition(b"\0")
        _, _, body = body.partition(b"\0")
        if flag:
            body = _inflate(body, what)
        text = body.decode("utf-8", errors="replace")
    texts.add(key.decode("latin-1"), text)


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(f: BinaryIO, texts: Texts) -> tuple[int, int]:
    size = None
    for _ in range(MAX_CHUNKS):
        byte = f.read(1)
        while byte == b"\xff":  # fill bytes
            byte = f.read(1)
        if not byte:
            break
        marker = byte[0]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue  # no length
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no metadata follows that matters
            break
        length = struct.unpack(">H", _read(f, 2))[0] - 2  # at most 64 kB by construction
        if length < 0:
            raise MetadataError("a broken JPEG segment")
        data = _read(f, length)
        if marker in _SOF and length >= 5:
            height, width = struct.unpack(">HH", data[1:5])
            size = (width, height)
        elif marker == 0xE1 and data.startswith(b"Exif\0\0"):
            texts.check("EXIF block", length)
            texts.exif = texts.exif or data[6:]
        elif marker == 0xFE:  # COM
            texts.check("JPEG comment", length)
            texts.add("Comment", data.decode("utf-8", errors="replace"))
    if size is None:
        raise MetadataError("a JPEG without its frame header")
    return size


def _webp(f: BinaryIO, texts: Texts) -> tuple[int, int]:
    riff = _read(f, 12)
    end = 8 + struct.unpack("<I", riff[4:8])[0]
    size = None
    position = 12
    for _ in range(MAX_CHUNKS):
        if position + 8 > end:
            break
        header = f.read(8)
        if len(header) < 8:
            break
        kind, length = header[:4], struct.unpack("<I", header[4:])[0]
        padded = length + (length & 1)
        if kind == b"VP8X" and length >= 10:
            data = _read(f, 10)
            width = 1 + int.from_bytes(data[4:7], "little")
            height = 1 + int.from_bytes(data[7:10], "little")
            size = (width, height)
            f.seek(padded - 10, os.SEEK_CUR)
        elif kind == b"VP8 " and length >= 10 and size is None:
            data = _read(f, 10)
            width, height = (v & 0x3FFF for v in struct.unpack("<HH", data[6:10]))
            size = (width, height)
            f.seek(padded - 10, os.SEEK_CUR)
        elif kind == b"VP8L" and length >= 5 and size is None:
            data = _read(f, 5)
            bits = int.from_bytes(data[1:5], "little")
            size = (1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF))
            f.seek(padded - 5, os.SEEK_CUR)
        elif kind == b"EXIF":
            texts.check("EXIF chunk", length)
            data = _read(f, length)
            texts.exif = texts.exif or (data[6:] if data.startswith(b"Exif\0\0") else data)
            f.seek(padded - length, os.SEEK_CUR)
        else:
            f.seek(padded, os.SEEK_CUR)
        position += 8 + padded
    if size is None:
        raise MetadataError("a WebP without its image header")
    return size


_CODES = {b"ASCII\0\0\0": "ascii", b"UNICODE\0": "unicode", b"JIS\0\0\0\0\0": "jis", b"\0" * 8: "undefined"}


def _user_comment(raw: bytes) -> str:
    """An EXIF UserComment: 8 bytes naming the character code, then the text."""
    code, body = _CODES.get(raw[:8]), raw[8:]
    if code is None:
        body = raw  # no prefix (some writers): taken as UTF-8
    if code == "unicode":
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            return body.decode("utf-16")
        # A1111 (piexif) writes big-endian; others the TIFF byte order: for mostly-ASCII text, the zero bytes
        # tell which.
        even, odd = body[0::2].count(0), body[1::2].count(0)
        return body.decode("utf-16-be" if even >= odd else "utf-16-le", errors="replace")
    if code == "jis":
        return body.decode("shift_jis", errors="replace")
    return body.decode("utf-8", errors="replace")


def _exif_texts(exif: bytes, texts: Texts) -> None:
    """UserComment (and ImageDescription) of an EXIF block, through Pillow's TIFF reader (bounded: the block
    is at most MAX_TEXT_BYTES)."""
    from PIL import Image

    info = Image.Exif()
    try:
        info.load(exif if exif.startswith(b"Exif\0\0") else b"Exif\0\0" + exif)
        comment = info.get_ifd(0x8769).get(0x9286)
        description = info.get(0x010E)
    except Exception as exc:  # a broken TIFF structure: Pillow raises many kinds
        raise MetadataError(f"broken EXIF block ({type(exc).__name__})") from None
    if isinstance(comment, bytes) and len(comment) > 8:
        texts.add("parameters", _user_comment(comment).rstrip("\0"))
    elif isinstance(comment, str) and comment:
        texts.add("parameters", comment)
    if isinstance(description, str) and description.strip():
        texts.add("ImageDescription", description)


def extract(path: Path) -> tuple[tuple[int, int], Texts]:
    """((width, height), texts) of an image file, every read bounded; MetadataError or InputError else."""
    check_input_file(path)  # a regular file within predict's size cap: a FIFO cannot block
    texts = Texts()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for something else since the check
            raise InputError("not a regular file")
        head = f.read(12)
        f.seek(0)
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            f.seek(8)
            size = _png(f, texts)
        elif head.startswith(b"\xff\xd8"):
            f.seek(2)
            size = _jpeg(f, texts)
        elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            size = _webp(f, texts)
        else:
            raise MetadataError("not a PNG, JPEG or WebP file")
    if texts.exif:
        _exif_texts(texts.exif, texts)
    return size, texts
