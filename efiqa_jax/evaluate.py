"""`efiqa evaluate`: image- and pixel-level metrics with bootstrap CIs.

Tasks:
  binary  (MSHF, mBRSET, DRIMDB; efiqa-method.md §3.1) a score per image
          (default `quality`, higher = acceptable) against a binary label.
          The paper's protocol: stratified K-fold; in each fold the threshold
          maximising balanced accuracy on the K-1 other folds is applied to
          the held-out fold; BAcc, F1, MCC on the pooled out-of-fold
          predictions; AUROC, AUPRC of the score (threshold free). The
          positive class is `--positive` (default "1", acceptable).
  eyeq    3-class (0 good, 1 usable, 2 reject): accuracy, macro precision /
          recall / F1, quadratic weighted kappa, of a predicted class column
          (default `grade`: good/usable/reject or 0/1/2).
  pixel   FunPiQ: maps/<id>.npy (assess output, covering the crop square) put
          back into the photograph's frame (crop_x0, crop_y0, crop_size of
          scores.csv, bilinear; empty crop columns: the map covers the
          whole photograph, the student's efiqa preprocessing) against
          indexed PNG annotations (0 background,
          1 good, 2 usable, 3 bad); background pixels are ignored. QWK over
          the 3 classes at the best pair of thresholds on the map, reject-vs-
          rest Dice at the best threshold, AUROC, AUPRC, sensitivity at 95 %
          specificity. Map values are binned to 1/BINS (exact counts per bin)
          so any number of pixels fits in memory.

CIs: percentile bootstrap over images (`bootstrap` resamples, fixed seed);
for `binary` the out-of-fold predictions are kept fixed and resampled.
Output: DIR/metrics.json and DIR/metrics.md.
"""
from __future__ import annotations

import io
import json
import os
from typing import Callable, Sequence

import numpy as np

from efiqa_jax import files
from efiqa_jax import metrics as rank_metrics

BINS = 10000
EYEQ_CLASSES = {"good": 0, "usable": 1, "reject": 2, "0": 0, "1": 1, "2": 2}


# ----------------------------------------------------------- metric functions


def confusion(y: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
  y, pred = np.asarray(y, bool), np.asarray(pred, bool)
  return (int(np.sum(y & pred)), int(np.sum(~y & pred)),
          int(np.sum(~y & ~pred)), int(np.sum(y & ~pred)))  # tp fp tn fn


def _div(a, b):
  return float(a / b) if b else float("nan")


def balanced_accuracy(y, pred) -> float:
  tp, fp, tn, fn = confusion(y, pred)
  return 0.5 * (_div(tp, tp + fn) + _div(tn, tn + fp))


def f1(y, pred) -> float:
  tp, fp, _, fn = confusion(y, pred)
  return _div(2 * tp, 2 * tp + fp + fn)


def mcc(y, pred) -> float:
  tp, fp, tn, fn = confusion(y, pred)
  den = np.sqrt(float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  return float((tp * tn - fp * fn) / den) if den else 0.0


def average_precision(y, scores, weights=None) -> float:
  """AUPRC as average precision: sum_n (R_n - R_{n-1}) P_n over distinct
  thresholds (descending), as sklearn's average_precision_score."""
  y = np.asarray(y, bool).ravel()
  s = np.asarray(scores, np.float64).ravel()
  w = np.ones_like(s) if weights is None else np.asarray(weights, np.float64)
  if w[y].sum() == 0:
    return float("nan")
  order = np.argsort(-s, kind="mergesort")
  s, y, w = s[order], y[order], w[order]
  last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # end of tie blocks
  tp = np.cumsum(w * y)[last]
  fp = np.cumsum(w * ~y)[last]
  prec = tp / (tp + fp)
  rec = tp / tp[-1]
  return float(np.sum(np.diff(np.r_[0.0, rec]) * prec))


def qwk(y, pred, n_classes: int = 3) -> float:
  """Cohen's kappa with weights (i - j)^2 / (C - 1)^2."""
  o = np.zeros((n_classes, n_classes))
  np.add.at(o, (np.asarray(y, int), np.asarray(pred, int)), 1)
  return qwk_from_confusion(o)


def qwk_from_confusion(o: np.ndarray) -> float:
  c = o.shape[0]
  i, j = np.indices((c, c))
  w = (i - j) ** 2 / (c - 1) ** 2
  n = o.sum()
  if n == 0:
    return float("nan")
  e = np.outer(o.sum(1), o.sum(0)) / n
  den = (w * e).sum()
  return float(1.0 - (w * o).sum() / den) if den else float("nan")


def macro_prf(y, pred, n_classes: int = 3) -> dict:
  p, r, f = [], [], []
  y, pred = np.asarray(y, int), np.asarray(pred, int)
  for c in range(n_classes):
    tp = np.sum((y == c) & (pred == c))
    pc = _div(tp, np.sum(pred == c))
    rc = _div(tp, np.sum(y == c))
    p.append(0.0 if np.isnan(pc) else pc)
    r.append(0.0 if np.isnan(rc) else rc)
    f.append(_div(2 * p[-1] * r[-1], p[-1] + r[-1]) if p[-1] + r[-1] else 0.0)
  return {"precision": float(np.mean(p)), "recall": float(np.mean(r)),
          "f1": float(np.mean(f))}


# ------------------------------------------------- K-fold threshold protocol


def stratified_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
  """Fold index per sample: each class shuffled (seed) and dealt round
  robin, so every fold holds ~1/k of each class."""
  y = np.asarray(y)
  fold = np.empty(len(y), int)
  rng = np.random.default_rng(seed)
  for c in np.unique(y):
    idx = np.flatnonzero(y == c)
    rng.shuffle(idx)
    fold[idx] = np.arange(len(idx)) % k
  return fold


def best_bacc_threshold(y, s) -> float:
  """Threshold t (predict positive when s >= t) maximising BAcc; candidates
  are the distinct scores (plus +inf); ties go to the smallest t."""
  y = np.asarray(y, bool)
  s = np.asarray(s, np.float64)
  cands = np.r_[np.unique(s), np.inf]
  best, best_t = -1.0, cands[0]
  for t in cands:
    b = balanced_accuracy(y, s >= t)
    if b > best + 1e-12:
      best, best_t = b, t
  return float(best_t)


def effective_folds(y, k: int) -> int:
  """Folds the protocol can use: at most the size of the smaller class (a
  stratified fold needs one image of each), at least 2."""
  y = np.asarray(y, bool)
  return max(2, min(int(k), int(min(np.sum(y), np.sum(~y)))))


def kfold_predictions(y, s, k: int = 5, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(out-of-fold predictions, threshold used per sample)."""
  y = np.asarray(y, bool)
  s = np.asarray(s, np.float64)
  k = effective_folds(y, k)
  folds = stratified_folds(y, k, seed)
  pred = np.zeros(len(y), bool)
  thr = np.zeros(len(y))
  for f in range(k):
    test = folds == f
    t = best_bacc_threshold(y[~test], s[~test])
    pred[test] = s[test] >= t
    thr[test] = t
  return pred, thr


# --------------------------------------------------------------- bootstrap


def bootstrap_ci(fn: Callable[[np.ndarray], dict], n: int, n_boot: int,
                 seed: int = 0, alpha: float = 0.05) -> dict:
  """{metric: [lo, hi]} percentile CIs of fn(indices) over resamples."""
  if n_boot <= 0:
    return {}
  rng = np.random.default_rng(seed)
  vals: dict[str, list] = {}
  for _ in range(n_boot):
    for k, v in fn(rng.integers(0, n, n)).items():
      vals.setdefault(k, []).append(v)
  out = {}
  for k, v in vals.items():
    v = np.asarray(v, np.float64)
    v = v[np.isfinite(v)]
    out[k] = ([float(np.quantile(v, alpha / 2)),
               float(np.quantile(v, 1 - alpha / 2))] if len(v) else
              [float("nan")] * 2)
  return out


# ------------------------------------------------------------------ inputs


def _stem(x: str) -> str:
  return os.path.splitext(os.path.basename(x))[0]


def read_csv(path: str) -> list[dict]:
  return files.read_csv(path)[1]


def labels_from_tfds(spec: str, data_dir: str | None = None,
                     label_column: str = "label") -> list[dict]:
  """Label rows from a built TFDS dataset of data/ (ArrayRecord, no TF).

  spec: "tfds:NAME[/CONFIG]:SPLIT[:FEATURE]" (FEATURE default "quality",
  a ClassLabel; its class NAME becomes the label, e.g. good/usable/reject
  for EyeQ, good/bad for MSHF). Rows: {image: image/filename, label}.
  Images are not decoded."""
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
  parts = spec.split(":")
  if parts[0] != "tfds" or len(parts) not in (3, 4):
    raise ValueError(f"expected tfds:NAME[/CONFIG]:SPLIT[:FEATURE], got "
                     f"{spec!r}")
  name, split = parts[1], parts[2]
  feature = parts[3] if len(parts) == 4 else "quality"
  # A built dataset is read from its files; the builder code is not needed.
  src = sources.tfds_data_source(name, split, data_dir)
  feats = src.dataset_info.features
  if feature not in feats:
    raise ValueError(f"{name} has no feature {feature!r}: {sorted(feats)}")
  names = getattr(feats[feature], "names", None)
  rows = []
  for i in range(len(src)):
    ex = src[i]
    fn = ex["image/filename"]
    fn = fn.decode() if isinstance(fn, bytes) else str(fn)
    v = ex[feature]
    v = names[int(v)] if names is not None else str(v)
    rows.append({"image": fn, label_column: v})
  return rows


def read_labels(labels: str, data_dir: str | None, label_column: str
                ) -> list[dict]:
  if labels.startswith("tfds:"):
    return labels_from_tfds(labels, data_dir, label_column)
  return read_csv(labels)


def join(scores: list[dict], labels: list[dict], label_column: str
         ) -> tuple[list[tuple[dict, dict]], dict]:
  """Pairs (score row, label row) by id (label `id` column, else the stem of
  `image`/`path`). Everything not paired is counted and listed."""
  by_id = {r["id"]: r for r in scores}
  pairs, missing, failed = [], [], []
  for lr in labels:
    if label_column not in lr:
      raise ValueError(f"labels CSV has no column {label_column!r}: "
                       f"{sorted(lr)}")
    key = lr.get("id") or _stem(lr.get("image") or lr.get("path") or "")
    sr = by_id.get(key)
    if sr is None:
      missing.append(key)
    elif sr.get("status", "ok") != "ok":
      failed.append(key)
    else:
      pairs.append((sr, lr))
  return pairs, {"evaluated": len(pairs), "labels_without_score": missing,
                 "score_not_ok": failed}


# ------------------------------------------------------------------- tasks


def evaluate_binary(y, s, *, folds: int = 5, seed: int = 0,
                    n_boot: int = 1000) -> dict:
  y = np.asarray(y, bool)
  s = np.asarray(s, np.float64)
  pred, thr = kfold_predictions(y, s, folds, seed)

  def mets(i):
    return {"bacc": balanced_accuracy(y[i], pred[i]), "f1": f1(y[i], pred[i]),
            "mcc": mcc(y[i], pred[i]), "auroc": rank_metrics.auroc(y[i], s[i]),
            "auprc": average_precision(y[i], s[i])}

  k = effective_folds(y, folds)
  out = {"metrics": mets(np.arange(len(y))),
         "ci95": bootstrap_ci(mets, len(y), n_boot, seed),
         "n": int(len(y)), "positives": int(y.sum()),
         "folds": k, "folds_requested": int(folds),
         "thresholds": sorted(set(float(t) for t in thr))}
  if k < folds:
    out["note"] = (f"{folds} folds requested, {k} used: the smaller class "
                   f"has {int(min(y.sum(), (~y).sum()))} images")
  return out


def evaluate_eyeq(y, pred, *, seed: int = 0, n_boot: int = 1000) -> dict:
  y, pred = np.asarray(y, int), np.asarray(pred, int)

  def mets(i):
    return {"accuracy": float(np.mean(y[i] == pred[i])),
            **macro_prf(y[i], pred[i]), "qwk": qwk(y[i], pred[i])}

  return {"metrics": mets(np.arange(len(y))),
          "ci95": bootstrap_ci(mets, len(y), n_boot, seed), "n": int(len(y))}


def pixel_histograms(map_: np.ndarray, ann: np.ndarray, crop: Sequence[int]
                     ) -> np.ndarray:
  """(3, BINS) counts of map values per annotated class (1, 2, 3)."""
  from PIL import Image
  h, w = ann.shape
  m = Image.fromarray(np.asarray(map_, np.float32), mode="F")
  if any(str(v).strip() == "" for v in crop):  # whole-photograph map
    full = np.asarray(m.resize((w, h), Image.BILINEAR), np.float32)
  else:
    x0, y0, side = (int(v) for v in crop)
    up = np.asarray(m.resize((side, side), Image.BILINEAR))
    full = np.zeros((h, w), np.float32)
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(h, y0 + side), min(w, x0 + side)
    if ye > ys and xe > xs:
      full[ys:ye, xs:xe] = up[ys - y0:ye - y0, xs - x0:xe - x0]
  b = np.clip((full * BINS).astype(np.int64), 0, BINS - 1)
  out = np.zeros((3, BINS), np.int64)
  for c in (1, 2, 3):
    out[c - 1] = np.bincount(b[ann == c], minlength=BINS)
  return out


def pixel_metrics(hist: np.ndarray) -> dict:
  """Metrics from summed (3, BINS) histograms (class good/usable/bad)."""
  pos, neg = hist[2].astype(np.float64), hist[:2].sum(0).astype(np.float64)
  # Predict bad when value >= bin edge t (t = 0..BINS): counts above.
  tp = np.r_[np.cumsum(pos[::-1])[::-1], 0.0]
  fp = np.r_[np.cumsum(neg[::-1])[::-1], 0.0]
  P, N = pos.sum(), neg.sum()
  out = {}
  if P == 0 or N == 0:
    out.update(auroc=float("nan"), auprc=float("nan"),
               sens_at_95spec=float("nan"), dice=float("nan"))
  else:
    tpr, fpr = tp / P, fp / N
    # AUROC: trapezoid over thresholds (ties within a bin count one half).
    out["auroc"] = float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:])
                                / 2))
    nz = (tp + fp) > 0
    prec = np.where(nz, tp / np.maximum(tp + fp, 1), 1.0)
    rec = tpr
    # AP over descending thresholds t = BINS-1 ... 0.
    r_desc, p_desc = rec[::-1], prec[::-1]
    out["auprc"] = float(np.sum(np.diff(np.r_[0.0, r_desc]) * p_desc))
    ok = fpr <= 0.05
    out["sens_at_95spec"] = float(tpr[ok].max()) if ok.any() else 0.0
    dice = 2 * tp / np.maximum(2 * tp + fp + (P - tp), 1)
    out["dice"] = float(dice.max())
  out["qwk"] = best_qwk(hist)[0]
  return out


def best_qwk(hist: np.ndarray, steps: int = 100) -> tuple[float, float, float]:
  """(QWK, t1, t2) maximised over threshold pairs t1 <= t2 on a grid of
  `steps` + 1 edges: value < t1 good, < t2 usable, else bad."""
  edges = np.linspace(0, BINS, steps + 1).astype(int)
  cum = np.concatenate([np.zeros((3, 1)), np.cumsum(hist, 1)], 1)
  below = cum[:, edges].T  # (steps+1, 3): count of each true class below
  a, b = np.triu_indices(steps + 1)
  lo, hi, tot = below[a], below[b], cum[:, -1][None]
  o = np.stack([lo, hi - lo, tot - hi], 2)  # (pairs, true, pred)
  c = 3
  i, j = np.indices((c, c))
  w = ((i - j) ** 2 / (c - 1) ** 2)[None]
  n = o.sum((1, 2))
  e = o.sum(2)[:, :, None] * o.sum(1)[:, None, :] / np.maximum(n, 1)[
      :, None, None]
  den = (w * e).sum((1, 2))
  k = np.where(den > 0, 1.0 - (w * o).sum((1, 2)) / np.where(den > 0, den, 1),
               -np.inf)
  if not np.isfinite(k).any():
    return float("nan"), 0.0, 0.0
  m = int(np.argmax(k))
  return float(k[m]), edges[a[m]] / BINS, edges[b[m]] / BINS


def evaluate_pixel(hists: np.ndarray, *, seed: int = 0, n_boot: int = 200
                   ) -> dict:
  """hists: (n_images, 3, BINS)."""
  def mets(i):
    return pixel_metrics(hists[i].sum(0))
  total = hists.sum(0)
  m = pixel_metrics(total)
  _, t1, t2 = best_qwk(total)
  return {"metrics": m, "qwk_thresholds": [t1, t2],
          "ci95": bootstrap_ci(mets, len(hists), n_boot, seed),
          "n": int(len(hists)),
          "pixels": {"good": int(total[0].sum()), "usable": int(total[1].sum()),
                     "bad": int(total[2].sum())}}


# ------------------------------------------------------------------ driver


def evaluate(scores_csv: str, labels_csv: str, out_dir: str, *,
             task: str = "binary", label_column: str = "label",
             score_column: str = "quality", positive: str = "1",
             higher_is_positive: bool = True, pred_column: str = "grade",
             folds: int = 5, seed: int = 0, bootstrap: int = 1000,
             maps_dir: str | None = None,
             annotations_dir: str | None = None,
             tfds_data_dir: str | None = None) -> dict:
  """Runs one task and writes metrics.json + metrics.md into out_dir.

  labels_csv: a CSV path or "tfds:NAME[/CONFIG]:SPLIT[:FEATURE]"."""
  scores = read_csv(scores_csv)
  if task in ("binary", "eyeq"):
    pairs, info = join(scores, read_labels(labels_csv, tfds_data_dir,
                                           label_column), label_column)
    if not pairs:
      raise ValueError("no labelled image has an ok score row")
    if task == "binary":
      values = [lr[label_column].strip() for _, lr in pairs]
      y = np.array([v == positive for v in values])
      s = np.array([float(sr[score_column]) for sr, _ in pairs])
      if not higher_is_positive:
        s = -s
      found = ", ".join(repr(v) for v in sorted(set(values))[:10])
      if not y.any():
        raise ValueError(
            f"binary evaluation needs both classes, and no label equals "
            f"--positive {positive!r}; the labels hold {found}: pass "
            "--positive with the value of the positive class")
      if y.all():
        raise ValueError(
            f"binary evaluation needs both classes, and every label equals "
            f"--positive {positive!r} (labels hold {found})")
      if min(y.sum(), (~y).sum()) < 2:
        raise ValueError(
            f"binary evaluation needs at least 2 images of each class for "
            f"its 2+ folds; there are {int(y.sum())} positive "
            f"(--positive {positive!r}) and {int((~y).sum())} negative")
      res = evaluate_binary(y, s, folds=folds, seed=seed, n_boot=bootstrap)
    else:
      def cls(v, what):
        v = str(v).strip().lower()
        if v not in EYEQ_CLASSES:
          raise ValueError(f"{what} value {v!r} is not one of "
                           f"{sorted(EYEQ_CLASSES)}")
        return EYEQ_CLASSES[v]
      y = np.array([cls(lr[label_column], "label") for _, lr in pairs])
      p = np.array([cls(sr[pred_column], "prediction") for sr, _ in pairs])
      res = evaluate_eyeq(y, p, seed=seed, n_boot=bootstrap)
  elif task == "pixel":
    from PIL import Image
    if not maps_dir:  # assess writes maps/ beside scores.csv
      maps_dir = files.join(files.abs_path(scores_csv).parent, "maps")
    if not annotations_dir:
      raise ValueError("task pixel needs --annotations")
    ann = {_stem(f): files.join(annotations_dir, f)
           for f in sorted(p.name for p in
                           files.as_path(annotations_dir).iterdir())
           if f.lower().endswith(".png")}
    hists, missing, failed = [], [], []
    for key, ap in ann.items():
      sr = next((r for r in scores if r["id"] == key), None)
      mp = files.join(maps_dir, key + ".npy")
      if sr is None or not files.exists(mp):
        missing.append(key)
        continue
      if sr.get("status", "ok") != "ok":
        failed.append(key)
        continue
      a = np.asarray(Image.open(io.BytesIO(files.read_bytes(ap))))
      if a.ndim != 2:
        raise ValueError(f"{ap}: annotations must be indexed (palette) PNGs")
      hists.append(pixel_histograms(
          files.load_npy(mp), a, (sr["crop_x0"], sr["crop_y0"], sr["crop_size"])))
    if not hists:
      raise ValueError("no annotation has a map")
    info = {"evaluated": len(hists), "labels_without_score": missing,
            "score_not_ok": failed}
    res = evaluate_pixel(np.stack(hists), seed=seed,
                         n_boot=min(bootstrap, 200))
  else:
    raise ValueError(f"task must be binary, eyeq or pixel, got {task!r}")
  res = {"task": task, "scores": os.fspath(files.abs_path(scores_csv)),
         "labels": (labels_csv if (labels_csv or "").startswith("tfds:")
                    else os.fspath(files.abs_path(labels_csv)) if labels_csv
                    else None),
         "bootstrap": bootstrap, "seed": seed, **info, **res}
  files.atomic_write_text(files.join(out_dir, "metrics.json"),
                          json.dumps(res, indent=2))
  files.atomic_write_text(files.join(out_dir, "metrics.md"), markdown(res))
  return res


def markdown(res: dict) -> str:
  lines = [f"# efiqa evaluate — {res['task']} (n = {res['n']})", "",
           "| metric | value (%) | 95 % CI (%) |", "|---|---|---|"]
  for k, v in res["metrics"].items():
    ci = res["ci95"].get(k)
    cs = f"{100 * ci[0]:.1f} – {100 * ci[1]:.1f}" if ci else "—"
    lines.append(f"| {k} | {100 * v:.1f} | {cs} |")
  skipped = len(res.get("labels_without_score", [])) + len(
      res.get("score_not_ok", []))
  if res.get("note"):
    lines += ["", f"Note: {res['note']}."]
  lines += ["", f"Not evaluated: {skipped} labelled images (see "
            "metrics.json).", ""]
  return "\n".join(lines)
