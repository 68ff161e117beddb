"""Decode, validate, resize and re-encode images, the one place that touches untrusted image bytes.

Every image is decoded once when a DiffusionDB part is read, brought to a fixed square size (what the
largest backbone needs, 256 px) and re-encoded, so the training loaders decode small, uniform files.

Geometry: the shorter side is resized to `size` and the centre is cropped to size x size (PIL's
ImageOps.fit).  That keeps the aspect ratio (no squashed circles); DiffusionDB's images are almost all
square, where it is a plain resize.  Transparent images are composited onto white, palette and 16-bit
images converted to 8-bit RGB, and only the first frame of an animation is used.

open_image is the one function that opens untrusted image bytes, for DiffusionDB parts, training decode
and predict alike: it applies the EXIF orientation (a phone photo shot sideways is used upright) and names
the image (path, archive member or row) in every message.

Untrusted input is refused with ImageError (never another exception type), with a short machine-readable
`reason`: "empty" (zero bytes), "too_large" (a decompression bomb: more pixels declared in the header
than `max_image_pixels`, checked before any pixel is decoded, and reported against that limit even when
Pillow's own, higher one is what caught it), "undecodable" (anything Pillow cannot
read: not an image, truncated, corrupt, or a format outside ALLOWED_FORMATS).
"""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image, ImageOps

# Far above any DiffusionDB image (at most about 1024 x 1024 = 1M pixels) and below Pillow's own
# bomb limits (a warning at about 89M, an error in Image.open at about 179M); an image past Pillow's error
# is still reported against this limit, in our words (see _open_checked).
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# The formats DiffusionDB (PNG, WebP in the large set) and users' photos come in.  Pillow would otherwise
# sniff and decode anything it knows, including EPS (which runs Ghostscript) and rarely-fuzzed decoders.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class ImageError(ValueError):
    """An image that cannot be used; `reason` is one of "empty", "too_large", "undecodable".

    `detail` is the message alone; str() prefixes it with `path` (a file path, archive member or row) when
    the caller named the image, so a message says which file it is about, never which buffer.
    """

    def __init__(self, reason: str, message: str, path: str | None = None):
        super().__init__(f"{path}: {message}" if path else message)
        self.reason = reason
        self.detail = message
        self.path = path


# Pillow's own bomb error: "Image size (900000000 pixels) exceeds limit of 178956970 pixels, ..."
_PILLOW_BOMB = re.compile(r"\((\d+) pixels\)")
# Pillow names an in-memory source by its repr; never show that.
_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _too_large(pixels: int, size: str, max_image_pixels: int) -> str:
    return f"image declares {size}{pixels:,} pixels, above the limit of {max_image_pixels:,} (decompression bomb?)"


def _open_checked(data: bytes, max_image_pixels: int, name: str | None = None) -> Image.Image:
    """Open (header only), check the declared size against ``max_image_pixels``, then decode the pixels.

    Pillow checks its own, higher limit (Image.MAX_IMAGE_PIXELS) inside Image.open, before any caller can
    look at the header; an image past it is reported here against our limit, in our words, like any other
    image above ours.
    """
    if not data:
        raise ImageError("empty", "zero-byte image", name)
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit; ours is lower and raises instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageError("undecodable", f"image declares an empty size {width}x{height}", name)
            if width * height > max_image_pixels:
                raise ImageError(
                    "too_large", _too_large(width * height, f"{width}x{height} = ", max_image_pixels), name
                )
            img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        found = _PILLOW_BOMB.search(str(exc))
        pixels = int(found.group(1)) if found else None
        if pixels is not None and pixels > max_image_pixels:
            message = _too_large(pixels, "", max_image_pixels)
        else:  # a caller's limit above Pillow's: say whose limit it is
            message = f"image declares {pixels or 'more'} pixels, above Pillow's limit (decompression bomb?)"
        raise ImageError("too_large", message, name) from None
    except MemoryError as exc:
        raise ImageError("too_large", "image needs more memory than is available", name) from exc
    except Image.UnidentifiedImageError:
        raise ImageError(
            "undecodable", f"not an image in a supported format ({', '.join(ALLOWED_FORMATS)})", name
        ) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, struct.error ...)
        text = _BUFFER_REPR.sub(name or "image", str(exc))
        raise ImageError("undecodable", f"cannot decode image: {type(exc).__name__}: {text}", name) from exc
    return img


def _exif_upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF Orientation tag says (a phone photo shot sideways); a damaged EXIF
    block leaves the pixels as stored rather than losing a good image."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # noqa: BLE001 - malformed EXIF of any kind
        pass
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping to white
        return img.point(lambda v: v / 256).convert("L").convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def open_image(data: bytes, name: str | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The one way into untrusted image bytes (parts, training decode, predict): a loaded, upright
    (EXIF orientation applied) RGB PIL image, or ImageError.

    The declared size is checked against ``max_image_pixels`` before any pixel is decoded; ``name`` (the
    file path, archive member or row) prefixes every message.
    """
    img = _open_checked(data, max_image_pixels, name)
    try:
        return _to_rgb(_exif_upright(img))
    except Exception as exc:  # noqa: BLE001
        raise ImageError("undecodable", f"cannot convert image to RGB: {exc}", name) from exc


def reencode(
    data: bytes,
    size: int = 256,
    fmt: str = "JPEG",
    quality: int = 95,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    name: str | None = None,
) -> tuple[bytes, int, int]:
    """As reencode_image, also returning the (upright) source image's width and height."""
    img = open_image(data, name, max_image_pixels)
    width, height = img.size
    if img.size != (size, size):
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    buf = io.BytesIO()
    if fmt.upper() in ("JPEG", "JPG"):
        # no chroma subsampling: the sample's thin coloured lines survive re-encoding
        img.save(buf, format="JPEG", quality=quality, subsampling=0)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue(), width, height


def reencode_image(data: bytes, *args, **kwargs) -> bytes:
    """Encoded image -> upright RGB, shorter side resized to `size`, centre-cropped to size x size, re-encoded:
    reencode (the same arguments: size, fmt, quality, max_image_pixels, name) without the source's size."""
    return reencode(data, *args, **kwargs)[0]
