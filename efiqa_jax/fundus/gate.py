"""Is this a fundus photograph? A cheap gate before any model sees it.

A colour fundus photograph is a bright field of view (a disc, possibly cut
by the frame) on a dark surround, lit in the orange-red of the retina
(red the strongest channel), with natural, continuous tones inside. The
gate measures that on the coarse copy the FOV search already made and
refuses, with the reason, what is plainly something else:

  no_fov_circle  no circular field of view was found (faces, scenes,
                 documents, charts, vessel maps: their bright area is not a
                 disc on a dark surround);
  binary         the field of view holds a few flat tones (FOV masks,
                 binary vessel maps, text, drawings);
  not_red        red is not the strongest channel over the field of view
                 (colour-coded vessel maps, scenes, garbled colour);
  garbled        whole rows of the FOV jump in brightness, or the surround
                 is lit (a bit error in a JPEG shifts every later block).

Bad photographs are not refused: dark, hazy, blurred, overexposed and
pathological fundus photographs keep their disc, their surround and their
colour order. Thresholds were set on fundus_train photographs (clean and
severely degraded with `efiqa_jax.synth.degrade`) and scikit-image's
sample images, never on the evaluation photographs.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

NOT_FUNDUS = "not_fundus"


@dataclasses.dataclass
class GateResult:
  fundus: bool
  reason: str  # one line; "" when fundus
  features: dict


def _luma(px: np.ndarray) -> np.ndarray:
  return px @ np.array([0.299, 0.587, 0.114], np.float32)


def measure(image: np.ndarray, fov, small: np.ndarray | None = None,
            k: int | None = None) -> dict:
  """Gate features of an (H, W, 3) uint8 image and its detected FOV."""
  from efiqa_jax.fundus import fov as ffov  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  if small is None:
    kk = max(1, int(np.ceil(max(h, w) / ffov.DETECT_SIDE)))
    small = image[kk // 2::kk, kk // 2::kk]
    k = kk
  sh, sw = small.shape[:2]
  gy = (np.arange(sh)[:, None] * k + k // 2).astype(np.float32)
  gx = (np.arange(sw)[None, :] * k + k // 2).astype(np.float32)
  f = {"circular": bool(fov.circular)}
  if fov.circular:
    d2 = (gx - fov.cx) ** 2 + (gy - fov.cy) ** 2
    m = (d2 <= (0.97 * fov.r) ** 2) & ffov._inside_cuts(gx, gy, fov.cuts,
                                                        0.03 * fov.r)
    out = (d2 > (1.03 * fov.r + 2 * k) ** 2) | ~ffov._inside_cuts(
        gx, gy, fov.cuts, -0.03 * fov.r - 2 * k)
  else:
    m = np.ones((sh, sw), bool)
    out = np.zeros((sh, sw), bool)
  # 2x2 block means: sensor noise must not flip the channel order.
  sm = small.astype(np.float32)
  sm = ndimage.uniform_filter(sm, (3, 3, 1), mode="nearest")
  px = sm[m]
  if px.shape[0] < 16:
    return f
  lum = _luma(px)
  lit = lum > max(8.0, 0.25 * float(np.median(lum)))
  q = px[lit] if lit.sum() >= 16 else px
  r, g, b = q[:, 0], q[:, 1], q[:, 2]
  f["chroma"] = float(np.mean(q.max(axis=1) - q.min(axis=1)))
  f["red_max"] = float(np.mean(r >= np.maximum(g, b) - 2.0))
  f["rgb_order"] = float(np.mean((r >= g - 2.0) & (g >= b - 2.0)))
  # Greyscale stored as RGB: the channels agree to the rounding.
  rawc = small[m].astype(np.int16)
  f["grey_frac"] = float(np.mean(
      (np.abs(rawc[:, 0] - rawc[:, 1]) <= 1)
      & (np.abs(rawc[:, 1] - rawc[:, 2]) <= 1)))
  # Share of the FOV in its two most common exact tones (binary images).
  raw = _luma(small[m].astype(np.float32))
  hist = np.bincount(np.clip(np.rint(raw), 0, 255).astype(np.int64),
                     minlength=256)
  f["top2"] = float(np.sort(hist)[-2:].sum() / max(hist.sum(), 1))
  f["lum_median"] = float(np.median(lum))
  # A garbled JPEG shifts whole runs of blocks: from some row on, most of
  # the row steps by the same amount. Natural edges are sparse along a row.
  ls = _luma(small.astype(np.float32))
  both = m[1:] & m[:-1]
  dif = np.where(both, ls[1:] - ls[:-1], np.nan)
  ok_rows = both.sum(axis=1) >= max(8, 0.2 * sw)
  if fov.circular and ok_rows.any():
    with np.errstate(all="ignore"):
      med = np.nanmedian(dif[ok_rows], axis=1)
    # Sharp: a one-row jump, not a shadow's gradual fall-off (the rows two
    # above and below step by much less).
    a = np.abs(np.nan_to_num(med))
    nb = np.maximum(np.pad(a, (2, 0))[:-2], np.pad(a, (0, 2))[2:])
    f["row_step"] = float(np.max(a - nb) / max(f["lum_median"], 8.0))
  else:
    f["row_step"] = 0.0
  if out.sum() >= 16:
    vo = small[out].max(axis=-1).astype(np.float32)
    f["surround_lit"] = float(np.mean(vo > 0.25 * f["lum_median"]))
  else:
    f["surround_lit"] = 0.0
  # Corners of the frame (2.5% of the short side): outside the FOV in every
  # camera format, so dark; faces, scenes and documents fill them.
  v = small.max(axis=-1).astype(np.float32)
  c = max(2, min(sh, sw) // 40)
  hi = max(float(np.percentile(v, 99)), 1.0)
  f["corner_level"] = float(max(np.median(x) for x in (
      v[:c, :c], v[:c, -c:], v[-c:, :c], v[-c:, -c:])) / hi)
  f["lit_frac"] = float(np.mean(v > 0.25 * hi))
  return f


# Thresholds (see the module docstring for where they were measured).
MAX_GREY_FRAC = 0.95     # share of FOV pixels with equal channels (+-1)
# Colour is judged only where there is colour to judge: a photograph
# darkened to 7% with a grey-green cast keeps a channel spread of ~2.
MIN_CHROMA = 10.0        # mean max-min channel spread over the lit FOV
MIN_RED_MAX = 0.9        # share of the FOV where red is the top channel
MAX_SURROUND_LIT = 0.15  # share of the surround as bright as the fundus
# Brightest frame corner / 99th percentile brightness: <= 0.05 on every
# training photograph, clean or degraded. A fitted circle tolerates a label
# in a corner; without one the corners must be dark.
MAX_CORNER_LEVEL = 0.25
MAX_CORNER_LEVEL_NO_CIRCLE = 0.1
MIN_LIT_FRAC = 0.2       # share of the frame lit, without a circle
# Sharpest whole-row brightness step in the FOV / FOV brightness: <= 0.03
# on training photographs, <= 0.16 severely degraded (noise).
MAX_ROW_STEP = 0.3
# Below ~24 JPEG blocks across the FOV an honest, heavily compressed
# photograph's 8-px blocks step as sharply as a garbled one's rows.
MIN_ROW_STEP_DIAMETER = 192.0


def check(image: np.ndarray, fov, small: np.ndarray | None = None,
          k: int | None = None) -> GateResult:
  """Decides whether an image is a colour fundus photograph (never raises
  for valid (H, W, 3) uint8 input and a FOV from `detect_fov`)."""
  f = measure(image, fov, small, k)
  if "chroma" not in f:
    return GateResult(False, "field of view too small to judge", f)
  if f["grey_frac"] >= MAX_GREY_FRAC:
    kind = ("binary or flat" if f["top2"] >= 0.9 else "greyscale")
    return GateResult(
        False, f"{kind} image ({100 * f['grey_frac']:.0f}% of the field of "
        "view has no colour): a mask, map or monochrome picture", f)
  if f["chroma"] >= MIN_CHROMA and f["red_max"] < MIN_RED_MAX:
    return GateResult(
        False, f"red is the strongest channel on only "
        f"{100 * f['red_max']:.0f}% of the field of view (fundus: >= "
        f"{100 * MIN_RED_MAX:.0f}%)", f)
  if fov.circular:
    if (f["row_step"] > MAX_ROW_STEP
        and 2.0 * fov.r >= MIN_ROW_STEP_DIAMETER):
      return GateResult(
          False, "whole rows of the field of view jump in brightness ("
          f"{100 * f['row_step']:.0f}% of its level in one row): a garbled "
          "image", f)
    if (f["surround_lit"] > MAX_SURROUND_LIT
        or f["corner_level"] > MAX_CORNER_LEVEL):
      return GateResult(
          False, f"the surround outside the field of view is lit "
          f"({100 * f['surround_lit']:.0f}% of it, a corner at "
          f"{100 * f['corner_level']:.0f}% of the brightest): a garbled "
          "image, or not a fundus photograph", f)
    return GateResult(True, "", f)
  # No circle (a rim hidden by a shadow, a cut frame we could not fit):
  # still a fundus photograph when a red field lies on a dark surround.
  if (f["corner_level"] > MAX_CORNER_LEVEL_NO_CIRCLE
      or f["lit_frac"] < MIN_LIT_FRAC):
    return GateResult(
        False, "no field of view: no circular bright area on a dark "
        f"surround (corners at {100 * f['corner_level']:.0f}% of the "
        f"brightest, {100 * f['lit_frac']:.0f}% of the frame lit)", f)
  return GateResult(True, "", f)
