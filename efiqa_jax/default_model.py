"""The bundled default model: how it is built, from data any machine makes.

    efiqa build-default-model --config configs/teacher_default.py \\
        --workdir runs/teacher_default --out efiqa_jax/assets/teacher_default

1. trains a VUAD teacher (`efiqa_jax.teacher.train`) on label-free vessel maps
   of clean synthetic photographs (efiqa_jax.synth), as the config says;
2. calibrates on NEW clean synthetic photographs (seeds disjoint from
   training) whose vessel maps have random regions erased (vessels that
   should be there and are not, which is what the teacher detects):
   - the pixel threshold on |f(x)| that maximises the map's AUROC against the
     erased regions (the reference's 0.02 assumes R2-V2's crisp maps and a
     fully trained base-64 teacher; ours is measured, not assumed);
   - the grade cut-offs on `quality` that best reproduce the grade rule of
     the synthetic set (reject when >= 25 % of the FOV is missing, usable
     when >= 5 %; balanced accuracy over good/usable/reject).
   Besides the synthetic photographs, scikit-image's public-domain retina
   photograph (8 orientations x 4 erasure draws) anchors both on real vessel
   maps;
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

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
MODEL_DIR = os.path.join(ASSETS, "teacher_default")
SAMPLES_DIR = os.path.join(ASSETS, "samples")

# |f(x)| scales differ by teacher (a base-32 256-px teacher fills in ~10x
# less on intact maps than the base-8 128-px default), hence the low end.
THRESHOLDS = (0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025,
              0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.13)
# Pseudo-label cell shares tried (the reference's 0.9 among them).
RELAXES = (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)
LABEL_GRID = 32  # cells per side of the calibrated pseudo-label rule


@dataclasses.dataclass
class Calibration:
  anomaly_threshold: float
  good_min: float
  usable_min: float
  map_auroc: float
  grade_balanced_accuracy: float
  threshold_sweep: dict
  n_images: int
  # The pseudo-label rule: a cell is positive when >= label_relax of its
  # pixels exceed anomaly_threshold; chosen by balanced accuracy against the
  # erased cells on a label_grid x label_grid grid.
  label_relax: float = 0.9
  label_grid: int = LABEL_GRID
  label_balanced_accuracy: float = float("nan")
  relax_sweep: dict = dataclasses.field(default_factory=dict)


def erase_masks(rng: np.random.Generator, fov: np.ndarray,
                n_max: int = 3) -> np.ndarray:
  """Random regions where the vessels are made to vanish, inside the FOV.

  A quarter of the masks are empty (clean); the rest are unions of 1..n_max
  disks of radius 15-45 % of the FOV radius, so the erased share of the FOV
  spans 0 to ~60 %, across the grade cut-offs.
  """
  t = fov.shape[0]
  e = np.zeros((t, t), bool)
  if rng.random() < 0.25:
    return e.astype(np.float32)
  ys, xs = np.nonzero(fov)
  rad = np.sqrt(fov.sum() / np.pi)
  yy, xx = np.mgrid[:t, :t]
  for _ in range(int(rng.integers(1, n_max + 1))):
    k = int(rng.integers(len(ys)))
    r = rad * rng.uniform(0.15, 0.45)
    e |= (yy - ys[k]) ** 2 + (xx - xs[k]) ** 2 <= r * r
  return (e & fov).astype(np.float32)


def _real_anchor(size: int):
  from skimage import data  # pylint: disable=g-import-not-at-top
  from efiqa_jax import fundus  # pylint: disable=g-import-not-at-top
  p = fundus.prepare_image(data.retina(), size)
  if p.status != "ok":
    raise RuntimeError("the scikit-image retina photograph did not prepare")
  imgs, fovs = [], []
  for k in range(4):
    for flip in (False, True):
      im = np.rot90(p.image, k)
      fm = np.rot90(p.fov_mask, k)
      if flip:
        im, fm = im[:, ::-1], fm[:, ::-1]
      imgs.append(np.ascontiguousarray(im))
      fovs.append(np.ascontiguousarray(fm))
  return np.stack(imgs), np.stack(fovs)


def calibrate(quality_model, *, n: int = 96, seed: int = 900_000,
              batch: int = 8, real_anchor: bool = True, real_draws: int = 4,
              label_grid: int = LABEL_GRID,
              progress: bool = True) -> Calibration:
  """Measures the anomaly threshold and grade cut-offs on synthetic data.

  The teacher's job is to notice vessels that should be there and are not.
  So the calibration erases random regions from the label-free vessel maps of
  NEW clean synthetic photographs (seeds disjoint from training) and asks:
  which pixel threshold on |f(x)| makes the map find the erased regions best
  (AUROC), and which quality cut-offs reproduce the synthetic grade rule
  (reject when >= 25 % of the FOV is missing, usable when >= 5 %) best
  (balanced accuracy).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from efiqa_jax import synth  # pylint: disable=g-import-not-at-top
  from efiqa_jax import quality_model as qm  # pylint: disable=g-import-not-at-top

  qmod = quality_model
  t_size = qmod.teacher_size
  graphdef, state = qmod._graphdef, qmod._state  # pylint: disable=protected-access

  @jax.jit
  def erased_anomaly(state, images, fov, erase):
    teacher = nnx.merge(graphdef, state)
    v = qm.teacher_input(images, fov, teacher_size=t_size)
    v = v * (1.0 - erase)[..., None]
    f = teacher.body(v) if getattr(teacher, "residual", False) else (
        teacher(v) - v)
    a = jnp.mean(jnp.abs(f.astype(jnp.float32)), axis=-1)
    fov_t = jax.image.resize(fov.astype(jnp.float32),
                             (images.shape[0], t_size, t_size), "linear")
    return a, (fov_t > 0.5).astype(jnp.float32)

  rng = np.random.default_rng(seed)
  anomalies, fov_ts, erases = [], [], []
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def run(imgs, fovs):
    fov_small = np.stack([np.asarray(Image.fromarray(
        f.astype(np.uint8) * 255).resize((t_size, t_size), Image.BILINEAR))
                          > 127 for f in fovs])
    er = np.stack([erase_masks(rng, f) for f in fov_small])
    a, f = erased_anomaly(state, imgs, fovs, er)
    anomalies.append(np.asarray(a))
    fov_ts.append(np.asarray(f))
    erases.append(er)

  it = range(0, n, batch)
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    it = tqdm(it, desc="calibrate", unit="batch")
  for s in it:
    smps = [synth.generate(seed + i, qmod.work_size, degrade=False)
            for i in range(s, min(s + batch, n))]
    run(np.stack([x.image for x in smps]), np.stack([x.fov_mask for x in smps]))
  # A real anchor: scikit-image's public-domain retina photograph in its 8
  # orientations, each with fresh erasures. Synthetic vessel trees are not
  # real ones; this keeps the cut-offs on the scale of real vessel maps.
  if real_anchor:
    imgs, fovs = _real_anchor(qmod.work_size)
    for _ in range(real_draws):
      for s in range(0, len(imgs), batch):
        run(imgs[s:s + batch], fovs[s:s + batch])
  anomaly = np.concatenate(anomalies)
  fov_t = np.concatenate(fov_ts)
  erase = np.concatenate(erases)
  ms = qm.MAP_SIZE

  def small(x):
    return np.asarray(x).reshape(len(x), ms, t_size // ms, ms,
                                 t_size // ms).mean(axis=(2, 4))

  w_small, e_small = small(fov_t), small(erase * fov_t)
  y = (e_small >= 0.5 * np.maximum(w_small, 1e-6)) & (w_small > 0)
  sweep, best = {}, None
  for t in THRESHOLDS:
    maps = np.asarray(qm.pool_anomaly(anomaly, fov_t, threshold=t))
    auc = metrics.auroc(y.ravel(), maps.ravel(), w_small.ravel())
    sweep[str(t)] = round(float(auc), 4)
    if best is None or auc > best[1]:
      best = (t, auc, maps)
  t, auc, maps = best
  m = len(maps)
  q = np.array([quality_lib.summarise(maps[k], w_small[k])[0]
                for k in range(m)])
  frac = np.array([(erase[k] * fov_t[k]).sum() / max(fov_t[k].sum(), 1)
                   for k in range(m)])
  grades = np.where(frac >= 0.25, "reject",
                    np.where(frac >= 0.05, "usable", "good"))
  good_min, usable_min, bacc = fit_grade_cutoffs(q, grades)
  relax, label_bacc, relax_sweep = fit_label_relax(anomaly * fov_t, fov_t,
                                                   erase, t, label_grid)
  return Calibration(float(t), good_min, usable_min, float(auc), bacc, sweep,
                     m, relax, int(label_grid), label_bacc, relax_sweep)


def fit_label_relax(anomaly, fov, erase, threshold: float, grid: int
                    ) -> tuple[float, float, dict]:
  """The cell share (`relax`) whose hard pseudo-labels (share of pixels
  with |f(x)| > threshold) best find the erased cells (erased >= half of the
  cell's FOV part): balanced accuracy over the cells that touch the FOV."""
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


def calibrated_meta(meta: dict, cal: Calibration, work_size: int) -> dict:
  """The sidecar fields a calibration sets (map threshold, grading,
  pseudo-label rule, the whole calibration record)."""
  return dict(
      meta, work_size=int(work_size),
      anomaly_threshold=cal.anomaly_threshold,
      grading={"good_min": round(cal.good_min, 4),
               "usable_min": round(cal.usable_min, 4)},
      pseudo_labels={"threshold": cal.anomaly_threshold,
                     "relax": cal.label_relax, "grid": cal.label_grid},
      calibration=dataclasses.asdict(cal))


def calibrate_teacher(teacher: str, out: str, *, work_size: int | None = None,
                      n: int = 96, label_grid: int = LABEL_GRID,
                      progress: bool = True) -> dict:
  """`efiqa calibrate-teacher`: measures a trained teacher's map threshold,
  grade cut-offs and pseudo-label rule on synthetic erasures (no quality
  label) and writes the teacher with them in its sidecar to `out`."""
  from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
  model, meta = checkpoints.load_model(teacher, kind="teacher")
  if meta.get("architecture") != "unet":
    raise ValueError(f"{teacher} is not a teacher (architecture "
                     f"{meta.get('architecture')!r}, expected 'unet')")
  if os.path.abspath(out) == os.path.abspath(teacher):
    raise ValueError("--out must differ from the teacher directory")
  ws = int(work_size or meta.get("work_size", 512))
  return _calibrate_and_write(
      model, meta, out, work_size=ws,
      name=os.path.basename(os.path.normpath(teacher)), n=n,
      label_grid=label_grid, progress=progress)


def _calibrate_and_write(model, meta: dict, out: str, *, work_size: int,
                         name: str, n: int, label_grid: int = LABEL_GRID,
                         progress: bool = True, extra: dict | None = None
                         ) -> dict:
  """Calibrates a loaded teacher and writes it with its calibration (the
  sidecar and calibration.json) to `out`; returns the sidecar."""
  import shutil  # pylint: disable=g-import-not-at-top
  from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from efiqa_jax import quality_model as qm  # pylint: disable=g-import-not-at-top
  meta = {k: v for k, v in meta.items()
          if k not in ("format", "version", "architecture", "kwargs")}
  qmod = qm.TeacherQualityModel(model, dict(meta, work_size=work_size),
                                name=name)
  cal = calibrate(qmod, n=n, label_grid=label_grid, progress=progress)
  meta = dict(calibrated_meta(meta, cal, work_size), **(extra or {}))
  if os.path.isdir(out):
    shutil.rmtree(out)
  checkpoints.save_model(out, model, meta)
  with open(os.path.join(out, "calibration.json"), "w") as f:
    json.dump(dataclasses.asdict(cal), f, indent=2)
  return meta


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
  from efiqa_jax import checkpoints, config_util  # pylint: disable=g-import-not-at-top
  from efiqa_jax.teacher import train  # pylint: disable=g-import-not-at-top

  config = config_util.load_config(config_spec, list(overrides))
  res = train.train_and_evaluate(config, workdir)
  export = res.export_dir or os.path.join(workdir, "export")
  model, meta = checkpoints.load_model(export)
  return _calibrate_and_write(
      model, meta, out, work_size=int(config.get("work_size", 512)),
      name="default", n=calib_n, progress=progress,
      extra=dict(name="efiqa-default-teacher",
                 image_size=int(config.image_size),
                 built_by=("efiqa build-default-model --config " +
                           config_spec + "".join(" " + o for o in overrides))))


def write_samples(out_dir: str) -> list[str]:
  """The bundled sample photographs (efiqa_jax/assets/samples).

  scikit-image's public-domain retina photograph as is, under two of the
  project's degradations (severe blur; haze), and one clean synthetic
  photograph. Recreate with
  `python -c "from efiqa_jax import default_model as d; d.write_samples('efiqa_jax/assets/samples')"`.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from skimage import data  # pylint: disable=g-import-not-at-top
  from efiqa_jax import fundus, synth  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  retina = data.retina()
  small = np.asarray(Image.fromarray(retina).resize((1024, 1024),
                                                     Image.LANCZOS))
  p = fundus.prepare_image(small, 1024)
  paths = []

  def save(name, img):
    path = os.path.join(out_dir, name)
    Image.fromarray(img).save(path, quality=90)
    paths.append(path)

  save("retina.jpg", small)
  for kind, sev, seed in (("blur", 0.9, 1), ("haze", 0.9, 2)):
    img, _, _ = synth.degrade(p.image, p.fov_mask, seed, kinds=[kind],
                              severity=sev)
    save(f"retina_{kind}.jpg", img)
  save("synthetic.jpg", synth.generate(7, 768, degrade=False).image)
  return paths
