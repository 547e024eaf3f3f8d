"""Square FOV crop at a working resolution, and maps back to the original.

Crop geometry in original pixels uses edge coordinates: pixel column j spans
[j, j + 1), so a circle centre cx (pixel-centre coordinates) is at cx + 0.5.
The crop square is [crop_x0, crop_x0 + crop_size) x [crop_y0, ...); it may
leave the image (x0/y0 negative or beyond the far side): those parts are
zero padding and never part of the FOV mask.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from PIL import Image

from efiqa_jax.fundus import fov as ffov
from efiqa_jax.fundus import gate as fgate
from efiqa_jax.fundus import io as fio

TOO_SMALL = ffov.TOO_SMALL
NO_FOV = ffov.NO_FOV
NOT_FUNDUS = fgate.NOT_FUNDUS


@dataclasses.dataclass
class Prepared:
  """A photograph ready for the models, or why it is not.

  status: "ok" or a failure (not_found, unreadable, too_large, unsupported,
    too_small, no_fov, not_fundus). With "ok", `circular` says whether a
    circle was fitted (also when the frame cuts it); False means a fundus
    photograph whose rim could not be fitted (e.g. hidden by a shadow): the
    full frame is its FOV. Either way it is graded like any other.
  image: (size, size, 3) uint8, zero outside the FOV and in the padding.
  fov_mask: (size, size) bool.
  crop_x0, crop_y0, crop_size: the crop square in original pixels.
  """
  path: str
  status: str
  message: str
  image: np.ndarray | None = None
  fov_mask: np.ndarray | None = None
  fov: ffov.FOV | None = None
  gate: fgate.GateResult | None = None  # the fundus gate's decision
  crop_x0: int = 0
  crop_y0: int = 0
  crop_size: int = 0
  orig_h: int = 0
  orig_w: int = 0
  size: int = 0
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def ok(self) -> bool:
    return self.status == "ok"

  @property
  def circular(self) -> bool:
    return bool(self.fov is not None and self.fov.circular)

  @property
  def flags(self) -> tuple[str, ...]:
    """Warnings for downstream: ('not_circular',) on full-frame fallback."""
    if self.ok and not self.circular:
      return ("not_circular",)
    return ()


def crop_box(fov: ffov.FOV, h: int, w: int) -> tuple[int, int, int]:
  """(x0, y0, side) of the square around the FOV in original pixels."""
  if fov.circular:
    side = max(1, int(round(2.0 * fov.r)))
    x0 = int(round(fov.cx + 0.5 - side / 2.0))
    y0 = int(round(fov.cy + 0.5 - side / 2.0))
  else:
    side = max(h, w)
    x0 = (w - side) // 2
    y0 = (h - side) // 2
  return x0, y0, side


def _resample(src: int, dst: int, nearest: bool = False):
  if nearest:
    return Image.Resampling.NEAREST
  # Area averaging when shrinking (no aliasing), bicubic when enlarging.
  return Image.Resampling.BOX if dst < src else Image.Resampling.BICUBIC


def _crop_resize_2d(a: np.ndarray, x0: int, y0: int, side: int, out: int,
                    nearest: bool = False) -> np.ndarray:
  """Crops a float/uint8 2-D array to the (zero-padded) square and resizes."""
  if a.dtype == np.uint8:
    im = Image.fromarray(a)
  else:
    im = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")
  im = im.crop((x0, y0, x0 + side, y0 + side))  # pads with 0 outside
  if side != out:
    im = im.resize((out, out), _resample(side, out, nearest))
  return np.asarray(im)


def crop_image(image: np.ndarray, x0: int, y0: int, side: int,
               size: int) -> np.ndarray:
  """(H, W, 3) uint8 -> zero-padded crop square resized to (size, size, 3)."""
  im = Image.fromarray(np.ascontiguousarray(image))
  im = im.crop((x0, y0, x0 + side, y0 + side))
  if side != size:
    # reducing_gap: an integer box reduce first, then the exact resample;
    # both area-averaging, several times faster on large photographs.
    im = im.resize((size, size), _resample(side, size), reducing_gap=2.0)
  return np.asarray(im)


def fov_mask_at(fov: ffov.FOV, x0: int, y0: int, side: int, size: int,
                h: int, w: int) -> np.ndarray:
  """FOV mask on the (size, size) crop grid: disc and inside the image."""
  scale = side / size
  c = (np.arange(size, dtype=np.float64) + 0.5) * scale  # crop edge coords
  xe, ye = c + x0, c + y0  # original edge coordinates of the sample centres
  in_x = (xe >= 0) & (xe < w)
  in_y = (ye >= 0) & (ye < h)
  m = in_y[:, None] & in_x[None, :]
  if fov.circular:
    dx = (xe - 0.5 - fov.cx)[None, :]
    dy = (ye - 0.5 - fov.cy)[:, None]
    m &= dx * dx + dy * dy <= fov.r * fov.r
    for a, b, c in fov.cuts:
      m &= a * (xe - 0.5)[None, :] + b * (ye - 0.5)[:, None] <= c
  return m


def scale_fov(fov: ffov.FOV, s: int) -> ffov.FOV:
  """FOV on an s-times reduced grid -> original pixel coordinates."""
  if s == 1:
    return fov
  # Reduced pixel i covers original pixels [i*s, (i+1)*s).
  cuts = tuple((a, b, c * s + (a + b) * (s - 1) / 2.0) for a, b, c in fov.cuts)
  return dataclasses.replace(fov, cx=fov.cx * s + (s - 1) / 2.0,
                             cy=fov.cy * s + (s - 1) / 2.0, r=fov.r * s,
                             fit_rms=fov.fit_rms * s, cuts=cuts)


def prepare_image(image: np.ndarray, size: int = 512, *, path: str = "",
                  meta: dict[str, Any] | None = None,
                  fov: ffov.FOV | None = None, scale: int = 1,
                  orig_hw: tuple[int, int] | None = None,
                  check_fundus: bool = True) -> Prepared:
  """prepare_fundus on an already decoded (H, W, 3) uint8 image.

  check_fundus: run the fundus gate; an image that is not a colour fundus
  photograph gets status "not_fundus" with the reason.

  scale/orig_hw: the image was decoded `scale` times smaller than the file
  (JPEG draft); the crop box and FOV are reported in file pixels.
  """
  h, w = image.shape[:2]
  oh, ow = orig_hw or (h * scale, w * scale)
  base = dict(path=path, orig_h=oh, orig_w=ow, size=size, meta=meta or {})
  if fov is None:
    fov = ffov.detect_fov(image)
  if not fov.ok:
    return Prepared(status=fov.status, message=fov.message, fov=fov, **base)
  gate = fgate.check(image, fov) if check_fundus else None
  if gate is not None and not gate.fundus:
    return Prepared(status=NOT_FUNDUS, message="not a colour fundus "
                    f"photograph: {gate.reason}", fov=scale_fov(fov, scale),
                    gate=gate, **base)
  x0, y0, side = crop_box(fov, h, w)
  out = crop_image(image, x0, y0, side, size)
  mask = fov_mask_at(fov, x0, y0, side, size, h, w)
  out = np.where(mask[..., None], out, 0).astype(np.uint8)
  return Prepared(status="ok", message=fov.message, image=out, fov_mask=mask,
                  fov=scale_fov(fov, scale), gate=gate, crop_x0=x0 * scale,
                  crop_y0=y0 * scale, crop_size=side * scale, **base)


def prepare_fundus(source, size: int = 512, *,
                   max_pixels: int | None = fio.DEFAULT_MAX_PIXELS,
                   fast_decode: bool = True,
                   check_fundus: bool = True) -> Prepared:
  """Decodes, finds the FOV, crops a square around it. Never raises.

  source: path or encoded bytes. Returns Prepared with status "ok" (check
  `.circular`/`.flags`: False/('not_circular',) means full-frame fallback)
  or a failure status with a message ("not_fundus": the fundus gate,
  `efiqa_jax.fundus.gate`, says it is not a colour fundus photograph).
  fast_decode: large JPEGs are decoded at 1/2..1/8 scale by libjpeg while
  the short side stays >= 1.25 * size (the crop is then still downscaled,
  never upscaled, for typical FOVs); FOV and crop box stay in file pixels.
  check_fundus: False skips the fundus gate (e.g. for inputs known to be
  fundus photographs that the gate's colour rules do not fit).
  """
  if isinstance(source, (bytes, bytearray, memoryview)):
    path = "<bytes>"
  else:
    try:
      path = os.fspath(source)
    except TypeError:
      path = repr(source)
  try:
    if size < 16:
      return Prepared(path=path, status="unsupported",
                      message=f"working size {size} is below 16 px")
    dec = fio.decode_image(
        source, max_pixels=max_pixels,
        draft_min_side=int(np.ceil(1.25 * size)) if fast_decode else None)
    if not dec.ok:
      return Prepared(path=path, status=dec.status, message=dec.message,
                      orig_h=int(dec.meta.get("height", 0) or 0),
                      orig_w=int(dec.meta.get("width", 0) or 0),
                      size=size, meta=dec.meta)
    return prepare_image(dec.image, size, path=path, meta=dec.meta,
                         scale=int(dec.meta.get("scale", 1)),
                         orig_hw=(dec.meta["height"], dec.meta["width"]),
                         check_fundus=check_fundus)
  except MemoryError as e:
    return Prepared(path=path, status=fio.TOO_LARGE,
                    message=f"out of memory: {e}", size=size)
  except Exception as e:  # pylint: disable=broad-except
    return Prepared(path=path, status="error",
                    message=f"unexpected {type(e).__name__}: {e}", size=size)


def map_to_original(map2d: np.ndarray, prepared: Prepared, *,
                    fill: float = 0.0, nearest: bool | None = None
                    ) -> np.ndarray:
  """Resizes a map covering the crop square back onto the original grid.

  map2d: (h, w) or (h, w, C) over the crop square (any resolution, usually
  prepared.size). Returns (orig_h, orig_w[, C]); pixels outside the crop get
  `fill`. Bool maps are resampled bilinearly and thresholded at 0.5
  (nearest=True forces nearest-neighbour); numbers keep float32.
  """
  m = np.asarray(map2d)
  if m.ndim == 3:
    chans = [map_to_original(m[..., c], prepared, fill=fill, nearest=nearest)
             for c in range(m.shape[-1])]
    return np.stack(chans, axis=-1)
  is_bool = m.dtype == bool
  x0, y0, side = prepared.crop_x0, prepared.crop_y0, prepared.crop_size
  h, w = prepared.orig_h, prepared.orig_w
  # The part of the original grid covered by the crop square.
  ox0, oy0 = max(x0, 0), max(y0, 0)
  ox1, oy1 = min(x0 + side, w), min(y0 + side, h)
  out = np.full((h, w), fill, dtype=bool if is_bool else np.float32)
  if ox1 <= ox0 or oy1 <= oy0:
    return out
  im = Image.fromarray(m.astype(np.float32), mode="F")
  if m.shape != (side, side):
    mh, mw = m.shape
    near = bool(nearest)
    resample = (Image.Resampling.NEAREST if near
                else Image.Resampling.BOX if side < min(mh, mw)
                else Image.Resampling.BILINEAR)
    im = im.resize((side, side), resample)
  a = np.asarray(im)[oy0 - y0:oy1 - y0, ox0 - x0:ox1 - x0]
  out[oy0:oy1, ox0:ox1] = a >= 0.5 if is_bool else a
  return out


def map_to_crop(map_orig: np.ndarray, prepared: Prepared,
                size: int | None = None) -> np.ndarray:
  """Inverse of map_to_original: original-grid map -> crop square grid.

  Bool masks come back bool (area-averaged, thresholded at 0.5); uint8 stays
  uint8; other numbers become float32. Padding is 0 / False.
  """
  size = size or prepared.size
  m = np.asarray(map_orig)
  if m.ndim == 3:
    if m.dtype == np.uint8 and m.shape[-1] == 3:
      return crop_image(m, prepared.crop_x0, prepared.crop_y0,
                        prepared.crop_size, size)
    return np.stack([map_to_crop(m[..., c], prepared, size)
                     for c in range(m.shape[-1])], axis=-1)
  is_bool = m.dtype == bool
  a = m.astype(np.float32) if is_bool or m.dtype != np.uint8 else m
  r = _crop_resize_2d(a, prepared.crop_x0, prepared.crop_y0,
                      prepared.crop_size, size)
  return r >= 0.5 if is_bool else r
