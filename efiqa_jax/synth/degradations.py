"""Quality degradations of fundus photographs with pixel-accurate masks.

Works on synthetic and on REAL photographs of any size: all geometry is derived
from the FOV mask (centre = centre of its bounding box, radius = half its
larger extent), so a severity means the same thing at 512 px and at 3000 px.

Every kind k is applied with a severity s_k in [0, 1] (0 = no effect, 1 = the
vessels under it are essentially invisible) and a spatial profile p_k(x) in
[0, 1] (1 everywhere in the FOV for global kinds). The effect strength at a
pixel is s_k * p_k(x), and that is also the kind's mask: **the mask is the
local severity**. Several kinds combine as 1 - prod_k (1 - s_k p_k). Masks are
0 outside the FOV. What p_k is, per kind:

  blur          defocus (gaussian, sigma = 0.3 px + 0.025 r s). Global (p = 1) or, with
                probability 0.4, local: p = a soft blob (the blurred region).
  motion        linear motion blur (length 0.12 r s, random direction); global.
  illumination  uneven illumination: a smooth dark ramp across the FOV, gain
                1 - 0.9 s p, plus amplified sensor noise there; p = darkness
                profile of the ramp.
  shadow        a dark crescent from one FOV edge (eyelid/iris) or a dark
                peripheral ring (small pupil); gain 1 - 0.97 s p; p = shadow.
  overexposure  global over-exposure: gain 1 + 2.5 s, clipping and a white wash
                of weight 0.6 s; p = 1.
  glare         local bright reflex/haze veil (white, bluish or yellow) mixed
                in with weight 0.9 s p; p = the glare region.
  haze          cataract / media-opacity veil: contrast loss towards a very
                blurred, yellowish-grey copy plus mild blur, weight 0.85 s p;
                p = 0.65..1 smooth field (global with spatial variation).
  eyelash       out-of-focus eyelashes (dark or bright blurred strokes from
                the top or bottom edge); opacity 0.95 s p; p = lash opacity.
  dust          soft dark or bright spots (dust on the optics); opacity
                0.9 s p; p = spot opacity.
  noise         signal-dependent gaussian sensor noise, std ~0.2 s; p = 1.
  jpeg          JPEG compression, quality round(5 + 90 (1 - s)^2); p = 1.
                Always applied last, to the whole frame.

Pixels outside the FOV are returned unchanged, except by JPEG.
"""
from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from efiqa_jax.synth import _ops

KINDS = ("blur", "motion", "illumination", "shadow", "overexposure", "glare",
         "haze", "eyelash", "dust", "noise", "jpeg")
# The kinds that hide vessels from the label-free segmenter (efiqa_jax.vessels):
# under them it keeps <= 44 % of a real photograph's vessel map at severity
# 0.65 and <= 20 % at 0.95; the others keep more or add structures (measured on
# 18 real photographs, bench/README.md "Default teacher").
VESSEL_HIDING = ("blur", "motion", "overexposure", "glare", "haze", "noise")
# Physical order: media and optics first, then sensor, then the file format.
_ORDER = ("haze", "glare", "shadow", "illumination", "eyelash", "dust", "blur",
          "motion", "overexposure", "noise", "jpeg")
_N_KINDS_P = (0.6, 0.3, 0.1)    # probability of 1, 2, 3 kinds per image
SEVERITY_RANGE = (0.1, 1.0)     # random per-kind severity when not given
_LOWRES = 256                   # profiles are drawn at this size, then upsampled


class _Ctx:
  """FOV geometry of one photograph plus a low-resolution coordinate grid."""

  def __init__(self, fov: np.ndarray):
    self.h, self.w = fov.shape
    self.fov = fov
    ys, xs = np.nonzero(np.any(fov, axis=1))[0], np.nonzero(np.any(fov, axis=0))[0]
    self.cx = 0.5 * (xs[0] + xs[-1])
    self.cy = 0.5 * (ys[0] + ys[-1])
    self.r = 0.5 * max(xs[-1] - xs[0] + 1, ys[-1] - ys[0] + 1)
    sc = min(1.0, _LOWRES / max(self.h, self.w))
    self.lh, self.lw = max(8, int(round(self.h * sc))), max(8, int(round(self.w * sc)))
    # Low-res pixel centres expressed in full-resolution pixel coordinates.
    ly = (np.arange(self.lh, dtype=np.float32) + 0.5) * (self.h / self.lh) - 0.5
    lx = (np.arange(self.lw, dtype=np.float32) + 0.5) * (self.w / self.lw) - 0.5
    self.lx, self.ly = np.meshgrid(lx, ly)
    self.scale = self.lw / self.w       # full-res px -> low-res px

  def up(self, p_lo: np.ndarray) -> np.ndarray:
    return np.clip(_ops.resize_linear(p_lo, self.h, self.w), 0.0, 1.0)

  def rho(self):
    return np.sqrt((self.lx - self.cx) ** 2 + (self.ly - self.cy) ** 2) / self.r


def _blob(rng, ctx: _Ctx, rmin=0.25, rmax=0.6, soft=(0.15, 0.5)) -> np.ndarray:
  """A soft, irregular elliptical region inside the FOV (low-res profile)."""
  ang = rng.uniform(0, 2 * math.pi)
  dist = rng.uniform(0.0, 0.75) * ctx.r
  bx, by = ctx.cx + dist * math.cos(ang), ctx.cy + dist * math.sin(ang)
  ra, rb = rng.uniform(rmin, rmax, 2) * ctx.r
  th = rng.uniform(0, math.pi)
  dx, dy = ctx.lx - bx, ctx.ly - by
  u = (dx * math.cos(th) + dy * math.sin(th)) / ra
  v = (-dx * math.sin(th) + dy * math.cos(th)) / rb
  d = np.sqrt(u * u + v * v)
  d = d + 0.15 * _ops.smooth_noise(rng, ctx.lh, ctx.lw, 8)
  return _ops.smoothstep(1.0, 1.0 - rng.uniform(*soft), d)


def _mix(x, col, a):
  """x * (1 - a) + col * a, with in-place updates (fewer full-size temporaries)."""
  d = np.asarray(col, np.float32) - x
  d *= a[..., None]
  d += x
  return d


# Each kind: (rng, x float32 (H,W,3) in [0,1], ctx, s) -> (x, profile, extent)

def _blur(rng, x, ctx, s):
  sigma = 0.3 + 0.025 * ctx.r * s
  blurred = _ops.gaussian(_filled(x, ctx), sigma)
  if rng.random() < 0.4:
    p = ctx.up(_blob(rng, ctx))
    return x + p[..., None] * (blurred - x), p, "local"
  return blurred, None, "global"


def _filled(x, ctx):
  """x with the outside of the FOV filled by a wide blur of the FOV content, so
  plain filters do not pull the black surround into the FOV."""
  fill = _ops.masked_gaussian(x, ctx.fov, 0.05 * ctx.r)
  return np.where(ctx.fov[..., None], x, fill)


def _motion(rng, x, ctx, s):
  length = 0.12 * ctx.r * s
  th = rng.uniform(0, math.pi)
  n = int(np.clip(length / 2.0 + 2, 2, 10))
  t = np.linspace(-length / 2, length / 2, n)
  dx = np.rint(t * math.cos(th)).astype(int)
  dy = np.rint(t * math.sin(th)).astype(int)
  pad = int(max(np.abs(dx).max(), np.abs(dy).max()))
  xp = np.pad(_filled(x, ctx), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
  acc = np.zeros_like(x)
  for ox, oy in zip(dx, dy):
    acc += xp[pad + oy:pad + oy + ctx.h, pad + ox:pad + ox + ctx.w]
  acc *= 1.0 / n
  # The copies are up to length / (n - 1) px apart: close the gaps.
  return _ops.gaussian(acc, 0.4 * length / max(n - 1, 1)), None, "global"


def _illumination(rng, x, ctx, s):
  ang = rng.uniform(0, 2 * math.pi)
  proj = ((ctx.lx - ctx.cx) * math.cos(ang) + (ctx.ly - ctx.cy) * math.sin(ang)) / ctx.r
  a = rng.uniform(-0.6, 0.3)
  p = _ops.smoothstep(a, a + rng.uniform(0.5, 1.2), proj)
  p = np.clip(p + 0.15 * _ops.smooth_noise(rng, ctx.lh, ctx.lw, 5) * p, 0, 1)
  p = ctx.up(p)
  gain = 1.0 - 0.9 * s * p
  noise = rng.standard_normal((ctx.h, ctx.w), dtype=np.float32) * (0.02 * s) * p
  return x * gain[..., None] + noise[..., None], p, "local"


def _shadow(rng, x, ctx, s):
  rho = ctx.rho()
  if rng.random() < 0.35:   # dark periphery: pupil too small for the flash
    r0 = rng.uniform(0.55, 0.85)
    soft = rng.uniform(0.05, 0.15)
    p = _ops.smoothstep(r0 - soft, r0 + soft, rho + 0.05 * _ops.smooth_noise(
        rng, ctx.lh, ctx.lw, 6))
  else:                     # crescent from one side of the FOV
    ang = rng.uniform(0, 2 * math.pi)
    r2 = rng.uniform(0.8, 2.0) * ctx.r
    depth = rng.uniform(0.2, 0.8) * ctx.r
    c2x = ctx.cx + (ctx.r + r2 - depth) * math.cos(ang)
    c2y = ctx.cy + (ctx.r + r2 - depth) * math.sin(ang)
    d = (np.sqrt((ctx.lx - c2x) ** 2 + (ctx.ly - c2y) ** 2) - r2) / ctx.r
    soft = rng.uniform(0.03, 0.12)
    p = _ops.smoothstep(soft, -soft, d + 0.04 * _ops.smooth_noise(rng, ctx.lh, ctx.lw, 6))
  p = ctx.up(p)
  return x * (1.0 - 0.97 * s * p)[..., None], p, "local"


def _overexposure(rng, x, ctx, s):
  y = np.clip(x * (1.0 + 2.5 * s) + 0.1 * s, 0.0, 1.0)
  a = 0.6 * s
  return y * (1 - a) + a * np.array([1.0, 0.97, 0.9], np.float32), None, "global"


def _glare(rng, x, ctx, s):
  if rng.random() < 0.6:   # peripheral reflex arc
    p = _blob(rng, ctx, 0.2, 0.5, (0.5, 0.95))
    ang = rng.uniform(0, 2 * math.pi)
    rim = _ops.smoothstep(0.4, 1.0, ((ctx.lx - ctx.cx) * math.cos(ang) +
                                     (ctx.ly - ctx.cy) * math.sin(ang)) / ctx.r)
    p = np.maximum(p * 0.6, rim * rng.uniform(0.6, 1.0))
  else:
    p = _blob(rng, ctx, 0.15, 0.45, (0.5, 0.95))   # glare has no sharp edge
  p = ctx.up(p)
  col = [(1.0, 0.97, 0.92), (0.85, 0.92, 1.0), (1.0, 0.85, 0.5)][rng.integers(3)]
  return _mix(x, col, 0.9 * s * p), p, "local"


def _haze(rng, x, ctx, s):
  p = np.clip(0.82 + 0.18 * _ops.smooth_noise(rng, ctx.lh, ctx.lw, 4), 0.65, 1.0)
  p = ctx.up(p)
  wide = _ops.masked_gaussian(x, ctx.fov, 0.12 * ctx.r)
  col = np.array([0.78, 0.68, 0.52], np.float32) * rng.uniform(0.7, 1.1)
  veil = 0.4 * wide + 0.6 * col
  # Mild blur too; the wide blur fills the surround so the rim stays bright.
  y = _ops.gaussian(np.where(ctx.fov[..., None], x, wide), 0.3 + 0.012 * ctx.r * s)
  return y + (veil - y) * (0.85 * s * p)[..., None], p, "global"


def _strokes_lowres(rng, ctx, n):
  """Curved strokes (eyelashes) as a low-res opacity map in [0, 1]."""
  xs, ys, rs = [], [], []
  sc = ctx.scale
  top = rng.random() < 0.5
  for _ in range(n):
    a0 = (-math.pi / 2 if top else math.pi / 2) + rng.uniform(-0.9, 0.9)
    sx = ctx.cx + ctx.r * 1.05 * math.cos(a0)
    sy = ctx.cy + ctx.r * 1.05 * math.sin(a0)
    inward = math.atan2(ctx.cy - sy, ctx.cx - sx) + rng.uniform(-0.5, 0.5)
    length = rng.uniform(0.2, 0.55) * ctx.r
    bend = rng.uniform(-0.6, 0.6)
    t = np.linspace(0, 1, 40)
    hh = inward + bend * t
    xs.append(sx + np.cumsum(np.cos(hh)) * length / 40)
    ys.append(sy + np.cumsum(np.sin(hh)) * length / 40)
    rs.append(np.full(40, rng.uniform(0.008, 0.02) * ctx.r) * (1.2 - 0.7 * t))
  xs, ys, rs = map(np.concatenate, (xs, ys, rs))
  a = _ops.splat((ctx.lh, ctx.lw), (xs + 0.5) * sc - 0.5, (ys + 0.5) * sc - 0.5,
                 np.maximum(rs * sc, 0.6), "disc")
  a = ndi.gaussian_filter(a, rng.uniform(0.01, 0.04) * ctx.r * sc)
  return np.clip(a / max(a.max(), 1e-6) * 1.3, 0, 1)


def _eyelash(rng, x, ctx, s):
  p = ctx.up(_strokes_lowres(rng, ctx, int(rng.integers(3, 10))))
  col = (0.02, 0.02, 0.02) if rng.random() < 0.6 else (0.85, 0.8, 0.75)
  return _mix(x, col, 0.95 * s * p), p, "local"


def _dust(rng, x, ctx, s):
  n = int(rng.integers(3, 16))
  ang = rng.uniform(0, 2 * math.pi, n)
  dist = np.sqrt(rng.uniform(0, 0.85, n)) * ctx.r
  sc = ctx.scale
  xs = (ctx.cx + dist * np.cos(ang) + 0.5) * sc - 0.5
  ys = (ctx.cy + dist * np.sin(ang) + 0.5) * sc - 0.5
  rs = rng.uniform(0.015, 0.06, n) * ctx.r * sc
  p = _ops.splat((ctx.lh, ctx.lw), xs, ys, np.maximum(rs, 0.7), "gauss",
                 rng.uniform(0.6, 1.0, n))
  p = ctx.up(p)
  col = (0.05, 0.04, 0.03) if rng.random() < 0.6 else (0.9, 0.88, 0.85)
  return _mix(x, col, 0.9 * s * p), p, "local"


def _noise(rng, x, ctx, s):
  # std = 0.2 s (0.5 + 0.5 sqrt(x / 0.4)): shot noise grows with the signal.
  std = np.maximum(x, 0.0)
  std *= 1.0 / 0.4
  np.sqrt(std, out=std)
  std *= 0.1 * s
  std += 0.1 * s
  std *= rng.standard_normal(x.shape, dtype=np.float32)
  std += x
  return std, None, "global"


_FUNCS = {"blur": _blur, "motion": _motion, "illumination": _illumination,
          "shadow": _shadow, "overexposure": _overexposure, "glare": _glare,
          "haze": _haze, "eyelash": _eyelash, "dust": _dust, "noise": _noise}


def _to_uint8(x: np.ndarray) -> np.ndarray:
  """Round float [0, 1] to uint8, in place on x (saves full-size temporaries)."""
  np.clip(x, 0.0, 1.0, out=x)
  x *= 255.0
  x += 0.5
  return x.astype(np.uint8)


def jpeg_quality(s: float) -> int:
  return int(np.clip(round(5 + 90 * (1.0 - s) ** 2), 3, 95))


def grade(degraded_fraction: float, mean_degradation: float) -> str:
  """good / usable / reject from the mask (documented rule).

  reject:  >= 25% of the FOV has mask > 0.5 (vessels hard to see there);
  usable:  >= 5% of the FOV has mask > 0.5, or the mean mask over the FOV
           (severity integrated over area) is >= 0.15;
  good:    otherwise (clean, or mild and/or small degradations).
  """
  if degraded_fraction >= 0.25:
    return "reject"
  if degraded_fraction >= 0.05 or mean_degradation >= 0.15:
    return "usable"
  return "good"


def summarise(mask: np.ndarray, fov: np.ndarray, kinds: Sequence[str],
              severities: Mapping[str, float], **extra) -> dict[str, Any]:
  inside = mask[fov]
  frac = float(np.mean(inside > 0.5)) if inside.size else 0.0
  mean = float(np.mean(inside)) if inside.size else 0.0
  frac, mean = round(frac, 4), round(mean, 4)
  info = {"kinds": list(kinds), "severities": dict(severities),
          "severity": round(max(severities.values(), default=0.0), 4),
          "degraded_fraction": frac, "mean_degradation": mean,
          "grade": grade(frac, mean), "extent": {}, "jpeg_quality": None,
          "jpeg_bytes": None}
  info.update(extra)
  return info


def parse_kinds(kinds) -> list[str]:
  if isinstance(kinds, str):
    kinds = [k.strip() for k in kinds.split(",") if k.strip()]
  kinds = list(kinds)
  bad = [k for k in kinds if k not in KINDS]
  if bad:
    raise ValueError(f"unknown degradation kind(s) {bad}; valid: {', '.join(KINDS)}")
  if len(set(kinds)) != len(kinds):
    raise ValueError(f"duplicate degradation kinds in {kinds}")
  return kinds


def degrade(image: np.ndarray, fov_mask: np.ndarray, seed_or_rng, *,
            kinds: Sequence[str] | str | None = None,
            severity: float | Mapping[str, float] | None = None,
            pool: Sequence[str] | str | None = None):
  """Degrades a fundus photograph; returns (image uint8, mask float32, info).

  image: (H, W, 3) uint8 RGB, any size; fov_mask: (H, W) bool.
  kinds: exactly these kinds (names in KINDS, list or comma string); None draws
    1-3 kinds (p = 0.6/0.3/0.1) from `pool` (default: all kinds).
  severity: one float for all kinds, a {kind: float} dict, or None (uniform in
    SEVERITY_RANGE per kind).
  info: kinds (in application order), severities, extent (global/local per
    kind), severity (max), degraded_fraction (share of the FOV with mask > 0.5),
    mean_degradation, grade (see `grade`), jpeg_quality and jpeg_bytes (the
    exact encoded file when JPEG was applied; decoding it gives `image`).
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
  fov = np.asarray(fov_mask)
  if fov.shape != image.shape[:2]:
    raise ValueError(f"fov_mask shape {fov.shape} != image shape {image.shape[:2]}")
  fov = fov.astype(bool)
  if fov.sum() < 64:
    raise ValueError("fov_mask is empty (fewer than 64 pixels)")
  rng = (seed_or_rng if isinstance(seed_or_rng, np.random.Generator)
         else np.random.default_rng(seed_or_rng))
  if kinds is None:
    pool_l = parse_kinds(pool) if pool is not None else list(KINDS)
    if not pool_l:
      raise ValueError("empty degradation pool")
    n = int(rng.choice(3, p=_N_KINDS_P)) + 1
    n = min(n, len(pool_l))
    kinds = [pool_l[i] for i in rng.choice(len(pool_l), size=n, replace=False)]
  else:
    kinds = parse_kinds(kinds)
  kinds = [k for k in _ORDER if k in kinds]
  sev: dict[str, float] = {}
  for k in kinds:
    if severity is None:
      v = rng.uniform(*SEVERITY_RANGE)
    elif isinstance(severity, Mapping):
      if k not in severity:
        raise ValueError(f"no severity given for kind {k!r}")
      v = severity[k]
    else:
      v = severity
    v = float(v)
    if not 0.0 <= v <= 1.0:
      raise ValueError(f"severity for {k!r} must be in [0, 1], got {v}")
    sev[k] = round(v, 4)

  ctx = _Ctx(fov)
  x = np.multiply(image, np.float32(1.0 / 255.0), dtype=np.float32)
  keep = np.ones(fov.shape, np.float32)   # prod (1 - s_k p_k)
  extent = {}
  for k in kinds:
    s = sev[k]
    if k == "jpeg":
      extent[k] = "global"
      keep *= 1.0 - s
      continue
    x, p, ext = _FUNCS[k](rng, x, ctx, s)
    extent[k] = ext
    keep *= 1.0 - s * (1.0 if p is None else p)
  mask = np.where(fov, 1.0 - keep, 0.0).astype(np.float32)
  np.clip(mask, 0.0, 1.0, out=mask)
  out = _to_uint8(x)
  np.copyto(out, image, where=~fov[..., None])   # outside the FOV: untouched
  jq, jb = None, None
  if "jpeg" in kinds:
    jq = jpeg_quality(sev["jpeg"])
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="JPEG", quality=jq)
    jb = buf.getvalue()
    out = np.asarray(Image.open(io.BytesIO(jb)).convert("RGB"))
  info = summarise(mask, fov, kinds, sev, jpeg_quality=jq, jpeg_bytes=jb)
  info["extent"] = extent
  return out, mask, info
