"""`efiqa calibrate`: image-level decisions from quality maps.

Default pooling (no calibration; `quality.summarise`, documented in
efiqa_jax/quality.py): quality = 1 - mean of the map over the FOV, grade by
fixed cut-offs.

The paper's option 1 (efiqa-method.md §1.6): learnable weighted pooling
  acceptable = 1[ sum_hw W_hw Q_hw < tau ]
with the encoder and adapter frozen (the map does not change). We fit W
(gh x gw) and tau as a logistic model p(acceptable) = sigmoid(tau - <W, Q>)
with AdamW (paper: 50,000 iterations, batch 32, lr 3e-4), on the maps that
`efiqa assess` wrote (probabilities, 0 outside the FOV). Stratified K-fold
cross-validation reports out-of-fold AUROC / BAcc (the threshold protocol of
`efiqa evaluate`); the final W, tau are fitted on all images.

The calibration file (JSON) that `efiqa assess --calibration` reads:
  {"format": "efiqa-calibration", "version": 1,
   "pooling": {"kind": "weighted", "weights": [[...]] (gh x gw), "tau": t},
   "grading": {"good_min": g, "usable_min": u},   # on the pooled quality
   "cv": {...}, "fit": {...}}
With a calibration, quality = sigmoid(tau - <W, map>) (probability that the
image is acceptable) and grade = good >= good_min, usable >= usable_min.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

FORMAT = "efiqa-calibration"


@dataclasses.dataclass
class WeightedPooling:
  weights: np.ndarray   # (gh, gw)
  tau: float

  def logit(self, qmap: np.ndarray) -> float:
    q = np.asarray(qmap, np.float64)
    if q.shape != self.weights.shape:
      raise ValueError(f"map {q.shape} does not match the calibration's "
                       f"weights {self.weights.shape}")
    return float(self.tau - np.sum(self.weights * q))

  def summarise(self, qmap: np.ndarray, fov_weight: np.ndarray
                ) -> tuple[float, float]:
    """(quality = p(acceptable), degraded_fraction as the default)."""
    from efiqa_jax import quality as quality_lib
    _, frac = quality_lib.summarise(qmap, fov_weight)
    z = self.logit(qmap)
    return float(1.0 / (1.0 + np.exp(-z))), frac


def load_calibration(path: str) -> dict:
  from efiqa_jax import files  # pylint: disable=g-import-not-at-top
  cal = files.read_json(path)
  if cal.get("format") != FORMAT:
    raise ValueError(f"{path} is not an efiqa calibration file")
  return cal


def pooling_from(cal: dict) -> WeightedPooling | None:
  p = cal.get("pooling")
  if not p or p.get("kind") == "default":
    return None
  if p.get("kind") != "weighted":
    raise ValueError(f"unknown pooling kind {p.get('kind')!r}")
  return WeightedPooling(np.asarray(p["weights"], np.float64), float(p["tau"]))


def fit_weighted_pooling(maps: np.ndarray, acceptable: np.ndarray, *,
                         steps: int = 50000, batch: int = 32,
                         lr: float = 3e-4, weight_decay: float = 0.0,
                         seed: int = 0) -> WeightedPooling:
  """Logistic fit of p(acceptable) = sigmoid(tau - <W, Q>) with AdamW.

  A task on `efiqa_jax.trainer`, in memory on one local device: batch s
  draws `batch` maps with replacement from `default_rng([seed, s])`; 1000
  steps per jitted call."""
  import jax.numpy as jnp
  import optax
  from efiqa_jax import trainer

  x = np.asarray(maps, np.float32)
  y = np.asarray(acceptable, np.float32)
  n, gh, gw = x.shape
  b = min(batch, n)
  # Start at "mean of the map": W uniform, tau at the data's mean pooled map.
  w0 = np.full((gh, gw), 1.0 / (gh * gw), np.float32)
  tau0 = np.float32(np.mean(np.sum(x * w0, (1, 2))))

  def batches():
    for s in range(steps):
      idx = np.random.default_rng([seed, s]).integers(0, n, b)
      yield {"x": x[idx], "y": y[idx]}

  def loss(p, bt, rng, step):
    del rng, step
    z = p["tau"] - jnp.sum(p["w"] * bt["x"], (1, 2))
    return jnp.mean(optax.sigmoid_binary_cross_entropy(z, bt["y"])), {}

  res = trainer.fit(
      trainer.Task(name="calibrate", loss=loss, batches=batches,
                   global_batch=b,
                   build=lambda: {"w": jnp.asarray(w0), "tau": jnp.asarray(
                       tau0)}),
      trainer.TrainConfig(total_steps=steps, seed=seed, lr=lr,
                          weight_decay=weight_decay, mesh="local",
                          log_every=steps, steps_per_call=min(1000, steps),
                          progress=False), None)
  return WeightedPooling(np.asarray(res.params["w"], np.float64),
                         float(res.params["tau"]))


def check_student_run(scores: list[dict], assess_dir: str) -> None:
  """Refuses, before any fitting, a run that `assess --calibration` could not
  use: the calibration is the student's pooling (its map grid), and assess
  takes --calibration only with --model student."""
  models = sorted({r.get("model", "") for r in scores
                   if r.get("status") == "ok"})
  others = [m for m in models if m and m != "student"]
  if others:
    raise ValueError(
        f"{assess_dir} was assessed with model {others[0]!r}, not the "
        "student: `efiqa calibrate` fits the student's pooling, which only "
        "`efiqa assess --model student --calibration` reads (a teacher's "
        "cut-offs come from `efiqa calibrate-teacher`)")


def calibrate(assess_dir: str, labels_csv: str, out_path: str, *,
              label_column: str = "label", positive: str = "1",
              folds: int = 5, steps: int = 50000, batch: int = 32,
              lr: float = 3e-4, seed: int = 0) -> dict:
  """Fits option 1 on `efiqa assess` output + binary labels (positive =
  acceptable) and writes the calibration JSON."""
  from efiqa_jax import evaluate as ev
  from efiqa_jax import metrics

  from efiqa_jax import files  # pylint: disable=g-import-not-at-top
  scores_csv = files.join(assess_dir, "scores.csv")
  if not files.isfile(scores_csv):
    raise FileNotFoundError(f"{assess_dir} has no scores.csv (give the "
                            "folder `efiqa assess --model student` wrote)")
  scores = ev.read_csv(scores_csv)
  check_student_run(scores, assess_dir)
  pairs, info = ev.join(scores, ev.read_csv(labels_csv), label_column)
  maps, y = [], []
  for sr, lr_ in pairs:
    mp = files.join(assess_dir, "maps", sr["id"] + ".npy")
    if not files.exists(mp):
      info.setdefault("map_missing", []).append(sr["id"])
      continue
    maps.append(files.load_npy(mp))
    y.append(lr_[label_column].strip() == positive)
  if not maps:
    raise ValueError("no labelled image has a map")
  shapes = {m.shape for m in maps}
  if len(shapes) != 1:
    raise ValueError(f"maps of different shapes {sorted(shapes)}")
  maps, y = np.stack(maps), np.asarray(y, bool)
  if y.all() or not y.any():
    raise ValueError("calibration needs acceptable and rejected images")
  k = max(2, min(folds, int(min(y.sum(), (~y).sum()))))
  fold = ev.stratified_folds(y, k, seed)
  oof = np.zeros(len(y))
  for f in range(k):
    tr = fold != f
    pool = fit_weighted_pooling(maps[tr], y[tr], steps=steps, batch=batch,
                                lr=lr, seed=seed + f)
    oof[~tr] = [pool.logit(m) for m in maps[~tr]]
  pred, _ = ev.kfold_predictions(y, oof, k, seed)
  default_q = 1.0 - maps.reshape(len(y), -1).mean(1)
  cv = {"folds": k, "oof_auroc": metrics.auroc(y, oof),
        "oof_bacc_at_0": ev.balanced_accuracy(y, oof >= 0),
        "oof_bacc_kfold_threshold": ev.balanced_accuracy(y, pred),
        "default_pooling_auroc": metrics.auroc(y, default_q)}
  final = fit_weighted_pooling(maps, y, steps=steps, batch=batch, lr=lr,
                               seed=seed)
  z = np.array([final.logit(m) for m in maps])
  t = ev.best_bacc_threshold(y, z)
  good_min = float(1 / (1 + np.exp(-t))) if np.isfinite(t) else 1.0
  cal = {"format": FORMAT, "version": 1,
         "pooling": {"kind": "weighted", "weights": final.weights.tolist(),
                     "tau": final.tau, "input": "assess maps (probability)"},
         # Binary labels give one cut: acceptable -> good, else reject.
         "grading": {"good_min": good_min, "usable_min": good_min},
         "cv": cv, "fit": {"n": int(len(y)), "acceptable": int(y.sum()),
                           "steps": steps, "batch": batch, "lr": lr,
                           "seed": seed, **info}}
  files.atomic_write_text(out_path, json.dumps(cal, indent=1))
  return cal
