"""Host-side, per-record augmentation of vessel maps for VUAD training.

Reference order (`vuad/train.py`): RandomHorizontalFlip(0.5),
RandomVerticalFlip(0.5), RandomRotation(360, fill 0), RandomFOV, Resize(256),
ToTensor. Everything here is numpy/PIL on uint8 single-channel maps and is a
pure function of (map, rng): the pipeline seeds one `np.random.Generator` per
record from (seed, global record index), so a resumed run sees the same pixels.

RandomFOV (our reading of the reference): with probability p(epoch) a new
circular field of view of radius R_new = ratio * R_orig, ratio ~
U[max(ratio_lo, min_diameter / original_diameter), ratio_hi], is centred
uniformly in the disc of radius R_orig - R_new around the map centre (so it
stays inside the original FOV); its bounding square is cropped and resized to
the output size (a smaller FOV fills the frame, like a narrower camera) and
everything outside the new circle is set to black.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image


def fov_probability(epoch: float, *, p_max: float = 0.5,
                    start: float = 20, end: float = 80) -> float:
  """RandomFOV probability: 0 before `start`, linear to p_max at `end`."""
  if epoch < start:
    return 0.0
  if end <= start:
    return float(p_max)
  return float(p_max) * min((epoch - start) / (end - start), 1.0)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  out_size: int = 256
  hflip: bool = True
  vflip: bool = True
  rotation: bool = True
  fov_ratio_range: tuple[float, float] = (0.5, 1.0)
  # Minimum crop diameter in pixels of the ORIGINAL image (reference
  # pixel_limits=224); converted per record with its original diameter.
  fov_min_diameter_px: float = 224.0


def fov_params(rng: np.random.Generator, size: int, orig_diameter: float,
               cfg: AugmentConfig):
  """Draws (ratio, cx, cy) for a RandomFOV crop of a size x size map.

  Returns None when the minimum diameter cannot be met (map too small).
  Always consumes the same number of random draws.
  """
  u_ratio, u_rho, u_theta = rng.random(3)
  lo, hi = cfg.fov_ratio_range
  lo = max(lo, cfg.fov_min_diameter_px / max(orig_diameter, 1e-6))
  if lo > hi:
    return None
  ratio = lo + (hi - lo) * u_ratio
  r_orig = size / 2.0
  r_new = ratio * r_orig
  rho = (r_orig - r_new) * math.sqrt(u_rho)  # uniform in the disc
  theta = 2 * math.pi * u_theta
  return ratio, r_orig + rho * math.cos(theta), r_orig + rho * math.sin(theta)


def circle_mask(size: int) -> np.ndarray:
  c = (np.arange(size) + 0.5 - size / 2.0) / (size / 2.0)
  return (c[None, :] ** 2 + c[:, None] ** 2) <= 1.0


def augment(vmap: np.ndarray, rng: np.random.Generator, *, fov_p: float,
            orig_diameter: float, cfg: AugmentConfig) -> tuple[np.ndarray, dict]:
  """One augmented sample.

  vmap: (L, L) uint8 vessel map (square, FOV centred). Returns
  ((out_size, out_size) uint8, info dict with flip/rotation/fov draws).
  """
  if vmap.ndim != 2 or vmap.shape[0] != vmap.shape[1] or vmap.dtype != np.uint8:
    raise ValueError(f"expected a square (L, L) uint8 map, got {vmap.shape} "
                     f"{vmap.dtype}")
  size = vmap.shape[0]
  # Fixed draw order so every record consumes the same stream.
  u_h, u_v, u_rot, u_fov = rng.random(4)
  fov = fov_params(rng, size, orig_diameter, cfg)
  img = vmap
  hflip = cfg.hflip and u_h < 0.5
  vflip = cfg.vflip and u_v < 0.5
  if hflip:
    img = img[:, ::-1]
  if vflip:
    img = img[::-1, :]
  pil = Image.fromarray(np.ascontiguousarray(img))
  angle = 360.0 * u_rot if cfg.rotation else 0.0
  if cfg.rotation:
    # torchvision RandomRotation on PIL: nearest, fill 0, same canvas.
    pil = pil.rotate(angle, resample=Image.NEAREST, fillcolor=0)
  crop = fov is not None and u_fov < fov_p
  s = cfg.out_size
  if crop:
    ratio, cx, cy = fov
    r_new = ratio * size / 2.0
    box = (cx - r_new, cy - r_new, cx + r_new, cy + r_new)
    out = np.asarray(pil.resize((s, s), Image.BILINEAR, box=box))
    out = np.where(circle_mask(s), out, 0).astype(np.uint8)
  else:
    out = np.asarray(pil.resize((s, s), Image.BILINEAR)) if size != s else (
        np.asarray(pil))
  info = dict(hflip=hflip, vflip=vflip, angle=angle, fov_crop=crop,
              fov_ratio=fov[0] if crop else 1.0)
  return np.ascontiguousarray(out), info
