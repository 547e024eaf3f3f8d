"""`efiqa assess`: photographs in, a quality map, score and grade out.

Output contract (also in the README):
  DIR/scores.csv        one row per input, in input order, none dropped
  DIR/maps/<id>.npy     float32 (h, w) in [0, 1]: probability that the region is
                        degraded; covers the crop square; 0 outside the FOV
  DIR/overlays/<id>.png heat-map overlay on the FOV crop
  DIR/logits/<id>.npy   (save_logits, student only) float32 (gh, gw) raw
                        adapter logits before any post-processing
  DIR/report.html       the report (report.write_report); its pictures in
                        DIR/report/ (<id>.jpg FOV crop, <id>.png map layer)

Resumability: each finished image is appended to DIR/progress[-pK].jsonl after
its map and overlay are on disk (one JSON line, flushed and fsynced per batch).
A re-run skips ids already there; a line cut by a kill is ignored and that image
redone. scores.csv and report.html are rewritten from the progress rows in input
order at the end, so an interrupted-then-resumed run ends with the same
scores.csv as an uninterrupted one.

Multi-host: every process takes its slice of the inputs, writes its own progress
file and maps; process 0 writes scores.csv after a barrier.
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import os
import sys
import time
from typing import Iterable, Sequence

import numpy as np

from efiqa_jax import __version__
from efiqa_jax import quality as quality_lib
from efiqa_jax import report as report_lib

SCORE_COLUMNS = ("image", "id", "status", "message", "quality", "grade",
                 "degraded_fraction", "fov_cx", "fov_cy", "fov_r", "crop_x0",
                 "crop_y0", "crop_size", "model", "version")

EXIT_OK = 0           # every input assessed
EXIT_USAGE = 2        # bad arguments, model or config: nothing assessed
EXIT_SOME_FAILED = 3  # finished, but some rows have a failure status
EXIT_NO_INPUTS = 4    # the inputs named no image at all


@dataclasses.dataclass
class AssessResult:
  out_dir: str
  total: int
  ok: int
  failed: int
  skipped_done: int
  exit_code: int
  scores_csv: str


def _progress_path(out_dir: str, process_index: int, process_count: int):
  if process_count == 1:
    return os.path.join(out_dir, "progress.jsonl")
  return os.path.join(out_dir, f"progress-p{process_index}.jsonl")


def read_progress(out_dir: str) -> dict[str, dict]:
  """Rows already finished in out_dir (all processes), keyed by id."""
  done = {}
  if not os.path.isdir(out_dir):
    return done
  for name in sorted(os.listdir(out_dir)):
    if not (name.startswith("progress") and name.endswith(".jsonl")):
      continue
    with open(os.path.join(out_dir, name)) as f:
      for line in f:
        line = line.strip()
        if not line:
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by a kill: that image is redone
        if isinstance(row, dict) and "id" in row:
          done[row["id"]] = row
  return done


def _row_complete(out_dir: str, row: dict) -> bool:
  if row.get("status") != "ok":
    return True
  return os.path.exists(os.path.join(out_dir, "maps", row["id"] + ".npy"))


def _failure_row(path, id_, status, message, model_name):
  row = {c: "" for c in SCORE_COLUMNS}
  row.update(image=path, id=id_, status=status, message=message,
             model=model_name, version=__version__)
  return row


def default_num_threads() -> int:
  """Decode/FOV threads when none are given: min(4, CPU cores)."""
  return min(4, os.cpu_count() or 1)


def assess(inputs: Sequence[str] | str, out_dir: str, *,
           model: str = "default", batch_size: int = 8,
           num_threads: int | None = None, num_workers: int = 0,
           overlays: bool = True,
           progress: bool = True, quality_model=None,
           save_logits: bool = False,
           model_kwargs: dict | None = None) -> AssessResult:
  """Assesses photographs; see the module docstring for the contract.

  model_kwargs go to `quality_model.load_quality_model` (for the student:
  encoder=, adapter=, calibration=). num_threads (decode/FOV threads):
  default min(4, CPU cores); more threads than cores only take the cores the
  jitted maps run on (2 cores: 4 threads gave 14-15 img/s on camera-size
  JPEGs, 2 threads 17). The writer pool has max(num_threads, min(8, cores))
  threads."""
  import jax  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top

  if num_threads is None:
    num_threads = default_num_threads()
  if isinstance(inputs, str):
    inputs = [inputs]
  paths = sources.list_inputs(list(inputs))
  ids = sources.unique_ids(paths)
  os.makedirs(out_dir, exist_ok=True)
  if quality_model is None:
    from efiqa_jax import quality_model as qm_lib  # pylint: disable=g-import-not-at-top
    quality_model = qm_lib.load_quality_model(model, **(model_kwargs or {}))
  model_name = quality_model.name
  if save_logits and not hasattr(quality_model, "predict_logits"):
    raise ValueError(f"model {model_name!r} has no logits (--save-logits is "
                     "for --model student)")
  for sub in ("maps", "overlays") + (("logits",) if save_logits else ()):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)

  pidx, pcount = jax.process_index(), jax.process_count()
  done = {k: v for k, v in read_progress(out_dir).items()
          if _row_complete(out_dir, v)}
  # Contiguous per-process slices of the global input list.
  lo = len(paths) * pidx // pcount
  hi = len(paths) * (pidx + 1) // pcount
  todo = [i for i in range(lo, hi) if ids[i] not in done]
  skipped = (hi - lo) - len(todo)

  prog_path = _progress_path(out_dir, pidx, pcount)
  bar = _progress_bar(len(todo), progress and pidx == 0, "assess")
  if todo:
    # Decoding and FOV cropping run in grain threads (or worker processes)
    # ahead of the device; this process's slice only, padded to whole
    # batches, every record exactly once.
    from efiqa_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
    batches = input_pipeline.inference_batches(
        [paths[i] for i in todo], batch_size,
        prepare=sources.PrepareFundus(quality_model.work_size),
        process_index=0, process_count=1, num_workers=num_workers,
        read_threads=num_threads)
    # Writers (PNG encoding releases the GIL) get their own thread count:
    # with decode worker processes num_threads is per worker (often 1), and
    # one writer thread capped a 16-core GPU host at ~64 img/s with overlays
    # (151 without).
    writers = max(1, num_threads, min(8, os.cpu_count() or 1))
    with open(prog_path, "a") as prog, concurrent.futures.ThreadPoolExecutor(
        writers) as pool:

      def record(rows, writes):
        # A row enters the progress file only once its outputs are on disk.
        for fut in writes:
          fut.result()
        for row in rows:
          prog.write(json.dumps(row) + "\n")
        prog.flush()
        os.fsync(prog.fileno())
        bar.update(len(rows))

      # The writes of batch k (overlay PNG, map) run in the pool while the
      # device works on batch k+1; their rows are recorded after that, in
      # batch order. Before, the loop waited for them first, so the device
      # idled for the whole PNG encoding of every batch.
      pending = None
      for batch in batches:
        done_now = _assess_batch(quality_model, batch, todo, paths, ids,
                                 out_dir, overlays, pool, save_logits)
        if pending is not None:
          record(*pending)
        pending = done_now
      if pending is not None:
        record(*pending)
  bar.close()

  if pcount > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("efiqa_assess_done")

  all_rows = read_progress(out_dir)
  final = []
  for p, i in zip(paths, ids):
    row = all_rows.get(i)
    if row is None:  # only possible if another process died mid-run
      row = _failure_row(p, i, "missing", "no result was recorded", model_name)
    row = dict(row, image=p)
    final.append(row)
  scores_csv = os.path.join(out_dir, "scores.csv")
  if pidx == 0:
    _write_csv(scores_csv, final)
    report_lib.write_report(os.path.join(out_dir, "report.html"), final,
                            f"efiqa assess — {len(final)} images, model "
                            f"{model_name}",
                            grading=quality_model.grading)
  n_ok = sum(1 for r in final if r["status"] == "ok")
  n_fail = len(final) - n_ok
  if not final:
    code = EXIT_NO_INPUTS
  else:
    code = EXIT_OK if n_fail == 0 else EXIT_SOME_FAILED
  return AssessResult(out_dir, len(final), n_ok, n_fail, skipped, code,
                      scores_csv)


def _assess_batch(quality_model, batch, todo, paths, ids, out_dir, overlays,
                  pool, save_logits=False):
  """(rows, write futures) of one batch; the caller waits for the writes
  before recording the rows."""
  valid = np.asarray(batch["valid"], bool)
  ok = np.asarray(batch["ok"], bool) & valid
  maps = logits = probs = None
  if ok.any() and hasattr(quality_model, "predict_all"):
    # The student: logits, maps and (with an EyeQ head) class probabilities
    # from one encoder pass.
    out = quality_model.predict_all(batch["image"], batch["fov_mask"])
    maps, probs = out["maps"], out.get("class_probs")
    logits = out["logits"] if save_logits else None
  elif ok.any() and save_logits:
    logits = quality_model.predict_logits(batch["image"], batch["fov_mask"])
    maps = quality_model.maps_from_logits(logits, batch["fov_mask"])
  elif ok.any():
    maps = quality_model.predict(batch["image"], batch["fov_mask"])
  rows, writes, outputs = [], [], []
  for k in np.flatnonzero(valid):
    i = todo[int(batch["index"][k])]
    status, message = str(batch["status"][k]), str(batch["message"][k])
    if not ok[k]:
      rows.append(_failure_row(paths[i], ids[i], status, message,
                               quality_model.name))
      continue
    fov_mask = np.asarray(batch["fov_mask"][k], bool)
    qmap = np.asarray(maps[k], np.float32)
    w = quality_lib.fov_at(fov_mask, qmap.shape)
    qmap = np.where(w > 0, qmap, 0.0).astype(np.float32)
    # A calibrated model pools its own way (efiqa calibrate).
    q, frac = getattr(quality_model, "summarise", quality_lib.summarise)(
        qmap, w)
    if probs is not None:  # EyeQ head: its class
      grade = quality_lib.GRADES[int(np.argmax(probs[k]))]
    else:
      grade = quality_model.grading.grade(q)
    cx, cy, r = (float(v) for v in batch["fov"][k])
    x0, y0, side = (int(v) for v in batch["crop"][k][:3])
    rows.append({
        "image": paths[i], "id": ids[i], "status": "ok", "message": message,
        "quality": round(q, 6), "grade": grade,
        "degraded_fraction": round(frac, 6),
        "fov_cx": round(cx, 3), "fov_cy": round(cy, 3), "fov_r": round(r, 3),
        "crop_x0": x0, "crop_y0": y0, "crop_size": side,
        "model": quality_model.name, "version": __version__,
    })
    outputs.append((k, ids[i], qmap))
  ovs = None
  if overlays and outputs:
    # One jitted call renders the batch's overlays next to the maps (the
    # host threads only encode PNGs); `report.overlay` is the per-image
    # numpy form of the same picture.
    qmaps = np.zeros((len(valid),) + outputs[0][2].shape, np.float32)
    for k, _, qmap in outputs:
      qmaps[k] = qmap
    ovs = np.asarray(report_lib.overlay_batch(
        batch["image"], qmaps, np.asarray(batch["fov_mask"], bool)))
  for k, id_, qmap in outputs:
    writes.append(pool.submit(
        _write_outputs, out_dir, id_, qmap,
        None if ovs is None else ovs[k],
        None if logits is None else np.asarray(logits[k], np.float32)))
    writes.append(pool.submit(report_lib.write_card_files, out_dir, id_,
                              np.asarray(batch["image"][k]), qmap))
  return rows, writes


def _write_outputs(out_dir, id_, qmap, overlay=None, logits=None):
  if logits is not None:
    lp = os.path.join(out_dir, "logits", id_ + ".npy")
    np.save(lp + ".tmp.npy", logits)
    os.replace(lp + ".tmp.npy", lp)
  if overlay is not None:
    report_lib.write_png(os.path.join(out_dir, "overlays", id_ + ".png"),
                         overlay)
  # The map goes last: its presence marks the image as finished.
  path = os.path.join(out_dir, "maps", id_ + ".npy")
  tmp = path + ".tmp.npy"
  np.save(tmp, qmap)
  os.replace(tmp, path)


def _write_csv(path: str, rows: Iterable[dict]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=SCORE_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({c: r.get(c, "") for c in SCORE_COLUMNS})
  os.replace(tmp, path)


class _NullBar:
  def update(self, n):
    pass

  def close(self):
    pass


def _progress_bar(total, enabled, desc):
  if not enabled or total == 0:
    return _NullBar()
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, unit="img", file=sys.stderr)
