import itertools

import numpy as np
import pytest

from efiqa_jax import metrics, quality, report


def _auroc_bruteforce(y, s):
  pos = [b for a, b in zip(y, s) if a]
  neg = [b for a, b in zip(y, s) if not a]
  tot = 0.0
  for p, n in itertools.product(pos, neg):
    tot += 1.0 if p > n else 0.5 if p == n else 0.0
  return tot / (len(pos) * len(neg))


def test_auroc_matches_pairwise_definition_with_ties():
  rng = np.random.default_rng(0)
  y = rng.random(60) > 0.6
  s = np.round(rng.random(60) * 5) / 5  # many ties
  assert abs(metrics.auroc(y, s) - _auroc_bruteforce(y, s)) < 1e-12
  assert metrics.auroc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2]) == 1.0
  assert np.isnan(metrics.auroc([1, 1], [0.1, 0.2]))


def test_weighted_auroc_equals_repetition():
  y = np.array([1, 0, 1, 0, 1])
  s = np.array([0.3, 0.2, 0.1, 0.4, 0.5])
  w = np.array([2, 1, 1, 3, 1])
  rep_y = np.repeat(y, w)
  rep_s = np.repeat(s, w)
  assert abs(metrics.auroc(y, s, w) - _auroc_bruteforce(rep_y, rep_s)) < 1e-12


def test_within_image_auroc_says_where_not_which():
  """Per image, damaged vs intact cells of that image only: a map of one
  value per image scores 0.5 however well it ranks the images (the pooled
  AUROC rewards it), a map that follows the damage scores 1; images with
  (almost) no or all damage are left out (nan)."""
  rng = np.random.default_rng(1)
  y = np.zeros((4, 8, 8), bool)
  y[0, :3] = True  # partly damaged
  y[1, :, :5] = True  # partly damaged
  y[3] = True  # all damaged: no within-image contrast
  w = np.ones((4, 8, 8))
  w[1, 7] = 0.0  # outside the FOV: not counted
  per_image = np.broadcast_to(y.mean(axis=(1, 2))[:, None, None], y.shape)
  follows = y + 0.1 * rng.random(y.shape)
  assert metrics.auroc(y, per_image, w) > 0.75  # pooled: rewarded
  got = metrics.within_image_auroc(y, per_image, w)
  assert got[0] == 0.5 and got[1] == 0.5 and np.isnan(got[2:]).all()
  got = metrics.within_image_auroc(y, follows, w)
  assert got[0] == 1.0 and got[1] == 1.0
  # A cell outside the FOV does not count: only it wrong changes nothing.
  wrong = follows.copy()
  wrong[1, 7] = -1.0 * y[1, 7] + 2.0 * ~y[1, 7]
  assert metrics.within_image_auroc(y, wrong, w)[1] == 1.0
  flipped = follows.copy()
  flipped[1] = 1.0 - flipped[1]
  assert metrics.within_image_auroc(y, flipped, w)[1] == 0.0


def test_summarise_and_grades():
  qmap = np.zeros((4, 4), np.float32)
  qmap[0, :] = 1.0
  w = np.ones((4, 4), np.float32)
  q, frac = quality.summarise(qmap, w)
  assert abs(q - 0.75) < 1e-6 and abs(frac - 0.25) < 1e-6
  g = quality.Grading(good_min=0.8, usable_min=0.5)
  assert g.grade(0.9) == "good"
  assert g.grade(0.6) == "usable" and g.grade(0.4) == "reject"
  # Outside the FOV counts for nothing.
  w[0, :] = 0
  q, frac = quality.summarise(qmap, w)
  assert q == 1.0 and frac == 0.0


def test_overlay_keeps_clean_regions_and_marks_degraded_ones():
  img = np.full((64, 64, 3), 100, np.uint8)
  m = np.zeros((8, 8), np.float32)
  m[:4] = 1.0
  fov = np.ones((64, 64), bool)
  out = report.overlay(img, m, fov)
  assert out.shape == img.shape and out.dtype == np.uint8
  assert np.abs(out[40:60, 10:50].astype(int) - 100).max() == 0
  assert np.abs(out[5:20, 10:50].astype(int) - 100).mean() > 30


def test_overlay_batch_matches_overlay():
  """The jitted batch overlay `efiqa assess` writes is report.overlay's
  picture: Pillow's bilinear map upsampling (8x and a non-integer ratio),
  ramp, opacity and FOV rim; a channel may differ by 1 on a .5 rounding."""
  rng = np.random.default_rng(3)
  for (h, w), (mh, mw) in (((64, 64), (8, 8)), ((50, 70), (6, 9))):
    img = rng.integers(0, 256, size=(3, h, w, 3), dtype=np.uint8)
    q = rng.random((3, mh, mw)).astype(np.float32) * 1.2 - 0.1  # clipped
    q[0] = 0.0
    q[1, :2] = 1.0
    yy, xx = np.mgrid[:h, :w]
    fov = np.stack([(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 2.2) ** 2,
                    np.ones((h, w), bool), np.zeros((h, w), bool)])
    got = np.asarray(report.overlay_batch(img, q, fov))
    assert got.shape == img.shape and got.dtype == np.uint8
    want = np.stack([report.overlay(img[k], q[k], fov[k]) for k in range(3)])
    d = np.abs(got.astype(int) - want)
    assert d.max() <= 1 and (d > 0).mean() < 1e-3
    np.testing.assert_array_equal(got[0][~fov[0]], img[0][~fov[0]])


def test_efiqa_map_filter():
  from efiqa_jax import quality
  fov = np.zeros((160, 160), bool)
  yy, xx = np.mgrid[:160, :160]
  fov[(yy - 80) ** 2 + (xx - 80) ** 2 <= 75 ** 2] = True
  valid = quality.fov_at(fov, (16, 16)) > 0
  # A constant map inside the FOV stays constant (no rim erosion).
  m = np.where(valid, 0.3, 0.0)
  np.testing.assert_allclose(quality.efiqa_map_filter(m, fov)[valid], 0.3,
                             atol=1e-6)
  assert np.all(quality.efiqa_map_filter(m, fov)[~valid] == 0)
  # An isolated bad cell is removed; an isolated good cell inside an 8x8 bad
  # region is filled and the region survives.
  m = np.where(valid, 0.1, 0.0)
  m[8, 8] = 0.9
  assert quality.efiqa_map_filter(m, fov, sigma=0)[8, 8] == pytest.approx(0.1)
  m = np.where(valid, 0.1, 0.0)
  m[4:12, 4:12] = 0.9
  m[7, 7] = 0.1
  f = quality.efiqa_map_filter(m, fov, sigma=0)
  assert f[7, 7] == pytest.approx(0.9) and f[4, 4] == pytest.approx(0.9)
  assert f[2, 8] == pytest.approx(0.1)
  # Smoothing spreads, keeps the order, and the raw setting is the identity.
  g = quality.efiqa_map_filter(m, fov)
  assert g[7, 7] > g[12, 12] > g[14, 8]
  np.testing.assert_allclose(quality.efiqa_map_filter(m, fov, size=1,
                                                      sigma=0)[valid],
                             m[valid], atol=1e-7)
  assert np.all(quality.efiqa_map_filter(m, np.zeros_like(fov)) == 0)
