"""Small vectorised numpy/scipy building blocks shared by the generator and degrader.

Everything here is single-threaded numpy, vectorised: no per-pixel Python and
no full-resolution wide filters (`bench/synth.py` times it).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def resize_linear(x: np.ndarray, h: int, w: int) -> np.ndarray:
  """Bilinear resize of (h0, w0[, C]) to (h, w[, C]) with pixel-centre alignment.

  Two separable gathers + lerps: much cheaper than ndimage.zoom for the large
  upsampling factors used for smooth low-frequency fields.
  """
  x = np.asarray(x, np.float32)
  h0, w0 = x.shape[:2]
  if (h0, w0) == (h, w):
    return x.copy()
  def coords(n0, n):
    c = (np.arange(n, dtype=np.float32) + 0.5) * (n0 / n) - 0.5
    c = np.clip(c, 0, n0 - 1)
    i0 = np.floor(c).astype(np.intp)
    i1 = np.minimum(i0 + 1, n0 - 1)
    return i0, i1, (c - i0).astype(np.float32)
  # Width first (on the few input rows), then whole-row gathers for height:
  # row gathers are contiguous copies, much cheaper than column gathers. The
  # lerp is written as y0 + (y1 - y0) * a with the difference taken at the
  # input resolution, saving full-size temporaries.
  j0, j1, b = coords(w0, w)
  sh = (1, w) + (1,) * (x.ndim - 2)
  y = np.take(x, j0, axis=1)
  y += (np.take(x, j1, axis=1) - y) * b.reshape(sh)
  i0, i1, a = coords(h0, h)
  dy = np.zeros_like(y)
  dy[:-1] = y[1:] - y[:-1]
  # i1 == i0 + 1 except where clamped at the last row (there a == 0).
  out = np.take(y, i0, axis=0)
  d = np.take(dy, i0, axis=0)
  d *= a.reshape((h,) + (1,) * (x.ndim - 1))
  out += d
  return out


def block_mean(x: np.ndarray, f: int) -> np.ndarray:
  """Average f x f blocks (edge-padded to a multiple of f).

  Sums f^2 strided views: numpy reductions over interleaved axes are slow.
  """
  h, w = x.shape[:2]
  ph, pw = (-h) % f, (-w) % f
  if ph or pw:
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (x.ndim - 2)
    x = np.pad(x, pad, mode="edge")
  out = x[0::f, 0::f].astype(np.float32, copy=True)
  for i in range(f):
    for j in range(f):
      if i or j:
        out += x[i::f, j::f]
  out *= 1.0 / (f * f)
  return out


def _down_factor(sigma: float) -> int:
  return max(2, int(sigma / 2))


def _rest_sigma(sigma: float, f: int) -> float:
  # Block averaging (box of width f, variance (f^2 - 1) / 12) and bilinear
  # upsampling (tent of half-width f, variance f^2 / 6) already blur; the low-res
  # gaussian supplies the rest (in low-res pixels).
  v = sigma**2 - (f * f - 1) / 12.0 - f * f / 6.0
  return float(np.sqrt(max(v, 0.0))) / f


def _low_blur(x: np.ndarray, sigma: float):
  f = _down_factor(sigma)
  small = block_mean(x, f)
  rest = _rest_sigma(sigma, f)
  if rest > 0.05:
    small = ndi.gaussian_filter(small, (rest, rest) + (0,) * (x.ndim - 2),
                                mode="nearest", truncate=3.0)
  return small, f


def _upsample_crop(small: np.ndarray, f: int, h: int, w: int) -> np.ndarray:
  big = resize_linear(small, small.shape[0] * f, small.shape[1] * f)
  return np.ascontiguousarray(big[:h, :w])


def gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
  """Gaussian blur over the two spatial axes; wide blurs run at reduced resolution.

  For sigma > 1.5 px the image is block-averaged by f = max(2, sigma // 2),
  blurred with the remaining sigma and bilinearly upsampled: a smooth
  approximation of the full-resolution blur (what the degradations need) at a
  fraction of the cost, also on multi-megapixel photographs.
  """
  x = np.asarray(x, np.float32)
  if sigma <= 0.3:
    return x.copy()
  if sigma <= 1.5:
    spatial = (sigma, sigma) + (0,) * (x.ndim - 2)
    return ndi.gaussian_filter(x, spatial, mode="nearest", truncate=3.0)
  small, f = _low_blur(x, sigma)
  return _upsample_crop(small, f, x.shape[0], x.shape[1])


def masked_gaussian(x: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
  """Normalised convolution: blur x using only pixels where mask is set.

  Keeps the black surround of a fundus photograph from bleeding into the FOV.
  For wide blurs the normalisation happens at the reduced resolution.
  """
  x = np.asarray(x, np.float32)
  m = mask.astype(np.float32)
  mc = m[..., None] if x.ndim == 3 else m
  if sigma <= 1.5:
    num = gaussian(x * mc, sigma)
    den = gaussian(m, sigma)
    den = np.maximum(den, 1e-4)
    return num / (den[..., None] if x.ndim == 3 else den)
  num, f = _low_blur(x * mc, sigma)
  den, _ = _low_blur(m, sigma)
  den = np.maximum(den, 1e-4)
  small = num / (den[..., None] if x.ndim == 3 else den)
  return _upsample_crop(small, f, x.shape[0], x.shape[1])


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int,
                 channels: int | None = None) -> np.ndarray:
  """Zero-mean, unit-std band-limited noise: `cells` random values across the
  longer side, bilinearly upsampled (plus a light blur at low resolution)."""
  cells = max(2, int(cells))
  ch = max(2, int(round(cells * h / max(h, w))))
  cw = max(2, int(round(cells * w / max(h, w))))
  shape = (ch + 2, cw + 2) + ((channels,) if channels else ())
  lo = rng.standard_normal(shape, dtype=np.float32)
  lo = ndi.gaussian_filter(lo, (0.7, 0.7) + ((0,) if channels else ()), mode="wrap")
  lo = lo[1:-1, 1:-1]
  lo = (lo - lo.mean()) / (lo.std() + 1e-6)
  return resize_linear(lo, h, w)


def smoothstep(e0, e1, x):
  t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
  return t * t * (3.0 - 2.0 * t)


def splat(shape: tuple[int, int], xs: np.ndarray, ys: np.ndarray,
          radii: np.ndarray, profile: str = "disc", values: np.ndarray | None = None,
          out: np.ndarray | None = None) -> np.ndarray:
  """Max-composite many soft round stamps into an (H, W) float32 image.

  profile "disc": coverage value * sqrt(1 - (d / (r + 0.5))^2) (a cylinder seen
  from above, anti-aliased half a pixel); "gauss": value * exp(-(d / r)^2) with
  a 2.5 r window. Points are grouped by window size and written with
  np.maximum.at, so overlapping stamps take the max (no double counting).
  """
  h, w = shape
  if out is None:
    out = np.zeros((h, w), np.float32)
  xs = np.asarray(xs, np.float32)
  ys = np.asarray(ys, np.float32)
  radii = np.asarray(radii, np.float32)
  if values is None:
    values = np.ones_like(xs)
  values = np.asarray(values, np.float32)
  if xs.size == 0:
    return out
  reach = radii + 0.5 if profile == "disc" else 2.5 * radii
  ks = np.ceil(reach).astype(np.int32)
  flat = out.reshape(-1)
  for k in np.unique(ks):
    sel = ks == k
    x, y, r, v = xs[sel], ys[sel], radii[sel], values[sel]
    off = np.arange(-k, k + 1, dtype=np.int32)
    ox, oy = np.meshgrid(off, off)
    ox, oy = ox.reshape(-1), oy.reshape(-1)
    cx = np.rint(x).astype(np.int32)
    cy = np.rint(y).astype(np.int32)
    px = cx[:, None] + ox[None, :]
    py = cy[:, None] + oy[None, :]
    d2 = (px.astype(np.float32) - x[:, None]) ** 2 + (py.astype(np.float32) - y[:, None]) ** 2
    if profile == "disc":
      rr = (r + 0.5)[:, None] ** 2
      val = np.sqrt(np.clip(1.0 - d2 / rr, 0.0, 1.0)) * v[:, None]
    else:
      val = np.exp(-d2 / (r[:, None] ** 2)) * v[:, None]
    ok = (px >= 0) & (px < w) & (py >= 0) & (py < h) & (val > 0)
    np.maximum.at(flat, (py[ok] * w + px[ok]), val[ok].astype(np.float32))
  return out


def splat_vessels(shape, xs, ys, radii, values, kinds):
  """Renders vessel samples in one pass.

  Returns dens (2, H, W) float32, the max over samples of
  value * sqrt(1 - (d / (r + 0.5))^2) separately per kind (0 artery, 1 vein),
  and the ground truth (H, W) bool: d <= max(r, 0.71) for some sample (0.71 =
  half a pixel diagonal: thin vessels rasterise 8-connected, without gaps). Uses the
  exact sub-pixel distance to every sample, so branch points and crossings
  have no holes. Draws on a canvas padded by the largest stamp, so no bounds
  checks are needed per stamp pixel.
  """
  h, w = shape
  xs = np.asarray(xs, np.float32)
  ys = np.asarray(ys, np.float32)
  radii = np.asarray(radii, np.float32)
  values = np.asarray(values, np.float32)
  kinds = np.asarray(kinds, np.int64)
  ks = np.ceil(radii + 0.5).astype(np.int32)
  pad = int(ks.max()) + 1 if ks.size else 1
  hp, wp = h + 2 * pad, w + 2 * pad
  cxs = np.rint(xs).astype(np.int32)
  cys = np.rint(ys).astype(np.int32)
  keep = (cxs >= -pad + ks) & (cxs < w + pad - ks) & (cys >= -pad + ks) & (cys < h + pad - ks)
  dens = np.zeros((2, hp, wp), np.float32)
  gt = np.zeros((hp, wp), bool)
  dflat, gflat = dens.reshape(-1), gt.reshape(-1)
  for k in np.unique(ks[keep]):
    sel = keep & (ks == k)
    x, y, r = xs[sel], ys[sel], radii[sel]
    cx, cy = cxs[sel], cys[sel]
    off = np.arange(-k, k + 1, dtype=np.int32)
    ox, oy = np.meshgrid(off, off)
    ox, oy = ox.reshape(1, -1), oy.reshape(1, -1)
    # int32 - float32 would promote to float64 (a much slower maximum.at).
    fx = (cx.astype(np.float32) - x)[:, None] + ox.astype(np.float32)
    fy = (cy.astype(np.float32) - y)[:, None] + oy.astype(np.float32)
    d2 = fx * fx + fy * fy
    lin = ((cy + pad) * wp + cx + pad)[:, None] + (oy * wp + ox)
    val = np.sqrt(np.maximum(1.0 - d2 / ((r + 0.5)[:, None] ** 2), 0.0))
    val *= values[sel][:, None]
    np.maximum.at(dflat, (lin + (kinds[sel] * (hp * wp))[:, None]).reshape(-1),
                  val.reshape(-1))
    gflat[lin[d2 <= np.maximum(r, 0.71)[:, None] ** 2]] = True
  return (np.ascontiguousarray(dens[:, pad:pad + h, pad:pad + w]),
          np.ascontiguousarray(gt[pad:pad + h, pad:pad + w]))
