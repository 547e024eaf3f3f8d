"""From a degradation map to image-level numbers: quality, grade, fraction.

The default pooling (documented in the README):
  quality           = 1 - mean of the map over the field of view
  degraded_fraction = share of the field of view where the map >= 0.5
  grade             = good    if quality >= GOOD_MIN
                      usable  if quality >= USABLE_MIN
                      reject  otherwise
Inputs that are not colour fundus photographs never get here (status
`not_fundus`, `efiqa_jax.fundus.gate`); every fundus photograph is graded the
same way whatever its frame shape. `efiqa calibrate` (issue 5) replaces these
defaults with a fitted pooling.
"""
from __future__ import annotations

import dataclasses

import numpy as np

GOOD_MIN = 0.80
USABLE_MIN = 0.55
DEGRADED_CELL = 0.5
GRADES = ("good", "usable", "reject")


@dataclasses.dataclass(frozen=True)
class Grading:
  good_min: float = GOOD_MIN
  usable_min: float = USABLE_MIN

  def grade(self, quality: float) -> str:
    if quality >= self.good_min:
      return "good"
    if quality >= self.usable_min:
      return "usable"
    return "reject"


def fov_at(fov_mask: np.ndarray, shape) -> np.ndarray:
  """Fraction of each map cell inside the FOV (area resampling of the mask)."""
  fm = np.asarray(fov_mask, np.float32)
  h, w = fm.shape
  mh, mw = shape
  if h % mh == 0 and w % mw == 0:
    return fm.reshape(mh, h // mh, mw, w // mw).mean(axis=(1, 3))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.fromarray(fm, mode="F").resize((mw, mh), Image.BOX))


MAP_FILTERS = ("efiqa", "none")


def efiqa_map_filter(qmap: np.ndarray, fov_mask: np.ndarray | None, *,
                     size: int = 3, sigma: float = 1.0,
                     valid: np.ndarray | None = None) -> np.ndarray:
  """EFIQA's map post-processing (paper §1.7: "morphological filtering and
  smoothing") on the patch grid: a grey opening then closing with a
  size x size square (drops isolated bad cells, fills isolated good holes),
  then a Gaussian of `sigma` cells. Cells outside the FOV take the FOV's
  median first (so the rim is not eroded towards 0) and are 0 afterwards.
  `valid` (cells touching the FOV), when the caller has it, replaces
  fov_mask."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  q = np.asarray(qmap, np.float64)
  if valid is None:
    valid = fov_at(fov_mask, q.shape) > 0
  if not valid.any():
    return np.zeros(q.shape, np.float32)
  x = np.where(valid, q, np.median(q[valid]))
  if size > 1:
    x = ndimage.grey_closing(ndimage.grey_opening(x, size=size), size=size)
  if sigma > 0:
    x = ndimage.gaussian_filter(x, sigma, mode="nearest")
  return np.where(valid, x, 0.0).astype(np.float32)


def summarise(qmap: np.ndarray, fov_weight: np.ndarray) -> tuple[float, float]:
  """(quality, degraded_fraction) of a map given per-cell FOV weights."""
  wsum = float(fov_weight.sum())
  if wsum <= 0:
    return 0.0, 1.0
  mean = float((qmap * fov_weight).sum() / wsum)
  frac = float(((qmap >= DEGRADED_CELL) * fov_weight).sum() / wsum)
  return 1.0 - mean, frac
