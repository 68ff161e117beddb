"""Decode, validate, resize and re-encode images, the one place that touches untrusted image bytes.

Every image is decoded once when a DiffusionDB part is read, brought to a fixed square size (what the
largest backbone needs, 256 px) and re-encoded, so the training loaders decode small, uniform files.

Geometry: the shorter side is resized to `size` and the centre is cropped to size x size (PIL's
ImageOps.fit).  That keeps the aspect ratio (no squashed circles); DiffusionDB's images are almost all
square, where it is a plain resize.  Transparent images are composited onto white, palette and 16-bit
images converted to 8-bit RGB, and only the first frame of an animation is used.

Untrusted input is refused with ImageError (never another exception type), with a short machine-readable
`reason`: "empty" (zero bytes), "too_large" (a decompression bomb: more pixels declared in the header
than `max_image_pixels`, checked before any pixel is decoded), "undecodable" (anything Pillow cannot
read: not an image, truncated, corrupt, or a format outside ALLOWED_FORMATS).
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

# Far above any DiffusionDB image (at most about 1024 x 1024 = 1M pixels) and below Pillow's own
# bomb limit (about 89M), so ours is the one that fires and says so clearly.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# The formats DiffusionDB (PNG, WebP in the large set) and users' photos come in.  Pillow would otherwise
# sniff and decode anything it knows, including EPS (which runs Ghostscript) and rarely-fuzzed decoders.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class ImageError(ValueError):
    """An image that cannot be used; `reason` is one of "empty", "too_large", "undecodable"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _open_checked(data: bytes, max_image_pixels: int) -> Image.Image:
    """Open (header only), check the declared size, then decode the pixels."""
    if not data:
        raise ImageError("empty", "zero-byte image")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit; ours is lower and raises instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageError("undecodable", f"image declares an empty size {width}x{height}")
            if width * height > max_image_pixels:
                raise ImageError(
                    "too_large",
                    f"image declares {width}x{height} = {width * height:,} pixels, "
                    f"above the limit of {max_image_pixels:,} (decompression bomb?)",
                )
            img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", f"decompression bomb: {exc}") from exc
    except MemoryError as exc:
        raise ImageError("too_large", "image needs more memory than is available") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, struct.error ...)
        raise ImageError("undecodable", f"cannot decode image: {type(exc).__name__}: {exc}") from exc
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


def decode_image(data: bytes, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Encoded bytes -> a loaded RGB PIL image, or ImageError."""
    img = _open_checked(data, max_image_pixels)
    try:
        return _to_rgb(img)
    except Exception as exc:  # noqa: BLE001
        raise ImageError("undecodable", f"cannot convert image to RGB: {exc}") from exc


def reencode(
    data: bytes,
    size: int = 256,
    fmt: str = "JPEG",
    quality: int = 95,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[bytes, int, int]:
    """As reencode_image, also returning the source image's width and height."""
    img = decode_image(data, max_image_pixels)
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


def reencode_image(
    data: bytes,
    size: int = 256,
    fmt: str = "JPEG",
    quality: int = 95,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> bytes:
    """Encoded image -> RGB, shorter side resized to `size`, centre-cropped to size x size, re-encoded."""
    return reencode(data, size, fmt, quality, max_image_pixels)[0]
