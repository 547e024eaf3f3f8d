"""`efiqa benchmark GOOD_PHOTOS/`: does the model see real-looking damage?

Each good photograph is assessed as is and under the project's synthetic
degradations (efiqa_jax.synth.degrade: blur, illumination, haze, glare,
artefacts, noise, JPEG) at several severities. Reported, over all kinds and
over the kinds that hide vessels from the label-free segmenter
(synth.VESSEL_HIDING: what EFIQA, which judges visible anatomy, is meant to
see):
  map_auroc            pixel AUROC of the map against the degradation masks
                       (local severity >= 0.5; inside the FOV, degraded
                       variants and clean originals pooled): mostly which
                       photographs are damaged, since most damage covers
                       most of the FOV
  within_auroc         the same AUROC inside each partly damaged variant
                       (5-95 % of its FOV), averaged: where the damage is
                       (a map of one value per photograph scores 0.5)
  rank_spearman        Spearman correlation of (1 - quality) with severity
  image_auroc          AUROC of (1 - quality) for degraded vs clean
  baseline_*           the same for a vessel-density baseline (share of FOV
                       with label-free vessel probability >= 0.5; local map =
                       1 - local vessel density)
  clean_*              the clean photographs' quality and degraded_fraction
Inputs are photographs, prepared folders (`efiqa prepare` at the model's
work size: the stored FOV crop and mask are degraded, as the photograph's
would be) or tfds: datasets, with the same results from each. With `split`,
a folder of good photographs is split as the default model's build splits
it (teacher.data.assign_splits) and only that split is used; a prepared
folder or tfds: dataset of those photographs splits the same way.
Not split across processes: each process runs the whole benchmark.
The model is never tuned on these numbers inside this command.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from efiqa_jax import metrics
from efiqa_jax import quality as quality_lib

DEFAULT_SEVERITIES = (0.35, 0.65, 0.95)


@dataclasses.dataclass
class BenchmarkResult:
  n_photos: int
  n_variants: int
  map_auroc: float
  rank_spearman: float
  image_auroc: float
  baseline_map_auroc: float
  baseline_rank_spearman: float
  baseline_image_auroc: float
  per_kind: dict
  failed: list
  within_auroc: float = float("nan")
  baseline_within_auroc: float = float("nan")
  n_within: int = 0  # partly damaged variants within_auroc averages over
  # The same metrics over the vessel-hiding kinds present (None if none).
  hiding: dict | None = None
  clean_quality_min: float = float("nan")
  clean_quality_mean: float = float("nan")
  clean_fraction_max: float = float("nan")
  clean_fraction_mean: float = float("nan")

  def to_markdown(self) -> str:
    cols = [("all kinds", self.__dict__)]
    if self.hiding and set(self.per_kind) - set(self.hiding["kinds"]):
      cols.insert(0, ("vessel-hiding kinds", self.hiding))
    elif self.hiding:
      cols = [("vessel-hiding kinds", self.hiding)]
    head = " | ".join(f"model ({c}) | baseline ({c})" for c, _ in cols)
    lines = [f"{self.n_photos} photographs, {self.n_variants} degraded "
             "variants", "", f"| metric | {head} |",
             "|---|" + "---|---|" * len(cols)]
    for name, key in (("map AUROC", "map_auroc"),
                      ("map AUROC within photographs (partly damaged)",
                       "within_auroc"),
                      ("image AUROC (degraded vs clean)", "image_auroc"),
                      ("Spearman (severity vs 1 - quality)",
                       "rank_spearman")):
      vals = " | ".join(f"{d[key]:.3f} | {d['baseline_' + key]:.3f}"
                        for _, d in cols)
      lines.append(f"| {name} | {vals} |")
    lines += ["", f"clean photographs: quality {self.clean_quality_mean:.3f}"
              f" (min {self.clean_quality_min:.3f}), degraded_fraction "
              f"{self.clean_fraction_mean:.3f} (max "
              f"{self.clean_fraction_max:.3f})"]
    if self.per_kind:
      lines += ["", "| degradation | map AUROC | within photographs | "
                "image AUROC | mean quality drop |", "|---|---|---|---|---|"]
      for k, v in sorted(self.per_kind.items()):
        lines.append(f"| {k} | {v['map_auroc']:.3f} | "
                     f"{_cell(v.get('within_auroc'))} | "
                     f"{v.get('image_auroc', float('nan')):.3f} | "
                     f"{v['quality_drop']:.3f} |")
    return "\n".join(lines)


def run_benchmark(inputs, *, model: str = "default", kinds=None,
                  severities=DEFAULT_SEVERITIES, seed: int = 0,
                  split: str | None = None, quality_model=None,
                  out_json: str | None = None,
                  progress: bool = True) -> BenchmarkResult:
  """inputs: photographs, prepared folders or tfds: datasets; kinds: names,
  or None for all (synth.KINDS); split: with a folder of good photographs
  (or its prepared folder / tfds: dataset), only that split ('heldout',
  'calibration', 'train')."""
  import jax  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sources, synth, vessels  # pylint: disable=g-import-not-at-top
  from efiqa_jax import quality_model as qm_lib  # pylint: disable=g-import-not-at-top

  if isinstance(inputs, (str, os.PathLike)):
    inputs = [inputs]
  inputs = [os.fspath(p) for p in inputs]
  # Listed before the model is loaded: no image exits fast (4).
  entries, prepared = _entries(inputs, split)
  qm = quality_model or qm_lib.load_quality_model(model)
  # Prepared crops are checked as assess checks them.
  checks = sources.Inputs([e[0] for e in entries], None, prepared)
  if qm.assess_prepare() is not None:
    checks.require_photographs(
        f"model {qm.name!r} reads whole photographs (--preprocess efiqa)")
  checks.check_size(qm.work_size, f"model {qm.name!r}")
  kinds = list(kinds) if kinds else list(synth.KINDS)
  vfn = jax.jit(vessels.vessel_probability)
  crop = sources.PrepareFundus(qm.work_size)

  rows = []  # per variant: (kind or None, severity, y, map, baseline, w, ...)
  failed = []
  it = entries
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    it = tqdm(entries, desc="benchmark", unit="photo")
  for path, src, j in it:
    prep = _read(qm, crop, path, src, j)
    if prep.status != "ok":
      failed.append({"image": path, "status": prep.status,
                     "message": prep.message or ""})
      continue
    variants = [(prep.image, np.zeros(prep.fov_mask.shape, np.float32),
                 0.0, None)]
    for kind in kinds:
      for sev in severities:
        s = variant_seed(seed, path, kind, sev)
        img, mask, _ = synth.degrade(prep.image, prep.fov_mask, s,
                                     kinds=[kind], severity=sev)
        variants.append((img, mask, sev, kind))
    imgs = np.stack([v[0] for v in variants])
    fovs = np.repeat(prep.fov_mask[None], len(variants), axis=0)
    maps = qm.predict(imgs, fovs)
    vp = np.asarray(vfn(imgs, fovs))
    clean_q = None
    for (img, mask, sev, kind), qmap, vprob in zip(variants, maps, vp):
      w = quality_lib.fov_at(prep.fov_mask, qmap.shape)
      q, frac = quality_lib.summarise(qmap, w)
      m_small = _area(mask, qmap.shape)
      # Baseline: 1 - local vessel density, normalised by the clean photo's
      # own density so that the macula does not count as damage.
      dens = _area((vprob >= 0.5).astype(np.float32), qmap.shape)
      fov_frac = np.maximum(w, 1e-6)
      local = dens / fov_frac
      b_map = 1.0 - np.clip(local / max(1e-6, _global_density(vprob, prep)),
                            0, 1)
      b_score = 1.0 - _global_density(vprob, prep)
      if kind is None:
        clean_q = q
      y = m_small >= 0.5
      within, b_within = (float(metrics.within_image_auroc(
          y[None], x[None], w[None])[0]) for x in (qmap, b_map))
      rows.append(dict(kind=kind, sev=sev, y=y.ravel(),
                       s=qmap.ravel(), b=b_map.ravel(), w=w.ravel(),
                       score=1.0 - q, b_score=b_score, q=q, frac=frac,
                       drop=clean_q - q, within=within,
                       b_within=b_within))
  if not rows:
    raise ValueError("no photograph could be read: " + json.dumps(failed[:5]))

  def measure(sel_kinds) -> dict:
    r = [x for x in rows if x["kind"] is None or x["kind"] in sel_kinds]
    y, s, b, w = (np.concatenate([x[k] for x in r]) for k in "ysbw")
    sev = np.asarray([x["sev"] for x in r])
    score = np.asarray([x["score"] for x in r])
    b_score = np.asarray([x["b_score"] for x in r])
    within = np.asarray([x["within"] for x in r])
    b_within = np.asarray([x["b_within"] for x in r])
    part = np.isfinite(within)
    return dict(map_auroc=metrics.auroc(y, s, w),
                within_auroc=(float(np.mean(within[part])) if part.any()
                              else float("nan")),
                baseline_within_auroc=(float(np.mean(b_within[part]))
                                       if part.any() else float("nan")),
                n_within=int(part.sum()),
                rank_spearman=metrics.spearman(sev, score),
                image_auroc=metrics.auroc(sev > 0, score),
                baseline_map_auroc=metrics.auroc(y, b, w),
                baseline_rank_spearman=metrics.spearman(sev, b_score),
                baseline_image_auroc=metrics.auroc(sev > 0, b_score))

  overall = measure(kinds)
  hiding_kinds = [k for k in kinds if k in synth.VESSEL_HIDING]
  hiding = (dict(measure(hiding_kinds), kinds=hiding_kinds)
            if hiding_kinds else None)
  per_kind = {}
  for k in kinds:
    m = measure([k])
    per_kind[k] = {"map_auroc": m["map_auroc"], "image_auroc": m["image_auroc"],
                   "within_auroc": m["within_auroc"],
                   "quality_drop": float(np.mean([x["drop"] for x in rows
                                                  if x["kind"] == k]))}
  clean = [x for x in rows if x["kind"] is None]
  n_photos = len(clean)
  res = BenchmarkResult(
      n_photos=n_photos, n_variants=len(rows) - n_photos, **overall,
      per_kind=per_kind, failed=failed, hiding=hiding,
      clean_quality_min=float(min(x["q"] for x in clean)),
      clean_quality_mean=float(np.mean([x["q"] for x in clean])),
      clean_fraction_max=float(max(x["frac"] for x in clean)),
      clean_fraction_mean=float(np.mean([x["frac"] for x in clean])))
  if out_json:
    from efiqa_jax import files  # pylint: disable=g-import-not-at-top
    files.atomic_write_json(out_json, dataclasses.asdict(res), indent=2)
  return res


def _entries(inputs: list[str], split: str | None):
  """([(path, source, index)], prepared folders): the photographs to
  benchmark in input order; record `index` of `source` is the raw record
  (`sources.InputSource`: a photograph's path, a prepared record, a tfds:
  record), source None: the photograph at path.

  With `split`, photograph folders are read as `teacher.data.
  list_good_photos` reads them (a folder manifest's sets), and the records
  of a prepared folder or tfds: dataset each get the stratum their
  photograph has in the folder the records share (`_record_photos`), so a
  prepared folder of a folder of photographs splits as the folder does.
  """
  from efiqa_jax import prepared as prepared_lib  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
  if not split:
    r = sources.resolve_inputs(inputs)
    return [(p, r.source, i) for i, p in enumerate(r.paths)], r.prepared
  import dataclasses  # pylint: disable=g-import-not-at-top
  from efiqa_jax.teacher import data as data_lib  # pylint: disable=g-import-not-at-top

  def records(item):
    return (item.startswith(sources.TFDS_PREFIX)
            or prepared_lib.is_prepared(item))

  photos, where, folders = [], [], []
  if not any(records(item) for item in inputs):  # photographs: as before
    photos = data_lib.list_good_photos(inputs)
    where = [(None, -1)] * len(photos)
  else:
    for item in inputs:
      if records(item):
        r = sources.resolve_inputs([item])
        folders += r.prepared
        photos += _record_photos(r.paths)
        where += [(r.source, i) for i in range(len(r.paths))]
      else:
        found = data_lib.list_good_photos([item])
        photos += found
        where += [(None, -1)] * len(found)
  ids = sources.unique_ids([p.path for p in photos])  # as list_good_photos
  photos = [dataclasses.replace(p, id=p.id or i, group=p.group or
                                data_lib.subject_of(p.id or i))
            for p, i in zip(photos, ids)]
  of = data_lib.assign_splits(photos)
  out = [(p.path, *w) for p, w in zip(photos, where) if of[p.id] == split]
  if not out:
    raise sources.NoInputsError(f"no photograph of split {split!r} under "
                                f"{list(inputs)}")
  return out, folders


def _record_photos(paths: list[str]) -> list:
  """`teacher.data.GoodPhoto`s (ids to be given) of records known by their
  photographs' paths: the stratum is the first folder below the folder all
  of them share ('' for a photograph directly in it), as
  `list_good_photos` reads that folder."""
  from efiqa_jax.teacher import data as data_lib  # pylint: disable=g-import-not-at-top
  dirs = [p.replace(os.sep, "/").split("/")[:-1] for p in paths]
  depth = 0
  while dirs and all(len(d) > depth and d[depth] == dirs[0][depth]
                     for d in dirs):
    depth += 1
  return [data_lib.GoodPhoto(path=p, id="", group="",
                             stratum=d[depth] if len(d) > depth else "")
          for p, d in zip(paths, dirs)]


def _read(qm, crop, path: str, source, index: int):
  """The photograph's FOV crop on the model's frame (`fundus.Prepared`
  fields status, message, image, fov_mask): a prepared record as stored,
  otherwise `qm.prepare` of the file or the tfds: record's bytes."""
  import types  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
  try:
    rec = {"path": path} if source is None else source[index]
    if "prepared" not in rec:
      return qm.prepare(sources.record_source(rec))
    row = crop.map(rec)
  except Exception as e:  # pylint: disable=broad-except
    # A record that cannot be read is a failure row, as in assess.
    return types.SimpleNamespace(status="error", image=None, fov_mask=None,
                                 message=f"{type(e).__name__}: {e}")
  return types.SimpleNamespace(status=row["status"], message=row["message"],
                               image=row["image"], fov_mask=row["fov_mask"])


def variant_seed(seed: int, path: str, kind: str, severity: float) -> int:
  """The degradation seed of one variant, from its photograph's file name,
  kind and severity: a run over a subset of photographs or kinds degrades
  each photograph exactly as the full run does."""
  import hashlib  # pylint: disable=g-import-not-at-top
  key = f"{seed}:{os.path.basename(str(path))}:{kind}:{severity:g}"
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4],
                        "little") & 0x7FFFFFFF


def _cell(x) -> str:
  """A table cell: 3 decimals, or a dash where nothing was measured (no
  partly damaged variant of that kind)."""
  return "—" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _area(x: np.ndarray, shape) -> np.ndarray:
  return quality_lib.fov_at(x, shape)


def _global_density(vprob, prep) -> float:
  fm = prep.fov_mask
  return float((vprob[fm] >= 0.5).mean()) if fm.any() else 0.0
