"""Rendering: heat-map overlays and the HTML contact sheet of `efiqa assess`."""
from __future__ import annotations

import html
import os
from typing import Sequence

import numpy as np
from PIL import Image

from efiqa_jax.kernels import png

# A perceptual ramp (black-red-yellow-white), enough for a quality heat map and
# free of a matplotlib import on the hot path.
_RAMP = np.array([[0, 0, 0], [120, 0, 40], [220, 40, 20], [255, 160, 0],
                  [255, 255, 180]], np.float32)


def colormap(x: np.ndarray) -> np.ndarray:
  """[0,1] floats -> (..., 3) uint8 colours."""
  x = np.clip(np.nan_to_num(np.asarray(x, np.float32)), 0.0, 1.0)
  pos = x * (len(_RAMP) - 1)
  i0 = np.floor(pos).astype(np.int64)
  i1 = np.minimum(i0 + 1, len(_RAMP) - 1)
  t = (pos - i0)[..., None]
  return np.round(_RAMP[i0] * (1 - t) + _RAMP[i1] * t).astype(np.uint8)


def overlay(image: np.ndarray, qmap: np.ndarray, fov_mask: np.ndarray | None,
            alpha_max: float = 0.65) -> np.ndarray:
  """Blends a degradation map over the photograph crop (both cover the crop).

  Opacity follows the map so clean regions stay readable; the FOV rim is
  drawn so that the analysed region is visible.
  """
  h, w = image.shape[:2]
  m = np.asarray(Image.fromarray(np.asarray(qmap, np.float32), mode="F").resize(
      (w, h), Image.BILINEAR))
  m = np.clip(m, 0, 1)
  col = colormap(m).astype(np.float32)
  a = (alpha_max * np.sqrt(m))[..., None]
  out = image.astype(np.float32) * (1 - a) + col * a
  if fov_mask is not None:
    fm = np.asarray(fov_mask, bool)
    edge = fm & ~_erode(fm)
    out[edge] = (80, 200, 255)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _pil_bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of Pillow's BILINEAR resize along one axis (its
  triangle filter, support scaled when downsampling, taps renormalised at
  the borders), in float64 as Pillow computes them."""
  scale = n_in / n_out
  fs = max(scale, 1.0)
  out = np.zeros((n_out, n_in), np.float64)
  for xx in range(n_out):
    center = (xx + 0.5) * scale
    lo = max(int(center - fs + 0.5), 0)
    hi = min(int(center + fs + 0.5), n_in)
    t = (np.arange(lo, hi) - center + 0.5) / fs
    k = np.clip(1.0 - np.abs(t), 0.0, None)
    out[xx, lo:hi] = k / k.sum() if k.sum() else 0.0
  return out


def _overlay_fn(alpha_max: float):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  @jax.jit
  def fn(images, qmaps, fov_masks, wy, wx):
    hp = jax.lax.Precision.HIGHEST  # float32 resampling on every backend
    # Pillow resizes horizontally, stores float32, then vertically.
    m = jnp.einsum("bhk,wk->bhw", qmaps, wx, precision=hp)
    m = jnp.einsum("hk,bkw->bhw", wy, m, precision=hp)
    m = jnp.clip(m, 0.0, 1.0)
    n = len(_RAMP)
    pos = m * (n - 1)
    i0 = jnp.floor(pos)
    i1 = jnp.minimum(i0 + 1, n - 1)
    t = pos - i0
    a = alpha_max * jnp.sqrt(m)
    img = images.astype(jnp.float32)

    def pick(i, c):  # _RAMP[i, c] by selects on scalars (no gather)
      v = jnp.full(i.shape, float(_RAMP[n - 1, c]), jnp.float32)
      for j in range(n - 2, -1, -1):
        v = jnp.where(i == j, float(_RAMP[j, c]), v)
      return v

    out = jnp.stack([
        img[..., c] * (1 - a)
        + jnp.round(pick(i0, c) * (1 - t) + pick(i1, c) * t) * a
        for c in range(3)], axis=-1)
    fm = fov_masks
    inner = fm.at[:, 1:].set(fm[:, 1:] & fm[:, :-1])
    inner = inner.at[:, :-1].set(inner[:, :-1] & fm[:, 1:])
    inner = inner.at[:, :, 1:].set(inner[:, :, 1:] & fm[:, :, :-1])
    inner = inner.at[:, :, :-1].set(inner[:, :, :-1] & fm[:, :, 1:])
    edge = (fm & ~inner)[..., None]
    out = jnp.where(edge, jnp.asarray([80.0, 200.0, 255.0]), out)
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)

  return fn


_OVERLAY_FNS: dict = {}


def overlay_batch(images: np.ndarray, qmaps: np.ndarray,
                  fov_masks: np.ndarray, alpha_max: float = 0.65):
  """`overlay` for a batch, jitted: (B, H, W, 3) uint8 crops, (B, h, w)
  maps, (B, H, W) bool masks -> (B, H, W, 3) uint8, on the device.

  The same pixels as `overlay` up to float32 rounding (a channel may differ
  by 1 where a value sits on a .5 boundary; tests/test_metrics_quality.py).
  `efiqa assess` renders each batch's overlays here, next to the maps,
  instead of ~20 ms of numpy per image on the host threads that also decode
  the photographs and encode the PNGs."""
  images = np.asarray(images)
  qmaps = np.asarray(qmaps, np.float32)
  fov_masks = np.asarray(fov_masks, bool)
  _, h, w = fov_masks.shape
  _, mh, mw = qmaps.shape
  key = (float(alpha_max), h, w, mh, mw)
  if key not in _OVERLAY_FNS:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    # The resampling weights go to the device once, not with every batch.
    _OVERLAY_FNS[key] = (
        _overlay_fn(float(alpha_max)),
        jnp.asarray(_pil_bilinear_weights(mh, h), jnp.float32),
        jnp.asarray(_pil_bilinear_weights(mw, w), jnp.float32))
  fn, wy, wx = _OVERLAY_FNS[key]
  return fn(images, qmaps, fov_masks, wy, wx)


def _erode(m: np.ndarray) -> np.ndarray:
  e = m.copy()
  e[1:] &= m[:-1]
  e[:-1] &= m[1:]
  e[:, 1:] &= m[:, :-1]
  e[:, :-1] &= m[:, 1:]
  return e


def write_png(path: str, arr: np.ndarray) -> None:
  """Writes the PNG of `arr` (`kernels.png.encode_png`) to path, atomically:
  a reader never sees a partial file."""
  tmp = path + ".tmp.png"
  with open(tmp, "wb") as f:
    f.write(png.encode_png(arr))
  os.replace(tmp, path)


GRADE_COLOURS = {"good": "#2e7d32", "usable": "#f9a825", "reject": "#c62828"}


def write_report(path: str, rows: Sequence[dict], title: str,
                 overlay_dir: str = "overlays") -> None:
  """A self-contained HTML contact sheet, best quality first, failures last."""
  ok = [r for r in rows if r.get("status") == "ok"]
  bad = [r for r in rows if r.get("status") != "ok"]
  ok.sort(key=lambda r: -float(r["quality"]))
  counts = {g: sum(1 for r in ok if r["grade"] == g)
            for g in ("good", "usable", "reject")}
  e = html.escape
  parts = [
      "<!doctype html><html><head><meta charset='utf-8'>",
      f"<title>{e(title)}</title><style>",
      "body{font-family:sans-serif;margin:1em;background:#fafafa}",
      ".grid{display:flex;flex-wrap:wrap;gap:10px}",
      ".card{background:#fff;border:1px solid #ddd;padding:6px;width:220px;"
      "font-size:12px}",
      ".card img{width:220px;height:220px;object-fit:contain;background:#000}",
      ".g{color:#fff;padding:1px 6px;border-radius:3px}",
      "table{border-collapse:collapse}td,th{border:1px solid #ccc;"
      "padding:3px 6px;font-size:12px}",
      "</style></head><body>",
      f"<h1>{e(title)}</h1>",
      f"<p>{len(rows)} images: {counts['good']} good, {counts['usable']} usable,"
      f" {counts['reject']} reject, {len(bad)} failed. Sorted by quality "
      "(1 = all expected anatomy visible). Bright overlay = regions where the "
      "expected vessels are missing.</p><div class='grid'>",
  ]
  for r in ok:
    colour = GRADE_COLOURS.get(r["grade"], "#555")
    parts.append(
        "<div class='card'>"
        f"<img loading='lazy' src='{e(overlay_dir)}/{e(r['id'])}.png' "
        f"alt='{e(r['id'])}'><br><b>{e(r['id'])}</b><br>"
        f"<span class='g' style='background:{colour}'>{e(r['grade'])}</span> "
        f"quality {float(r['quality']):.3f}, degraded "
        f"{100 * float(r['degraded_fraction']):.1f}%"
        + (f"<br><i>{e(r['message'])}</i>" if r.get("message") else "")
        + "</div>")
  parts.append("</div>")
  if bad:
    parts.append("<h2>Not assessed</h2><table><tr><th>image</th><th>status"
                 "</th><th>message</th></tr>")
    for r in bad:
      parts.append(f"<tr><td>{e(r['image'])}</td><td>{e(r['status'])}</td>"
                   f"<td>{e(r.get('message', ''))}</td></tr>")
    parts.append("</table>")
  parts.append("</body></html>")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(parts))
  os.replace(tmp, path)
