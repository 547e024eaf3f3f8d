"""The bundled default model: how it is built, from data any machine makes.

    efiqa build-default-model --config configs/teacher_default.py \\
        --workdir runs/teacher_default --out efiqa_jax/assets/teacher_default

1. trains a VUAD teacher (`efiqa_jax.teacher.train`) on label-free vessel maps
   of clean synthetic photographs (efiqa_jax.synth), as the config says;
2. calibrates on NEW synthetic photographs (seeds disjoint from training),
   degraded with the project's degradations:
   - the pixel threshold on |f(x)| that maximises the map's AUROC against the
     degradation masks (the reference's 0.02 assumes R2-V2's crisp maps; our
     label-free maps are softer, so the threshold is measured, not assumed);
   - the grade cut-offs on `quality` that best reproduce the synthetic grades
     (balanced accuracy over good/usable/reject);
3. writes the teacher with that calibration in its sidecar.
Quality labels of real photographs are used nowhere.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from efiqa_jax import metrics
from efiqa_jax import quality as quality_lib

THRESHOLDS = (0.01, 0.015, 0.02, 0.03, 0.045, 0.06, 0.08, 0.1, 0.13)


@dataclasses.dataclass
class Calibration:
  anomaly_threshold: float
  good_min: float
  usable_min: float
  map_auroc: float
  grade_balanced_accuracy: float
  threshold_sweep: dict
  n_images: int


def _synthetic_validation(n: int, seed: int, size: int):
  from efiqa_jax import synth  # pylint: disable=g-import-not-at-top
  imgs, fovs, masks, grades = [], [], [], []
  for i in range(n):
    s = synth.generate(seed + i, size)
    imgs.append(s.image)
    fovs.append(s.fov_mask)
    masks.append(s.degradation)
    grades.append(s.labels["grade"])
  return np.stack(imgs), np.stack(fovs), np.stack(masks), grades


def calibrate(quality_model, *, n: int = 96, seed: int = 900_000,
              batch: int = 8, progress: bool = True) -> Calibration:
  """Measures the anomaly threshold and grade cut-offs on synthetic data."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from efiqa_jax import quality_model as qm  # pylint: disable=g-import-not-at-top

  qmod = quality_model
  imgs, fovs, masks, grades = _synthetic_validation(n, seed, qmod.work_size)
  teacher = nnx.merge(qmod._graphdef, qmod._state)  # pylint: disable=protected-access
  anom_fn = jax.jit(lambda x, f: qm.teacher_anomaly(
      teacher, x, f, teacher_size=qmod.teacher_size))
  anomalies, fov_ts = [], []
  it = range(0, n, batch)
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    it = tqdm(it, desc="calibrate", unit="batch")
  for s in it:
    a, f = anom_fn(imgs[s:s + batch], fovs[s:s + batch])
    anomalies.append(np.asarray(a))
    fov_ts.append(np.asarray(f))
  anomaly = np.concatenate(anomalies)
  fov_t = np.concatenate(fov_ts)

  sweep = {}
  best = None
  for t in THRESHOLDS:
    maps = np.asarray(qm.pool_anomaly(anomaly, fov_t, threshold=t))
    ys, ss, ws = [], [], []
    for k in range(n):
      w = quality_lib.fov_at(fovs[k], maps[k].shape)
      y = quality_lib.fov_at(masks[k], maps[k].shape) >= 0.5
      ys.append(y.ravel()); ss.append(maps[k].ravel()); ws.append(w.ravel())
    auc = metrics.auroc(np.concatenate(ys), np.concatenate(ss),
                        np.concatenate(ws))
    sweep[str(t)] = round(float(auc), 4)
    if best is None or auc > best[1]:
      best = (t, auc, maps)
  t, auc, maps = best
  q = np.array([quality_lib.summarise(
      maps[k], quality_lib.fov_at(fovs[k], maps[k].shape))[0]
                for k in range(n)])
  good_min, usable_min, bacc = fit_grade_cutoffs(q, grades)
  return Calibration(float(t), good_min, usable_min, float(auc), bacc, sweep,
                     n)


def fit_grade_cutoffs(quality, grades) -> tuple[float, float, float]:
  """Cut-offs (good_min > usable_min) maximising balanced accuracy."""
  q = np.asarray(quality, np.float64)
  g = np.asarray(grades)
  cands = np.unique(np.round(np.concatenate([q, [0.0, 1.0]]), 4))
  present = [c for c in quality_lib.GRADES if np.any(g == c)]
  best = (quality_lib.GOOD_MIN, quality_lib.USABLE_MIN, -1.0)
  for i, lo in enumerate(cands):
    for hi in cands[i + 1:]:
      pred = np.where(q >= hi, "good", np.where(q >= lo, "usable", "reject"))
      bacc = np.mean([np.mean(pred[g == c] == c) for c in present])
      if bacc > best[2] + 1e-12:
        best = (float(hi), float(lo), float(bacc))
  return best


def build_default_model(config_spec: str, workdir: str, out: str, *,
                        overrides=(), calib_n: int = 96,
                        progress: bool = True) -> dict:
  """Train (or resume), calibrate and write the default model to `out`."""
  import shutil  # pylint: disable=g-import-not-at-top
  from efiqa_jax import checkpoints, config_util  # pylint: disable=g-import-not-at-top
  from efiqa_jax import quality_model as qm  # pylint: disable=g-import-not-at-top
  from efiqa_jax.teacher import train  # pylint: disable=g-import-not-at-top

  config = config_util.load_config(config_spec, list(overrides))
  res = train.train_and_evaluate(config, workdir)
  export = res.export_dir or os.path.join(workdir, "export")
  model, meta = checkpoints.load_model(export)
  meta = {k: v for k, v in meta.items()
          if k not in ("format", "version", "architecture", "kwargs")}
  work_size = int(config.get("work_size", 512))
  qmod = qm.TeacherQualityModel(model, dict(meta, work_size=work_size),
                                name="default")
  cal = calibrate(qmod, n=calib_n, progress=progress)
  meta.update(
      name="efiqa-default-teacher", work_size=work_size,
      image_size=int(config.image_size),
      anomaly_threshold=cal.anomaly_threshold,
      grading={"good_min": round(cal.good_min, 4),
               "usable_min": round(cal.usable_min, 4)},
      calibration=dataclasses.asdict(cal),
      built_by=("efiqa build-default-model --config " + config_spec +
                "".join(" " + o for o in overrides)))
  if os.path.isdir(out):
    shutil.rmtree(out)
  checkpoints.save_model(out, model, meta)
  with open(os.path.join(out, "calibration.json"), "w") as f:
    json.dump(dataclasses.asdict(cal), f, indent=2)
  return meta
