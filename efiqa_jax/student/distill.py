"""`efiqa distill`: teacher pseudo-labels -> feature extraction -> adapter.

One command for EFIQA's stages 1 -> 2 on a folder of photographs (or a
prepared folder, `efiqa prepare --size WORK_SIZE`, or a tfds: dataset: the
same outputs; --preprocess efiqa needs the whole photographs, so not a
prepared folder):
  WORKDIR/pseudo/    `efiqa pseudo-label --from-photos` (teacher anomaly on
                     the label-free vessel map of the 512 FOV crop), on the
                     adapter's output grid (14x14 for the linear adapter at
                     224 with /16 patches; 16x16 for EFIQA-CP at 1024);
  WORKDIR/features/  `efiqa extract` with the run's preprocessing: fov (the
                     default: the same FOV crop as the pseudo-labels) or
                     efiqa (the whole photograph, as EFIQA's extractor);
  WORKDIR/pseudo_efiqa/  efiqa only: the pseudo-labels on the photograph's
                     frame (`photograph_labels`: each photograph's anomaly
                     map placed back through its crop square, then the same
                     labelling rule on the encoder's token grid);
  WORKDIR/train/     `efiqa train-adapter` from those two (resumable), the
                     final adapter in WORKDIR/train/adapter; it records the
                     preprocessing, which `efiqa assess` then follows.
Re-running the command resumes every stage (pseudo-labels and features
already on disk are kept; training restarts from its checkpoint).
"""
from __future__ import annotations

import io
import json
import os
import sys
from typing import Sequence

import numpy as np


def label_grid(config, encoder: str) -> tuple[int, int]:
  """The adapter's output grid for the config's encoder input size."""
  from flax import nnx
  from efiqa_jax import checkpoints
  from efiqa_jax.models import adapters
  meta = checkpoints.check_kind(encoder, "encoder")
  if meta["architecture"] != "vit":
    raise ValueError(f"{encoder} is not a ViT encoder")
  p = int(meta["kwargs"]["patch_size"])
  d = int(meta["kwargs"]["hidden_size"])
  if config.size % p:
    raise ValueError(f"size {config.size} is not a multiple of {p}")
  g = config.size // p
  ada = nnx.eval_shape(lambda: adapters.build_adapter(
      config.adapter.name, d, **dict(config.adapter.kwargs)))
  return ada.output_grid(g, g)


def anomaly_on_photograph(anomaly: np.ndarray, crop: Sequence[int],
                          h: int, w: int, n: int) -> np.ndarray:
  """A crop-square map (T, T) -> (n, n) samples over the photograph frame
  (sample (i, j) at original edge coordinates ((j + 0.5) w / n, (i + 0.5) h
  / n)), nearest; 0 outside the crop square. crop = (x0, y0, side)."""
  x0, y0, side = (int(v) for v in crop)
  t = anomaly.shape[0]
  xe = (np.arange(n) + 0.5) * (w / n)
  ye = (np.arange(n) + 0.5) * (h / n)
  u = np.floor((xe - x0) / side * t).astype(np.int64)
  v = np.floor((ye - y0) / side * t).astype(np.int64)
  iu, iv = (u >= 0) & (u < t), (v >= 0) & (v < t)
  out = anomaly[np.clip(v, 0, t - 1)][:, np.clip(u, 0, t - 1)]
  return np.where(iv[:, None] & iu[None, :], out, 0.0).astype(np.float32)


def photograph_labels(pseudo_dir: str, out_dir: str, spec, *,
                      work_size: int, progress: bool = False,
                      inputs=None) -> dict:
  """Pseudo-labels of `pseudo_dir` (FOV crop frame) -> the photograph frame.

  For each photograph labelled there: its anomaly map (teacher resolution
  T, over the crop square of `fundus.prepare_fundus(path, work_size)`, the
  call the labels were made with) is sampled on an n x n grid over the
  whole photograph (n = spec.grid * ceil(T / spec.grid)), 0 outside the
  crop square, and labelled with the same rule (`pseudo_labels.
  patch_labels`). Writes out_dir/labels/<id>.png and out_dir/spec.json
  (frame 'efiqa'), local or gs://; resumes (labels already there with the
  same spec are kept). inputs: the `sources.Inputs` labelled there, whose
  records are read (a tfds: record's bytes) instead of the manifest's
  paths. Multi-host: process 0 checks and writes spec.json, each process
  labels its `runtime.process_slice` of the photographs.
  Returns counts {'total', 'ok', 'failed'} over all processes."""
  import dataclasses
  from PIL import Image
  from efiqa_jax import files
  from efiqa_jax import fundus
  from efiqa_jax import pseudo_labels
  from efiqa_jax import runtime
  from efiqa_jax import sources

  files.makedirs(files.join(out_dir, "labels"))
  rule = {"frame": "efiqa", "from": os.fspath(files.abs_path(pseudo_dir)),
          "work_size": int(work_size), "rule": dataclasses.asdict(spec)}
  spec_path = files.join(out_dir, "spec.json")
  error = None
  if runtime.is_primary():
    error = ""
    if files.exists(spec_path):
      if files.read_json(spec_path) != rule:
        error = (f"{out_dir} holds photograph-frame labels made with other "
                 "settings; use another workdir")
    else:
      files.atomic_write_text(spec_path, json.dumps(rule, indent=1))
    error = error.encode()
  error = runtime.broadcast_bytes("distill-photograph-spec", error).decode()
  if error:
    raise ValueError(error)
  _, rows = files.read_csv(files.join(pseudo_dir, "manifest.csv"))
  rows = [r for r in rows if r["status"] == "ok"]
  record_of = ({i: k for k, i in enumerate(inputs.ids)} if inputs is not None
               else {})
  n_ok = failed = 0
  for r in rows[runtime.process_slice(len(rows))]:
    dst = files.join(out_dir, "labels", r["id"] + ".png")
    if files.exists(dst):
      n_ok += 1
      continue
    k = record_of.get(r["id"])
    src = (r["image"] if k is None
           else sources.record_source(inputs.source[k]))
    prep = fundus.prepare_fundus(src, size=work_size)
    if not prep.ok:  # the labels were made, so this only happens if the
      failed += 1    # file changed since
      print(f"distill: {r['image']}: {prep.status} {prep.message}",
            file=sys.stderr)
      continue
    a = files.load_npy(files.join(pseudo_dir, "anomaly", r["id"] + ".npy"))
    n = spec.grid * -(-a.shape[0] // spec.grid)
    on_photo = anomaly_on_photograph(
        a, (prep.crop_x0, prep.crop_y0, prep.crop_size), prep.orig_h,
        prep.orig_w, n)
    buf = io.BytesIO()
    Image.fromarray(pseudo_labels.patch_labels(on_photo, spec)).save(buf,
                                                                     "PNG")
    files.atomic_write_bytes(dst, buf.getvalue())
    n_ok += 1
  counts = [json.loads(t) for t in runtime.all_gather_text(
      "distill-photograph-labels", json.dumps([n_ok, failed]))]
  n_ok, failed = (sum(c[k] for c in counts) for k in (0, 1))
  if progress and runtime.is_primary():
    print(f"distill: {n_ok} pseudo-labels on the photograph frame "
          f"({out_dir})", file=sys.stderr)
  return {"total": len(rows), "ok": n_ok, "failed": failed}


def distill(inputs: Sequence[str], teacher: str, encoder: str, workdir: str,
            config, *, batch_size: int = 8, progress: bool = True,
            preprocess: str | None = None):
  """Runs the three stages; returns train.TrainResult. preprocess: efiqa |
  fov (default config.preprocess, else fov)."""
  from efiqa_jax import files
  from efiqa_jax import pseudo_labels
  from efiqa_jax import runtime
  from efiqa_jax import sources
  from efiqa_jax.encoders import extract
  from efiqa_jax.encoders import preprocess as pp
  from efiqa_jax.student import train

  progress_here = progress and runtime.is_primary()  # one report
  preprocess = pp.check_preprocess(
      preprocess or config.get("preprocess") or pp.DEFAULT_PREPROCESS)
  # No image: NoInputsError before any work; prepared crops of another
  # size, or for whole-photograph features, refused in one line.
  resolved = sources.resolve_inputs([os.fspath(p) for p in inputs])
  if preprocess == "efiqa":
    resolved.require_photographs("--preprocess efiqa reads whole photographs")
  resolved.check_size(config.work_size, "config.work_size")
  workdir = files.output_dir(workdir)  # local or gs://
  oh, ow = label_grid(config, encoder)
  if oh != ow:
    raise ValueError(f"non-square label grid {oh}x{ow}")
  pdir = files.join(workdir, "pseudo")
  pl = config.get("pseudo_labels", {})
  spec, origin = pseudo_labels.teacher_label_spec(
      teacher, oh, threshold=pl.get("threshold"), relax=pl.get("relax"))
  if progress_here:
    print(f"distill: pseudo-labels |f(x)| > {spec.threshold:g} on "
          f">= {spec.relax:g} of a cell ({origin})", file=sys.stderr)
  # Resumes: photographs already labelled (same rule) are skipped.
  res = pseudo_labels.write_pseudo_labels(
      list(inputs), teacher, pdir, from_photos=True, spec=spec,
      batch_size=batch_size, work_size=config.work_size, progress=progress)
  if res["failed"] and runtime.is_primary():
    print(f"distill: {res['failed']} of {res['total']} photographs got no "
          f"pseudo-label (see {pdir}/manifest.csv)", file=sys.stderr)
  if preprocess == "efiqa":
    edir = files.join(workdir, "pseudo_efiqa")
    photograph_labels(pdir, edir, spec, work_size=config.work_size,
                      progress=progress, inputs=resolved)
    pdir = edir
  fdir = files.join(workdir, "features")
  extract.extract_features(list(inputs), encoder, fdir, size=config.size,
                           work_size=config.work_size, batch_size=batch_size,
                           preprocess=preprocess, progress=progress)
  with config.unlocked():
    config.mode = "features"
    config.features_dir = fdir
    config.labels_dir = pdir
    config.preprocess = preprocess
    config.progress = progress and config.progress
  return train.train_and_evaluate(config, files.join(workdir, "train"))
