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
import os

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
  with open(path) as f:
    cal = json.load(f)
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
  """Logistic fit of p(acceptable) = sigmoid(tau - <W, Q>) with AdamW."""
  import jax
  import jax.numpy as jnp
  import optax

  x = jnp.asarray(maps, jnp.float32)
  y = jnp.asarray(acceptable, jnp.float32)
  n, gh, gw = x.shape
  # Start at "mean of the map": W uniform, tau at the data's mean pooled map.
  w0 = jnp.full((gh, gw), 1.0 / (gh * gw), jnp.float32)
  params = {"w": w0, "tau": jnp.mean(jnp.sum(x * w0, (1, 2)))}
  tx = optax.adamw(lr, weight_decay=weight_decay)
  idx = jax.random.randint(jax.random.key(seed), (steps, min(batch, n)), 0, n)

  def loss_fn(p, xb, yb):
    z = p["tau"] - jnp.sum(p["w"] * xb, (1, 2))
    return jnp.mean(optax.sigmoid_binary_cross_entropy(z, yb))

  def step(carry, ib):
    p, s = carry
    g = jax.grad(loss_fn)(p, x[ib], y[ib])
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  (params, _), _ = jax.jit(lambda c, i: jax.lax.scan(step, c, i))(
      (params, tx.init(params)), idx)
  return WeightedPooling(np.asarray(params["w"], np.float64),
                         float(params["tau"]))


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

  scores_csv = os.path.join(assess_dir, "scores.csv")
  if not os.path.isfile(scores_csv):
    raise FileNotFoundError(f"{assess_dir} has no scores.csv (give the "
                            "folder `efiqa assess --model student` wrote)")
  scores = ev.read_csv(scores_csv)
  check_student_run(scores, assess_dir)
  pairs, info = ev.join(scores, ev.read_csv(labels_csv), label_column)
  maps, y = [], []
  for sr, lr_ in pairs:
    mp = os.path.join(assess_dir, "maps", sr["id"] + ".npy")
    if not os.path.exists(mp):
      info.setdefault("map_missing", []).append(sr["id"])
      continue
    maps.append(np.load(mp))
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
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, "w") as f:
    json.dump(cal, f, indent=1)
  return cal
