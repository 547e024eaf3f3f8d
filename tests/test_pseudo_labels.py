"""Pseudo-label rules against the reference's vuad/infer.py, by hand."""
import numpy as np
import pytest

from efiqa_jax import pseudo_labels as pl


def test_hard_labels_need_ninety_percent_of_a_cell():
  a = np.zeros((256, 256), np.float32)
  # Cell (0, 0): 16x16 = 256 pixels; 231 anomalous (90.2 %) -> bad.
  a[:16, :16].flat[:231] = 0.5
  # Cell (0, 1): 230 anomalous (89.8 %) -> good.
  a[:16, 16:32].flat[:230] = 0.5
  # Cell (1, 0): all pixels exactly at the threshold -> not anomalous (>).
  a[16:32, :16] = 0.02
  lab = pl.patch_labels(a, pl.LabelSpec(grid=16))
  assert lab.shape == (16, 16) and lab.dtype == np.uint8
  assert lab[0, 0] == 255 and lab[0, 1] == 0 and lab[1, 0] == 0
  assert lab.sum() == 255


def test_soft_labels_are_cell_means_of_the_soft_map():
  a = np.full((256, 256), 0.03, np.float32)  # soft value (0.03-0.02)/0.02=0.5
  lab = pl.patch_labels(a, pl.LabelSpec(mode="soft", grid=16))
  assert np.all(lab == 128)  # round(0.5 * 255)


def test_grid_14_on_256_covers_every_pixel_once():
  b = pl.cell_bounds(256, 14)
  assert b[0] == 0 and b[-1] == 256 and np.all(np.diff(b) > 0)
  a = np.zeros((256, 256), np.float32)
  a[:, :] = 1.0
  lab = pl.patch_labels(a, pl.LabelSpec(grid=14))
  assert lab.shape == (14, 14) and np.all(lab == 255)


def test_label_spec_validates():
  with pytest.raises(ValueError):
    pl.LabelSpec(mode="fuzzy")
  with pytest.raises(ValueError):
    pl.LabelSpec(relax=0)


def test_reference_vessel_input_zeroes_dark_pixels_and_scales():
  img = np.zeros((512, 512, 3), np.uint8)
  img[:256] = 50      # grey 50 -> zeroed (<= 50)
  img[256:] = 51      # kept
  x = pl.reference_vessel_input(img, 256)
  assert x.shape == (256, 256, 3) and x.dtype == np.float32
  assert np.all(x[:127] == 0)
  assert np.allclose(x[129:], 51 / 255)


def test_resize_linear_matches_half_pixel_bilinear():
  img = np.arange(16, dtype=np.float32).reshape(4, 4)
  out = pl.resize_linear(img, 2, 2)
  # Downscale by 2 with half-pixel centres samples at 0.5, 2.5 -> averages.
  assert np.allclose(out, [[2.5, 4.5], [10.5, 12.5]])
