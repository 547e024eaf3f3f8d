"""Rank metrics in plain numpy (no sklearn dependency): AUROC, Spearman."""
from __future__ import annotations

import numpy as np
from scipy import stats


def auroc(labels, scores, weights=None) -> float:
  """Area under the ROC curve; ties count one half (Mann-Whitney U).

  `weights` (optional, >= 0) weight each sample, e.g. by FOV coverage.
  Returns nan when only one class is present.
  """
  y = np.asarray(labels).astype(bool).ravel()
  s = np.asarray(scores, np.float64).ravel()
  w = (np.ones_like(s) if weights is None
       else np.asarray(weights, np.float64).ravel())
  keep = w > 0
  y, s, w = y[keep], s[keep], w[keep]
  wp, wn = w[y].sum(), w[~y].sum()
  if wp == 0 or wn == 0:
    return float("nan")
  # Group ties: within a tie block negatives below count fully, ties half.
  _, group = np.unique(s, return_inverse=True)
  pos = np.bincount(group, weights=np.where(y, w, 0.0))
  neg = np.bincount(group, weights=np.where(y, 0.0, w))
  below = np.cumsum(neg) - neg
  return float(np.sum(pos * (below + 0.5 * neg)) / (wp * wn))


def within_image_auroc(labels, scores, weights, *, min_share: float = 0.05,
                       max_share: float = 0.95) -> np.ndarray:
  """Per image (leading axis), the AUROC of its map cells, damaged vs intact,
  for the images whose damaged share (weighted) lies in [min_share,
  max_share]; nan for the others. Where a map puts the damage inside one
  photograph, which a pooled AUROC over many photographs hardly measures:
  a map that is one value per photograph scores 0.5 here."""
  y = np.asarray(labels).astype(bool)
  s = np.asarray(scores, np.float64)
  w = np.asarray(weights, np.float64)
  n = y.shape[0]
  y, s, w = y.reshape(n, -1), s.reshape(n, -1), w.reshape(n, -1)
  out = np.full(n, np.nan)
  for i in range(n):
    tot = w[i].sum()
    share = (w[i] * y[i]).sum() / tot if tot > 0 else 0.0
    if min_share <= share <= max_share:
      out[i] = auroc(y[i], s[i], w[i])
  return out


def spearman(x, y) -> float:
  x = np.asarray(x, np.float64).ravel()
  y = np.asarray(y, np.float64).ravel()
  if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
    return float("nan")
  return float(stats.spearmanr(x, y).statistic)
