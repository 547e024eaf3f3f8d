"""EFIQA distillation end to end on synthetic photographs, from one seed.

  PYTHONPATH=$PWD python experiments/distill_synthetic.py --out runs/distill_synth \
      [--seed 0] [--train 160] [--per-kind 12] [--clean 12]

Stages (each a library function or the `efiqa` CLI; masks are read only by
the final evaluation and by the clearly separate oracle probe):
  1. training photographs: `n_train` synthetic photographs (30 % clean, the
     rest with 1-3 random degradations from `train_pool`), written as PNG;
  2. encoder: a tiny DINOv3-like ViT pretrained self-supervised on those
     photographs (`efiqa pretrain-encoder`, masked image modelling; no label,
     no mask);
  3. `efiqa distill` (the CLI): the teacher's pseudo-labels (default: the
     bundled label-free teacher; `--teacher DIR`, by the teacher's
     calibrated rule when it has one) -> encoder features -> adapter;
  4. held-out photographs (other seeds): `per_kind` photographs per
     degradation kind (one kind each, random severity) plus `n_clean` clean
     ones; the student's and the teacher's maps against the degradation masks
     with one protocol: both maps bilinearly resized to `eval_size` on the
     FOV crop (interpolating over map cells that touch the FOV only),
     truth = degradation mask (area-resampled into the crop frame) >= 0.5, pixels weighted by their FOV share, scores binned to 1e-4,
     AUROC (`efiqa_jax.metrics.auroc`); per kind, over EFIQA's
     anatomy-hiding kinds (+ clean) and over all kinds (+ clean);
     the student's map is the one `efiqa assess` writes (EFIQA's map filter);
     its raw sigmoid and the teacher's map under the same filter are beside;
  5. baselines in the same run: the teacher's own pseudo-labels of the
     held-out photographs (the 0/1 grid the student is trained to predict),
     the same distillation with a randomly initialised encoder, and the oracle probe (the same adapter trained on
     the TRUE training masks instead of pseudo-labels) for both encoders --
     what each encoder could carry at best;
  6. result.json, result.md, figure.png (photo, mask, teacher map, its
     pseudo-labels, student map).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# EFIQA's definition: quality = visible anatomy. These kinds hide vessels.
ANATOMY_KINDS = ("blur", "motion", "haze", "overexposure", "glare", "noise")


@dataclasses.dataclass
class Settings:
  seed: int = 0
  n_train: int = 160
  per_kind: int = 12
  n_clean: int = 12
  size: int = 512                       # synthetic photograph side
  work_size: int = 512                  # FOV crop side (held-out, oracle)
  eval_size: int = 128                  # evaluation grid on the FOV crop
  train_pool: tuple = tuple()           # empty: all kinds
  heldout_kinds: tuple = tuple()        # empty: all kinds
  teacher: str = "default"
  encoder_config: str = "configs/encoder_mim.py"
  encoder_overrides: tuple = ()
  adapter_config: str = "configs/adapter_synth.py"
  adapter_overrides: tuple = ()
  random_baseline: bool = True
  pretrain: bool = True                 # False: the random encoder only
  oracle_probe: bool = True
  teacher_maps: bool = True             # the teacher's columns in the table
  figure_rows: int = 6


class _Clock:
  """Wall and process CPU seconds per stage."""

  def __init__(self):
    self.rows = {}

  def __call__(self, name):
    clock = self

    class _Ctx:
      def __enter__(self):
        self.w, self.c = time.time(), time.process_time()

      def __exit__(self, *exc):
        clock.rows[name] = {"wall_s": round(time.time() - self.w, 1),
                            "cpu_s": round(time.process_time() - self.c, 1)}
    return _Ctx()


def _seeds(seed: int):
  base = 1_000_000 * (int(seed) + 1)
  return base, base + 500_000


def write_training_photos(out_dir, seed, n, size, pool):
  """Unlabelled training photographs (PNG). Returns the folder."""
  from PIL import Image
  from efiqa_jax import synth
  os.makedirs(out_dir, exist_ok=True)
  base, _ = _seeds(seed)
  for i in range(n):
    p = os.path.join(out_dir, f"train_{i:05d}.png")
    if os.path.exists(p):
      continue
    s = synth.generate(base + i, size, pool=list(pool) if pool else None)
    Image.fromarray(s.image).save(p + ".tmp.png")
    os.replace(p + ".tmp.png", p)
  return out_dir


def heldout_set(seed, per_kind, n_clean, size, kinds, work_size=512):
  """[(kind or 'clean', SynthSample, Prepared)] on seeds disjoint from
  training (one degradation kind per photograph, random severity)."""
  from efiqa_jax import fundus, synth
  _, base = _seeds(seed)
  out = []
  for ki, k in enumerate(["clean"] + list(kinds)):
    n = n_clean if k == "clean" else per_kind
    for i in range(n):
      s = base + 1000 * ki + i
      smp = (synth.generate(s, size, degrade=False) if k == "clean" else
             synth.generate(s, size, kinds=[k]))
      prep = fundus.prepare_image(smp.image, work_size)
      if prep.status != "ok":
        raise RuntimeError(f"synthetic seed {s}: {prep.status} {prep.message}")
      out.append((k, smp, prep))
  return out


def _resize(m, n):
  from PIL import Image
  return np.asarray(Image.fromarray(np.asarray(m, np.float32), mode="F")
                    .resize((n, n), Image.BILINEAR))


def eval_truth(heldout, eval_size):
  """Per photograph: (truth bool (E, E), FOV weight (E, E)) on the crop."""
  from efiqa_jax import fundus
  from efiqa_jax import quality as q
  out = []
  for _, smp, prep in heldout:
    t = fundus.map_to_crop(smp.degradation, prep, eval_size) >= 0.5
    w = q.fov_at(prep.fov_mask, (eval_size, eval_size))
    out.append((t, w))
  return out


def upsample_in_fov(m, fov_mask, n):
  """Map (h, w) -> (n, n), bilinear over the map cells that touch the FOV
  only: cells wholly outside (0 by convention in both models) would pull
  the FOV rim towards 0 and bias rim regions (shadow, lashes, glare)."""
  from efiqa_jax import quality as q
  valid = (q.fov_at(fov_mask, m.shape) > 0).astype(np.float32)
  num = _resize(np.asarray(m, np.float32) * valid, n)
  den = _resize(valid, n)
  return np.where(den > 1e-6, num / np.maximum(den, 1e-6), 0.0)


def map_aurocs(maps, heldout, truth, eval_size):
  """{'per_kind': {k: auroc}, 'anatomy': .., 'all': ..}."""
  from efiqa_jax import metrics
  kinds = [k for k, _, _ in heldout]
  ys, ss, ws = [], [], []
  for m, (t, w), (_, _, prep) in zip(maps, truth, heldout):
    ys.append(t.ravel())
    ss.append(np.round(upsample_in_fov(m, prep.fov_mask, eval_size),
                       4).ravel())
    ws.append(w.ravel())

  def auc(sel):
    idx = [i for i, k in enumerate(kinds) if sel(k)]
    y = np.concatenate([ys[i] for i in idx])
    s = np.concatenate([ss[i] for i in idx])
    w = np.concatenate([ws[i] for i in idx])
    return metrics.auroc(y, s, w)

  per = {k: auc(lambda x, k=k: x == k) for k in dict.fromkeys(kinds)
         if k != "clean"}
  return {"per_kind": per,
          "anatomy": auc(lambda x: x == "clean" or x in ANATOMY_KINDS),
          "all": auc(lambda x: True)}


def pseudo_label_maps(teacher, imgs, fovs, spec, batch=8):
  """What `efiqa distill` would label each held-out photograph with (hard
  pseudo-labels on the adapter grid, 0/1, by the rule `spec` distill used):
  the target the student learns."""
  import jax
  from flax import nnx
  from efiqa_jax import checkpoints, pseudo_labels
  from efiqa_jax import quality_model as qm
  model, meta = checkpoints.load_model(teacher)
  size = int(meta.get("image_size", 256))
  gd, state = nnx.split(model)
  fn = jax.jit(lambda st, x, f: qm.teacher_anomaly(
      nnx.merge(gd, st), x, f, teacher_size=size)[0])
  out = []
  for s in range(0, len(imgs), batch):
    a = np.asarray(fn(state, imgs[s:s + batch], fovs[s:s + batch]))
    out += [pseudo_labels.patch_labels(x, spec).astype(np.float32) / 255.0
            for x in a]
  return np.stack(out)


def oracle_labels(train_dir, seed, n, size, grid, out_dir, pool,
                  work_size=512):
  """Cell labels from the TRUE masks of the training photographs (probe
  only): a cell is positive when its mean degradation mask >= 0.5."""
  from PIL import Image
  from efiqa_jax import fundus, pseudo_labels, synth
  os.makedirs(os.path.join(out_dir, "labels"), exist_ok=True)
  base, _ = _seeds(seed)
  for i in range(n):
    dst = os.path.join(out_dir, "labels", f"train_{i:05d}.png")
    if os.path.exists(dst):
      continue
    s = synth.generate(base + i, size, pool=list(pool) if pool else None)
    prep = fundus.prepare_fundus(os.path.join(train_dir,
                                              f"train_{i:05d}.png"), work_size)
    m = fundus.map_to_crop(s.degradation, prep, grid * 16)
    cell = pseudo_labels.cell_means(m, grid)
    Image.fromarray(((cell >= 0.5) * 255).astype(np.uint8)).save(dst)
  return out_dir


def _teacher_summary(teacher):
  from efiqa_jax import checkpoints
  m = checkpoints.read_meta(teacher)
  cal = m.get("calibration", {})
  return {"path": teacher, "name": m.get("name"),
          "base_channels": m.get("kwargs", {}).get("base_channels"),
          "image_size": m.get("image_size"), "steps": m.get("steps"),
          "built_by": m.get("built_by"),
          "erasure_map_auroc": cal.get("map_auroc"),
          "pseudo_labels": m.get("pseudo_labels")}


def _cfg_args(spec, overrides):
  a = ["--config", spec]
  for o in overrides:
    a += ["--set", o]
  return a


def run_experiment(out_dir: str, settings: Settings = Settings(),
                   progress: bool = False) -> dict:
  """Everything from the seed; returns (and writes) the result dict."""
  from efiqa_jax import cli, config_util, synth
  from efiqa_jax import quality_model as qm
  from efiqa_jax.encoders import pretrain
  from efiqa_jax.models import vit
  from efiqa_jax.student import train
  from efiqa_jax import checkpoints
  from flax import nnx

  st = settings
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  clock = _Clock()
  t_all, c_all = time.time(), time.process_time()
  quiet = [] if progress else ["--quiet"]
  spec = lambda s: s if os.path.isabs(s.split(":")[0]) else os.path.join(
      REPO, s)
  teacher = qm.DEFAULT_MODEL_DIR if st.teacher == "default" else st.teacher

  with clock("training photographs"):
    train_dir = write_training_photos(os.path.join(out_dir, "train_photos"),
                                      st.seed, st.n_train, st.size,
                                      st.train_pool)
  encoders = {}
  enc_dir = os.path.join(out_dir, "encoder_mim")
  if st.pretrain:
    with clock("pretrain encoder (MIM)"):
      if not os.path.exists(os.path.join(enc_dir, "efiqa.json")):
        rc = cli.main(["pretrain-encoder", train_dir, "--out", enc_dir] +
                      _cfg_args(spec(st.encoder_config),
                                st.encoder_overrides) + quiet)
        if rc != 0:
          raise RuntimeError(f"efiqa pretrain-encoder exited {rc}")
    encoders["mim"] = enc_dir
  if st.random_baseline or not st.pretrain:
    rnd = os.path.join(out_dir, "encoder_random")
    if not os.path.exists(os.path.join(rnd, "efiqa.json")):
      ecfg = config_util.load_config(spec(st.encoder_config),
                                     list(st.encoder_overrides))
      checkpoints.save_model(rnd, vit.VisionTransformer(
          **dict(ecfg.encoder), rngs=nnx.Rngs(int(ecfg.seed))))
    encoders["random"] = rnd
  first = next(iter(encoders))  # the student of the headline and the figure

  students = {}
  for name, enc in encoders.items():
    wd = os.path.join(out_dir, f"distill_{name}")
    with clock(f"efiqa distill ({name} encoder)"):
      rc = cli.main(["distill", train_dir, "--teacher", teacher, "--encoder",
                     enc, "--workdir", wd] +
                    _cfg_args(spec(st.adapter_config),
                              st.adapter_overrides) + quiet)
      if rc != 0:
        raise RuntimeError(f"efiqa distill exited {rc}")
    students[f"student ({name} encoder)"] = (enc, os.path.join(
        wd, "train", "adapter"))
    if st.oracle_probe:
      with clock(f"oracle probe ({name} encoder)"):
        data = json.load(open(os.path.join(wd, "train", "data.json")))
        grid = data["label_grid"][0]
        lab = oracle_labels(train_dir, st.seed, st.n_train, st.size, grid,
                            os.path.join(out_dir, f"oracle_labels_{grid}"),
                            st.train_pool, st.work_size)
        cfg = config_util.load_config(spec(st.adapter_config),
                                      list(st.adapter_overrides))
        cfg.features_dir = os.path.join(wd, "features")
        cfg.labels_dir = lab
        cfg.progress = False
        res = train.train_and_evaluate(cfg, os.path.join(
            out_dir, f"oracle_{name}"))
      students[f"oracle probe ({name} encoder)"] = (enc, res.adapter_dir)

  with clock("held-out photographs"):
    held = heldout_set(st.seed, st.per_kind, st.n_clean, st.size,
                       st.heldout_kinds or synth.KINDS, st.work_size)
    truth = eval_truth(held, st.eval_size)
    imgs = np.stack([p.image for _, _, p in held])
    fovs = np.stack([p.fov_mask for _, _, p in held])
  from efiqa_jax import quality as quality_lib
  efiqa_filter = lambda ms: np.stack([quality_lib.efiqa_map_filter(m, f)
                                      for m, f in zip(ms, fovs)])
  from efiqa_jax import pseudo_labels as pl_lib
  used = json.load(open(os.path.join(out_dir, f"distill_{first}", "pseudo",
                                     "spec.json")))
  maps = {}
  if st.teacher_maps:
    with clock("teacher maps"):
      maps["teacher"] = qm.TeacherQualityModel.from_checkpoint(
          teacher).predict(imgs, fovs)
      # The same post-processing as the student's map, for a like-for-like
      # comparison (the teacher's own map is window-pooled already).
      maps["teacher + EFIQA map filter"] = efiqa_filter(maps["teacher"])
    with clock("teacher pseudo-label maps"):
      spec = pl_lib.LabelSpec(threshold=used["threshold"], grid=used["grid"],
                              relax=used["relax"], mode=used["mode"])
      grid = spec.grid
      maps[f"teacher pseudo-labels ({grid}x{grid})"] = pseudo_label_maps(
          teacher, imgs, fovs, spec)
  with clock("student maps"):
    for name, (enc, ada) in students.items():
      # The student's map (as `efiqa assess` writes it) is EFIQA's filtered
      # map; its raw sigmoid(logits) is reported beside it.
      raw = qm.StudentQualityModel.from_checkpoints(
          enc, ada, map_filter="none").predict(imgs, fovs)
      maps[name] = efiqa_filter(raw)
      maps[name.replace("student", "student raw sigmoid", 1).replace(
          "oracle probe", "oracle probe raw sigmoid", 1)] = raw
  with clock("evaluation"):
    scores = {k: map_aurocs(v, held, truth, st.eval_size)
              for k, v in maps.items()}
  pseudo = json.load(open(os.path.join(out_dir, f"distill_{first}", "train",
                                       "data.json")))
  pre = (checkpoints.read_meta(enc_dir).get("pretraining", {})
         if st.pretrain else {})
  result = {
      "settings": dataclasses.asdict(st),
      "anatomy_kinds": list(ANATOMY_KINDS),
      "n_heldout": len(held),
      "heldout_positive_share": float(
          sum((t * w).sum() for t, w in truth) /
          sum(w.sum() for _, w in truth)),
      "pseudo_label_positive_share": pseudo["positive_fraction"],
      "pseudo_label_rule": {k: used[k] for k in ("threshold", "relax", "grid",
                                                 "mode")},
      "teacher": _teacher_summary(teacher),
      "pretraining": {k: pre.get(k) for k in ("steps", "first_loss",
                                               "final_loss", "images")},
      "map_auroc": scores,
      "time": dict(clock.rows, total={
          "wall_s": round(time.time() - t_all, 1),
          "cpu_s": round(time.process_time() - c_all, 1)}),
  }
  with open(os.path.join(out_dir, "result.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out_dir, "result.md"), "w") as f:
    f.write(to_markdown(result))
  if st.figure_rows:
    render_figure(os.path.join(out_dir, "figure.png"), held, maps,
                  next(iter(students)), st.figure_rows)
  return result


def to_markdown(r: dict) -> str:
  sc = r["map_auroc"]
  names = list(sc)
  kinds = list(next(iter(sc.values()))["per_kind"])
  lines = ["| held-out map AUROC | " + " | ".join(names) + " |",
           "|---" * (len(names) + 1) + "|"]
  def row(label, get):
    return f"| {label} | " + " | ".join(f"{get(sc[n]):.3f}" for n in names) + " |"
  lines.append(row("**anatomy-hiding kinds + clean**", lambda s: s["anatomy"]))
  lines.append(row("all kinds + clean", lambda s: s["all"]))
  for k in kinds:
    tag = " (anatomy)" if k in r["anatomy_kinds"] else ""
    lines.append(row(f"{k}{tag}", lambda s, k=k: s["per_kind"][k]))
  t = r["time"]
  lines += ["", f"{r['n_heldout']} held-out photographs; degraded share of "
            f"FOV pixels {r['heldout_positive_share']:.3f}; pseudo-label "
            f"positive cells {r['pseudo_label_positive_share']:.3f}" + (
                " (|f(x)| > {threshold:g} on >= {relax:g} of a cell)".format(
                    **r["pseudo_label_rule"]) if "pseudo_label_rule" in r
                else "") + "; " + (
                f"pretraining loss {r['pretraining']['first_loss']:.3f} -> "
                f"{r['pretraining']['final_loss']:.3f}."
                if r["pretraining"].get("first_loss") is not None
                else "no pretraining (randomly initialised encoder)."), "",
            "| stage | wall s | CPU s |", "|---|---|---|"]
  lines += [f"| {k} | {v['wall_s']} | {v['cpu_s']} |" for k, v in t.items()]
  return "\n".join(lines) + "\n"


def render_figure(path, held, maps, student, rows):
  """Rows: one held-out photograph per anatomy-hiding kind."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from efiqa_jax import fundus
  picks = []
  for k in ANATOMY_KINDS:
    cand = [i for i, (kk, smp, _) in enumerate(held) if kk == k]
    if cand:  # the most severe one of that kind
      picks.append(max(cand, key=lambda i: held[i][1].labels["severity"]))
  picks = picks[:rows]
  pseudo = [k for k in maps if k.startswith("teacher pseudo-labels")]
  teacher = [("teacher", "teacher map")] if "teacher" in maps else []
  ncol = 3 + len(teacher) + len(pseudo)
  fig, ax = plt.subplots(len(picks), ncol, figsize=(2.5 * ncol,
                                                    2.6 * len(picks)))
  ax = np.atleast_2d(ax)
  for r, i in enumerate(picks):
    kind, smp, prep = held[i]
    m = fundus.map_to_crop(smp.degradation, prep, prep.image.shape[0])
    panels = [(prep.image, f"{kind} (sev {smp.labels['severity']:.2f})"),
              (m, "degradation mask")]
    panels += [(maps[k][i], title) for k, title in teacher]
    panels += [(maps[k][i], "pseudo-labels") for k in pseudo]
    panels.append((maps[student][i], "student"))
    for c, (im, title) in enumerate(panels):
      a = ax[r, c]
      if im.ndim == 3:
        a.imshow(im)
      else:
        a.imshow(im, vmin=0, vmax=1, cmap="magma", interpolation="bilinear")
      a.set_title(title, fontsize=9)
      a.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--train", type=int, default=Settings.n_train)
  ap.add_argument("--per-kind", type=int, default=Settings.per_kind)
  ap.add_argument("--clean", type=int, default=Settings.n_clean)
  ap.add_argument("--train-pool", default="",
                  help="comma-separated kinds for the training photographs "
                  "(default: all)")
  ap.add_argument("--heldout-kinds", default="",
                  help="comma-separated kinds for the held-out photographs "
                  "(default: all)")
  ap.add_argument("--encoder-config", default=Settings.encoder_config)
  ap.add_argument("--encoder-set", action="append", default=[])
  ap.add_argument("--adapter-config", default=Settings.adapter_config)
  ap.add_argument("--adapter-set", action="append", default=[])
  ap.add_argument("--teacher", default="default")
  ap.add_argument("--no-baselines", action="store_true")
  ap.add_argument("--no-pretrain", action="store_true",
                  help="skip the MIM pretraining: the randomly initialised "
                  "encoder is the student's")
  ap.add_argument("--progress", action="store_true")
  a = ap.parse_args(argv)
  st = Settings(seed=a.seed, n_train=a.train, per_kind=a.per_kind,
                n_clean=a.clean,
                train_pool=tuple(k for k in a.train_pool.split(",") if k),
                heldout_kinds=tuple(k for k in a.heldout_kinds.split(",")
                                    if k),
                teacher=a.teacher, encoder_config=a.encoder_config,
                encoder_overrides=tuple(a.encoder_set),
                adapter_config=a.adapter_config,
                adapter_overrides=tuple(a.adapter_set),
                random_baseline=not a.no_baselines,
                pretrain=not a.no_pretrain,
                oracle_probe=not a.no_baselines)
  r = run_experiment(a.out, st, progress=a.progress)
  print(to_markdown(r))
  return 0


if __name__ == "__main__":
  sys.exit(main())
