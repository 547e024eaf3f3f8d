"""`efiqa assess`: photographs in, a quality map, score and grade out.

Output contract (also in the README):
  DIR/scores.csv        one row per input, in input order, none dropped
  DIR/maps/<id>.npy     float32 (h, w) in [0, 1]: probability that the region is
                        degraded; covers the crop square (the student with
                        preprocessing efiqa: the whole photograph, resized
                        to a square, and the crop columns are empty); 0
                        outside the FOV
  DIR/overlays/<id>.png heat-map overlay on the FOV crop (or that square)
  DIR/logits/<id>.npy   (save_logits, student only) float32 (gh, gw) raw
                        adapter logits before any post-processing
  DIR/report.html       the report (report.write_report); its pictures in
                        DIR/report/ (<id>.jpg FOV crop or that square,
                        <id>.png map layer)

  DIR/run.json          the settings the results were made with

Runs on the inference driver (`efiqa_jax.driver`). Resumability: each
finished image's row enters the journal (DIR/.journal/) after its map and
overlay are on disk. A re-run with the same settings skips finished ids; a
line cut by a kill is ignored and that image redone; another model or
settings is refused with the difference unless overwrite=True. scores.csv
and report.html are rewritten from the journal in input order at the end,
so an interrupted-then-resumed run ends with the same scores.csv as an
uninterrupted one.

Multi-host: the work still to do is decided once by process 0; every
process takes its strided share, writes its own journal and maps; process 0
writes scores.csv and the report after a barrier.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from efiqa_jax import __version__
from efiqa_jax import quality as quality_lib
from efiqa_jax import report as report_lib
from efiqa_jax.kernels import png

if TYPE_CHECKING:
  from efiqa_jax.quality_model import QualityModel

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
           progress: bool = True,
           quality_model: QualityModel | None = None,
           save_logits: bool = False,
           model_kwargs: dict | None = None,
           overwrite: bool = False,
           max_steps: int | None = None) -> AssessResult:
  """Assesses photographs; see the module docstring for the contract.

  model_kwargs go to `quality_model.load_quality_model` (for the student:
  encoder=, adapter=, calibration=). num_threads (decode/FOV threads):
  default min(4, CPU cores) (more threads than cores only take the cores the
  jitted maps run on). The writer pool has max(num_threads, min(8, cores))
  threads. batch_size: photographs per step over all processes. A folder
  holding results of another model or settings is refused
  (`driver.UsageError`, with the difference) unless `overwrite`.
  """
  from efiqa_jax import driver  # pylint: disable=g-import-not-at-top
  from efiqa_jax import files  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top

  from efiqa_jax import quality_model as qm_lib  # pylint: disable=g-import-not-at-top
  if quality_model is not None and not isinstance(quality_model,
                                                  qm_lib.QualityModel):
    raise TypeError(f"{type(quality_model).__name__} is not a "
                    "quality_model.QualityModel")
  if num_threads is None:
    num_threads = default_num_threads()
  if isinstance(inputs, (str, os.PathLike)):
    inputs = [inputs]
  resolved = sources.resolve_inputs([os.fspath(p) for p in inputs])
  paths, ids = resolved.paths, resolved.ids
  out = driver.output_dir(out_dir)
  model_kwargs = {k: v for k, v in (model_kwargs or {}).items()
                  if v is not None}
  if quality_model is None:
    quality_model = qm_lib.load_quality_model(model, **model_kwargs)
  note = quality_model.preprocess_note()
  if note:  # the student: what it reads
    print(f"efiqa assess: {note}", file=sys.stderr)
  model_name = quality_model.name
  own_prepare = quality_model.assess_prepare()
  if own_prepare is not None:
    resolved.require_photographs(
        f"model {model_name!r} reads whole photographs (--preprocess efiqa)")
  resolved.check_size(quality_model.work_size, f"model {model_name!r}")
  if save_logits and not quality_model.has_logits:
    raise ValueError(f"model {model_name!r} has no logits (--save-logits is "
                     "for --model student)")
  model_files = {}
  if model not in ("default", "teacher", "student"):
    model_files["model"] = files.identity(model)
  for k in ("encoder", "adapter", "calibration"):
    if k in model_kwargs:
      model_files[k] = files.identity(model_kwargs[k])
  fingerprint = {
      "model": model_name, "model_files": model_files,
      "model_options": {k: v for k, v in model_kwargs.items()
                        if k not in model_files},
      "model_meta": quality_model.meta,
      "work_size": quality_model.work_size,
      "overlays": bool(overlays), "save_logits": bool(save_logits),
  }
  subs = (("maps",) + (("overlays",) if overlays else ())
          + (("logits",) if save_logits else ()))
  for sub in subs:
    (out / sub).mkdir(parents=True, exist_ok=True)

  def step(host):
    return _assess_step(quality_model, host, overlays, save_logits)

  def write(rec, res):
    return _write_record(out, rec, res, quality_model, subs)

  def done_files(row):
    return [f"{sub}/{row['id']}{'.png' if sub == 'overlays' else '.npy'}"
            for sub in subs]

  def finish(rows, out):
    final = [dict(r, image=p) if r.get("status") != "pending" else
             _failure_row(p, r["id"], "pending", r["message"], model_name)
             for r, p in zip(rows, paths)]
    _write_csv(out / "scores.csv", final)
    report_lib.write_report(os.fspath(out / "report.html"), final,
                            f"efiqa assess — {len(final)} images, model "
                            f"{model_name}",
                            grading=quality_model.grading)

  task = driver.Task(
      command="assess", fingerprint=fingerprint,
      # A model may read photographs its own way (the student's efiqa path).
      prepare=own_prepare or sources.PrepareFundus(quality_model.work_size),
      step=step,
      write=write,
      done_files=done_files,
      clear=("maps/*", "overlays/*", "logits/*",
             f"{report_lib.REPORT_FILES}/*", "scores.csv", "report.html"),
      temporaries=tuple(f"{sub}/*.tmp-*" for sub in subs) + ("*.tmp-*",),
      finish=finish)
  # Writers get their own thread count: with decode worker processes
  # num_threads is per worker (often 1), too few to encode PNGs.
  res = driver.run(task, paths, out, ids=ids, source=resolved.source,
                   batch_size=batch_size,
                   overwrite=overwrite, num_workers=num_workers,
                   read_threads=num_threads,
                   writers=max(1, num_threads, min(8, os.cpu_count() or 1)),
                   progress=progress, max_steps=max_steps)
  if not res.rows:
    code = EXIT_NO_INPUTS
  else:
    code = EXIT_OK if res.failed == 0 else EXIT_SOME_FAILED
  return AssessResult(os.fspath(out), res.total, res.ok, res.failed,
                      res.skipped, code, os.fspath(out / "scores.csv"))


def _assess_step(quality_model, batch, overlays, save_logits):
  """One batch on the device: masked maps, FOV weights, overlays, logits,
  class probabilities (rows that are not ok hold zeros); None when no row
  is ok."""
  valid = np.asarray(batch["valid"], bool)
  ok = np.asarray(batch["ok"], bool) & valid
  if not ok.any():
    return None
  # Maps, logits and (the student with an EyeQ head) class probabilities
  # from one pass.
  out = quality_model.predict_all(batch["image"], batch["fov_mask"],
                                  encoder_images=batch.get("encoder_image"))
  maps, probs = out["maps"], out["class_probs"]
  logits = out["logits"] if save_logits else None
  maps = np.asarray(maps, np.float32)
  qmaps, ws = np.zeros_like(maps), np.zeros_like(maps)
  for k in np.flatnonzero(ok):
    w = quality_lib.fov_at(np.asarray(batch["fov_mask"][k], bool),
                           maps[k].shape)
    qmaps[k] = np.where(w > 0, maps[k], 0.0)
    ws[k] = w
  ovs = None
  if overlays:
    # One jitted call renders the batch's overlays next to the maps (the
    # host threads only encode PNGs); `report.overlay` is the per-image
    # numpy form of the same picture.
    ovs = np.asarray(report_lib.overlay_batch(
        batch["image"], qmaps, np.asarray(batch["fov_mask"], bool)))
  return {"map": qmaps, "w": ws, "overlay": ovs,
          "logits": None if logits is None else np.asarray(logits,
                                                           np.float32),
          "probs": None if probs is None else np.asarray(probs)}


def _write_record(out, rec, res, quality_model, subs):
  """Files of one photograph (the map last) and its scores.csv row; a
  photograph that now fails loses the files of an earlier run."""
  from efiqa_jax import driver  # pylint: disable=g-import-not-at-top
  id_ = rec["id"]
  names = {"logits": out / "logits" / f"{id_}.npy",
           "overlays": out / "overlays" / f"{id_}.png",
           "report_jpg": out / report_lib.REPORT_FILES / f"{id_}.jpg",
           "report_png": out / report_lib.REPORT_FILES / f"{id_}.png",
           "maps": out / "maps" / f"{id_}.npy"}
  if not rec["ok"]:
    for f in names.values():
      if f.exists():
        f.unlink()
    return _failure_row(rec["path"], id_, rec["status"], rec["message"],
                        quality_model.name)
  qmap, w = res["map"], res["w"]
  message = rec["message"]
  # A calibrated model pools its own way (efiqa calibrate).
  q, frac = quality_model.summarise(qmap, w)
  if res["probs"] is not None:  # EyeQ head: its class
    grade = quality_lib.GRADES[int(np.argmax(res["probs"]))]
  else:
    grade = quality_model.grading.grade(q)
  cx, cy, r = (float(v) for v in rec["fov"])
  x0, y0, side = (int(v) for v in rec["crop"][:3])
  if side <= 0:  # the map covers the whole photograph, not a crop square
    x0 = y0 = side = ""
  if "logits" in subs:
    driver.write_npy(names["logits"], np.asarray(res["logits"], np.float32))
  if res["overlay"] is not None:
    driver.write_atomic(names["overlays"],
                        png.encode_png(np.asarray(res["overlay"])))
  report_lib.write_card_files(os.fspath(out), id_, np.asarray(rec["image"]),
                              np.asarray(qmap, np.float32))
  # The map goes last: its presence marks the image as finished.
  driver.write_npy(names["maps"], np.asarray(qmap, np.float32))
  return {
      "image": rec["path"], "id": id_, "status": "ok", "message": message,
      "quality": round(q, 6), "grade": grade,
      "degraded_fraction": round(frac, 6),
      "fov_cx": round(cx, 3), "fov_cy": round(cy, 3), "fov_r": round(r, 3),
      "crop_x0": x0, "crop_y0": y0, "crop_size": side,
      "model": quality_model.name, "version": __version__,
  }


def _write_csv(path, rows: Iterable[dict]) -> None:
  from efiqa_jax import driver  # pylint: disable=g-import-not-at-top
  driver.write_csv(path, SCORE_COLUMNS, rows)
