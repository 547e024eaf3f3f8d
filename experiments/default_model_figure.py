"""The README's figure of the default model ("The default model"):

  top     the maps `efiqa assess` wrote for the real photographs of a folder
          (e.g. ../shared/data/fundus), best first, with id, grade and
          degraded share. Maps only: the photographs are under research-use
          terms and stay out of the repository (their overlays are in the
          run's report.html).
  bottom  overlays on the bundled public-domain sample photograph
          (scikit-image's retina): as is, and with its left half blurred.

  PYTHONPATH=$PWD python experiments/default_model_figure.py RUN_DIR OUT.png
where RUN_DIR is an `efiqa assess` output folder made with the default model.
"""
import csv
import os
import sys

import numpy as np
from PIL import Image, ImageDraw


def _tile(rgb: np.ndarray, text: str, side: int) -> Image.Image:
  im = Image.fromarray(rgb).resize((side, side), Image.NEAREST)
  canvas = Image.new("RGB", (side, side + 30), "white")
  canvas.paste(im, (0, 0))
  d = ImageDraw.Draw(canvas)
  for i, line in enumerate(text.split("\n")):
    d.text((3, side + 2 + 13 * i), line, fill="black")
  return canvas


def main(run_dir: str, out: str, side: int = 160) -> None:
  from efiqa_jax import default_model, quality, report
  from efiqa_jax import quality_model as qm
  rows = [r for r in csv.DictReader(open(os.path.join(run_dir,
                                                      "scores.csv")))
          if r["status"] == "ok"]
  rows.sort(key=lambda r: -float(r["quality"]))
  tiles = []
  for r in rows:
    m = np.load(os.path.join(run_dir, "maps", r["id"] + ".npy"))
    tiles.append(_tile(report.colormap(m), f"{r['id']}: {r['grade']}\n"
                       f"q {float(r['quality']):.2f}, flagged "
                       f"{100 * float(r['degraded_fraction']):.0f}%", side))
  p, mixed, _, maps = default_model.half_blurred_sample(
      qm.load_quality_model("default"))
  sample = []
  for name, im, m in (("sample photograph", p.image, maps[0]),
                      ("left half blurred", mixed, maps[1])):
    w = quality.fov_at(p.fov_mask, m.shape)
    q, frac = quality.summarise(m, w)
    sample.append(_tile(report.overlay(im, m, p.fov_mask),
                        f"{name}: q {q:.2f}\nflagged {100 * frac:.0f}%",
                        2 * side))
  cols = 5
  nrow = -(-len(tiles) // cols)
  th = side + 30
  fig = Image.new("RGB", (cols * side, nrow * th + 2 * side + 30), "white")
  for i, t in enumerate(tiles):
    fig.paste(t, ((i % cols) * side, (i // cols) * th))
  for i, t in enumerate(sample):
    fig.paste(t, (i * 2 * side, nrow * th))
  fig.save(out, optimize=True)
  print(f"wrote {out}")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
