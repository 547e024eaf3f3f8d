"""The field of view of every common camera format (issue 12 §4).

Real training photographs (../shared/data/fundus_train) with official FOV
masks, and the same photographs cut to a 4:3 frame (circle cut at top and
bottom), to a 4:3 window inside the circle with cut corners (octagonal
window) and to a centred square. HRF photographs are themselves cut at top
and bottom, so their square window holds black bands inside the frame:
straight cuts that are not the frame edge.
"""
import csv

import numpy as np
import pytest
from PIL import Image

from efiqa_jax import fundus


def _rows(train_dir):
  with open(train_dir / "manifest.csv") as f:
    return list(csv.DictReader(f))


def _load(train_dir, rel):
  return np.asarray(Image.open(train_dir / rel).convert("RGB"))


def iou(a, b):
  return (a & b).sum() / max((a | b).sum(), 1)


def test_official_fov_masks_iou(fundus_train_dir):
  """Every photograph with an official mask (DRIVE, HRF): IoU >= 0.97."""
  rows = [r for r in _rows(fundus_train_dir) if r["fov"]]
  assert len(rows) >= 60
  worst = 1.0
  for r in rows[::2]:  # every other one keeps the test at a few seconds
    img = _load(fundus_train_dir, r["image"])
    gt = np.asarray(Image.open(fundus_train_dir / r["fov"]).convert("L")) > 127
    fov = fundus.detect_fov(img)
    assert fov.circular, (r["id"], fov.message)
    worst = min(worst, iou(fov.mask(*gt.shape), gt))
    assert iou(fov.mask(*gt.shape), gt) >= 0.97, r["id"]
  assert worst >= 0.97


def cut(img, cx, cy, r, fmt):
  """A window of the photograph (zero outside it) and the circle in it."""
  h, w = img.shape[:2]
  if fmt == "4:3":  # wider than the circle, cut at top and bottom
    ww = int(2.04 * r)
    hh = int(0.75 * ww)
  elif fmt == "octagonal":  # 4:3 inside the circle, corners cut by it
    ww = int(1.7 * r)
    hh = int(0.75 * ww)
  elif fmt == "square":
    ww = hh = int(1.6 * r)
  x0, y0 = int(round(cx - ww / 2)), int(round(cy - hh / 2))
  out = np.zeros((hh, ww, 3), np.uint8)
  valid = np.zeros((hh, ww), bool)
  sx0, sy0 = max(x0, 0), max(y0, 0)
  sx1, sy1 = min(x0 + ww, w), min(y0 + hh, h)
  out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img[sy0:sy1, sx0:sx1]
  valid[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = True
  return out, valid, cx - x0, cy - y0


PICKS = ("drive_21", "drive_30", "hrf_01_h", "hrf_07_dr", "chase_01L",
         "chase_12R")


@pytest.mark.parametrize("fmt", ["4:3", "octagonal", "square"])
def test_cut_formats_keep_the_circle(fundus_train_dir, fmt):
  rows = {r["id"]: r for r in _rows(fundus_train_dir)}
  for pid in PICKS:
    img = _load(fundus_train_dir, rows[pid]["image"])
    ref = fundus.detect_fov(img)
    assert ref.circular, (pid, ref.message)
    c, valid, cx, cy = cut(img, ref.cx, ref.cy, ref.r, fmt)
    fov = fundus.detect_fov(c)
    assert fov.circular, (pid, fmt, fov.message)
    tol = 0.02 * ref.r
    assert abs(fov.cx - cx) <= tol and abs(fov.cy - cy) <= tol, (pid, fov)
    assert abs(fov.r - ref.r) <= tol, (pid, fov)
    hh, ww = c.shape[:2]
    yy, xx = np.mgrid[:hh, :ww]
    truth = ((xx - cx) ** 2 + (yy - cy) ** 2 <= ref.r ** 2) & valid
    assert iou(fov.mask(hh, ww), truth) >= 0.97, (pid, fmt)
    # prepare_fundus: the same photograph is a fundus photograph, its crop
    # square stays around the circle and the mask stays in the window.
    res = fundus.prepare_image(c, 128)
    assert res.ok and res.circular, (pid, fmt, res.message)
    back = fundus.map_to_original(res.fov_mask, res)
    assert iou(back, truth) >= 0.95, (pid, fmt)
