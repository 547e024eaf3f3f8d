"""Field-of-view (FOV) detection: the circle of a fundus photograph.

Coarse to fine, all on the CPU in a few milliseconds:
1. a subsampled copy (long side ~320 px) of the max-channel brightness,
   thresholded between background and fundus levels (Otsu split), largest
   component, holes filled;
2. its boundary pixels that do not lie on the image border (the FOV of a 4:3
   sensor is cut at the top and bottom: those cuts are not circle) get a
   RANSAC circle, then a least-squares refit on the inliers;
3. at full resolution, radial brightness profiles across the fitted rim give
   sub-pixel rim points (outermost strong drop); a least-squares refit with
   MAD outlier rejection (camera notches, glare, dark rims) gives the circle.
The circle is accepted only if the bright region lies inside it (and
covers most of it unless the rim was seen over a wide arc), the rim points
hug it (RMS) over >= 60 degrees (or corner arcs in 3+ quadrants), and the
outside is dark; otherwise the full frame is used with `circular=False`.
When the dark surround is only a few corners a second background estimate
is tried.

Coordinates: pixel (row i, col j) has its centre at (y=i, x=j).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

OK = "ok"
FULL_FRAME = "full_frame"  # processed, but no circular FOV was found
NO_FOV = "no_fov"
TOO_SMALL = "too_small"

MIN_SIDE = 32  # smaller images carry no gradable detail
DETECT_SIDE = 320  # long side of the coarse copy
BLACK_LEVEL = 10.0  # 99th percentile brightness below this: blank image
REFINE_WINDOWS = (0.10, 0.03)  # half-widths of the radial search, x r


@dataclasses.dataclass
class FOV:
  """A fitted field of view in original pixel coordinates.

  circular: a circle was found and verified. False means the full frame is
    used as FOV (non-fundus photograph, fully lit rectangle, failed fit):
    downstream must not grade such images as good.
  status: ok | full_frame | no_fov | too_small.
  fundus_likeness: cheap heuristic in [0, 1] (circle fit, dark surround,
    red-dominant colour); not a classifier.
  """
  cx: float
  cy: float
  r: float
  circular: bool
  status: str
  message: str = ""
  fundus_likeness: float = 0.0
  fit_rms: float = float("nan")  # RMS radial residual of the edge inliers, px
  n_edge_points: int = 0
  coverage_deg: float = 0.0  # angular span of the rim that was seen
  region_iou: float = 0.0  # coarse bright region vs fitted disc
  inlier_frac: float = 0.0  # rim candidates on the circle / all candidates
  visible_deg: float = 0.0  # degrees of the circle inside the frame and cuts
  dark_out: float = 0.0  # (inside - outside) / inside brightness, coarse grid
  # Straight cuts of the frame inside the circle (black bands, windows):
  # (a, b, c) per cut, the FOV is where a * x + b * y <= c.
  cuts: tuple[tuple[float, float, float], ...] = ()

  @property
  def ok(self) -> bool:
    """True when there is a usable FOV (circle or full-frame fallback)."""
    return self.status in (OK, FULL_FRAME)

  def mask(self, h: int, w: int) -> np.ndarray:
    """(h, w) bool FOV mask on the original pixel grid."""
    if not self.circular:
      return np.ones((h, w), bool)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    return (((yy - self.cy) ** 2 + (xx - self.cx) ** 2 <= self.r * self.r)
            & _inside_cuts(xx, yy, self.cuts))


def _full_frame(h: int, w: int, message: str, **kw) -> FOV:
  return FOV((w - 1) / 2.0, (h - 1) / 2.0, max(h, w) / 2.0, False,
             FULL_FRAME, message, **kw)


def _fail(status: str, message: str) -> FOV:
  return FOV(float("nan"), float("nan"), float("nan"), False, status, message)


# -- circle fitting ----------------------------------------------------------


def fit_circle(x: np.ndarray, y: np.ndarray,
               w: np.ndarray | None = None) -> tuple[float, float, float]:
  """Algebraic (Kasa) least-squares circle through points, optional weights."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  mx, my = x.mean(), y.mean()  # centring keeps the system well conditioned
  u, v = x - mx, y - my
  a = np.stack([u, v, np.ones_like(u)], axis=1)
  b = u * u + v * v
  if w is not None:
    sw = np.sqrt(w)
    a, b = a * sw[:, None], b * sw
  sol, *_ = np.linalg.lstsq(a, b, rcond=None)
  cu, cv = sol[0] / 2, sol[1] / 2
  r = np.sqrt(max(sol[2] + cu * cu + cv * cv, 0.0))
  return float(cu + mx), float(cv + my), float(r)


def robust_fit_circle(x, y, *, iters: int = 6, k: float = 3.0,
                      min_tol: float = 0.5, max_tol: float = np.inf):
  """Iterative least squares with MAD outlier rejection.

  Points farther than clip(k * MAD, min_tol, max_tol) from the circle are
  dropped and the circle refitted. Returns (cx, cy, r, inlier mask).
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  keep = np.ones(x.shape, bool)
  cx, cy, r = fit_circle(x, y)
  for _ in range(iters):
    res = np.hypot(x - cx, y - cy) - r
    mad = 1.4826 * np.median(np.abs(res[keep] - np.median(res[keep])))
    new = np.abs(res) <= min(max(k * mad, min_tol), max_tol)
    if new.sum() < 5:
      break
    if np.array_equal(new, keep):
      break
    keep = new
    cx, cy, r = fit_circle(x[keep], y[keep])
  res = np.hypot(x - cx, y - cy) - r
  keep = np.abs(res) <= min(
      max(k * 1.4826 * np.median(np.abs(res[keep])), min_tol), max_tol)
  return cx, cy, r, keep


def ransac_circle(x, y, *, tol: float, n_trials: int = 256, seed: int = 0,
                  r_range: tuple[float, float] = (0.0, np.inf),
                  centre_box: tuple[float, float, float, float] | None = None,
                  contain: tuple[np.ndarray, np.ndarray] | None = None,
                  max_outside: float = 0.05):
  """Best circle through random point triples (most inliers within tol).

  Optional constraints make it a fit of the FOV rim when straight frame cuts
  share the boundary: r within r_range, centre within centre_box (x0, y0,
  x1, y1), and at most max_outside of the `contain` points (the whole
  boundary of the bright region) farther than tol outside the circle. A
  straight cut fits only a huge circle or one the region spills out of.
  """
  n = x.shape[0]
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, n, size=(n_trials, 3))
  p = np.stack([x[idx], y[idx]], axis=-1)  # (T, 3, 2)
  # Circumcentre of each triple.
  ax, ay = p[:, 0, 0], p[:, 0, 1]
  bx, by = p[:, 1, 0], p[:, 1, 1]
  cx_, cy_ = p[:, 2, 0], p[:, 2, 1]
  d = 2 * (ax * (by - cy_) + bx * (cy_ - ay) + cx_ * (ay - by))
  good = np.abs(d) > 1e-6
  d = np.where(good, d, 1.0)
  a2, b2, c2 = ax * ax + ay * ay, bx * bx + by * by, cx_ * cx_ + cy_ * cy_
  ux = (a2 * (by - cy_) + b2 * (cy_ - ay) + c2 * (ay - by)) / d
  uy = (a2 * (cx_ - bx) + b2 * (ax - cx_) + c2 * (bx - ax)) / d
  r = np.hypot(ax - ux, ay - uy)
  good &= (r >= r_range[0]) & (r <= r_range[1])
  if centre_box is not None:
    x0, y0, x1, y1 = centre_box
    good &= (ux >= x0) & (ux <= x1) & (uy >= y0) & (uy <= y1)
  dist = np.abs(np.hypot(x[None, :] - ux[:, None], y[None, :] - uy[:, None])
                - r[:, None])
  score = np.where(good, (dist <= tol).sum(axis=1), -1)
  if contain is not None and contain[0].size:
    out = (np.hypot(contain[0][None, :] - ux[:, None],
                    contain[1][None, :] - uy[:, None]) - r[:, None] > tol)
    score = np.where(out.mean(axis=1) <= max_outside, score, -1)
  best = int(np.argmax(score))
  if score[best] < 0:
    return float("nan"), float("nan"), float("nan"), np.zeros(n, bool)
  return float(ux[best]), float(uy[best]), float(r[best]), dist[best] <= tol


# -- detection ----------------------------------------------------------------


def _otsu(v: np.ndarray) -> float:
  hist = np.bincount(np.clip(v, 0, 255).astype(np.uint8).ravel(),
                     minlength=256).astype(np.float64)
  p = hist / hist.sum()
  omega = np.cumsum(p)
  mu = np.cumsum(p * np.arange(256))
  mu_t = mu[-1]
  with np.errstate(divide="ignore", invalid="ignore"):
    sigma_b = (mu_t * omega - mu) ** 2 / (omega * (1 - omega))
  sigma_b = np.nan_to_num(sigma_b, nan=-1.0, posinf=-1.0)
  return float(np.argmax(sigma_b)) + 0.5


def _brightness_small(image: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, int]:
  """Subsampled RGB copy, its smoothed max-channel brightness, the factor.

  Plain strided subsampling (pixel i of the copy is original pixel
  i * k + k // 2) is the cheapest; the 3x3 smoothing stands in for the
  missing anti-aliasing, and the rim is refined at full resolution anyway.
  """
  h, w = image.shape[:2]
  k = max(1, int(np.ceil(max(h, w) / DETECT_SIDE)))
  small = image[k // 2::k, k // 2::k]
  v = np.maximum(np.maximum(small[..., 0], small[..., 1]), small[..., 2])
  return small, ndimage.uniform_filter(v.astype(np.float32), 3,
                                       mode="nearest"), k


def _fill_holes(m: np.ndarray) -> np.ndarray:
  """Fills background pockets not connected to the border (fast)."""
  lab, n = ndimage.label(~m)
  if n == 0:
    return m
  border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
  hole = np.ones(n + 1, bool)
  hole[border] = False
  hole[0] = False
  return m | hole[lab]


def _sample_bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray
                     ) -> np.ndarray:
  """Bilinear samples of (H, W) or (H, W, C) at in-bounds points."""
  h, w = img.shape[:2]
  x0 = np.clip(np.floor(x).astype(np.int64), 0, w - 2)
  y0 = np.clip(np.floor(y).astype(np.int64), 0, h - 2)
  fx, fy = x - x0, y - y0
  if img.ndim == 3:
    fx, fy = fx[..., None], fy[..., None]
  a = img[y0, x0].astype(np.float32)
  b = img[y0, x0 + 1].astype(np.float32)
  c = img[y0 + 1, x0].astype(np.float32)
  d = img[y0 + 1, x0 + 1].astype(np.float32)
  return (a * (1 - fx) * (1 - fy) + b * fx * (1 - fy) + c * (1 - fx) * fy
          + d * fx * fy)


def _radial_edges(image: np.ndarray, cx: float, cy: float, r: float,
                  half_window: float, min_contrast: float,
                  n_rays: int = 180, n_samples: int = 96, cuts=()):
  """Rim points along rays across the current circle, at full resolution.

  A rim candidate on a ray is a strong brightness drop (a local minimum of
  the derivative reaching 35% of the ray's steepest) of at least
  min_contrast, after which the profile never climbs back above the
  half-way level: vessels and lesions inside the FOV are followed by bright
  fundus again, the true rim only by dark surround (or smooth glow around
  handheld FOVs). The outermost candidate wins, refined to sub-pixel by a
  parabola. A ray that leaves the image is padded with its last sample, so
  a FOV cut by the frame (still bright at the border) yields no candidate.
  Returns edge x, y and ray angle arrays.
  """
  h, w = image.shape[:2]
  # Sub-pixel steps for the narrow pass; a wide search window is sampled
  # more coarsely so its cost stays bounded (n_samples per ray).
  step = max(0.5, 2.0 * half_window / n_samples)
  s = np.arange(-half_window, half_window + step / 2, step)
  if s.size < 16:
    return np.zeros(0), np.zeros(0), np.zeros(0)
  theta = _visible_angles(cx, cy, r, h, w, n_rays, cuts, half_window)
  if theta.size == 0:
    return np.zeros(0), np.zeros(0), np.zeros(0)
  rad = np.broadcast_to(r + s[None, :], (theta.size, s.size))
  xs = cx + np.cos(theta)[:, None] * rad
  ys = cy + np.sin(theta)[:, None] * rad
  lead = np.cumprod((xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1),
                    axis=1).astype(bool)  # the leading in-image samples
  use = lead[:, 0]
  if not use.any():
    return np.zeros(0), np.zeros(0), np.zeros(0)
  xs, ys, rad, theta, lead = xs[use], ys[use], rad[use], theta[use], lead[use]
  prof = _sample_bilinear(image, np.clip(xs, 0, w - 1),
                          np.clip(ys, 0, h - 1)).max(axis=-1)  # (R, S)
  rr = np.arange(prof.shape[0])
  n_valid = lead.sum(axis=1)
  prof = np.where(lead, prof, prof[rr, n_valid - 1][:, None])
  prof = ndimage.uniform_filter1d(prof, 5, axis=1, mode="nearest")
  n_s = prof.shape[1]
  g = np.gradient(prof, axis=1)
  idx = np.arange(n_s)
  before = prof[:, np.maximum(idx - 6, 0)]
  after = prof[:, np.minimum(idx + 6, n_s - 1)]
  drop = before - after
  # Highest value from 2 px past each sample to the end of the ray.
  sufmax = np.maximum.accumulate(prof[:, ::-1], axis=1)[:, ::-1]
  later = sufmax[:, np.minimum(idx + 4, n_s - 1)]
  gmin = g.min(axis=1, keepdims=True)
  cand = np.zeros_like(prof, dtype=bool)
  gc = g[:, 2:-2]
  cand[:, 2:-2] = (gc < g[:, 1:-3]) & (gc <= g[:, 3:-1]) & (gc <= 0.35 * gmin)
  cand &= (drop >= min_contrast) & (later <= after + 0.5 * drop)
  found = cand.any(axis=1)
  i = np.clip(n_s - 1 - np.argmax(cand[:, ::-1], axis=1), 2, n_s - 3)
  gm, g0, gp = g[rr, i - 1], g[rr, i], g[rr, i + 1]
  den = gm - 2 * g0 + gp
  safe = np.abs(den) > 1e-9
  off = np.clip(np.where(safe, 0.5 * (gm - gp) / np.where(safe, den, 1.0),
                         0.0), -1.0, 1.0)
  rows = np.nonzero(found)[0]
  re = rad[rows, i[rows]] + off[rows] * step
  th = theta[rows]
  return cx + np.cos(th) * re, cy + np.sin(th) * re, th


def _straight_cuts(x: np.ndarray, y: np.ndarray, min_span: float, *,
                   tol: float = 0.75, max_lines: int = 4, seed: int = 0):
  """Long straight runs among boundary points (coarse grid): frame cuts.

  A circle stays within tol of a straight line over only ~3.5 sqrt(r)
  pixels, so a run spanning min_span (a third of the short side) densely
  is a straight edge: a black band or window cut inside the frame. Returns
  [(a, b, c, point indices)] with (a, b) a unit normal, a x + b y = c.
  """
  rng = np.random.default_rng(seed)
  left = np.ones(x.size, bool)
  lines = []
  for _ in range(max_lines):
    idx = np.flatnonzero(left)
    if idx.size < min_span:
      break
    px, py = x[idx].astype(np.float64), y[idx].astype(np.float64)
    pr = rng.integers(0, idx.size, size=(200, 2))
    dx, dy = px[pr[:, 1]] - px[pr[:, 0]], py[pr[:, 1]] - py[pr[:, 0]]
    length = np.hypot(dx, dy)
    ok = length >= min_span / 4
    length = np.where(ok, length, 1.0)
    a, b = -dy / length, dx / length
    c = a * px[pr[:, 0]] + b * py[pr[:, 0]]
    score = np.abs(a[:, None] * px[None] + b[:, None] * py[None]
                   - c[:, None]) <= tol
    score = np.where(ok, score.sum(axis=1), -1)
    best = int(np.argmax(score))
    if score[best] < 0.7 * min_span:
      break
    sel = np.abs(a[best] * px + b[best] * py - c[best]) <= tol
    # Total least squares on the run, then its inliers again.
    mx, my = px[sel].mean(), py[sel].mean()
    cov = np.cov(np.stack([px[sel] - mx, py[sel] - my]))
    _, vec = np.linalg.eigh(cov)
    na, nb = vec[0, 0], vec[1, 0]  # smallest eigenvalue: the normal
    nc = na * mx + nb * my
    sel = np.abs(na * px + nb * py - nc) <= tol
    t = -nb * px[sel] + na * py[sel]
    span = float(t.max() - t.min()) if sel.any() else 0.0
    if span < min_span or sel.sum() < 0.7 * span:
      break
    lines.append((float(na), float(nb), float(nc), idx[sel]))
    left[idx[sel]] = False
  return lines


def _inside_cuts(x, y, cuts, margin: float = 0.0):
  """Points on the inner side of every cut (a x + b y <= c - margin)."""
  ok = np.ones(np.broadcast(x, y).shape, bool)
  for a, b, c in cuts:
    ok &= a * x + b * y <= c - margin
  return ok


def _visible_angles(cx: float, cy: float, r: float, h: int, w: int,
                    n: int, cuts=(), margin: float = 0.0) -> np.ndarray:
  """n ray angles spread evenly over the arc of the circle inside the frame.

  A frame cutting the circle on all four sides leaves short corner arcs:
  all rays go there (at most one per pixel of arc), none to the cuts.
  """
  th = np.linspace(0, 2 * np.pi, 1440, endpoint=False)
  x, y = cx + r * np.cos(th), cy + r * np.sin(th)
  th = th[(x >= 1) & (x <= w - 2) & (y >= 1) & (y <= h - 2)
          & _inside_cuts(x, y, cuts, margin)]
  n = min(n, int(th.size / 1440 * 2 * np.pi * r))
  if n < 1:
    return th[:0]
  return th[np.linspace(0, th.size - 1, n).astype(np.int64)]


def _visible_deg(cx: float, cy: float, r: float, h: int, w: int,
                 cuts=()) -> float:
  """Degrees of the circle that lie inside the frame and its cuts."""
  th = np.linspace(0, 2 * np.pi, 720, endpoint=False)
  x, y = cx + r * np.cos(th), cy + r * np.sin(th)
  return float(((x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
                & _inside_cuts(x, y, cuts)).sum() / 2.0)


def _coverage_deg(theta: np.ndarray, bins: int = 72) -> float:
  if theta.size == 0:
    return 0.0
  b = np.unique((np.mod(theta, 2 * np.pi) / (2 * np.pi) * bins).astype(int))
  return float(b.size * 360.0 / bins)


def _disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
  yy = (np.arange(h, dtype=np.float32) - cy)[:, None]
  xx = (np.arange(w, dtype=np.float32) - cx)[None, :]
  return yy * yy + xx * xx <= r * r


def detect_fov(image: np.ndarray) -> FOV:
  """Finds the circular field of view of an (H, W, 3) uint8 photograph.

  Never raises. status "ok" with circular=True when a circle was found and
  verified; "full_frame" (circular=False) when the image has no circular FOV
  and the whole frame stands in; "no_fov" for blank images; "too_small".
  """
  try:
    return _detect_fov(image)
  except Exception as e:  # pylint: disable=broad-except
    return _fail(NO_FOV, f"FOV detection failed: {type(e).__name__}: {e}")


def _detect_fov(image: np.ndarray) -> FOV:
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    return _fail(NO_FOV, f"expected (H, W, 3) uint8, got {image.shape} "
                 f"{image.dtype}")
  h, w = image.shape[:2]
  if min(h, w) < MIN_SIDE:
    return _fail(TOO_SMALL, f"image is {w}x{h}, below {MIN_SIDE} px per side")

  small, v, k = _brightness_small(image)
  hi = float(np.percentile(v, 99))
  if hi < BLACK_LEVEL:
    return _fail(NO_FOV, f"image is blank (99th percentile brightness "
                 f"{hi:.1f} < {BLACK_LEVEL})")
  t_otsu = _otsu(v)
  lo_vals, hi_vals = v[v < t_otsu], v[v >= t_otsu]
  fg = float(np.median(hi_vals)) if hi_vals.size else hi
  bg_otsu = float(np.median(lo_vals)) if lo_vals.size else 0.0
  # When the dark surround is only a few corners, Otsu splits the fundus
  # itself (bright vs dim half): then the darkest percentile is the
  # background. Tried second, as it lets glow around handheld FOVs in.
  bgs = [bg_otsu]
  # A frame cutting the circle on all four sides leaves only its corners
  # dark, too few pixels for any percentile: the darkest corner patch.
  q = max(2, min(v.shape) // 40)
  bg_corner = min(float(np.median(c)) for c in (
      v[:q, :q], v[:q, -q:], v[-q:, :q], v[-q:, -q:]))
  bg_dark = float(np.percentile(v, 1))
  for b in sorted((bg_corner, bg_dark)):
    if b < bg_otsu - 3.0 and all(abs(b - o) > 3.0 for o in bgs):
      bgs.append(b)
  results = []
  for bg in bgs:
    results.append(_attempt(image, small, v, k, bg, fg))
    if results[-1].circular:
      return results[-1]
  # No circle: a full-frame fallback beats no_fov (the image has content).
  return next((f for f in results if f.status == FULL_FRAME), results[0])


def _attempt(image: np.ndarray, small: np.ndarray, v: np.ndarray, k: int,
             bg: float, fg: float) -> FOV:
  """Region, coarse circle, refinement and verification for one threshold."""
  h, w = image.shape[:2]
  sh, sw = v.shape
  # A low threshold keeps dim (vignetted, handheld) rims inside the region.
  thr = max(bg + 0.25 * (fg - bg), bg + 3.0)
  mask = v > thr
  lab, n = ndimage.label(mask)
  if n == 0:
    return _fail(NO_FOV, "no bright region found")
  sizes = np.bincount(lab.ravel())
  sizes[0] = 0
  comp = lab == int(np.argmax(sizes))
  comp = _fill_holes(comp)
  area_frac = comp.mean()
  if area_frac < 0.01:
    return _fail(NO_FOV, f"largest bright region covers only "
                 f"{100 * area_frac:.2f}% of the image")

  # Boundary pixels off the image border: the rim, and straight cuts.
  interior = np.ones_like(comp)
  interior[1:-1, 1:-1] = (comp[:-2, 1:-1] & comp[2:, 1:-1] & comp[1:-1, :-2]
                          & comp[1:-1, 2:])
  edge = comp & ~interior
  edge[:2, :] = edge[-2:, :] = False
  edge[:, :2] = edge[:, -2:] = False
  ey, ex = np.nonzero(edge)
  if ex.size < 20:
    return _full_frame(h, w, "no circular FOV: the bright region fills the "
                       "frame, no rim visible; using the full frame",
                       region_iou=0.0)
  lines = _straight_cuts(ex, ey, 0.3 * min(sh, sw))
  on_line = np.zeros(ex.size, bool)
  for *_, idx in lines:
    on_line[idx] = True
  if (~on_line).sum() < 20:
    return _full_frame(h, w, "no circular FOV: the bright region has straight "
                       "edges only; using the full frame",
                       region_iou=0.0)
  # Small-pixel centre -> original coordinates.
  ox, oy = ex[~on_line] * k + k // 2, ey[~on_line] * k + k // 2
  if ox.size > 400:  # plenty for RANSAC, and its time bounded
    sel = np.linspace(0, ox.size - 1, 400).astype(np.int64)
    ox, oy = ox[sel], oy[sel]
  # The whole outline of the region, frame edges included: the circle must
  # hold it (a circle through a straight cut would leave it spilling out).
  ring = np.zeros_like(comp)
  ring[[0, -1], :] = ring[:, [0, -1]] = True
  by, bx = np.nonzero((comp & ~interior) | (comp & ring))
  if bx.size > 400:
    sel = np.linspace(0, bx.size - 1, 400).astype(np.int64)
    by, bx = by[sel], bx[sel]
  cx, cy, r, inl = ransac_circle(
      ox, oy, tol=1.5 * k, n_trials=256,
      r_range=(0.1 * min(h, w), 0.75 * np.hypot(h, w)),
      centre_box=(-0.25 * w, -0.25 * h, 1.25 * w, 1.25 * h),
      contain=(bx * k + k // 2, by * k + k // 2))
  if inl.sum() >= 5:
    cx, cy, r, _ = robust_fit_circle(ox[inl], oy[inl], min_tol=k,
                                     max_tol=1.5 * k)

  if not np.isfinite(r):
    return _full_frame(h, w, "no circular FOV: no circle holds the bright "
                       "region; using the full frame")
  if not (r > 0.1 * min(h, w) and r < 2.0 * max(h, w)):
    return _full_frame(h, w, f"no circular FOV: coarse circle fit "
                       f"implausible (r={r:.1f}); using the full frame")

  # Straight edges inside the circle with the region on one side are cuts
  # of the frame (a black band, a window): the FOV is circle and cuts.
  cuts = []
  ys_, xs_ = np.nonzero(comp)
  for la, lb, lc, idx in lines:
    if la * xs_.mean() + lb * ys_.mean() > lc:  # normal points outwards
      la, lb, lc = -la, -lb, -lc
    lc += 0.5  # pixel centres -> the edge between region and band
    px, py = ex[idx] * k + k // 2, ey[idx] * k + k // 2
    spill = np.mean(la * xs_ + lb * ys_ > lc + 1.0)
    if np.median(np.hypot(px - cx, py - cy)) < r - 1.5 * k and spill < 0.01:
      # Coarse (x_s, y_s) = ((x - k // 2) / k, ...) in original pixels.
      cuts.append((la, lb, lc * k + (la + lb) * (k // 2)))
  cuts = tuple(cuts)

  # Full-resolution refinement on radial profiles: first a wide window (the
  # coarse region misses dim, vignetted rims, so the coarse circle can be
  # off by several percent), then a narrow one around the refit.
  min_contrast = max(0.12 * (fg - bg), 3.0)
  fit_rms, n_pts, cov, quads = float("nan"), 0, 0.0, 0
  inlier_frac = 0.0
  for frac in REFINE_WINDOWS:
    xs, ys, th = _radial_edges(image, cx, cy, r, max(3.0 * k, frac * r),
                               min_contrast, n_rays=120 if frac > 0.05 else 180,
                               cuts=cuts)
    n_pts = int(xs.size)
    if xs.size < 12:
      break
    # Consensus first: scattered points on dim, noisy rims must not drag
    # a least-squares fit; then a capped MAD refit on the consensus.
    tol = max(1.5, 0.004 * r)
    _, _, _, inl = ransac_circle(xs, ys, tol=tol, n_trials=128)
    if inl.sum() < 12:
      break
    cx2, cy2, r2, _ = robust_fit_circle(xs[inl], ys[inl], min_tol=0.75,
                                        max_tol=tol)
    keep = np.abs(np.hypot(xs - cx2, ys - cy2) - r2) <= tol
    if keep.sum() < 12:
      break
    cx, cy, r = cx2, cy2, r2
    res = np.hypot(xs[keep] - cx, ys[keep] - cy) - r
    fit_rms = float(np.sqrt(np.mean(res * res)))
    n_pts = int(keep.sum())
    inlier_frac = n_pts / xs.size
    cov = _coverage_deg(th[keep])
    quads = np.unique((np.mod(th[keep], 2 * np.pi) // (np.pi / 2))).size
  visible = _visible_deg(cx, cy, r, h, w, cuts)

  # Verification on the coarse grid.
  scx, scy, sr = (cx - k // 2) / k, (cy - k // 2) / k, r / k
  gy = np.arange(sh)[:, None] * k + k // 2
  gx = np.arange(sw)[None, :] * k + k // 2
  in_cuts = _inside_cuts(gx, gy, cuts)
  disc = _disc(sh, sw, scx, scy, sr) & in_cuts
  inter = float((disc & comp).sum())
  union = float((disc | comp).sum())
  iou = inter / max(union, 1.0)
  # Dark lesions or vignetting touching the rim make the region smaller than
  # the disc (low recall is tolerated); bright region outside the circle
  # (low precision) means the circle does not explain the image.
  precision = inter / max(float(comp.sum()), 1.0)
  recall = inter / max(float(disc.sum()), 1.0)
  ring_out = ~(_disc(sh, sw, scx, scy, sr + 2.0) & _inside_cuts(
      gx, gy, cuts, -2.0 * k))
  inside_far = _disc(sh, sw, scx, scy, max(sr - 2.0, 0.0)) & _inside_cuts(
      gx, gy, cuts, 2.0 * k)
  out_level = float(np.median(v[ring_out])) if ring_out.sum() > 20 else bg
  in_level = float(np.median(v[inside_far])) if inside_far.any() else fg
  dark_out = (in_level - out_level) / max(in_level, 1.0)
  likeness = _likeness(small, disc, iou, cov, dark_out)
  extra = dict(fit_rms=fit_rms, n_edge_points=n_pts, coverage_deg=cov,
               region_iou=iou, fundus_likeness=likeness,
               inlier_frac=inlier_frac, visible_deg=visible,
               dark_out=dark_out)

  reasons = []
  # A rim seen over a wide arc vouches for the circle even when a dark
  # part of the FOV (underexposure, haemorrhage) leaves it uncovered.
  if precision < 0.95 or (recall < 0.8 and cov < 150.0):
    reasons.append(f"bright region does not match a circle (inside "
                   f"{precision:.3f}, covered {recall:.3f})")
  if np.isfinite(fit_rms) and fit_rms > max(2.0, 0.005 * r):
    reasons.append(f"rim points scatter around the circle (RMS "
                   f"{fit_rms:.1f} px)")
  # Most rim candidates off the circle: a few arcs agree by chance while the
  # rest of the rim says otherwise (dim rim under glow, non-fundus edges).
  if n_pts and (inlier_frac < 0.45 or (inlier_frac < 0.65 and cov < 150.0)):
    reasons.append(f"only {100 * inlier_frac:.0f}% of the rim points lie on "
                   "the circle")
  if dark_out < 0.6:
    reasons.append(f"outside of the circle is not dark (contrast "
                   f"{dark_out:.2f})")
  # A FOV wider than the frame shows only corner arcs: short, but in three
  # or four quadrants, tightly on one circle, hardly any dissent.
  corners = (cov >= min(20.0, 0.6 * visible) and quads >= 3
             and fit_rms <= 1.0 and inlier_frac >= 0.8)
  if cov < 60.0 and not corners:
    reasons.append(f"rim seen over only {cov:.0f} degrees")
  if not (-0.25 * w <= cx <= 1.25 * w and -0.25 * h <= cy <= 1.25 * h):
    reasons.append(f"centre ({cx:.0f}, {cy:.0f}) far outside the image")
  if reasons:
    return _full_frame(h, w, "no circular FOV: " + "; ".join(reasons) +
                       "; using the full frame", **extra)
  return FOV(cx, cy, r, True, OK, "", cuts=cuts, **extra)


def _likeness(small: np.ndarray, disc: np.ndarray, iou: float, cov: float,
              dark_out: float) -> float:
  """Cheap fundus-likeness: circle (region and rim), dark surround, red."""
  px = small[::2, ::2][disc[::2, ::2]].astype(np.int16)
  if px.shape[0] == 0:
    return 0.0
  red = float(np.mean((px[:, 0] >= px[:, 1]) & (px[:, 1] >= px[:, 2])))
  circ = float(np.clip((iou - 0.8) / 0.17, 0.0, 1.0)
               * np.clip(cov / 150.0, 0.0, 1.0))
  dark = float(np.clip(dark_out, 0.0, 1.0))
  return round((circ + dark + red) / 3.0, 4)
