"""Decoding fundus photographs into (H, W, 3) uint8 RGB, never raising.

Every failure becomes a `Decoded` with a status and a message, so a batch job
over millions of files records bad inputs instead of dying or skipping them.
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import threading
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from efiqa_jax import files

# 120 MP: well above any fundus camera (the largest are ~24 MP) and still a
# bounded allocation (~360 MB RGB).
DEFAULT_MAX_PIXELS = 120_000_000

OK = "ok"
NOT_FOUND = "not_found"
UNREADABLE = "unreadable"
TOO_LARGE = "too_large"
UNSUPPORTED = "unsupported"

DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclasses.dataclass
class Decoded:
  """A decoded image, or why there is none.

  image: (H, W, 3) uint8 RGB, or None when status != "ok".
  meta: what is known about the file (format, mode, size, bit depth,
    exif orientation, frames, ...), filled as far as decoding got.
  """
  image: np.ndarray | None
  status: str
  message: str
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def ok(self) -> bool:
    return self.status == OK


def _fail(status: str, message: str, meta: dict[str, Any]) -> Decoded:
  return Decoded(None, status, message, meta)


def _read_source(source, meta) -> tuple[bytes | None, Decoded | None]:
  """Bytes of the source or a failure (not_found / unreadable)."""
  if isinstance(source, (bytes, bytearray, memoryview)):
    meta["source"] = "<bytes>"
    return bytes(source), None
  try:
    path = os.fspath(source)
  except TypeError:
    return None, _fail(UNSUPPORTED,
                       f"source of type {type(source).__name__} is neither a "
                       "path nor bytes", meta)
  meta["source"] = path
  try:
    p = files.as_path(path)
    if not p.exists():
      return None, _fail(NOT_FOUND, f"file not found: {path}", meta)
    if p.is_dir():
      return None, _fail(UNREADABLE, f"is a directory, not an image: {path}",
                         meta)
    data = p.read_bytes()
  except OSError as e:
    return None, _fail(UNREADABLE, f"cannot read {path}: {e}", meta)
  return data, None


def _is_dicom(data: bytes, path: str | None) -> bool:
  if len(data) >= 132 and data[128:132] == b"DICM":
    return True
  return bool(path) and path.lower().endswith(DICOM_SUFFIXES)


def decode_image(source, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 draft_min_side: int | None = None) -> Decoded:
  """Decodes a path or encoded bytes to (H, W, 3) uint8 RGB. Never raises.

  Handles JPEG/PNG/TIFF/BMP/GIF/WebP and anything else Pillow reads (first
  frame), 1/8/16/32-bit and float grayscale, palette, alpha (composited on
  black, the fundus background), CMYK and YCbCr, and applies the EXIF
  orientation. DICOM goes through pydicom when it is installed
  (`pip install efiqa-jax[dicom]`).

  The pixel count is checked from the header before any pixel is decoded:
  more than `max_pixels` gives status "too_large" without allocating.
  Statuses: ok, not_found, unreadable, too_large, unsupported.

  draft_min_side: for JPEG, let libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT
  domain, anti-aliased, several times faster) as long as the short side stays
  >= draft_min_side. The image is then smaller than the file:
  meta["scale"] (integer) is original pixels per decoded pixel and
  meta["width"]/meta["height"] stay the full-resolution size.
  """
  meta: dict[str, Any] = {}
  data, failed = _read_source(source, meta)
  if failed is not None:
    return failed
  if not data:
    return _fail(UNREADABLE, "empty file (0 bytes)", meta)
  meta["bytes"] = len(data)
  path = meta.get("source") if meta.get("source") != "<bytes>" else None
  try:
    if _is_dicom(data, path):
      from efiqa_jax.fundus import dicom  # pylint: disable=g-import-not-at-top
      return dicom.decode_dicom(data, meta, max_pixels)
    return _decode_pil(data, meta, max_pixels, draft_min_side)
  except MemoryError as e:
    return _fail(TOO_LARGE, f"out of memory while decoding: {e}", meta)
  except Exception as e:  # pylint: disable=broad-except
    # Pillow plugins raise a zoo of exception types on corrupt data
    # (OSError, SyntaxError, ValueError, struct.error, EOFError, ...).
    return _fail(UNREADABLE, f"cannot decode image: {type(e).__name__}: {e}",
                 meta)


def _too_large(w: int, h: int, max_pixels: int | None) -> str | None:
  if max_pixels is not None and w * h > max_pixels:
    return (f"image is {w}x{h} = {w * h} pixels, above the limit of "
            f"{max_pixels} (max_pixels); refused before decoding")
  return None


_PIL_LIMIT_LOCK = threading.Lock()


def _open_unlimited(data: bytes) -> Image.Image:
  """Image.open with Pillow's global pixel limit lifted (our check rules)."""
  with _PIL_LIMIT_LOCK:
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
      return Image.open(io.BytesIO(data))
    finally:
      Image.MAX_IMAGE_PIXELS = saved


def _decode_pil(data: bytes, meta: dict[str, Any], max_pixels: int | None,
                draft_min_side: int | None = None) -> Decoded:
  # Pillow's own bomb check reads the global Image.MAX_IMAGE_PIXELS: its
  # warning is silenced here (our header check below decides), its error is
  # mapped to too_large so the outcome never depends on warning filters.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
      im = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except Image.DecompressionBombError as e:
      # Pillow's limit (global, 2 * Image.MAX_IMAGE_PIXELS) fired before ours
      # could: decide with max_pixels, reopening without Pillow's limit only
      # when the caller allows more than Pillow does.
      m = re.search(r"\((\d+) pixels\)", str(e))
      pixels = int(m.group(1)) if m else None
      if pixels is None or (max_pixels is not None and pixels > max_pixels):
        meta["pixels"] = pixels
        return _fail(TOO_LARGE, f"image has {pixels} pixels, above the limit "
                     f"of {max_pixels} (max_pixels); refused before decoding",
                     meta)
      im = _open_unlimited(data)
    except UnidentifiedImageError:
      return _fail(UNREADABLE, "not a recognised image format "
                   f"({len(data)} bytes, starts with {data[:8]!r})", meta)
    w, h = im.size
    meta.update(format=im.format, mode=im.mode, width=w, height=h,
                n_frames=getattr(im, "n_frames", 1))
    msg = _too_large(w, h, max_pixels)
    if msg:
      return _fail(TOO_LARGE, msg, meta)
    if w < 1 or h < 1:
      return _fail(UNREADABLE, f"image has no pixels ({w}x{h})", meta)
    if meta["n_frames"] > 1:
      im.seek(0)  # animated GIF / multi-page TIFF: the first frame
    scale = 1
    if draft_min_side and im.format == "JPEG" and meta["n_frames"] == 1:
      scale = next((s for s in (8, 4, 2) if min(w, h) // s >= draft_min_side),
                   1)
      if scale > 1:
        # Pillow picks min(w // req_w, h // req_h): asking for the rounded-up
        # size would give 2133 // 1067 = 1, i.e. no reduction for any odd
        # side. libjpeg then returns the rounded-up size itself.
        im.draft(im.mode, (w // scale, h // scale))
        scale = int(round(w / im.size[0]))
    im.load()  # decodes; raises on truncated or corrupt data
    orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
    meta["exif_orientation"] = int(orientation) if orientation else 1
    if meta["exif_orientation"] != 1:
      im = ImageOps.exif_transpose(im)
    rgb = _to_rgb8(im, meta, data)
  meta["scale"] = scale
  # Full-resolution size, oriented like the returned image.
  swap = meta["exif_orientation"] in (5, 6, 7, 8)
  meta["height"], meta["width"] = (w, h) if swap else (h, w)
  return Decoded(rgb, OK, "", meta)


def _scale_to_uint8(a: np.ndarray, bits: int | None = None) -> np.ndarray:
  """Scales integer or float samples to uint8 without clipping.

  Integers use the fixed range of their bit depth (16 bits -> /257, 12 bits
  -> /4095.0 * 255), never a per-image min/max stretch, so exposure is kept:
  an under-exposed photograph stays dark, which is what quality assessment
  must see. Floats in [0, 1] map to [0, 255]; other floats by their max.
  """
  if a.dtype == np.uint8:
    return a
  if np.issubdtype(a.dtype, np.floating):
    a = np.nan_to_num(a.astype(np.float32))
    hi = float(a.max()) if a.size else 1.0
    scale = 255.0 if hi <= 1.0 else 255.0 / hi
    return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
  if bits is None:
    bits = a.dtype.itemsize * 8
    if a.dtype.itemsize > 2 and a.size and int(a.max()) <= 65535:
      bits = 16  # Pillow's mode "I" for 16-bit data stored as int32
  a = a.astype(np.int64)
  if np.issubdtype(a.dtype, np.signedinteger):
    a = np.maximum(a, 0)
  full = (1 << bits) - 1
  return np.clip((a * 255 + full // 2) // full, 0, 255).astype(np.uint8)


def _png_sbit(data: bytes) -> int | None:
  """Significant bits from a PNG sBIT chunk (Pillow does not read it)."""
  if not data.startswith(b"\x89PNG\r\n\x1a\n"):
    return None
  pos = 8
  while pos + 8 <= len(data):
    n = int.from_bytes(data[pos:pos + 4], "big")
    tag = data[pos + 4:pos + 8]
    if tag == b"sBIT" and n >= 1:
      return max(data[pos + 8:pos + 8 + n])
    if tag in (b"IDAT", b"IEND"):
      return None
    pos += 12 + n
  return None


def _significant_bits(a: np.ndarray, sbit: int | None) -> int:
  """Bits that carry data in a 16-bit grey image.

  The PNG sBIT chunk when present; otherwise the smallest common sensor
  depth (8, 10, 12, 14, 16) holding the maximum, so that 12-bit data in a
  16-bit container is not shown 16 times too dark. Within that depth the
  scaling is fixed, so exposure differences between photographs remain.
  """
  if sbit:
    return int(min(max(sbit, 1), 16))
  hi = int(a.max()) if a.size else 0
  return next(b for b in (8, 10, 12, 14, 16) if hi < (1 << b))


def _to_rgb8(im: Image.Image, meta: dict[str, Any],
             data: bytes = b"") -> np.ndarray:
  mode = im.mode
  if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
    meta["bit_depth"] = 16 if mode.startswith("I;16") else 32
    a = np.asarray(im)
    bits = None
    if mode != "F" and (mode.startswith("I;16") or (
        a.size and 0 <= int(a.min()) and int(a.max()) <= 65535)):
      bits = _significant_bits(a, _png_sbit(data))
      meta["significant_bits"] = bits
    g = _scale_to_uint8(a, bits)
    return np.repeat(g[..., None], 3, axis=-1)
  meta.setdefault("bit_depth", 1 if mode == "1" else 8)
  if mode in ("P", "PA"):
    im = im.convert("RGBA")
    mode = "RGBA"
  if mode in ("LA", "La", "RGBA", "RGBa"):
    # Composite on black: transparent pixels become background, not white.
    im = im.convert("RGBA")
    a = np.asarray(im)
    alpha = a[..., 3:4].astype(np.uint16)
    return ((a[..., :3].astype(np.uint16) * alpha + 127) // 255).astype(
        np.uint8)
  if mode != "RGB":
    im = im.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV, RGBX
  return np.asarray(im)
