"""Rendering: heat-map overlays and the HTML report of `efiqa assess`."""
from __future__ import annotations

import base64
import html
import io
import math
import os
import urllib.parse
from typing import Sequence

import numpy as np
from PIL import Image

from efiqa_jax import files as files_lib
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
  `efiqa assess` renders each batch's overlays here, next to the maps, so
  that the host threads only decode photographs and encode PNGs."""
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
  """Writes the PNG of `arr` (`kernels.png.encode_png`) to path,
  atomically: a reader never sees a partial file."""
  files_lib.atomic_write_bytes(path, png.encode_png(np.asarray(arr)))


# ------------------------------------------------------------- HTML report

GRADE_COLOURS = {"good": "#2e7d32", "usable": "#f9a825", "reject": "#c62828"}
REPORT_FILES = "report"  # DIR/report/<id>.jpg (FOV crop), <id>.png (map)
PAGE_SIZE = 500          # cards per page; more images get more pages
DEGRADED_AT = 0.5        # degraded_fraction counts map values >= this


def map_layer(qmap: np.ndarray) -> np.ndarray:
  """(h, w) map in [0, 1] -> (h, w, 4) uint8 RGBA at the map's resolution:
  the overlay's colours, transparent where the map is 0 (clean regions and
  outside the FOV), so the photograph shows through; the browser scales it
  smoothly over the photograph."""
  m = np.clip(np.nan_to_num(np.asarray(qmap, np.float32)), 0.0, 1.0)
  a = np.round(255.0 * np.sqrt(m)).astype(np.uint8)
  return np.concatenate([colormap(m), a[..., None]], axis=-1)


def write_card_files(out_dir: str, id_: str, crop: np.ndarray,
                     qmap: np.ndarray, *, jpeg_quality: int = 90) -> None:
  """The report's two small files of one image (`efiqa assess` calls this
  per image): DIR/report/<id>.jpg, the FOV crop the map covers, and
  DIR/report/<id>.png, the map layer (`map_layer`). Atomic writes."""
  d = files_lib.join(out_dir, REPORT_FILES)
  buf = io.BytesIO()
  Image.fromarray(np.asarray(crop, np.uint8)).save(
      buf, format="JPEG", quality=jpeg_quality)
  files_lib.atomic_write_bytes(files_lib.join(d, id_ + ".jpg"),
                               buf.getvalue())
  write_png(files_lib.join(d, id_ + ".png"), map_layer(qmap))


_CSS = """
:root{--map-opacity:.5}
body{font-family:system-ui,sans-serif;margin:1em;background:#fafafa;color:#222}
h1{font-size:1.4em;margin:.2em 0}
.summary{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start;
 margin:.5em 0 1em}
.summary p{margin:.2em 0;max-width:44em}
.scale{width:260px;font-size:12px}
.scale .bar{height:14px;border:1px solid #888;background:linear-gradient(
 to right,RAMP)}
.scale .ticks{display:flex;justify-content:space-between}
.controls{font-size:13px;margin:.4em 0}
.nav{margin:.6em 0;font-size:13px;line-height:1.8}
.nav a,.nav b{margin-right:.6em}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #ddd;padding:6px;width:220px;
 font-size:12px;overflow-wrap:anywhere}
.pic{position:relative;display:block;width:220px;height:220px;
 background:#000;cursor:zoom-in}
.pic img{position:absolute;left:0;top:0;width:100%;height:100%;
 object-fit:contain}
img.map{opacity:var(--map-opacity);transition:opacity .15s}
.pic:hover img.map{opacity:0}
.g{color:#fff;padding:1px 6px;border-radius:3px}
.missing{color:#bbb;display:flex;align-items:center;justify-content:center;
 height:100%}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;
 font-size:12px;text-align:left}
#broken{display:none;background:#c62828;color:#fff;padding:4px 8px}
#viewer{display:none;position:fixed;inset:0;background:rgba(0,0,0,.92);
 color:#eee;z-index:9;overflow:auto;padding:1em}
#viewer .row{display:flex;flex-wrap:wrap;gap:12px}
#viewer figure{margin:0}
#viewer .stack{position:relative;width:min(90vw,512px);
 height:min(90vw,512px);background:#000}
#viewer .stack img{position:absolute;left:0;top:0;width:100%;height:100%;
 object-fit:contain}
#viewer a{color:#9cf}
"""

_JS = """
(function(){
var broken=0;
function showBroken(){var b=document.getElementById('broken');
 b.style.display='block';
 b.textContent=broken+' picture(s) could not be loaded: were files of this '+
 'folder moved or deleted?';}
document.addEventListener('error',function(e){
 if(e.target&&e.target.tagName==='IMG'){broken++;showBroken();}},true);
window.efiqaOpacity=function(v){
 document.documentElement.style.setProperty('--map-opacity',v/100);
 var o=document.getElementById('opv');if(o)o.textContent=v+' %';};
window.efiqaView=function(a){
 var v=document.getElementById('viewer');
 v.querySelector('.vt').textContent=a.dataset.title;
 var p=a.dataset.photo,m=a.dataset.map;
 v.querySelectorAll('img.vp').forEach(function(i){i.src=p;});
 v.querySelectorAll('img.vm').forEach(function(i){i.src=m;});
 var o=v.querySelector('.vo');
 if(a.dataset.orig){o.href=a.dataset.orig;o.style.display='';}
 else{o.style.display='none';}
 v.style.display='block';return false;};
window.efiqaClose=function(){document.getElementById('viewer').style.display=
 'none';};
document.addEventListener('keydown',function(e){
 if(e.key==='Escape')efiqaClose();});
})();
"""


def _viewer() -> str:
  return (
      "<div id='viewer' onclick='if(event.target===this)efiqaClose()'>"
      "<p><b class='vt'></b> &nbsp; <a href='#' "
      "onclick='efiqaClose();return false'>close (Esc)</a> &nbsp; "
      "<a class='vo' target='_blank'>original file</a></p>"
      "<div class='row'>"
      "<figure><div class='stack'><img class='vp' alt='photograph'>"
      "<img class='vm map' alt='map'></div><figcaption>map over the "
      "photograph (opacity slider above)</figcaption></figure>"
      "<figure><div class='stack'><img class='vp' alt='photograph'></div>"
      "<figcaption>photograph (the FOV crop the map covers)</figcaption>"
      "</figure>"
      "<figure><div class='stack'><img class='vm' alt='map'></div>"
      "<figcaption>map alone</figcaption></figure>"
      "</div></div>")


def _ramp_css() -> str:
  n = len(_RAMP) - 1
  return ",".join(f"rgb({int(r)},{int(g)},{int(b)}) {100 * i / n:.0f}%"
                  for i, (r, g, b) in enumerate(_RAMP))


def _histogram_svg(qualities: Sequence[float], grading) -> str:
  """20 bins of quality over [0, 1], coloured by the grade they fall in,
  with the cut-offs marked."""
  bins = np.histogram(np.clip(qualities, 0, 1), bins=20, range=(0, 1))[0]
  w, h, top = 300, 80, max(1, int(bins.max()) if len(bins) else 1)
  parts = [f"<svg width='{w}' height='{h + 16}' role='img' "
           "aria-label='histogram of quality'>"]
  for i, c in enumerate(bins):
    mid = (i + 0.5) / 20
    g = grading.grade(mid) if grading is not None else "usable"
    bh = h * c / top
    parts.append(f"<rect x='{i * w / 20 + 1:.1f}' y='{h - bh:.1f}' "
                 f"width='{w / 20 - 2:.1f}' height='{bh:.1f}' "
                 f"fill='{GRADE_COLOURS[g]}'><title>{c} images, quality "
                 f"{i / 20:.2f}-{(i + 1) / 20:.2f}</title></rect>")
  if grading is not None:
    for t in (grading.usable_min, grading.good_min):
      x = w * min(max(t, 0), 1)
      parts.append(f"<line x1='{x:.1f}' x2='{x:.1f}' y1='0' y2='{h}' "
                   "stroke='#000' stroke-dasharray='3,2'/>")
  parts.append(f"<text x='0' y='{h + 13}' font-size='11'>0</text>"
               f"<text x='{w / 2 - 18}' y='{h + 13}' font-size='11'>quality"
               f"</text><text x='{w - 8}' y='{h + 13}' font-size='11'>1"
               "</text></svg>")
  return "".join(parts)


class _Files:
  """Where a page finds an image's files: a relative URL (quoted, so ids
  like `eye#1` work) or, self-contained, the bytes as a data URI."""

  def __init__(self, out_dir: str, page_dir: str, files_dir: str,
               overlay_dir: str, self_contained: bool):
    self.out_dir, self.page_dir = out_dir, page_dir
    self.files_dir, self.overlay_dir = files_dir, overlay_dir
    self.self_contained = self_contained
    self._listed: dict[str, set[str]] = {}

  def _exists(self, path: str) -> bool:
    if not files_lib.is_remote(path):
      return os.path.isfile(path)
    # In a bucket: one listing per folder, not one request per picture.
    folder = path.rsplit("/", 1)[0]
    if folder not in self._listed:
      self._listed[folder] = set(files_lib.glob(folder + "/*"))
    return path in self._listed[folder]

  def _url(self, path: str, mime: str) -> str | None:
    if not self._exists(path):
      return None
    if self.self_contained:
      return (f"data:{mime};base64,"
              + base64.b64encode(files_lib.read_bytes(path)).decode("ascii"))
    rel = os.path.relpath(path, self.page_dir).replace(os.sep, "/")
    return urllib.parse.quote(rel)

  def photo(self, id_: str) -> str | None:
    return self._url(os.path.join(self.out_dir, self.files_dir,
                                  id_ + ".jpg"), "image/jpeg")

  def map(self, id_: str) -> str | None:
    return self._url(os.path.join(self.out_dir, self.files_dir,
                                  id_ + ".png"), "image/png")

  def overlay(self, id_: str) -> str | None:
    return self._url(os.path.join(self.out_dir, self.overlay_dir,
                                  id_ + ".png"), "image/png")

  def original(self, image: str) -> str | None:
    if (self.self_contained or not image or files_lib.is_remote(image)
        or files_lib.is_remote(self.page_dir) or not os.path.isfile(image)):
      return None  # no relative link between a bucket and a disk
    rel = os.path.relpath(os.path.abspath(image), self.page_dir)
    return urllib.parse.quote(rel.replace(os.sep, "/"))


def _card(r: dict, files: _Files) -> str:
  e = html.escape
  id_ = r["id"]
  colour = GRADE_COLOURS.get(r["grade"], "#555")
  photo, qmap = files.photo(id_), files.map(id_)
  if photo is None and qmap is None:  # a run from before these files
    ov = files.overlay(id_)
    pic = (f"<span class='pic'><img loading='lazy' src='{e(ov)}' "
           f"alt='{e(id_)}'></span>" if ov else
           "<span class='pic'><span class='missing'>no picture</span></span>")
  else:
    orig = files.original(r.get("image", ""))
    title = (f"{id_} — {r['grade']}, quality {float(r['quality']):.3f}, "
             f"degraded {100 * float(r['degraded_fraction']):.1f}%")
    layers = "".join(
        f"<img loading='lazy' {cls}src='{e(u)}' alt='{e(alt)}'>"
        for u, cls, alt in ((photo, "", id_), (qmap, "class='map' ", "map"))
        if u)
    pic = (f"<a class='pic' href='{e(photo or qmap)}' target='_blank' "
           f"data-photo='{e(photo or '')}' data-map='{e(qmap or '')}' "
           f"data-orig='{e(orig or '')}' data-title='{e(title)}' "
           f"onclick='return efiqaView(this)' title='full size'>"
           f"{layers}</a>")
  return ("<div class='card'>" + pic + f"<b>{e(id_)}</b><br>"
          f"<span class='g' style='background:{colour}'>{e(r['grade'])}"
          f"</span> quality {float(r['quality']):.3f}, degraded "
          f"{100 * float(r['degraded_fraction']):.1f}%"
          + (f"<br><i>{e(r['message'])}</i>" if r.get("message") else "")
          + "</div>")


def _failure_table(rows: Sequence[dict]) -> str:
  e = html.escape
  out = ["<table><tr><th>image</th><th>status</th><th>message</th></tr>"]
  for r in rows:
    out.append(f"<tr><td>{e(str(r.get('image', '')))}</td><td>"
               f"{e(str(r.get('status', '')))}</td><td>"
               f"{e(str(r.get('message', '')))}</td></tr>")
  out.append("</table>")
  return "".join(out)


def _page(title: str, body: Sequence[str], grading=None) -> str:
  e = html.escape
  meta = ("" if grading is None else
          f"<meta name='efiqa-grading' content='{grading.good_min!r},"
          f"{grading.usable_min!r}'>")
  return "\n".join([
      "<!doctype html><html><head><meta charset='utf-8'>" + meta,
      "<meta name='viewport' content='width=device-width,initial-scale=1'>",
      f"<title>{e(title)}</title><style>{_CSS.replace('RAMP', _ramp_css())}"
      "</style></head><body>",
      "<div id='broken'></div>", *body, _viewer(),
      f"<script>{_JS}</script></body></html>"])


def _atomic_write(path: str, text: str) -> None:
  files_lib.atomic_write_text(path, text)


def write_report(path: str, rows: Sequence[dict], title: str, *,
                 grading=None, files_dir: str = REPORT_FILES,
                 overlay_dir: str = "overlays", page_size: int = PAGE_SIZE,
                 self_contained: bool = False,
                 out_dir: str | None = None) -> list[str]:
  """The HTML report of an `efiqa assess` folder; returns the files written.

  `path` is DIR/report.html; the pictures are the ones `write_card_files`
  left in DIR/report/ (runs from before them fall back to the overlays).
  Each card shows the photograph with the map as a layer over it (its
  opacity is a slider; 0 shows the photograph alone); a click opens the
  photograph, the map and both at full size, with a link to the original
  file. The page states the grade cut-offs (`grading`) and the map's colour
  scale, and says when a picture fails to load. Cards are sorted by quality,
  best first, `page_size` per page: report.html is the summary (counts,
  quality histogram) and the first page, DIR/report/page-K.html the others,
  so a million photographs make 2,000 light pages instead of one page that
  no browser opens. Failures are listed after the cards (paged alike).

  self_contained: one file with every picture inside (data URIs), for a
  notebook's iframe or an e-mail; it holds the summary and the first page
  only (it says so when there are more).
  out_dir: the assess folder, when `path` is not in it (default: its folder).
  `path` and out_dir may be local or in a bucket (`gs://...`).
  """
  if out_dir is None:
    out_dir = (path.rsplit("/", 1)[0] if files_lib.is_remote(path)
               else os.path.dirname(os.path.abspath(path)))
  page_size = max(1, int(page_size))
  ok = sorted((r for r in rows if r.get("status") == "ok"),
              key=lambda r: -float(r["quality"]))
  bad = [r for r in rows if r.get("status") != "ok"]
  counts = {g: sum(1 for r in ok if r["grade"] == g) for g in GRADE_COLOURS}
  n_pages = max(1, math.ceil(len(ok) / page_size))
  n_fail_pages = math.ceil(len(bad) / page_size) if len(bad) > page_size \
      else 0
  if self_contained:
    n_pages, n_fail_pages = 1, 0
  e = html.escape
  pages_dir = os.path.join(out_dir, files_dir)

  def page_href(k: int, from_dir: str) -> str:
    target = (os.path.join(out_dir, os.path.basename(path)) if k == 1 else
              os.path.join(pages_dir, f"page-{k}.html"))
    return urllib.parse.quote(
        os.path.relpath(target, from_dir).replace(os.sep, "/"))

  def nav(current: int, from_dir: str) -> str:
    if n_pages == 1:
      return ""
    links = []
    for k in range(1, n_pages + 1):
      chunk = ok[(k - 1) * page_size:k * page_size]
      label = (f"{k} ({float(chunk[0]['quality']):.3f}–"
               f"{float(chunk[-1]['quality']):.3f})")
      links.append(f"<b>{e(label)}</b>" if k == current else
                   f"<a href='{e(page_href(k, from_dir))}'>{e(label)}</a>")
    return ("<div class='nav'>Pages by quality, best first "
            f"({page_size} images each): " + " ".join(links) + "</div>")

  if grading is not None:
    cutoffs = (f"Grades: <b>good</b> when quality ≥ {grading.good_min:g} (and"
               f" the photograph has a circular field of view), <b>usable</b>"
               f" when ≥ {grading.usable_min:g}, else <b>reject</b>.")
  else:
    cutoffs = "Grades as given in scores.csv."
  legend = (
      "<div class='scale'><div class='bar'></div><div class='ticks'><span>0"
      "</span><span>0.5</span><span>1</span></div>Map: probability that the "
      "region is degraded (the expected vessels are missing); transparent = "
      f"0. degraded = share of the field of view with map ≥ {DEGRADED_AT:g}."
      "</div>")
  controls = (
      "<div class='controls'><label>map opacity <input type='range' min='0' "
      "max='100' value='50' oninput='efiqaOpacity(this.value)'></label> "
      "<span id='opv'>50 %</span>. Point at a picture to see the photograph "
      "alone; click it for the photograph and the map at full size.</div>")
  head = [f"<h1>{e(title)}</h1>", "<div class='summary'><div>",
          f"<p>{len(rows)} images: {counts['good']} good, {counts['usable']} "
          f"usable, {counts['reject']} reject, {len(bad)} not assessed. "
          "Quality: 1 = all expected anatomy visible.</p>",
          f"<p>{cutoffs}</p></div>", legend,
          _histogram_svg([float(r["quality"]) for r in ok], grading),
          "</div>", controls]

  def failures(from_dir: str, chunk: Sequence[dict], k: int = 0) -> list[str]:
    if not chunk:
      return []
    out = [f"<h2 id='failures'>Not assessed ({len(bad)})</h2>"]
    if n_fail_pages:
      links = " ".join(
          f"<b>{j}</b>" if j == k else
          f"<a href='{e(urllib.parse.quote(os.path.relpath(os.path.join(pages_dir, f'failures-{j}.html'), from_dir).replace(os.sep, '/')))}'>{j}</a>"
          for j in range(1, n_fail_pages + 1))
      out.append(f"<div class='nav'>Pages: {links}</div>")
    return out + [_failure_table(chunk)]

  written = []
  files_main = _Files(out_dir, out_dir, files_dir, overlay_dir,
                      self_contained)
  first = ok[:page_size]
  body = head + [nav(1, out_dir)]
  if self_contained and len(ok) > page_size:
    body.append(f"<p>Showing the best {page_size} of {len(ok)} assessed "
                "images; report.html in the output folder has them all.</p>")
  body += ["<div class='grid'>", *(_card(r, files_main) for r in first),
           "</div>", nav(1, out_dir)]
  if n_fail_pages:
    body += [f"<h2>Not assessed ({len(bad)})</h2><p><a href='"
             f"{e(urllib.parse.quote(files_dir))}/failures-1.html'>"
             "the list</a></p>"]
  else:
    body += failures(out_dir, bad if not self_contained else
                     bad[:page_size])
  _atomic_write(path, _page(title, body, grading))
  written.append(path)
  if n_pages > 1 or n_fail_pages:
    files_lib.makedirs(pages_dir)
  files_sub = _Files(out_dir, pages_dir, files_dir, overlay_dir, False)
  for k in range(2, n_pages + 1):
    chunk = ok[(k - 1) * page_size:k * page_size]
    p = os.path.join(pages_dir, f"page-{k}.html")
    _atomic_write(p, _page(f"{title} — page {k}", head + [
        nav(k, pages_dir), "<div class='grid'>",
        *(_card(r, files_sub) for r in chunk), "</div>", nav(k, pages_dir)]))
    written.append(p)
  for k in range(1, n_fail_pages + 1):
    p = os.path.join(pages_dir, f"failures-{k}.html")
    back = urllib.parse.quote(os.path.relpath(path, pages_dir)
                              .replace(os.sep, "/"))
    _atomic_write(p, _page(f"{title} — not assessed, page {k}", [
        f"<h1>{e(title)}</h1>", f"<p><a href='{e(back)}'>back to the "
        "report</a></p>",
        *failures(pages_dir, bad[(k - 1) * page_size:k * page_size], k)]))
    written.append(p)
  return written


def self_contained_report(out_dir: str, *, title: str | None = None,
                          grading=None, page_size: int = 100) -> str:
  """The report of an `efiqa assess` folder as one HTML string with every
  picture inside: what a notebook shows (an iframe has no folder to load
  pictures from). Reads DIR/scores.csv."""
  import tempfile  # pylint: disable=g-import-not-at-top
  out_dir = os.fspath(files_lib.abs_path(out_dir))
  rows = files_lib.read_csv(files_lib.join(out_dir, "scores.csv"))[1]
  if grading is None and rows:
    grading = _grading_of_run(out_dir)
  title = title or f"efiqa assess — {len(rows)} images"
  fd, tmp = tempfile.mkstemp(suffix=".html")
  os.close(fd)
  try:
    write_report(tmp, rows, title, grading=grading, page_size=page_size,
                 self_contained=True, out_dir=out_dir)
    with open(tmp, encoding="utf-8") as f:
      return f.read()
  finally:
    os.remove(tmp)


def _grading_of_run(out_dir: str):
  """The cut-offs report.html was written with (its efiqa-grading meta
  tag), for the self-contained copy; None without a report."""
  import re  # pylint: disable=g-import-not-at-top
  from efiqa_jax import quality as quality_lib  # pylint: disable=g-import-not-at-top
  p = files_lib.join(out_dir, "report.html")
  if not files_lib.isfile(p):
    return None
  m = re.search(r"<meta name='efiqa-grading' content='([^,']+),([^']+)'>",
                files_lib.read_text(p)[:4096])
  return quality_lib.Grading(float(m.group(1)), float(m.group(2))) if m \
      else None
