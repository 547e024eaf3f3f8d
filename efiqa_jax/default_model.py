"""The bundled default model: the recipe that builds it, and the samples.

    efiqa build-default-model ../shared/data/fundus_train \\
        --out efiqa_jax/assets/teacher_default

1. splits the good photographs given (teacher.data.assign_splits: per set,
   by subject hash: train / calibration / held out);
2. trains a VUAD teacher (`efiqa_jax.teacher.train`) on the label-free
   vessel maps of the train split, as configs/teacher_default.py says;
3. calibrates it (`efiqa_jax.teacher.calibration`) on the calibration split
   and its synthetic degradations and vessel erasures: the map rule, the
   grade cut-offs and the pseudo-label rule, with no quality label;
4. writes the teacher with that calibration, the command, the data and the
   split in its sidecar. The held-out split is never used here: it is what
   `efiqa benchmark --split heldout` measures on.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
MODEL_DIR = os.path.join(ASSETS, "teacher_default")
SAMPLES_DIR = os.path.join(ASSETS, "samples")
DEFAULT_CONFIG = "teacher_default"  # configs/teacher_default.py


def build_default_model(inputs: Sequence[str], out: str, *,
                        config_spec: str = DEFAULT_CONFIG,
                        workdir: str = "runs/teacher_default",
                        overrides: Sequence[str] = (),
                        progress: bool = True) -> dict:
  """Split, train (or resume in `workdir`), calibrate and write the default
  model to `out`; returns its sidecar."""
  from efiqa_jax import checkpoints, config_util, files, runtime  # pylint: disable=g-import-not-at-top
  from efiqa_jax.teacher import calibration, train  # pylint: disable=g-import-not-at-top
  from efiqa_jax.teacher import data as data_lib  # pylint: disable=g-import-not-at-top

  inputs = [str(i) for i in inputs]
  photos = data_lib.list_good_photos(inputs)
  splits = data_lib.assign_splits(photos)
  train_paths = [p.path for p in photos if splits[p.id] == "train"]
  if not train_paths or not any(s == "calibration" for s in splits.values()):
    raise ValueError(f"{len(photos)} photographs under {inputs}: too few to "
                     "split into training and calibration photographs")
  workdir = files.output_dir(workdir)  # local or gs://
  listing = files.join(workdir, "train_photos.csv")
  if runtime.is_primary():
    files.atomic_write_csv(listing, ["path"], [
        {"path": os.fspath(files.abs_path(p))} for p in train_paths])
  runtime.barrier("build-default-model-listing")

  config = config_util.load_config(config_spec, list(overrides))
  steps_schedule(config, len(train_paths))
  with config.unlocked():
    config.data.source = "folder"
    config.data.vessels = "label_free"
    config.data.path = listing
    config.data.split = "all"
  seeds = [int(x) for x in (config.get("build_seeds") or (config.seed,))]
  heldout = sorted(p.id for p in photos if splits[p.id] == "heldout")
  command = " ".join(["efiqa build-default-model", *inputs, "--out", out] +
                     (["--config", config_spec]
                      if config_spec != DEFAULT_CONFIG else []) +
                     [f"--config.{o.lstrip('-').split('config.', 1)[-1]}"
                      for o in overrides])
  split_desc = dict(
      rule=("teacher.data.assign_splits: per set, subjects ordered by "
            f"sha256; {data_lib.HELDOUT_SHARE:g} held out, "
            f"{data_lib.CALIBRATION_SHARE:g} calibration, the rest train"),
      train=len(train_paths), heldout=heldout,
      calibration=sorted(p.id for p in photos
                         if splits[p.id] == "calibration"))
  extra = dict(name="efiqa-default-teacher", image_size=int(config.image_size),
               built_by=command, split=split_desc,
               data_terms=("trained and calibrated on research-use "
                           "photographs (DRIVE, CHASE_DB1, HRF when built "
                           "from ../shared/data/fundus_train): the model "
                           "may ship, the photographs may not"))
  # One training run per seed (same data, schedule and split), each
  # calibrated on the calibration split; the best calibration score there
  # (what the map rule is chosen by) is kept:
  # runs of one recipe differ by chance (bench/README.md, "Default teacher").
  results = {}
  for seed in seeds:
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.seed = seed
    wd = workdir if len(seeds) == 1 else files.join(workdir, f"seed_{seed}")
    res = train.train_and_evaluate(cfg, wd)
    export = res.export_dir or files.join(wd, "export")
    model, meta = checkpoints.load_model(export)
    dest = out if len(seeds) == 1 else files.join(wd, "calibrated")
    results[seed] = (dest, calibration.calibrate_and_write(
        model, meta, dest, work_size=int(config.data.work_size),
        name="default", photos=inputs, split="calibration",
        progress=progress, extra=extra))
  if len(seeds) == 1:
    return results[seeds[0]][1]
  scores = {s: calibration.rule_score(m["calibration"]["map_auroc"],
                                      m["calibration"].get("map_within_auroc"))
            for s, (_, m) in results.items()}
  best = max(seeds, key=lambda s: (scores[s], -seeds.index(s)))
  src, meta = results[best]
  meta = dict(meta, seed_selection=dict(
      rule=("best calibration score on the calibration split (mean of the "
            "pooled and within-photograph map AUROCs)"),
      calibration_score={str(s): round(a, 4) for s, a in scores.items()},
      calibration_map_auroc={
          str(s): round(float(m["calibration"]["map_auroc"]), 4)
          for s, (_, m) in results.items()},
      chosen=best))
  out_p = files.abs_path(out)
  if runtime.is_primary() and out_p.exists():
    out_p.rmtree()
  runtime.barrier("build-default-model-cleared")
  model, _ = checkpoints.load_model(src)
  checkpoints.save_model(out_p, model, meta)
  if runtime.is_primary():
    files.atomic_write_bytes(out_p / "calibration.json", files.read_bytes(
        files.join(src, "calibration.json")))
  runtime.barrier("build-default-model-written")
  return meta


def steps_schedule(config, n_maps: int) -> None:
  """Epochs for `config.steps` steps over n_maps maps, with the masking and
  FOV-crop schedules over 20-80 % of them (the paper's shape)."""
  steps = int(config.get("steps", 0) or 0)
  if steps <= 0:
    return
  e = max(1, int(round(steps * int(config.batch_size) / max(n_maps, 1))))
  config.num_epochs = e
  lo, hi = int(round(0.2 * e)), max(int(round(0.8 * e)), int(round(0.2 * e)) + 1)
  config.mask.transition_start, config.mask.transition_end = lo, hi
  config.augment.fov_start, config.augment.fov_end = lo, hi


def half_blurred_sample(model):
  """The README's localisation example: (prepared, blurred, half, maps).

  The bundled sample photograph's FOV crop at `model.work_size`
  (`fundus.Prepared`), a copy with the left half blurred (`synth.degrade`,
  blur at severity 1, seed 0), that half as a bool mask, and `model`'s maps
  of the two, (2, h, w)."""
  from efiqa_jax import fundus, synth  # pylint: disable=g-import-not-at-top
  p = fundus.prepare_fundus(os.path.join(SAMPLES_DIR, "retina.jpg"),
                            model.work_size)
  img, _, _ = synth.degrade(p.image, p.fov_mask, 0, kinds=["blur"],
                            severity=1.0)
  half = np.zeros(p.fov_mask.shape, bool)
  half[:, : half.shape[1] // 2] = True
  blurred = np.where(half[..., None], img, p.image)
  maps = model.predict(np.stack([p.image, blurred]),
                       np.stack([p.fov_mask, p.fov_mask]))
  return p, blurred, half, maps


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
