"""Procedural anatomy of a 45-degree colour fundus photograph.

Geometry is drawn in pixel coordinates (x right, y down). For a right eye the
optic disc sits right of centre and the macula left of it; a left eye is the
mirror image. Distances scale with the FOV radius r: disc radius ~0.15 r,
disc-fovea distance ~0.75 r (about 2.5 disc diameters), main veins ~0.034 r wide.

Vessels are grown as polylines by a steered random walk:
  * four arcades per vessel type (artery, vein): supero/infero-temporal arcs
    that steer around the fovea (tangent to a circle centred on it), and
    supero/infero-nasal vessels that keep their initial heading;
  * side branches spawn at width-dependent intervals with Murray-like width
    ratios; branches on the macular side of an arcade (and theirs) converge on
    the fovea and stop at the avascular zone, other branches turn away from it;
  * widths taper along the vessel; arteries are thinner and lighter than veins.
The polylines are densified (0.8 px, 0.25 x width on wide vessels) and rendered with `_ops.splat_vessels` (exact
sub-pixel distance to each sample), so crossings and branch points have no
holes in either the image or the ground-truth mask.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

ARTERY, VEIN = 0, 1


@dataclasses.dataclass
class Geometry:
  size: int
  cx: float          # FOV centre and radius (px)
  cy: float
  r: float
  side: int          # +1 right eye (disc right of centre), -1 left eye
  disc_x: float
  disc_y: float
  disc_rx: float
  disc_ry: float
  cup_ratio: float
  fovea_x: float
  fovea_y: float

  @property
  def eye(self) -> str:
    return "right" if self.side > 0 else "left"


def sample_geometry(rng: np.random.Generator, size: int) -> Geometry:
  s = float(size)
  # Most cameras show the full circle; ~20% crop it at the top and bottom.
  if rng.random() < 0.2:
    r = s * rng.uniform(0.50, 0.56)
  else:
    r = s * rng.uniform(0.42, 0.49)
  cx = s / 2 + rng.uniform(-0.015, 0.015) * s
  cy = s / 2 + rng.uniform(-0.015, 0.015) * s
  side = 1 if rng.random() < 0.5 else -1
  # Macula-centred vs disc-centred-ish framing varies between protocols.
  shift = rng.uniform(-0.05, 0.3)
  disc_x = cx + side * (0.45 + shift) * r
  disc_y = cy + rng.uniform(-0.08, 0.06) * r
  drad = rng.uniform(0.13, 0.17) * r
  fdist = rng.uniform(2.3, 2.7) * 2 * drad
  fang = rng.uniform(-0.05, 0.2)   # fovea slightly below the disc
  fovea_x = disc_x - side * fdist * math.cos(fang)
  fovea_y = disc_y + fdist * math.sin(fang)
  return Geometry(size=size, cx=cx, cy=cy, r=r, side=side, disc_x=disc_x,
                  disc_y=disc_y, disc_rx=drad * rng.uniform(0.88, 0.97),
                  disc_ry=drad * rng.uniform(1.0, 1.08),
                  cup_ratio=rng.uniform(0.25, 0.6), fovea_x=fovea_x,
                  fovea_y=fovea_y)


def _wrap(a: float) -> float:
  return (a + math.pi) % (2 * math.pi) - math.pi


@dataclasses.dataclass
class _Branch:
  x: float
  y: float
  heading: float
  width: float
  kind: int
  level: int
  arcade: int        # 0 free; +-1 arcade around the fovea with that turn sign
  target_r: float
  sweep: float = 0.0  # arc length (px) after which an arcade goes straight
  macular: bool = False  # heads for the fovea and stops at the avascular zone


def grow_vessels(rng: np.random.Generator, g: Geometry):
  """Returns a list of polylines (xs, ys, widths, kind)."""
  r = g.r
  step = 0.02 * r
  wmin = max(0.9, 0.0035 * r)
  tort = rng.uniform(0.6, 1.4)
  lim2 = (1.03 * r) ** 2
  fx, fy = g.fovea_x, g.fovea_y
  faz = rng.uniform(0.07, 0.11) * r
  temporal = -g.side
  stack: list[_Branch] = []
  dfov = math.hypot(g.disc_x - fx, g.disc_y - fy)
  for kind, w0 in ((VEIN, 0.030 * r * rng.uniform(0.9, 1.1)),
                   (ARTERY, 0.022 * r * rng.uniform(0.9, 1.1))):
    for vert in (-1, 1):   # -1 superior (up), +1 inferior
      # Temporal arcade: leave the disc roughly vertically, tilted temporally.
      tilt = math.radians(rng.uniform(5, 35))
      h = math.atan2(vert * math.cos(tilt), temporal * math.sin(tilt))
      ox = rng.uniform(-0.3, 0.3) * g.disc_rx * (0.5 if kind == VEIN else 1)
      oy = vert * rng.uniform(0.0, 0.3) * g.disc_ry
      qx, qy = g.disc_x + ox - fx, g.disc_y + oy - fy
      sign = 1 if (-qy * math.cos(h) + qx * math.sin(h)) > 0 else -1
      stack.append(_Branch(g.disc_x + ox, g.disc_y + oy, h, w0, kind, 0, sign,
                           dfov * rng.uniform(0.62, 0.85), rng.uniform(1.1, 1.6) * r))
      # Nasal vessel: up/down and towards the nasal edge, thinner.
      tilt = math.radians(rng.uniform(20, 65))
      h = math.atan2(vert * math.cos(tilt), -temporal * math.sin(tilt))
      stack.append(_Branch(g.disc_x + ox, g.disc_y + oy, h,
                           w0 * rng.uniform(0.65, 0.8), kind, 1, 0, 0.0))
    # A small nasal-horizontal and a papillomacular vessel.
    h = math.atan2(rng.uniform(-0.3, 0.3), -temporal)
    stack.append(_Branch(g.disc_x, g.disc_y, h, w0 * rng.uniform(0.4, 0.55), kind,
                         2, 0, 0.0))
    if rng.random() < 0.8:
      h = math.atan2(rng.uniform(-0.25, 0.25), temporal)
      stack.append(_Branch(g.disc_x + temporal * 0.5 * g.disc_rx, g.disc_y, h,
                           w0 * rng.uniform(0.3, 0.4), kind, 2, 0, 0.0))

  lines = []
  max_steps = int(2.2 * r / step)
  while stack:
    b = stack.pop()
    x, y, h, w = b.x, b.y, b.heading, b.width
    h0 = h
    noise = rng.standard_normal(max_steps)
    gaps = rng.uniform(0.6, 1.5, size=64)
    sides = rng.random(64)
    angles = rng.uniform(math.radians(25), math.radians(75), size=64)
    ratios = rng.uniform(0.45, 0.8, size=64)
    gi = 0
    taper = 1.0 - rng.uniform(0.006, 0.014)
    sd = 0.05 * tort * (1.0 + 0.8 * b.level)
    # A gentle constant turn makes small vessels arc instead of running straight.
    curv = rng.normal(0.0, 0.012) * (1.0 + 0.5 * b.level)
    h_start = h
    next_branch = (0.6 if b.level == 0 else 0.2) * r * gaps[0]
    xs, ys, ws = [x], [y], [w]
    arc = 0.0
    for i in range(max_steps):
      qx, qy = x - fx, y - fy
      d = math.hypot(qx, qy) + 1e-6
      if b.arcade and arc < b.sweep:
        tx, ty = -b.arcade * qy / d, b.arcade * qx / d
        target_r = b.target_r + 0.12 * arc
        k = 1.6 * (target_r - d) / target_r
        h += 0.22 * _wrap(math.atan2(ty + k * qy / d, tx + k * qx / d) - h)
      else:
        # ...but never more than ~70 degrees in total: real vessels do not loop.
        if abs(_wrap(h0 + curv - h_start)) < 1.2:
          h0 += curv
        if b.macular:   # macular branches converge on the fovea
          h0 += 0.05 * _wrap(math.atan2(-qy, -qx) - h0)
        h += 0.06 * _wrap(h0 - h)
        if d < 2.2 * faz and not b.macular:   # turn away from the avascular zone
          h += 0.15 * _wrap(math.atan2(qy, qx) - h)
      h += sd * noise[i]
      x += step * math.cos(h)
      y += step * math.sin(h)
      arc += step
      w *= taper
      xs.append(x)
      ys.append(y)
      ws.append(w)
      if (w < wmin or d < (1.4 * faz if b.macular else faz)
          or (x - g.cx) ** 2 + (y - g.cy) ** 2 > lim2):
        break
      if arc >= next_branch and b.level < 3 and gi < 63:
        ratio = ratios[gi]
        inward = False
        if b.arcade:
          # Inward (macular) branches are thin; outward ones are big.
          inward = sides[gi] < 0.45
          turn = -b.arcade if inward else b.arcade
          if inward:
            ratio *= 0.6
        else:
          turn = 1 if sides[gi] < 0.5 else -1
        wc = w * ratio
        if wc >= wmin:
          stack.append(_Branch(x, y, h + turn * angles[gi], wc, b.kind,
                               b.level + 1, 0, 0.0, macular=inward or b.macular))
          w *= 1.0 - 0.25 * ratio ** 2
        gi += 1
        next_branch = arc + gaps[gi] * (0.12 * r + 6.0 * w)
    lines.append((np.asarray(xs, np.float32), np.asarray(ys, np.float32),
                  np.asarray(ws, np.float32), b.kind))
  return lines


def densify(lines, spacing: float = 0.8):
  """Resample every polyline: returns xs, ys, widths, kinds.

  Samples are `spacing` px apart on thin vessels and 0.25 x width on wide ones
  (the scallop of a union of discs spaced d apart is d^2 / (8 r), < 0.13 px).
  """
  out_x, out_y, out_w, out_k = [], [], [], []
  for xs, ys, ws, kind in lines:
    if xs.size < 2:
      continue
    dx, dy = np.diff(xs), np.diff(ys)
    seg = np.hypot(dx, dy)
    sp = np.clip(0.25 * ws[:-1], spacing, 2.0)
    m = np.maximum(np.ceil(seg / sp).astype(np.int64), 1)
    idx = np.repeat(np.arange(seg.size), m)
    start = np.cumsum(m) - m
    t = ((np.arange(idx.size) - start[idx]) / m[idx]).astype(np.float32)
    out_x.append(xs[idx] + t * dx[idx])
    out_y.append(ys[idx] + t * dy[idx])
    out_w.append(ws[idx] + t * (ws[idx + 1] - ws[idx]))
    out_k.append(np.full(idx.size, kind, np.int8))
  if not out_x:
    z = np.zeros(0, np.float32)
    return z, z, z, np.zeros(0, np.int8)
  return (np.concatenate(out_x), np.concatenate(out_y), np.concatenate(out_w),
          np.concatenate(out_k))
