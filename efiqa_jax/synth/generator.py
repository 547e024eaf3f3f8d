"""Synthetic colour fundus photographs with exact vessel ground truth.

`generate(seed)` is a pure function of (seed, size, options): every random draw
comes from numpy Generators spawned from `np.random.SeedSequence(seed)`, one
stream per stage (anatomy, lesions, degradation, decisions). Switching lesions
or degradation on or off therefore never changes the anatomy of a seed, and
`generate(seed, degrade=False).image` is exactly the clean photograph that
`generate(seed, degrade=True)` degrades.

Lesions (exudates, haemorrhages, drusen) are pathology, not poor quality: they
never enter the degradation mask. They are painted *under* the vessels (deep
retinal layers; the inner-retinal vessels pass over them), so the vessel
ground truth is never changed by lesions.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from efiqa_jax.synth import _ops
from efiqa_jax.synth import anatomy
from efiqa_jax.synth import degradations

DEFAULT_CLEAN_FRACTION = 0.3
DEFAULT_LESION_FRACTION = 0.35
LESION_KINDS = ("exudates", "haemorrhages", "drusen")


@dataclasses.dataclass
class SynthSample:
  image: np.ndarray          # (S, S, 3) uint8, degraded if degradation applied
  vessels: np.ndarray        # (S, S) uint8 0/1 vessel ground truth
  degradation: np.ndarray    # (S, S) float32 [0, 1]; 0 = clean; 0 outside FOV
  fov_mask: np.ndarray       # (S, S) bool
  labels: dict[str, Any]
  clean_image: np.ndarray | None = None   # the photograph before degradation
  lesion_mask: np.ndarray | None = None   # (S, S) bool, where lesions are painted
  info: dict[str, Any] = dataclasses.field(default_factory=dict)  # degrade() info
  geometry: anatomy.Geometry | None = None   # FOV, disc and fovea positions


def _fundus_colour(rng: np.random.Generator):
  """Background RGB in [0, 1] from fair (orange) to dark (brown) pigmentation."""
  t = rng.random()   # 0 fair, 1 dark
  base = np.array([0.86, 0.50, 0.22]) * (1 - t) + np.array([0.55, 0.25, 0.09]) * t
  base *= rng.uniform(0.92, 1.08, size=3) * rng.uniform(0.85, 1.1)
  return base.astype(np.float32), t


_LO = 128   # smooth fields are built at this resolution and upsampled once


def _render_background(rng, g: anatomy.Geometry):
  """Base colour x (texture, vignetting, nerve-fibre sheen, macula)."""
  s = g.size
  base, pig = _fundus_colour(rng)
  # Low-resolution grid in full-resolution pixel coordinates.
  c = (np.arange(_LO, dtype=np.float32) + 0.5) * (s / _LO) - 0.5
  lx, ly = np.meshgrid(c, c)
  low = _ops.smooth_noise(rng, _LO, _LO, 5)
  mid = _ops.smooth_noise(rng, _LO, _LO, int(rng.uniform(40, 64)))
  a_mid = rng.uniform(0.01, 0.035) * (0.6 + 0.8 * pig)
  rho2 = ((lx - g.cx) ** 2 + (ly - g.cy) ** 2) / (g.r * g.r)
  vig = 1.0 - rng.uniform(0.2, 0.5) * np.minimum(rho2, 1.2) ** rng.uniform(1.0, 2.0)
  dd2 = ((lx - g.disc_x) ** 2 + (ly - g.disc_y) ** 2) / (g.r * g.r)
  sheen = rng.uniform(0.04, 0.12) * np.exp(-dd2 / 0.12)
  df2 = ((lx - g.fovea_x) ** 2 + (ly - g.fovea_y) ** 2) / (g.r * g.r)
  mac = rng.uniform(0.12, 0.3) * np.exp(-df2 / (2 * 0.16**2))
  fov_c = rng.uniform(0.1, 0.25) * np.exp(-df2 / (2 * 0.035**2))
  gain = (1.0 + 0.04 * low + a_mid * mid) * (vig + sheen) * (1.0 - mac - fov_c)
  # Choroidal vessels show through mostly in red; the macula absorbs blue.
  red = 1.0 + 0.5 * a_mid * mid
  blue = 1.0 - 0.4 * mac
  lo = np.stack([gain * red, gain * (1.0 - 0.3 * mac), gain * blue], -1) * base
  img = _ops.resize_linear(lo, s, s)
  if rng.random() < 0.5:   # small foveal reflex
    y0, y1, x0, x1 = _box(g.fovea_x, g.fovea_y, 0.03 * g.r, s)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    d2 = ((xx - g.fovea_x) ** 2 + (yy - g.fovea_y) ** 2) / (0.006 * g.r) ** 2
    img[y0:y1, x0:x1] += (rng.uniform(0.05, 0.15) * np.exp(-d2))[..., None]
  return img


def _box(cx, cy, rad, s):
  x0, x1 = max(0, int(cx - rad)), min(s, int(cx + rad) + 2)
  y0, y1 = max(0, int(cy - rad)), min(s, int(cy + rad) + 2)
  return y0, y1, x0, x1


def _render_disc(rng, g: anatomy.Geometry, img):
  """Optic disc (yellow-orange rim, pale cup, faint glow), drawn on its box."""
  y0, y1, x0, x1 = _box(g.disc_x, g.disc_y, 2.2 * max(g.disc_rx, g.disc_ry), g.size)
  if y1 <= y0 or x1 <= x0:
    return
  yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
  sub = img[y0:y1, x0:x1]
  ang = np.arctan2(yy - g.disc_y, xx - g.disc_x)
  wob = 1.0 + 0.04 * np.sin(3 * ang + rng.uniform(0, 6.3)) + 0.03 * np.sin(
      5 * ang + rng.uniform(0, 6.3))
  dd = np.sqrt(((xx - g.disc_x) / g.disc_rx) ** 2 + ((yy - g.disc_y) / g.disc_ry) ** 2)
  dd = dd / wob
  alpha = _ops.smoothstep(1.08, 0.85, dd)
  glow = 0.15 * np.exp(-np.maximum(dd - 1.0, 0) * 3.0) * (dd > 0.9)
  # Neuroretinal rim: orange-pink; the cup (below) is pale yellow-white.
  rim = np.array([1.0, 0.64, 0.40], np.float32) * rng.uniform(0.92, 1.05, 3)
  rim *= rng.uniform(0.85, 1.05)
  sub[:] = sub * (1 - alpha[..., None]) + rim * alpha[..., None]
  sub += glow[..., None] * sub * np.array([0.5, 0.6, 0.5], np.float32)
  # Cup: paler, offset temporally.
  cux = g.disc_x - g.side * 0.15 * g.disc_rx
  cr = g.cup_ratio
  dc = np.sqrt(((xx - cux) / (cr * g.disc_rx)) ** 2 + ((yy - g.disc_y) / (cr * g.disc_ry)) ** 2)
  ca = _ops.smoothstep(1.4, 0.5, dc) * rng.uniform(0.7, 1.0)
  cup = np.array([1.0, 0.93, 0.72], np.float32)
  sub[:] = sub * (1 - ca[..., None]) + cup * ca[..., None]


def _render_lesions(rng, g: anatomy.Geometry, img, kinds: Sequence[str]):
  """Paints lesions in place; returns the lesion mask (alpha > 0.25)."""
  s = g.size
  r = g.r
  alpha_all = np.zeros((s, s), np.float32)
  for kind in kinds:
    if kind == "exudates":
      n_cl = rng.integers(1, 4)
      xs, ys, rs = [], [], []
      for _ in range(n_cl):
        ang = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(0.1, 0.45) * r
        ccx = g.fovea_x + dist * math.cos(ang)
        ccy = g.fovea_y + dist * math.sin(ang)
        m = rng.integers(5, 30)
        spread = rng.uniform(0.03, 0.1) * r
        xs.append(ccx + rng.normal(0, spread, m))
        ys.append(ccy + rng.normal(0, spread, m))
        rs.append(rng.lognormal(np.log(0.006), 0.5, m) * r)
      xs, ys, rs = map(np.concatenate, (xs, ys, rs))
      # Hard exudates: waxy patches with fairly sharp edges.
      a = _ops.splat((s, s), xs, ys, rs, "disc", rng.uniform(0.5, 0.85, xs.size))
      col = np.array([1.0, 0.92, 0.55], np.float32) * rng.uniform(0.85, 1.0)
    elif kind == "drusen":
      m = rng.integers(10, 60)
      ang = rng.uniform(0, 2 * math.pi, m)
      dist = np.abs(rng.normal(0, 0.18, m)) * r
      xs = g.fovea_x + dist * np.cos(ang)
      ys = g.fovea_y + dist * np.sin(ang)
      rs = rng.uniform(0.006, 0.014, m) * r
      a = _ops.splat((s, s), xs, ys, rs, "gauss", rng.uniform(0.3, 0.6, m))
      col = np.array([0.95, 0.78, 0.45], np.float32)
    elif kind == "haemorrhages":
      m = rng.integers(2, 14)
      xs, ys, rs = [], [], []
      for _ in range(m):
        ang = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(0.1, 0.85) * r
        hx = g.cx + dist * math.cos(ang)
        hy = g.cy + dist * math.sin(ang)
        size = rng.uniform(0.008, 0.035) * r
        if rng.random() < 0.4:   # flame: elongated, radial from the disc
          da = math.atan2(hy - g.disc_y, hx - g.disc_x)
          t = np.linspace(-2.0, 2.0, 25)
          xs.append(hx + t * size * math.cos(da) + rng.normal(0, 0.05 * size, 25))
          ys.append(hy + t * size * math.sin(da) + rng.normal(0, 0.05 * size, 25))
          rs.append(0.6 * size * np.sqrt(1.05 - (t / 2.0) ** 2))
        else:                    # dot/blot: a small irregular cluster
          k = rng.integers(1, 7)
          xs.append(hx + rng.normal(0, 0.35 * size, k))
          ys.append(hy + rng.normal(0, 0.35 * size, k))
          rs.append(size * rng.uniform(0.4, 0.9, k))
      xs, ys, rs = map(np.concatenate, (xs, ys, rs))
      a = _ops.splat((s, s), xs, ys, rs, "disc", rng.uniform(0.7, 0.95, xs.size))
      col = np.array([0.42, 0.06, 0.04], np.float32) * rng.uniform(0.7, 1.1)
    else:
      raise ValueError(f"unknown lesion kind {kind!r}; valid: {LESION_KINDS}")
    # Composite only inside the bounding box of the stamps (they are small).
    rows, cols = np.flatnonzero(a.any(axis=1)), np.flatnonzero(a.any(axis=0))
    if rows.size == 0:
      continue
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    sub, aa = img[y0:y1, x0:x1], a[y0:y1, x0:x1, None]
    if kind != "haemorrhages":
      # Bright lesions keep some of the underlying shading.
      col = col * (0.55 + 0.45 * sub / (sub.reshape(-1, 3).max(0) + 1e-6))
    sub[:] = sub * (1 - aa) + col * aa
    np.maximum(alpha_all, a, out=alpha_all)
  return alpha_all > 0.25


def _render_vessels(rng, g: anatomy.Geometry, img):
  lines = anatomy.grow_vessels(rng, g)
  xs, ys, ws, ks = anatomy.densify(lines)
  s = g.size
  # Thin vessels have less contrast (partial volume, less blood in the path).
  contrast = 1.0 - np.exp(-ws / (0.013 * g.r))
  dens, gt = _ops.splat_vessels((s, s), xs, ys, 0.5 * ws, contrast, ks)
  # Central light reflex on wider arteries.
  sel = (ks == anatomy.ARTERY) & (ws > 3.0)
  if sel.any():
    reflex = _ops.splat((s, s), xs[sel], ys[sel], 0.18 * ws[sel], "gauss",
                        np.full(sel.sum(), rng.uniform(0.15, 0.35), np.float32))
    dens[anatomy.ARTERY] *= 1.0 - reflex
  strength = rng.uniform(0.8, 1.2)
  k_art = np.array([0.22, 0.60, 0.50], np.float32) * strength
  k_vein = np.array([0.50, 1.00, 0.85], np.float32) * strength
  # Only touch vessel pixels (~15% of the frame).
  da, dv = dens[anatomy.ARTERY].reshape(-1), dens[anatomy.VEIN].reshape(-1)
  idx = np.flatnonzero((da + dv) > 0)
  flat = img.reshape(-1, 3)
  flat[idx] *= np.exp(-(da[idx, None] * k_art + dv[idx, None] * k_vein))
  return gt


def _fov(g: anatomy.Geometry):
  """FOV = pixel centres within r of the centre; alpha anti-aliases the rim."""
  yy, xx = np.ogrid[0:g.size, 0:g.size]
  dist = np.sqrt((xx.astype(np.float32) - g.cx) ** 2 + (yy.astype(np.float32) - g.cy) ** 2)
  fov = dist <= g.r
  alpha = np.clip(g.r - dist + 0.5, 0.0, 1.0) * fov
  return alpha, fov


def to_uint8(img: np.ndarray) -> np.ndarray:
  """Round float [0, 1] to uint8 (clobbers img: it is not used afterwards)."""
  np.clip(img, 0.0, 1.0, out=img)
  img *= 255.0
  img += 0.5
  return img.astype(np.uint8)


def _streams(seed: int):
  ss = np.random.SeedSequence(int(seed))
  return [np.random.default_rng(c) for c in ss.spawn(4)]


def generate(seed: int, size: int = 512, *, degrade: bool | None = None,
             lesions: bool | None = None,
             clean_fraction: float = DEFAULT_CLEAN_FRACTION,
             lesion_fraction: float = DEFAULT_LESION_FRACTION,
             kinds: Sequence[str] | str | None = None,
             severity: float | None = None,
             pool: Sequence[str] | str | None = None,
             sample_id: str | None = None) -> SynthSample:
  """One synthetic fundus photograph, fully determined by the arguments.

  degrade / lesions: True, False or None (random, with probability
  1 - clean_fraction / lesion_fraction; explicit `kinds` imply degrade). kinds / severity / pool are passed to
  `degradations.degrade` (None: 1-3 random kinds from pool, random severities).
  """
  if size < 64:
    raise ValueError(f"size must be >= 64, got {size}")
  if not 0.0 <= clean_fraction <= 1.0:
    raise ValueError(f"clean_fraction must be in [0, 1], got {clean_fraction}")
  if not 0.0 <= lesion_fraction <= 1.0:
    raise ValueError(f"lesion_fraction must be in [0, 1], got {lesion_fraction}")
  r_anat, r_les, r_deg, r_dec = _streams(seed)
  u_clean = r_dec.random()   # always drawn, so options never shift later draws
  if degrade is None:
    want_degrade = kinds is not None or u_clean >= clean_fraction
  else:
    want_degrade = bool(degrade)
  u_les = r_dec.random()
  want_lesions = (u_les < lesion_fraction) if lesions is None else bool(lesions)
  les_pick = r_dec.random(len(LESION_KINDS))

  g = anatomy.sample_geometry(r_anat, size)
  img = _render_background(r_anat, g)
  _render_disc(r_anat, g, img)
  lesion_kinds: list[str] = []
  lesion_mask = np.zeros((size, size), bool)
  if want_lesions:
    lesion_kinds = [k for k, u in zip(LESION_KINDS, les_pick) if u < 0.5]
    if not lesion_kinds:
      lesion_kinds = [LESION_KINDS[int(np.argmin(les_pick))]]
    lesion_mask = _render_lesions(r_les, g, img, lesion_kinds)
  gt = _render_vessels(r_anat, g, img)
  # Camera sensor grain, present even in clean photographs.
  grain = r_anat.standard_normal((size, size), dtype=np.float32)
  grain *= 0.012
  img += grain[..., None]
  alpha, fov = _fov(g)
  img *= alpha[..., None]
  clean = to_uint8(img)
  gt &= fov
  lesion_mask &= fov
  # (the black surround is exactly 0: alpha is 0 wherever fov is False)

  info: dict[str, Any] = {}
  if want_degrade:
    image, mask, info = degradations.degrade(clean, fov, r_deg, kinds=kinds,
                                             severity=severity, pool=pool)
  else:
    image, mask = clean, np.zeros((size, size), np.float32)
    info = degradations.summarise(mask, fov, [], {})
  labels = {
      "id": sample_id if sample_id is not None else f"synth_{seed}",
      "seed": int(seed),
      "eye": g.eye,
      "degradations": ";".join(info["kinds"]),
      "severities": ";".join(f"{info['severities'][k]:.4f}" for k in info["kinds"]),
      "severity": info["severity"],
      "degraded_fraction": info["degraded_fraction"],
      "mean_degradation": info["mean_degradation"],
      "grade": info["grade"],
      "lesions": ";".join(lesion_kinds),
  }
  return SynthSample(image=image, vessels=gt.astype(np.uint8), degradation=mask,
                     fov_mask=fov, labels=labels, clean_image=clean,
                     lesion_mask=lesion_mask, info=info, geometry=g)
