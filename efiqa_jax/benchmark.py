"""`efiqa benchmark GOOD_PHOTOS/`: does the model see real-looking damage?

Each good photograph is assessed as is and under the project's synthetic
degradations (efiqa_jax.synth.degrade: blur, illumination, haze, glare,
artefacts, noise, JPEG) at several severities. Reported:
  map_auroc            pixel AUROC of the map against the degradation masks
                       (inside the FOV, degraded variants and clean originals)
  rank_spearman        Spearman correlation of (1 - quality) with severity
  image_auroc          AUROC of (1 - quality) for degraded vs clean
  baseline_*           the same for a vessel-density baseline (share of FOV
                       with label-free vessel probability >= 0.5; local map =
                       1 - local vessel density)
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

  def to_markdown(self) -> str:
    rows = [("map AUROC", self.map_auroc, self.baseline_map_auroc),
            ("image AUROC (degraded vs clean)", self.image_auroc,
             self.baseline_image_auroc),
            ("Spearman (severity vs 1 - quality)", self.rank_spearman,
             self.baseline_rank_spearman)]
    lines = [f"{self.n_photos} photographs, {self.n_variants} degraded "
             "variants", "", "| metric | model | vessel-density baseline |",
             "|---|---|---|"]
    lines += [f"| {n} | {a:.3f} | {b:.3f} |" for n, a, b in rows]
    if self.per_kind:
      lines += ["", "| degradation | map AUROC | mean quality drop |",
                "|---|---|---|"]
      for k, v in sorted(self.per_kind.items()):
        lines.append(f"| {k} | {v['map_auroc']:.3f} | {v['quality_drop']:.3f} |")
    return "\n".join(lines)


def run_benchmark(inputs, *, model: str = "default", kinds=None,
                  severities=DEFAULT_SEVERITIES, seed: int = 0,
                  quality_model=None, out_json: str | None = None,
                  progress: bool = True) -> BenchmarkResult:
  import jax  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sources, synth, vessels  # pylint: disable=g-import-not-at-top
  from efiqa_jax import quality_model as qm_lib  # pylint: disable=g-import-not-at-top

  if isinstance(inputs, str):
    inputs = [inputs]
  paths = sources.list_inputs(list(inputs))  # before the model: exit 4 fast
  qm = quality_model or qm_lib.load_quality_model(model)
  kinds = list(kinds) if kinds else list(synth.KINDS)
  vfn = jax.jit(vessels.vessel_probability)

  pix_y, pix_s, pix_b, pix_w = [], [], [], []
  img_sev, img_q, img_b = [], [], []
  per_kind = {k: {"y": [], "s": [], "w": [], "drop": []} for k in kinds}
  failed = []
  n_var = 0
  rng = np.random.default_rng(seed)
  it = paths
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    it = tqdm(paths, desc="benchmark", unit="photo")
  for path in it:
    prep = qm.prepare(path)
    if prep.status != "ok":
      failed.append({"image": path, "status": prep.status,
                     "message": prep.message})
      continue
    variants = [(prep.image, np.zeros(prep.fov_mask.shape, np.float32),
                 0.0, None)]
    for kind in kinds:
      for sev in severities:
        s = int(rng.integers(2**31))
        img, mask, _ = synth.degrade(prep.image, prep.fov_mask, s,
                                     kinds=[kind], severity=sev)
        variants.append((img, mask, sev, kind))
    n_var += len(variants) - 1
    imgs = np.stack([v[0] for v in variants])
    fovs = np.repeat(prep.fov_mask[None], len(variants), axis=0)
    maps = qm.predict(imgs, fovs)
    vp = np.asarray(vfn(imgs, fovs))
    clean_q = None
    for (img, mask, sev, kind), qmap, vprob in zip(variants, maps, vp):
      w = quality_lib.fov_at(prep.fov_mask, qmap.shape)
      q, _ = quality_lib.summarise(qmap, w)
      m_small = _area(mask, qmap.shape)
      # Baseline: 1 - local vessel density, normalised by the clean photo's
      # own density so that the macula does not count as damage.
      dens = _area((vprob >= 0.5).astype(np.float32), qmap.shape)
      fov_frac = np.maximum(w, 1e-6)
      local = dens / fov_frac
      b_map = 1.0 - np.clip(local / max(1e-6, _global_density(vprob, prep)),
                            0, 1)
      b_score = 1.0 - _global_density(vprob, prep)
      y = (m_small >= 0.5)
      pix_y.append(y.ravel()); pix_s.append(qmap.ravel())
      pix_b.append(b_map.ravel()); pix_w.append(w.ravel())
      img_sev.append(sev); img_q.append(1.0 - q); img_b.append(b_score)
      if kind is None:
        clean_q = q
      else:
        pk = per_kind[kind]
        pk["y"].append(y.ravel()); pk["s"].append(qmap.ravel())
        pk["w"].append(w.ravel()); pk["drop"].append(clean_q - q)

  if not img_q:
    raise ValueError("no photograph could be read: " + json.dumps(failed[:5]))
  y, s, b, w = (np.concatenate(a) for a in (pix_y, pix_s, pix_b, pix_w))
  sev = np.asarray(img_sev)
  res = BenchmarkResult(
      n_photos=len(img_q) - n_var, n_variants=n_var,
      map_auroc=metrics.auroc(y, s, w),
      rank_spearman=metrics.spearman(sev, img_q),
      image_auroc=metrics.auroc(sev > 0, img_q),
      baseline_map_auroc=metrics.auroc(y, b, w),
      baseline_rank_spearman=metrics.spearman(sev, img_b),
      baseline_image_auroc=metrics.auroc(sev > 0, img_b),
      per_kind={k: {"map_auroc": metrics.auroc(np.concatenate(v["y"]),
                                               np.concatenate(v["s"]),
                                               np.concatenate(v["w"])),
                    "quality_drop": float(np.mean(v["drop"]))}
                for k, v in per_kind.items() if v["y"]},
      failed=failed)
  if out_json:
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    with open(out_json, "w") as f:
      json.dump(dataclasses.asdict(res), f, indent=2)
  return res


def _area(x: np.ndarray, shape) -> np.ndarray:
  return quality_lib.fov_at(x, shape)


def _global_density(vprob, prep) -> float:
  fm = prep.fov_mask
  return float((vprob[fm] >= 0.5).mean()) if fm.any() else 0.0
