"""Rendering: heat-map overlays and the HTML contact sheet of `efiqa assess`."""
from __future__ import annotations

import html
import os
from typing import Sequence

import numpy as np
from PIL import Image

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


def _erode(m: np.ndarray) -> np.ndarray:
  e = m.copy()
  e[1:] &= m[:-1]
  e[:-1] &= m[1:]
  e[:, 1:] &= m[:, :-1]
  e[:, :-1] &= m[:, 1:]
  return e


def write_png(path: str, arr: np.ndarray) -> None:
  # zlib level 1: a 512 px overlay encodes in ~25 ms instead of ~100 ms at
  # PIL's default level 6, for a ~20 % larger file (same pixels); the
  # encoding was the largest per-image cost of `efiqa assess` after the map.
  tmp = path + ".tmp.png"
  Image.fromarray(arr).save(tmp, optimize=False, compress_level=1)
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
