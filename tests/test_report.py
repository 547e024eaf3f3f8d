"""The HTML report in a real headless browser (Debian's chromium): no broken
picture in the report, its other pages, the full-size viewer and the
self-contained copy a notebook shows in an iframe, with ids that need URL
encoding (`eye#1`)."""
import contextlib
import csv
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import threading

import numpy as np
import pytest

from efiqa_jax import quality
from efiqa_jax import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Loads each page in an iframe (same origin: served from one folder), makes
# every lazy picture load, clicks the first card and counts the pictures
# with naturalWidth 0; `srcdoc:` pages are given as an iframe's srcdoc, as a
# notebook embeds the self-contained report.
HARNESS = """<!doctype html><html><body><pre id="result">pending</pre>
<script>
const pages = PAGES;
function loaded(img) {
  return new Promise(done => {
    if (img.complete) return done();
    img.addEventListener('load', done); img.addEventListener('error', done);
  });
}
async function check(spec) {
  const f = document.createElement('iframe');
  f.style.width = '1200px'; f.style.height = '900px';
  const ready = new Promise(done => f.onload = done);
  if (spec.startsWith('srcdoc:')) {
    f.srcdoc = await (await fetch(spec.slice(7))).text();
  } else { f.src = spec; }
  document.body.appendChild(f);
  await ready;
  const d = f.contentDocument;
  const imgs = [...d.images];
  imgs.forEach(i => i.loading = 'eager');
  await Promise.all(imgs.map(loaded));
  const link = d.querySelector('a.pic');
  const win = f.contentWindow;
  // The first card: the photograph under a half-transparent map, same box.
  const layers = link ? [...link.querySelectorAll('img')].map(i => {
    const b = i.getBoundingClientRect();
    return [i.className, win.getComputedStyle(i).opacity,
            Math.round(b.width), Math.round(b.height)]; }) : [];
  const bar = d.querySelector('.scale .bar');
  const scale = bar ? [Math.round(bar.getBoundingClientRect().width),
      win.getComputedStyle(bar).backgroundImage.split('(')[0]] : [];
  let viewer = 0, viewerBroken = -1;
  if (link) {
    link.click();
    const v = [...d.querySelectorAll('#viewer img')];
    await Promise.all(v.map(loaded));
    viewer = v.length;
    viewerBroken = v.filter(i => !(i.naturalWidth > 0)).length;
  }
  return {page: spec, images: imgs.length,
          broken: imgs.filter(i => !(i.naturalWidth > 0)).length,
          viewer, viewerBroken, layers, scale,
          viewerShown: link ? f.contentWindow.getComputedStyle(
              d.getElementById('viewer')).display : '',
          warning: d.getElementById('broken') ? f.contentWindow
              .getComputedStyle(d.getElementById('broken')).display : 'absent',
          links: [...d.querySelectorAll('.nav a')].map(a => a.href)};
}
(async () => {
  const out = [];
  for (const p of pages) {
    try { out.push(await check(p)); } catch (e) { out.push({page: p, error: String(e)}); }
  }
  document.getElementById('result').textContent = JSON.stringify(out);
})();
</script></body></html>"""


def _fake_run(out_dir, ids):
  """What `efiqa assess` leaves for the report: rows and report/ files."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:128, :128]
  fov = (yy - 63.5) ** 2 + (xx - 63.5) ** 2 < 60 ** 2
  rows = []
  for k, id_ in enumerate(ids):
    crop = (rng.random((128, 128, 3)) * 255 * fov[..., None]).astype(np.uint8)
    qmap = (rng.random((16, 16)) * quality.fov_at(fov, (16, 16))).astype(
        np.float32)
    report.write_card_files(str(out_dir), id_, crop, qmap)
    q = 1.0 - k / (len(ids) + 1)
    rows.append({"image": str(out_dir / f"{id_}.png"), "id": id_,
                 "status": "ok", "message": "", "quality": q,
                 "grade": quality.Grading().grade(q),
                 "degraded_fraction": 0.1})
  rows.append({"image": "gone.jpg", "id": "gone", "status": "not_found",
               "message": "no such file"})
  with open(out_dir / "scores.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]), restval="")
    w.writeheader()
    w.writerows(rows)
  return rows


@contextlib.contextmanager
def _serve(root):
  class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      pass

  handler = functools.partial(Quiet, directory=str(root))
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  t = threading.Thread(target=httpd.serve_forever, daemon=True)
  t.start()
  try:
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
  finally:
    httpd.shutdown()
    httpd.server_close()


def _browse(root, pages, tmp_path):
  (root / "harness.html").write_text(
      HARNESS.replace("PAGES", json.dumps(pages)))
  profile = tmp_path / "chromium-profile"
  with _serve(root) as base:
    res = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=30000",
         "--dump-dom", f"{base}/harness.html"],
        capture_output=True, text=True, timeout=240)
  m = re.search(r'<pre id="result">(.*?)</pre>', res.stdout, re.S)
  assert m, (res.stdout[-2000:], res.stderr[-2000:])
  return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true",
                    reason="chromium is not installed (.ci/run installs it)")
def test_report_pictures_load_in_a_browser(tmp_path):
  assert CHROMIUM, "CI installs Debian's chromium (.ci/run)"
  root = tmp_path / "site"
  out = root / "run"
  out.mkdir(parents=True)
  ids = ["eye#1", "a b?c", "ünï", "plain", "x%20y"]
  rows = _fake_run(out, ids)
  written = report.write_report(str(out / "report.html"), rows, "test run",
                                grading=quality.Grading(), page_size=3)
  assert [os.path.relpath(p, out) for p in written] == [
      "report.html", os.path.join("report", "page-2.html")]
  html = (out / "report.html").read_text()
  assert "eye%231.jpg" in html and "good</b> when quality ≥" in html
  assert "Not assessed (1)" in html and "gone.jpg" in html
  # The self-contained copy, read from another folder (as a notebook has).
  (root / "nb").mkdir()
  (root / "nb" / "report.html").write_text(
      report.self_contained_report(str(out)))
  assert "src='report/" not in (root / "nb" / "report.html").read_text()
  res = _browse(root, ["run/report.html", "run/report/page-2.html",
                       "srcdoc:nb/report.html"], tmp_path)
  by = {r["page"]: r for r in res}
  assert not [r for r in res if "error" in r], res
  # 3 cards (photograph + map) on page 1, 2 on page 2, all 5 self-contained.
  assert [by[p]["images"] for p in ("run/report.html",
                                    "run/report/page-2.html",
                                    "srcdoc:nb/report.html")] == [
                                        6 + 4, 4 + 4, 10 + 4]
  for r in res:
    assert r["broken"] == 0, r
    # Photograph first (under), the map over it at 50 %, both 220 px.
    assert r["layers"] == [["", "1", 220, 220], ["map", "0.5", 220, 220]], r
    assert r["scale"] == [260, "linear-gradient"], r
    assert r["viewer"] == 4 and r["viewerBroken"] == 0, r
    assert r["viewerShown"] == "block" and r["warning"] == "none", r
  assert any(l.endswith("/run/report/page-2.html")
             for l in by["run/report.html"]["links"])
  assert any(l.endswith("/run/report.html")
             for l in by["run/report/page-2.html"]["links"])
  # A moved picture is reported on the page, not silently shown blank.
  os.remove(out / "report" / "plain.jpg")
  os.rename(out / "report" / "ünï.jpg", out / "report" / "elsewhere.jpg")
  (res2,) = _browse(root, ["run/report/page-2.html"], tmp_path)
  assert res2["broken"] >= 1 and res2["warning"] == "block", res2


def test_many_images_make_light_pages(tmp_path):
  rows = [{"image": f"p{i}.png", "id": f"p{i}", "status": "ok",
           "message": "", "quality": i / 1200, "grade": "usable",
           "degraded_fraction": 0.5} for i in range(1200)]
  rows += [{"image": f"bad{i}", "id": f"bad{i}", "status": "unreadable",
            "message": "x"} for i in range(700)]
  written = report.write_report(str(tmp_path / "report.html"), rows, "big")
  names = sorted(os.path.relpath(p, tmp_path) for p in written)
  assert names == sorted(["report.html", "report/page-2.html",
                          "report/page-3.html", "report/failures-1.html",
                          "report/failures-2.html"])
  main = (tmp_path / "report.html").read_text()
  assert main.count("class='card'") == report.PAGE_SIZE
  assert "1200 images" not in main and "1900 images" in main
  assert "report/failures-1.html" in main
