"""Decode one real-world source image into an upright RGB picture, and decide what a DALI shard stores for it.

Every output format sees the same pixels: Pillow decodes the file completely (a truncated or corrupt file fails
here, never later inside DALI's or FFCV's readers), applies the EXIF orientation, converts any mode (grayscale,
CMYK, palette, 16-bit, alpha) to 8-bit RGB, and shrinks the long side to ``max_res`` when asked (Lanczos).

DALI shards keep the source bytes untouched when DALI decodes them to exactly these pixels: a baseline or
progressive 8-bit Huffman JPEG with 1 (gray) or 3 (YCbCr) components, orientation 1 (no EXIF rotation) and no
resize. Anything else (a resize, CMYK / YCCK, Adobe RGB-coded, arithmetic / lossless / 12-bit JPEG, EXIF
rotation, PNG or other data behind a .JPEG name) is re-encoded from the RGB pixels as a baseline 4:2:0 JPEG.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 200 M pixels (~14,000 x 14,000, 600 MB as RGB): far above any photo data set, low enough that one worker
# cannot exhaust memory on a forged header. Pillow's own default warns at 89 M and refuses at 179 M.
MAX_IMAGE_PIXELS = 200_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

# JPEG start-of-frame markers (C4 = DHT, C8 = JPG, CC = DAC are not frames)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# baseline, extended sequential, progressive: all Huffman-coded, what DALI's decoders handle like Pillow
_PLAIN_SOF = frozenset({0xC0, 0xC1, 0xC2})
_EXIF_ORIENTATION = 0x0112


class BadImage(Exception):
    """A source file that is not a usable image; ``str(error)`` is the reason recorded in the manifest."""


@dataclass
class Decoded:
    """One decoded source image."""

    image: Image.Image | None  # RGB, upright, already shrunk to max_res (None: see decode's pixels=False)
    plain_jpeg: bool  # the source bytes decode to ``image`` in DALI as they are (see module docstring)
    resized: bool
    source_size: tuple[int, int]  # upright (width, height) before any resize


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(SOF marker, sample precision, component count) of a JPEG stream, or None when there is no frame header."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length field
            i += 2
            continue
        if marker == 0xDA:  # scan data before any frame header: malformed
            return None
        if marker in _SOF_MARKERS:
            if i + 10 > n:
                return None
            return marker, data[i + 4], data[i + 9]
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def fit_within(size: tuple[int, int], max_res: int | None) -> tuple[int, int]:
    """(width, height) after shrinking so the long side is at most ``max_res`` (never enlarges)."""
    width, height = size
    if not max_res or max(width, height) <= max_res:
        return width, height
    scale = max_res / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any Pillow mode; 16/32-bit integer images are scaled down, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        values = np.asarray(image, dtype=np.int64)
        shift = 8 if values.max(initial=0) <= 0xFFFF else 24
        gray = np.clip(values >> shift, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def decode(data: bytes, max_res: int | None = None, pixels: bool = True) -> Decoded:
    """Decode a source file's bytes completely; raise :class:`BadImage` with the reason when it is not usable.

    ``pixels=False``: the caller needs only the verdict, the size and whether the bytes can be stored as they are.
    For such a file (a plain JPEG needing no resize) the JPEG is then decoded at 1/8 scale (libjpeg's DCT scaling):
    every entropy-coded block is still read, so truncated or corrupt data fails exactly as in a full decode, for a
    third less work; ``image`` is None. Any other file is decoded fully.
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            source_format, source_mode = image.format, image.mode
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise BadImage(f"image too large ({width}x{height} > {MAX_IMAGE_PIXELS} pixels)")
            adobe_transform = image.info.get("adobe_transform")
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            plain = (
                source_format == "JPEG"
                and source_mode in ("RGB", "L")
                and orientation == 1
                and fit_within((width, height), max_res) == (width, height)
                and _plain_frame(data, adobe_transform)
            )
            if plain and not pixels:
                image.draft(source_mode, (max(1, width // 8), max(1, height // 8)))
                image.load()  # all entropy-coded data is decoded: truncation and corrupt data fail here
                return Decoded(None, True, False, (width, height))
            image.load()  # the full decode: truncation and corrupt entropy data fail here
            if orientation in range(2, 9):
                image = ImageOps.exif_transpose(image)
            image = to_rgb(image)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised file format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImage(f"image too large: {error}") from None
    except MemoryError:
        raise BadImage("out of memory while decoding") from None
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, struct.error ... on bad data
        raise BadImage(f"corrupt image ({type(error).__name__}: {error})") from None
    source_size = image.size
    new_size = fit_within(source_size, max_res)
    resized = new_size != source_size
    if resized:
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    return Decoded(image, plain, resized, source_size)


def _plain_frame(data: bytes, adobe_transform) -> bool:
    """Whether the JPEG's frame is one DALI decodes like Pillow: baseline / extended / progressive Huffman, 8-bit,
    1 (gray) or 3 (YCbCr, not RGB-coded) components, behind a well-formed header (:func:`jpeg_header_clean`)."""
    frame = jpeg_frame(data)
    return (
        frame is not None
        and frame[0] in _PLAIN_SOF
        and frame[1] == 8
        and frame[2] in (1, 3)
        and not (frame[2] == 3 and adobe_transform == 0)  # RGB-coded (not YCbCr) 3-channel JPEG
        and jpeg_header_clean(data)
    )


# segments that may precede the first scan of a JPEG DALI reads: frames, DHT, DQT, DRI, APPn, COM
_HEADER_MARKERS = _PLAIN_SOF | {0xC4, 0xDB, 0xDD, 0xFE} | frozenset(range(0xE0, 0xF0))


def jpeg_header_clean(data: bytes) -> bool:
    """Whether every segment from SOI to the first SOS is a known marker with an in-bounds length, one frame.

    libjpeg (inside Pillow) skips garbage between segments with a warning ("extraneous bytes before marker"), so
    a file with a damaged marker can decode in Pillow and still stop DALI's stricter JPEG parser ("Invalid
    marker"), failing the whole training pipeline. Such a file is not stored as is but re-encoded from Pillow's
    pixels (found by tests/test_fuzz.py: one flipped bit turned a DHT marker's 0xFF into 0xFE).
    """
    if data[:2] != b"\xff\xd8":
        return False
    i, n, frames = 2, len(data), 0
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker (allowed by the standard)
            i += 1
            continue
        if marker == 0xDA:
            length = int.from_bytes(data[i + 2 : i + 4], "big")
            return frames == 1 and length >= 2 and i + 2 + length <= n
        if marker not in _HEADER_MARKERS:
            return False
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2 or i + 2 + length > n:
            return False
        frames += marker in _PLAIN_SOF
        i += 2 + length
    return False


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Baseline 4:2:0 JPEG of an RGB image (deterministic: same pixels and quality give the same bytes)."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(quality), subsampling=2, optimize=False, progressive=False)
    return buffer.getvalue()


def dali_payload(data: bytes, decoded: Decoded, quality: int) -> tuple[bytes, bool]:
    """(bytes stored in the shard, re-encoded?) for one decoded source file."""
    if decoded.plain_jpeg:
        return data, False
    return encode_jpeg(decoded.image, quality), True


# FFCV's crop decoders take int(ratio * side) pixels: a side under 2 px becomes a 0-px crop and OpenCV aborts the
# whole process, so FFCV samples get at least this many pixels per side.
FFCV_MIN_SIDE = 8


def ffcv_image(
    decoded: Decoded, index: int, write_mode: str, compress_prob: float, quality: int, seed: int
) -> tuple[str, np.ndarray, np.ndarray]:
    """(mode, pixels, stored bytes) of a source image in a .beton: what ``RGBImageField.encode`` stores for it.

    ``pixels`` is :func:`rgb_array` of the decoded picture (already shrunk to the max resolution, so FFCV's own
    resize would leave it alone). ``write_mode="proportion"`` stores a JPEG with probability ``compress_prob``,
    drawn from a generator seeded by ``(seed, index)``: the choice depends on the sample, not on which worker
    took it or what came before. JPEGs are encoded the way FFCV encodes them (OpenCV, the given quality); raw
    samples are the pixels' bytes. ``stored`` is a flat uint8 array.
    """
    pixels = rgb_array(decoded)
    if write_mode == "proportion":
        mode = "jpg" if np.random.default_rng([seed, index]).random() < compress_prob else "raw"
    elif write_mode in ("jpg", "raw"):
        mode = write_mode
    else:
        raise ValueError(f"unknown FFCV write mode {write_mode!r}")
    if mode == "raw":
        return mode, pixels, pixels.reshape(-1)
    cv2 = _opencv()
    ok, stored = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise BadImage(f"OpenCV could not encode a {pixels.shape[1]}x{pixels.shape[0]} JPEG")
    return mode, pixels, stored.reshape(-1)


def _opencv():
    """OpenCV (installed with FFCV), one thread: each conversion worker is one core already."""
    import cv2

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    return cv2


def stored_pixels(width: int, height: int) -> int:
    """Pixels FFCV stores for a picture of this size (:func:`rgb_array` enlarges sides under FFCV_MIN_SIDE)."""
    return max(width, FFCV_MIN_SIDE) * max(height, FFCV_MIN_SIDE)


def rgb_array(decoded: Decoded, min_side: int = FFCV_MIN_SIDE) -> np.ndarray:
    """The decoded picture as a C-contiguous uint8 (H, W, 3) array (what FFCV's RGBImageField takes).

    A side shorter than ``min_side`` is repeated (nearest neighbour) up to it, so FFCV can crop it.
    """
    image = decoded.image
    width, height = image.size
    if min(width, height) < min_side:
        image = image.resize((max(width, min_side), max(height, min_side)), Image.Resampling.NEAREST)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
