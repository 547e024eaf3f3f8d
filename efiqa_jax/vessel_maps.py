"""`efiqa vessels`: the label-free vessel map of every photograph written
as a PNG, on the inference driver. The segmenter itself is
`efiqa_jax.vessels`; this module only feeds it and writes its output."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from efiqa_jax.vessels import DEFAULT_CONFIG, VesselConfig, vessel_probability


MANIFEST_FIELDS = ("image", "id", "status", "message", "crop_x0", "crop_y0",
                   "crop_size", "orig_h", "orig_w", "fov_cx", "fov_cy",
                   "fov_r", "file")


def segment_paths(paths: Sequence[str], out_dir: str | os.PathLike,
                  size: int = 512, batch_size: int = 8, *,
                  prepare: Callable[..., Any] | None = None,
                  config: VesselConfig = DEFAULT_CONFIG,
                  overwrite: bool = False, progress: bool = False,
                  num_workers: int = 0, read_threads: int = 4,
                  max_steps: int | None = None):
  """`efiqa vessels`: out_dir/<id>.png for every photograph, on the
  inference driver (`efiqa_jax.driver`: multi-process exactly once,
  resumable, tmp-then-rename, one manifest).

  `paths`: a list of photographs, or `sources.Inputs` (which may hold
  prepared folders made at `size`: their crops are used as they are).
  Each input is FOV-cropped at `size` (`prepare(path, size) -> Prepared`,
  default `fundus.prepare_fundus`); its PNG is the uint8 (0..255) vessel
  probability at that crop resolution. manifest.csv has one row per input
  of this run, in input order, failures included, with the crop box in the
  original photograph (crop_x0, crop_y0, crop_size, orig_h, orig_w) and the
  FOV circle; below them, the rows of earlier runs into the same folder
  whose PNGs are still there (every PNG in the folder has its row). A
  photograph that fails when it is done loses any PNG of an earlier run
  (e.g. one written but not journaled before a kill). Another size or segmenter
  config is refused unless `overwrite`. batch_size: images per step over
  all processes. Returns the driver's Result (`.out_dir / "manifest.csv"`).
  """
  import dataclasses as dc  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from efiqa_jax import driver, files, sources  # pylint: disable=g-import-not-at-top

  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  step = driver.LocalDataParallel(
      lambda im, m: vessel_probability(im, m, config=config),
      ("image", "fov_mask"))

  def run_step(host):
    if not np.asarray(host["ok"]).any():
      return None
    return {"prob": step(host)}

  def write(rec, out):
    png = out_dir / f"{rec['id']}.png"
    crop, fov = rec["crop"], rec["fov"]
    row = {"status": rec["status"], "message": rec["message"],
           "orig_h": int(crop[3]) if crop[3] > 0 else "",
           "orig_w": int(crop[4]) if crop[4] > 0 else ""}
    if not rec["ok"]:
      if png.exists():  # a photograph that now fails keeps no old map
        png.unlink()
      return row
    u8 = np.round(np.clip(out["prob"], 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, "PNG")
    driver.write_atomic(png, buf.getvalue())
    return dict(row, crop_x0=int(crop[0]), crop_y0=int(crop[1]),
                crop_size=int(crop[2]), fov_cx=round(float(fov[0]), 3),
                fov_cy=round(float(fov[1]), 3), fov_r=round(float(fov[2]), 3),
                file=png.name)

  def finish(rows, out):
    listed = {r["id"] for r in rows}
    earlier = sorted((r for r in files.Journal.read(out).values()
                      if r["id"] not in listed and r.get("status") == "ok"
                      and (out / r.get("file", "-")).exists()),
                     key=lambda r: r["image"])
    driver.write_csv(out / "manifest.csv", MANIFEST_FIELDS, rows + earlier)

  source = None
  if isinstance(paths, sources.Inputs):
    paths.check_size(size, "--size")
    if prepare is not None:
      paths.require_photographs("a custom `prepare` reads the photographs")
    paths, source = paths.paths, paths.source
  out_dir = driver.output_dir(out_dir)
  prep = (sources.PrepareFundus(size) if prepare is None else
          sources.PrepareFundus(size, load_fn=prepare))
  task = driver.Task(
      command="vessels",
      fingerprint={"size": int(size), "config": dc.asdict(config),
                   "prepare": "fundus.prepare_fundus" if prepare is None
                   else getattr(prepare, "__name__", repr(prepare))},
      prepare=prep, step=run_step, write=write,
      done_files=lambda r: [r.get("file") or "-"],
      clear=("*.png", "manifest.csv"), finish=finish,
      unit=step.global_unit)
  return driver.run(task, [str(p) for p in paths], out_dir, source=source,
                    batch_size=batch_size, overwrite=overwrite,
                    progress=progress, num_workers=num_workers,
                    read_threads=read_threads, max_steps=max_steps)
