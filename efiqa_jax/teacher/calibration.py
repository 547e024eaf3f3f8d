"""Teacher calibration, label-free: map rule, grade cut-offs, pseudo-labels.

A teacher's |f(x)| has its own scale (width, resolution, training data), so
the numbers that turn it into a map and grades are measured per teacher, on
GOOD photographs the teacher never trained on and on damage of known extent
made from them (no quality label anywhere):

  clean          the photograph as is: nothing is missing;
  degraded       `synth.degrade` with each kind that hides vessels from the
                 label-free segmenter (synth.VESSEL_HIDING) at several
                 severities; truth = its mask (local severity >= 0.5);
  erased         the teacher input with random disks of vessels erased
                 (vessels that should be there and are not, exactly what the
                 teacher detects); truth = the erased disks.

Measured on them:
  map rule       the pixel threshold on |f(x)| and the window (map cells
                 around each map cell) whose map finds the truth best,
                 among thresholds from the 95th percentile of |f(x)| on the
                 clean photographs up (a good photograph's map stays low):
                 the mean of two AUROCs on the map grid, across photographs
                 (all variants' cells pooled: which photographs are
                 damaged) and within photographs (each partly damaged
                 variant's own cells: where). The pooled one alone grows
                 with the window until the map is one value per photograph
                 (bench/README.md, "Default teacher"); the within one
                 peaks near the size of the damage;
  grade cut-offs good_min / usable_min on quality (1 - mean map) that best
                 reproduce the grade of each variant (balanced accuracy):
                 clean -> good; damaged -> `synth.grade` of its truth
                 (reject when >= 25 % of the FOV is lost, usable when >= 5 %
                 or the mean severity is >= 0.15);
  pseudo-labels  the cell share `relax` whose hard cell labels find the
                 damaged cells best.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import numpy as np

from efiqa_jax import metrics
from efiqa_jax import quality as quality_lib
from efiqa_jax.teacher import inference

# |f(x)| scales differ by teacher (a base-32 256-px teacher fills in ~10x less
# on intact maps than a base-8 128-px one), hence the wide range.
THRESHOLDS = (0.0025, 0.004, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.025,
              0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.13)
WINDOWS = (3, 5, 9, 13, 17, 21, 25, 33)  # map window sides tried, in cells
# Pseudo-label cell shares tried (the reference's 0.9 among them).
RELAXES = (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)
LABEL_GRID = 32  # cells per side of the calibrated pseudo-label rule
SEVERITIES = (0.35, 0.65, 0.95)
# A pixel may only count as anomalous above what the teacher fills in on this
# share of the clean photographs' FOV pixels: without the floor the AUROC
# optimum can sit where good photographs are flagged all over (their maps
# rank below the damaged ones', but the map means nothing).
CLEAN_QUANTILE = 0.95
ERASURES = 2  # erased copies per photograph


@dataclasses.dataclass
class Calibration:
  anomaly_threshold: float
  window: int
  clean_floor: float
  good_min: float
  usable_min: float
  map_auroc: float  # pooled over the variants (the benchmark's map AUROC)
  grade_balanced_accuracy: float
  threshold_sweep: dict  # "threshold@window" -> pooled map AUROC
  n_images: int
  # The pseudo-label rule: a cell is positive when >= label_relax of its
  # pixels exceed anomaly_threshold; chosen by balanced accuracy against the
  # damaged cells on a label_grid x label_grid grid.
  label_relax: float = 0.9
  label_grid: int = LABEL_GRID
  label_balanced_accuracy: float = float("nan")
  relax_sweep: dict = dataclasses.field(default_factory=dict)
  data: dict = dataclasses.field(default_factory=dict)
  # What each grade means on the calibration variants: share graded good /
  # usable / reject per truth grade (rows), and the clean photographs'
  # quality and degraded_fraction.
  confusion: dict = dataclasses.field(default_factory=dict)
  clean: dict = dataclasses.field(default_factory=dict)
  warnings: list = dataclasses.field(default_factory=list)
  # Mean within-photograph map AUROC of the chosen rule over the partly
  # damaged variants, and per rule ("threshold@window").
  map_within_auroc: float = float("nan")
  within_sweep: dict = dataclasses.field(default_factory=dict)

  def rule(self, map_size: int = inference.MAP_SIZE) -> inference.MapRule:
    return inference.MapRule(threshold=self.anomaly_threshold,
                             window=self.window, map_size=map_size)


def erase_masks(rng: np.random.Generator, fov: np.ndarray,
                n_max: int = 3) -> np.ndarray:
  """Random disks where the vessels are made to vanish, inside the FOV:
  unions of 1..n_max disks of radius 15-45 % of the FOV radius (0 to ~60 %
  of the FOV, across the grade cut-offs)."""
  t = fov.shape[0]
  e = np.zeros((t, t), bool)
  ys, xs = np.nonzero(fov)
  rad = np.sqrt(fov.sum() / np.pi)
  yy, xx = np.mgrid[:t, :t]
  for _ in range(int(rng.integers(1, n_max + 1))):
    k = int(rng.integers(len(ys)))
    r = rad * rng.uniform(0.15, 0.45)
    e |= (yy - ys[k]) ** 2 + (xx - xs[k]) ** 2 <= r * r
  return (e & fov.astype(bool)).astype(np.float32)


def _area(x: np.ndarray, n: int) -> np.ndarray:
  """(B, S, S) -> (B, n, n) cell means (S a multiple of n), else PIL box."""
  x = np.asarray(x, np.float32)
  s = x.shape[-1]
  if s % n == 0:
    return x.reshape(x.shape[0], n, s // n, n, s // n).mean(axis=(2, 4))
  return np.stack([quality_lib.fov_at(a, (n, n)) for a in x])


@dataclasses.dataclass
class Variants:
  """|f(x)| of the calibration variants, with their truth."""
  anomaly: np.ndarray  # (N, T, T) float32
  fov_t: np.ndarray  # (N, T, T) {0, 1}
  truth_t: np.ndarray  # (N, T, T) local severity of the damage in [0, 1]
  grade: np.ndarray  # (N,) truth grade
  kind: np.ndarray  # (N,) 'clean', a degradation kind or 'erased'


def collect(quality_model, crops, *, kinds: Sequence[str] | None = None,
            severities: Sequence[float] = SEVERITIES,
            erasures: int = ERASURES, seed: int = 900_000,
            progress: bool = False, skipped: list | None = None) -> Variants:
  """Runs the teacher on every variant of every photograph of `crops`.

  crops: a sequence of loaders, each `() -> (image, fov)` FOV crop, or a
  dict {path, status, message} for a photograph that could not be used
  (collected in `skipped`); or an iterable of (image, fov) pairs. Each
  photograph's variants are drawn from its own seed (seed, position), so
  the variants do not depend on how the photographs are split: with
  several processes each runs the teacher on its `runtime.process_slice`
  of the photographs, and one gather gives every process all variants in
  photograph order (the same arrays as one process computes alone).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from efiqa_jax import runtime  # pylint: disable=g-import-not-at-top
  from efiqa_jax import synth  # pylint: disable=g-import-not-at-top

  qmod = quality_model
  kinds = list(synth.VESSEL_HIDING if kinds is None else kinds)
  t_size, load = qmod.teacher_size, qmod.load_size
  graphdef, state = qmod._graphdef, qmod._state  # pylint: disable=protected-access
  crops = [c if callable(c) else functools.partial(lambda c: c, c)
           for c in crops]
  skipped = [] if skipped is None else skipped

  @jax.jit
  def inputs(images, fov):
    return (inference.teacher_input(images, fov, teacher_size=t_size,
                                    load_size=load,
                                    min_component=qmod.min_component),
            inference.fov_at_teacher(fov, t_size))

  @jax.jit
  def anomaly(state, x):
    return inference.anomaly(nnx.merge(graphdef, state), x)

  def run(x):
    out = []
    b = qmod.batch_size
    for s in range(0, len(x), b):
      xb = x[s:s + b]
      k = len(xb)
      if k < b:
        xb = np.concatenate([xb, np.zeros((b - k,) + xb.shape[1:], xb.dtype)])
      out.append(np.asarray(anomaly(state, xb))[:k])
    return np.concatenate(out)

  vocab_kind = ["clean", *kinds, "erased"]
  acc = {k: [] for k in ("anomaly", "fov_t", "truth_t", "grade", "kind",
                         "photo")}
  mine = range(len(crops))[runtime.process_slice(len(crops))]
  bar = None
  if progress and runtime.is_primary():
    from efiqa_jax import progress as progress_lib  # pylint: disable=g-import-not-at-top
    bar = progress_lib.Progress(len(mine), "calibrate", unit="photo")
  local_skipped = []
  for i in mine:
    item = crops[i]()
    if bar is not None:
      bar.update(1)
    if isinstance(item, dict):
      local_skipped.append(dict(item, index=int(i)))
      continue
    image, fov = item
    rng = np.random.default_rng([seed, int(i)])
    imgs, truth, grades, kk = [image], [np.zeros(fov.shape, np.float32)], [
        "good"], ["clean"]
    for kind in kinds:
      for sev in severities:
        img, mask, info = synth.degrade(image, fov, int(rng.integers(2**31)),
                                        kinds=[kind], severity=sev)
        imgs.append(img)
        truth.append(mask)
        grades.append(info["grade"])
        kk.append(kind)
    x, fov_t = inputs(np.stack(imgs), np.repeat(fov[None], len(imgs), 0))
    x, fov_t = np.asarray(x), np.asarray(fov_t)
    tr = np.stack([_resize_truth(m, t_size) for m in truth])
    # Erasures of the clean photograph's own teacher input.
    for _ in range(erasures):
      e = erase_masks(rng, fov_t[0])
      x = np.concatenate([x, (x[0] * (1.0 - e)[..., None])[None]])
      fov_t = np.concatenate([fov_t, fov_t[:1]])
      tr = np.concatenate([tr, e[None]])
      share = float(e.sum() / max(fov_t[0].sum(), 1.0))
      grades.append(synth.grade(share, share))
      kk.append("erased")
    acc["anomaly"].append(run(x))
    acc["fov_t"].append(fov_t.astype(np.float32))
    acc["truth_t"].append(tr.astype(np.float32))
    acc["grade"].append(np.array([quality_lib.GRADES.index(g)
                                  for g in grades], np.int32))
    acc["kind"].append(np.array([vocab_kind.index(k) for k in kk], np.int32))
    acc["photo"].append(np.full(len(kk), i, np.int32))
  if bar is not None:
    bar.close()
  shape = (0, t_size, t_size)
  local = {k: (np.concatenate(v) if v else np.zeros(
      shape if k in ("anomaly", "fov_t", "truth_t") else (0,),
      np.float32 if k in ("anomaly", "fov_t", "truth_t") else np.int32))
           for k, v in acc.items()}
  allv, all_skipped = _gather_rows(local, local_skipped)
  skipped += sorted(all_skipped, key=lambda r: r.pop("index"))
  if not len(allv["photo"]):
    raise ValueError("no photograph to calibrate on")
  order = np.argsort(allv["photo"], kind="stable")  # photograph order
  allv = {k: v[order] for k, v in allv.items()}
  return Variants(anomaly=allv["anomaly"], fov_t=allv["fov_t"],
                  truth_t=allv["truth_t"],
                  grade=np.asarray(quality_lib.GRADES)[allv["grade"]],
                  kind=np.asarray(vocab_kind)[allv["kind"]])


def _gather_rows(local: dict, skipped: list) -> tuple[dict, list]:
  """Every process's rows (arrays with a leading row axis) and skip records,
  concatenated in process order, on every process: one device all-gather
  (rows padded to the longest process's) after a barrier (the processes
  may finish their slices far apart; gloo's collectives time out)."""
  import json  # pylint: disable=g-import-not-at-top
  from efiqa_jax import runtime  # pylint: disable=g-import-not-at-top
  if runtime.process_count() == 1:
    return local, list(skipped)
  n = len(local["photo"])
  info = [json.loads(t) for t in runtime.all_gather_text(
      "calibrate-rows", json.dumps({"n": n, "skipped": skipped}))]
  counts = [d["n"] for d in info]
  most = max(max(counts), 1)
  padded = {k: np.concatenate([v, np.zeros((most - n,) + v.shape[1:],
                                           v.dtype)])
            for k, v in local.items()}
  runtime.barrier("calibrate-gather")
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  got = multihost_utils.process_allgather(padded)  # (processes, most, ...)
  rows = {k: np.concatenate([np.asarray(v)[p, :c]
                             for p, c in enumerate(counts)])
          for k, v in got.items()}
  return rows, [r for d in info for r in d["skipped"]]


def _resize_truth(mask: np.ndarray, t: int) -> np.ndarray:
  """A crop-sized degradation mask on the teacher grid (area average)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.fromarray(np.asarray(mask, np.float32), mode="F")
                    .resize((t, t), Image.BOX), np.float32)


@functools.lru_cache(maxsize=None)
def _pool_fn(window: int, map_size: int):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.jit(functools.partial(inference.pool_share, window=window,
                                   map_size=map_size))


def _device_chunks(v: Variants) -> list:
  """|f(x)| and FOV of the variants on the device, 64 at a time: put there
  once for a whole sweep of rules."""
  import jax  # pylint: disable=g-import-not-at-top
  return [jax.device_put((v.anomaly[s:s + 64], v.fov_t[s:s + 64]))
          for s in range(0, len(v.anomaly), 64)]


def maps_of(v: Variants, rule: inference.MapRule,
            chunks: list | None = None) -> np.ndarray:
  """The variants' maps under `rule`; `chunks`: `_device_chunks(v)`."""
  fn = _pool_fn(rule.window, rule.map_size)
  thr = np.float32(rule.threshold)
  return np.concatenate([np.asarray(fn(a, f, thr))
                         for a, f in (chunks or _device_chunks(v))])


def _cell_truth(v: Variants, m: int) -> tuple[np.ndarray, np.ndarray]:
  """(FOV share w, damaged y) of the variants' m x m map cells: a cell is
  damaged when >= half of its FOV part is damaged at severity >= 0.5."""
  w = _area(v.fov_t, m)
  hit = _area((v.truth_t >= 0.5) * v.fov_t, m)
  return w, (hit >= 0.5 * np.maximum(w, 1e-6)) & (w > 0)


def rule_score(pooled: float, within: float) -> float:
  """What a map rule (and, in build-default-model, a seed) is chosen by: the
  mean of the pooled and within-photograph map AUROCs; the pooled one alone
  where no variant is partly damaged."""
  within = float("nan") if within is None else float(within)
  return float(pooled) if np.isnan(within) else 0.5 * (pooled + within)


def measure(v: Variants, maps: np.ndarray, truth=None) -> dict:
  """Map AUROC (map cells with >= half of their FOV part damaged at
  severity >= 0.5, FOV-weighted) pooled over the variants and within each
  partly damaged one (metrics.within_image_auroc, mean; nan if none), their
  mean (`score`, what the map rule is chosen by), and per-variant
  (quality, fraction). `truth`: `_cell_truth(v, map size)`, computed once
  for a sweep of rules."""
  w, y = truth if truth is not None else _cell_truth(v, maps.shape[-1])
  q, frac = zip(*(quality_lib.summarise(maps[i], w[i])
                  for i in range(len(maps))))
  pooled = float(metrics.auroc(y.ravel(), maps.ravel(), w.ravel()))
  within = metrics.within_image_auroc(y, maps, w)
  within = float(np.nanmean(within)) if np.isfinite(within).any() else (
      float("nan"))
  return dict(map_auroc=pooled, map_within_auroc=within,
              score=rule_score(pooled, within),
              quality=np.asarray(q), fraction=np.asarray(frac))


def calibrate(quality_model, crops, *, kinds=None,
              severities: Sequence[float] = SEVERITIES,
              erasures: int = ERASURES, label_grid: int = LABEL_GRID,
              seed: int = 900_000, data: dict | None = None,
              progress: bool = True, skipped: list | None = None
              ) -> Calibration:
  """Measures a teacher's map rule, grade cut-offs and pseudo-label rule on
  good photographs (`crops`: loaders of, or (image, fov) FOV crops at the
  model's work size; see `collect`) and their damaged variants (module
  docstring). With several processes the teacher's inference is split
  among them (`collect`), process 0 fits the rules and every process gets
  its result."""
  from efiqa_jax import runtime  # pylint: disable=g-import-not-at-top
  v = collect(quality_model, crops, kinds=kinds, severities=severities,
              erasures=erasures, seed=seed, progress=progress,
              skipped=skipped)
  if runtime.process_count() == 1:
    return fit(v, label_grid=label_grid, severities=severities,
               erasures=erasures, seed=seed, data=data)
  mine = None
  if runtime.is_primary():
    mine = fit(v, label_grid=label_grid, severities=severities,
               erasures=erasures, seed=seed, data=data)
  got = runtime.broadcast_bytes("calibrate-fit", None if mine is None else
                                json.dumps(dataclasses.asdict(mine)).encode())
  return mine if mine is not None else Calibration(**json.loads(got))


def fit(v: Variants, *, label_grid: int = LABEL_GRID,
        severities: Sequence[float] = SEVERITIES, erasures: int = ERASURES,
        seed: int = 900_000, data: dict | None = None) -> Calibration:
  """The map rule, grade cut-offs and pseudo-label rule of `calibrate`,
  from the teacher's |f(x)| on the variants."""
  cl = v.kind == "clean"
  floor = float(np.quantile(v.anomaly[cl][v.fov_t[cl] > 0], CLEAN_QUANTILE))
  # The floor itself is a candidate unless it is 0 (a teacher that fills in
  # nothing on clean photographs: every swept threshold lies above it).
  candidates = sorted(({round(floor, 5)} if round(floor, 5) > 0 else set())
                      | {t for t in THRESHOLDS if t > floor})
  sweep, within_sweep, best = {}, {}, None
  chunks, truth = _device_chunks(v), _cell_truth(v, inference.MAP_SIZE)
  for w in WINDOWS:
    for thr in candidates:
      rule = inference.MapRule(threshold=thr, window=w)
      r = measure(v, maps_of(v, rule, chunks), truth)
      sweep[f"{thr:g}@{w}"] = round(r["map_auroc"], 4)
      within_sweep[f"{thr:g}@{w}"] = round(r["map_within_auroc"], 4)
      if best is None or r["score"] > best[2]["score"] + 1e-9:
        best = (thr, w, r)
  thr, win, r = best
  good_min, usable_min, bacc = fit_grade_cutoffs(r["quality"], v.grade)
  grading = quality_lib.Grading(good_min=good_min, usable_min=usable_min)
  pred = np.array([grading.grade(q) for q in r["quality"]])
  confusion = {g: {p: round(float(np.mean(pred[v.grade == g] == p)), 3)
                   for p in quality_lib.GRADES}
               for g in quality_lib.GRADES if np.any(v.grade == g)}
  clean = dict(n=int(cl.sum()),
               quality_min=round(float(r["quality"][cl].min()), 4),
               quality_mean=round(float(r["quality"][cl].mean()), 4),
               degraded_fraction_max=round(float(r["fraction"][cl].max()), 4),
               degraded_fraction_mean=round(float(r["fraction"][cl].mean()),
                                            4))
  relax, label_bacc, relax_sweep = fit_label_relax(
      v.anomaly * v.fov_t, v.fov_t, (v.truth_t >= 0.5).astype(np.float32),
      thr, label_grid)
  cal = Calibration(
      anomaly_threshold=float(thr), window=int(win), good_min=good_min,
      clean_floor=round(floor, 5),
      usable_min=usable_min, map_auroc=r["map_auroc"],
      grade_balanced_accuracy=bacc, threshold_sweep=sweep,
      n_images=int(len(v.kind)), label_relax=relax,
      label_grid=int(label_grid), label_balanced_accuracy=label_bacc,
      relax_sweep=relax_sweep,
      data=dict(data or {}, variants={k: int(np.sum(v.kind == k))
                                      for k in np.unique(v.kind)},
                severities=list(severities), erasures=int(erasures),
                seed=int(seed)),
      confusion=confusion, clean=clean,
      map_within_auroc=r["map_within_auroc"], within_sweep=within_sweep)
  cal.warnings = warnings_for(cal)
  return cal


def warnings_for(cal: Calibration) -> list[str]:
  """Why a calibration is not to be trusted, one line each (empty if fine)."""
  out = []
  if not cal.map_auroc >= 0.6:
    out.append(f"the teacher's map barely finds the damage (AUROC "
               f"{cal.map_auroc:.2f}; 0.5 is chance): train it longer or on "
               "more good photographs before using its map")
  if cal.usable_min <= 1e-3 or cal.good_min >= 1 - 1e-3:
    out.append(f"a grade cut-off sits at the end of the quality range "
               f"(usable_min {cal.usable_min:g}, good_min {cal.good_min:g}): "
               "the grades do not separate the damage")
  if cal.grade_balanced_accuracy < 0.5:
    out.append(f"grades reproduce the damage poorly (balanced accuracy "
               f"{cal.grade_balanced_accuracy:.2f})")
  return out


def fit_label_relax(anomaly, fov, erase, threshold: float, grid: int
                    ) -> tuple[float, float, dict]:
  """The cell share (`relax`) whose hard pseudo-labels (share of pixels
  with |f(x)| > threshold) best find the damaged cells (damaged >= half of
  the cell's FOV part): balanced accuracy over the cells that touch the FOV."""
  from efiqa_jax import pseudo_labels as pl  # pylint: disable=g-import-not-at-top
  share = np.stack([pl.cell_means((np.asarray(a) > threshold).astype(
      np.float32), grid) for a in anomaly])
  f = np.stack([pl.cell_means(np.asarray(x, np.float32), grid) for x in fov])
  e = np.stack([pl.cell_means(np.asarray(x, np.float32) * y, grid)
                for x, y in zip(erase, fov)])
  inside = f > 0
  truth = (e >= 0.5 * np.maximum(f, 1e-6))[inside]
  share = share[inside]
  sweep, best = {}, (0.9, -1.0)
  for r in RELAXES:
    lab = share >= r - 1e-6  # as pseudo_labels.patch_labels
    tpr = np.mean(lab[truth]) if truth.any() else 0.0
    tnr = np.mean(~lab[~truth]) if (~truth).any() else 0.0
    b = 0.5 * (tpr + tnr)
    sweep[str(r)] = round(float(b), 4)
    if b > best[1] + 1e-12:
      best = (float(r), float(b))
  return best[0], best[1], sweep


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


def calibrated_meta(meta: dict, cal: Calibration, work_size: int) -> dict:
  """The sidecar fields a calibration sets (map rule, grading, pseudo-label
  rule, the whole calibration record)."""
  return dict(
      meta, work_size=int(work_size),
      anomaly_threshold=cal.anomaly_threshold,
      map={"threshold": cal.anomaly_threshold, "window": cal.window,
           "map_size": inference.MAP_SIZE},
      grading={"good_min": round(cal.good_min, 4),
               "usable_min": round(cal.usable_min, 4)},
      pseudo_labels={"threshold": cal.anomaly_threshold,
                     "relax": cal.label_relax, "grid": cal.label_grid},
      calibration=dataclasses.asdict(cal))


# ------------------------------------------------------------- photographs


def photo_crops(paths: Sequence[str], work_size: int) -> list:
  """Loaders of the (image, fov) FOV crops of photographs (`collect`); a
  photograph that fails loads as its {path, status, message}."""
  from efiqa_jax import fundus  # pylint: disable=g-import-not-at-top

  def load(p):
    prep = fundus.prepare_fundus(p, size=work_size)
    if prep.status != "ok":
      return dict(path=p, status=prep.status, message=prep.message)
    return prep.image, prep.fov_mask

  return [functools.partial(load, p) for p in paths]


def synthetic_crops(n: int, work_size: int, seed: int = 900_000) -> list:
  """Loaders (`collect`) of clean synthetic photographs (seeds disjoint from
  the trainer's) and of scikit-image's public-domain retina photograph in 8
  orientations: the fallback when no good photographs are given."""
  from efiqa_jax import fundus, synth  # pylint: disable=g-import-not-at-top

  def synthetic(i):
    s = synth.generate(seed + i, work_size, degrade=False)
    return s.image, s.fov_mask

  @functools.lru_cache(maxsize=1)
  def retina():
    from skimage import data  # pylint: disable=g-import-not-at-top
    p = fundus.prepare_image(data.retina(), work_size)
    if p.status != "ok":
      raise RuntimeError("the scikit-image retina photograph did not prepare")
    return p

  def oriented(k, flip):
    p = retina()
    im, fm = np.rot90(p.image, k), np.rot90(p.fov_mask, k)
    if flip:
      im, fm = im[:, ::-1], fm[:, ::-1]
    return np.ascontiguousarray(im), np.ascontiguousarray(fm)

  return ([functools.partial(synthetic, i) for i in range(n)] +
          [functools.partial(oriented, k, flip) for k in range(4)
           for flip in (False, True)])


def calibration_photos(inputs: Sequence[str], split: str = "calibration"
                       ) -> tuple[list[str], dict]:
  """The photographs of `split` among good photographs (teacher.data splits)
  and a description for the sidecar."""
  from efiqa_jax import files  # pylint: disable=g-import-not-at-top
  from efiqa_jax.teacher import data as data_lib  # pylint: disable=g-import-not-at-top
  photos = data_lib.list_good_photos(list(inputs))
  chosen = data_lib.select_split(photos, split)
  if not chosen:
    raise ValueError(f"no photograph of split {split!r} among {len(photos)} "
                     f"under {list(inputs)}")
  return [p.path for p in chosen], dict(
      source=[os.fspath(files.abs_path(i)) for i in inputs], split=split,
      ids=[p.id for p in chosen])


def calibrate_teacher(teacher: str, out: str, *, photos: Sequence[str] = (),
                      split: str = "calibration",
                      work_size: int | None = None, n: int = 96,
                      label_grid: int = LABEL_GRID,
                      progress: bool = True,
                      command: str | None = None) -> dict:
  """`efiqa calibrate-teacher`: measures a trained teacher's map rule, grade
  cut-offs and pseudo-label rule (no quality label) on the `split` of the
  good photographs `photos` (all of them with split 'all'), or, without
  photographs, on `n` clean synthetic photographs and scikit-image's retina
  photograph; writes the teacher with them in its sidecar to `out` (local
  or gs://). Multi-host: every process runs the teacher on its share of
  the photographs; `out` is written once (`calibrate_and_write`). The
  sidecar keeps the teacher's own record (how it was built) and adds
  `calibrated_by`: `command` (the command line) and the date."""
  from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from efiqa_jax import files  # pylint: disable=g-import-not-at-top
  teacher_p, out_p = files.abs_path(teacher), files.abs_path(out)
  if os.fspath(out_p).rstrip("/") == os.fspath(teacher_p).rstrip("/"):
    raise ValueError("--out must differ from the teacher directory")
  model, meta = checkpoints.load_model(teacher)
  if meta.get("architecture") != "unet":
    raise ValueError(f"{teacher} is not a teacher (architecture "
                     f"{meta.get('architecture')!r}, expected 'unet')")
  ws = int(work_size or meta.get("work_size", 512))
  import datetime  # pylint: disable=g-import-not-at-top
  by = dict(date=datetime.date.today().isoformat())
  if command:
    by["command"] = command
  return calibrate_and_write(
      model, meta, out, work_size=ws, photos=photos, split=split,
      name=teacher_p.name, n=n, label_grid=label_grid, progress=progress,
      extra=dict(calibrated_by=by))


def calibrate_and_write(model, meta: dict, out: str, *, work_size: int,
                        name: str, photos: Sequence[str] = (),
                        split: str = "calibration", n: int = 96,
                        label_grid: int = LABEL_GRID, progress: bool = True,
                        extra: dict | None = None) -> dict:
  """Calibrates a loaded teacher and writes it with its calibration (the
  sidecar and calibration.json) to `out` (local or gs://); returns the
  sidecar. Every process of a multi-process run calls it: the teacher's
  inference is split among them (`calibrate`); process 0 writes
  calibration.json, the model is saved once (`checkpoints.save_model`)."""
  from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from efiqa_jax import files  # pylint: disable=g-import-not-at-top
  from efiqa_jax import quality_model as qm  # pylint: disable=g-import-not-at-top
  from efiqa_jax import runtime  # pylint: disable=g-import-not-at-top
  meta = {k: v for k, v in meta.items()
          if k not in ("format", "version", "architecture", "kwargs")}
  qmod = qm.TeacherQualityModel(model, dict(meta, work_size=work_size),
                                name=name)
  skipped: list = []
  if photos:
    paths, desc = calibration_photos(photos, split)
    crops = photo_crops(paths, work_size)
  else:
    desc = dict(source=f"{n} clean synthetic photographs (efiqa_jax.synth, "
                "seeds 900000..) and scikit-image's retina photograph "
                "(8 orientations)")
    crops = synthetic_crops(n, work_size)
  cal = calibrate(qmod, crops, label_grid=label_grid, data=desc,
                  progress=progress, skipped=skipped)
  if skipped:
    cal.data["skipped"] = skipped
  meta = dict(calibrated_meta(meta, cal, work_size), **(extra or {}))
  out_p = files.abs_path(out)
  if runtime.is_primary() and out_p.exists():
    out_p.rmtree()
  runtime.barrier(f"calibrate-cleared:{out_p}")
  checkpoints.save_model(out_p, model, meta)
  if runtime.is_primary():
    files.atomic_write_text(out_p / "calibration.json",
                            json.dumps(dataclasses.asdict(cal), indent=2))
  runtime.barrier(f"calibrate-written:{out_p}")
  return meta
