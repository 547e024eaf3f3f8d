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
  order = np.argsort(s, kind="mergesort")
  s, y, w = s[order], y[order], w[order]
  # Group ties: within a tie block negatives below count fully, ties half.
  uniq, start = np.unique(s, return_index=True)
  ends = np.append(start[1:], len(s))
  cum_neg = 0.0
  total = 0.0
  for a, b in zip(start, ends):
    wy = w[a:b][y[a:b]].sum()
    wneg = w[a:b][~y[a:b]].sum()
    total += wy * (cum_neg + 0.5 * wneg)
    cum_neg += wneg
  del uniq
  return float(total / (wp * wn))


def spearman(x, y) -> float:
  x = np.asarray(x, np.float64).ravel()
  y = np.asarray(y, np.float64).ravel()
  if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
    return float("nan")
  return float(stats.spearmanr(x, y).statistic)
