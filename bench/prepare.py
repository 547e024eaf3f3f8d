"""`efiqa assess` from camera-size photographs vs from their prepared records.

Both sides assess the same photographs with the same model, batch and
threads; one side reads the JPEG/PNG files (decode + FOV crop per
photograph), the other the folder `efiqa prepare` wrote from them (the crop
read back from an ArrayRecord shard). Prints JSON lines on stdout:

  {"name": "prepare", ...}   `efiqa prepare` itself (photographs/s per core;
                             a one-off cost per dataset)
  {"name": "input_pipeline", "photos": rows/s/core, "prepared": ...,
   "ratio": prepared / photos}  the host input pipeline alone
                             (`input_pipeline.inference_batches` as assess
                             builds it: what the host feeds a device)
  {"name": "assess_replayed_model", ...}   assess end to end with the
                             bundled teacher's maps replayed: the warm-up
                             run records each crop's map (keyed by the
                             crop's bytes) and the timed runs look it up, as
                             if an accelerator computed it for free. What is
                             timed is the host's whole share of assess --
                             decode or record read, overlays, report cards,
                             maps, journal, scores.csv -- with the outputs
                             the model gives
  {"name": "assess_replayed_model_no_overlays", ...}  the same, --no-overlays
  {"name": "assess_default_model", ...}  (--cpu-model) the bundled teacher
                             computed on this CPU (label-free vessels and
                             U-Net share the cores with decoding)
  {"name": "pseudo_label_default_teacher", ...}  (--pseudo-label)
                             `pseudo-label --from-photos` with the bundled
                             teacher computed on this CPU, anomaly maps and
                             patch labels checked equal between the sides

"per core" divides by the cores this process may use
(`os.sched_getaffinity`). Each round runs both sides back to back, the
order alternating between rounds; the lines report the median round, every
round goes to stderr. Compilation is excluded (one untimed warm-up run per
side). Outputs of the two sides are checked equal (maps within 1e-6).

  PYTHONPATH=$PWD python bench/prepare.py                 # real photographs
  PYTHONPATH=$PWD python bench/prepare.py --synthetic 24  # 2000-px JPEGs
  PYTHONPATH=$PWD python bench/prepare.py --quick
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.assess import _find_fundus_dir, real_paths, write_synthetic  # noqa: E402


def cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _pipeline_rate(source, n, batch, threads, size) -> float:
  from efiqa_jax import input_pipeline, sources
  t0 = time.perf_counter()
  rows = 0
  for b in input_pipeline.inference_batches(
      source, batch, prepare=sources.PrepareFundus(size),
      read_threads=threads):
    rows += int(np.asarray(b["valid"]).sum())
  assert rows == n, (rows, n)
  return n / (time.perf_counter() - t0)


def _model_rate(source, n, batch, threads, size, model, rounds) -> float:
  """The model alone on crops already decoded (from the prepared records):
  photographs/s for the whole device, host-to-device copies included. Above
  assess's rate, the host sets assess's pace; near it, the model does."""
  from efiqa_jax import input_pipeline, sources
  batches = [(b["image"], b["fov_mask"]) for b in
             input_pipeline.inference_batches(
                 source, batch, prepare=sources.PrepareFundus(size),
                 read_threads=threads)]
  np.asarray(model.predict(*batches[0]))  # compiles
  rates = []
  for _ in range(max(rounds, 5)):
    t0 = time.perf_counter()
    for images, fov in batches:
      np.asarray(model.predict(images, fov))
    rates.append(n / (time.perf_counter() - t0))
  return statistics.median(rates)


def _assess_rate(inputs, out, model, batch, threads, n, overlays,
                 workers=0) -> float:
  from efiqa_jax import assess
  t0 = time.perf_counter()
  res = assess.assess(inputs, out, quality_model=model, batch_size=batch,
                      num_threads=threads, num_workers=workers,
                      progress=False, overwrite=True, overlays=overlays)
  dt = time.perf_counter() - t0
  assert res.total == n, res
  return n / dt


def _pseudo_rate(inputs, out, batch, threads, n, workers=0) -> float:
  from efiqa_jax import pseudo_labels, quality_model
  t0 = time.perf_counter()
  res = pseudo_labels.write_pseudo_labels(
      inputs, quality_model.DEFAULT_MODEL_DIR, out, from_photos=True,
      batch_size=batch, read_threads=threads, num_workers=workers,
      progress=False, overwrite=True)
  dt = time.perf_counter() - t0
  assert res["total"] == n, res
  return n / dt


def _same_pseudo(a, b) -> float:
  """Max |anomaly difference| of two pseudo-label folders (manifests and
  label PNGs equal)."""
  from PIL import Image
  for name in ("manifest.csv",):
    with open(os.path.join(a, name)) as f, open(os.path.join(b, name)) as g:
      assert f.read() == g.read(), f"{name} differ"
  worst = 0.0
  for f in glob.glob(os.path.join(a, "anomaly", "*.npy")):
    stem = os.path.basename(f)[:-4]
    worst = max(worst, float(np.abs(np.load(f) - np.load(os.path.join(
        b, "anomaly", stem + ".npy"))).max()))
    la = np.asarray(Image.open(os.path.join(a, "labels", stem + ".png")))
    lb = np.asarray(Image.open(os.path.join(b, "labels", stem + ".png")))
    assert np.array_equal(la, lb), stem
  return worst


def _same(a, b) -> float:
  """Max |map difference| of two assess folders (their tables equal)."""
  with open(os.path.join(a, "scores.csv")) as f:
    ta = f.read()
  with open(os.path.join(b, "scores.csv")) as f:
    tb = f.read()
  assert ta == tb, "scores.csv differ"
  worst = 0.0
  for f in glob.glob(os.path.join(a, "maps", "*.npy")):
    g = os.path.join(b, "maps", os.path.basename(f))
    worst = max(worst, float(np.abs(np.load(f) - np.load(g)).max()))
  return worst


def _rounds(name, fn_photos, fn_prepared, rounds, extra) -> dict:
  per = []
  for r in range(rounds):
    order = (("photos", fn_photos), ("prepared", fn_prepared))
    if r % 2:
      order = order[::-1]
    got = {k: fn() for k, fn in order}
    per.append(got)
    print(json.dumps({"name": name, "round": r, "load": os.getloadavg(),
                      **got}), file=sys.stderr, flush=True)
  c = cores()
  ph = statistics.median(p["photos"] for p in per) / c
  pr = statistics.median(p["prepared"] for p in per) / c
  line = {"name": name, "photos": round(ph, 3), "prepared": round(pr, 3),
          "unit": "photographs/s per core", "ratio": round(pr / ph, 3),
          "cores": c, "rounds": rounds, **extra}
  print(json.dumps(line), flush=True)
  return line


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--fundus", default=None,
                  help="folder of real photographs (default "
                  "../shared/data/fundus)")
  ap.add_argument("--n", type=int, default=24,
                  help="real photographs, cycled (default 24)")
  ap.add_argument("--synthetic", type=int, default=0,
                  help="use this many synthetic 2000-px JPEGs instead")
  ap.add_argument("--size", type=int, default=512, help="crop side")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--threads", type=int, default=None,
                  help="decode threads (default min(4, cores))")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--workers", type=int, default=0,
                  help="grain worker processes for assess and pseudo-label "
                  "(their --workers / --num-workers; default 0: threads)")
  ap.add_argument("--cpu-model", action="store_true",
                  help="also time assess with the bundled teacher computed "
                  "on JAX's default device (this CPU, or the accelerator), "
                  "and the model alone on decoded crops")
  ap.add_argument("--pseudo-label", action="store_true",
                  help="also time pseudo-label --from-photos (the bundled "
                  "teacher computed on JAX's default device)")
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args(argv)
  if args.quick:
    args.n, args.rounds, args.synthetic = 6, 1, min(args.synthetic, 6)
  threads = args.threads or min(4, cores())
  W = args.workers  # pylint: disable=invalid-name

  from efiqa_jax import prepared, quality_model, sources

  tmp = tempfile.mkdtemp(prefix="bench-prepare-")
  if args.synthetic:
    d = os.path.join(tmp, "photos")
    os.makedirs(d)
    paths = write_synthetic(d, args.synthetic, 2000)
    kind = f"synthetic {args.synthetic} JPEGs, 2000 px FOV on 2667x2000"
  else:
    folder = _find_fundus_dir(args.fundus)
    if folder is None:
      sys.exit("no ../shared/data/fundus: give --fundus or --synthetic N")
    paths = real_paths(folder, args.n)
    kind = f"real {args.n} (../shared/data/fundus, cycled)"
  # Distinct file names: assess ids are file stems.
  csv_in = os.path.join(tmp, "inputs.csv")
  with open(csv_in, "w") as f:
    f.write("path\n" + "\n".join(paths) + "\n")
  n = len(paths)
  mb = sum(os.path.getsize(p) for p in set(paths)) / len(set(paths)) / 1e6

  prep_dir = os.path.join(tmp, "prepared")
  t0 = time.perf_counter()
  res = prepared.prepare([csv_in], prep_dir, size=args.size,
                         batch_size=args.batch, read_threads=threads)
  dt = time.perf_counter() - t0
  rec_mb = sum(os.path.getsize(f) for f in glob.glob(os.path.join(
      prep_dir, prepared.SHARD_GLOB))) / n / 1e6
  print(json.dumps({"name": "prepare", "set": kind, "n": n, "ok": res.ok,
                    "rate": round(n / dt / cores(), 3),
                    "unit": "photographs/s per core (with compilation)",
                    "mb_per_photo": round(mb, 3),
                    "mb_per_record": round(rec_mb, 3)}), flush=True)

  resolved = sources.resolve_inputs([prep_dir])
  photo_list = sources.list_inputs([csv_in])
  _pipeline_rate(photo_list[:2], 2, 2, threads, args.size)  # imports
  _rounds("input_pipeline",
          lambda: _pipeline_rate(photo_list, n, args.batch, threads,
                                 args.size),
          lambda: _pipeline_rate(resolved.source, n, args.batch, threads,
                                 args.size),
          args.rounds, {"set": kind, "batch": args.batch,
                        "threads": threads})

  base = quality_model.load_quality_model("default")
  replay = Replay(base)
  models = [("assess_replayed_model", replay, True),
            ("assess_replayed_model_no_overlays", replay, False)]
  if args.cpu_model:
    models.append(("assess_default_model", base, True))
    import jax  # pylint: disable=g-import-not-at-top
    rate = _model_rate(resolved.source, n, args.batch, threads, args.size,
                       base, args.rounds)
    print(json.dumps({"name": "default_model_only", "set": kind,
                      "rate": round(rate, 2), "batch": args.batch,
                      "unit": "photographs/s, whole device (label-free "
                      "vessels + teacher on decoded crops)",
                      "device": str(jax.devices()[0].device_kind)}),
          flush=True)
  for name, qm, ov in models:
    a, b = os.path.join(tmp, name, "photos"), os.path.join(tmp, name, "prep")
    replay.recording = True  # warm-up: compiles, and records the maps
    _assess_rate([csv_in], a, qm, args.batch, threads, n, ov, W)
    _assess_rate([prep_dir], b, qm, args.batch, threads, n, ov, W)
    replay.recording = False
    diff = _same(a, b)
    _rounds(name,
            lambda: _assess_rate([csv_in], a, qm, args.batch, threads, n, ov,
                                 W),
            lambda: _assess_rate([prep_dir], b, qm, args.batch, threads, n,
                                 ov, W),
            args.rounds, {"set": kind, "batch": args.batch,
                          "threads": threads, "workers": W,
                          "max_map_diff": diff,
                          "replayed": qm is replay})


  if args.pseudo_label:
    # Each write_pseudo_labels call builds its step anew: a persistent
    # compilation cache keeps XLA compilation out of the timed runs.
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.join(tmp, "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    a, b = os.path.join(tmp, "pl", "photos"), os.path.join(tmp, "pl", "prep")
    _pseudo_rate([csv_in], a, args.batch, threads, n, W)  # compiles
    _pseudo_rate([prep_dir], b, args.batch, threads, n, W)
    diff = _same_pseudo(a, b)
    _rounds("pseudo_label_default_teacher",
            lambda: _pseudo_rate([csv_in], a, args.batch, threads, n, W),
            lambda: _pseudo_rate([prep_dir], b, args.batch, threads, n, W),
            args.rounds, {"set": kind, "batch": args.batch,
                          "threads": threads, "workers": W,
                          "max_anomaly_diff": diff,
                          "replayed": False})


class Replay:  # a quality_model.QualityModel
  """A quality model whose maps are those `model` gave the same crops
  earlier (`recording`: compute and keep them): the model at no cost, so
  that what is timed is the host's share of assess."""

  def __init__(self, model):
    self._model, self._maps, self.recording = model, {}, False
    # Explicit members: Python 3.12's protocol isinstance looks attributes
    # up statically, past __getattr__.
    for k in ("name", "work_size", "grading", "meta", "has_logits"):
      setattr(self, k, getattr(model, k))

  def prepare(self, path):
    return self._model.prepare(path)

  def assess_prepare(self):
    return self._model.assess_prepare()

  def preprocess_note(self):
    return self._model.preprocess_note()

  def summarise(self, qmap, fov_weight):
    return self._model.summarise(qmap, fov_weight)

  def predict_all(self, images, fov, encoder_images=None):
    del encoder_images  # a teacher reads the crop only
    return {"maps": self.predict(images, fov), "logits": None,
            "class_probs": None}

  @staticmethod
  def _key(image, fov):
    import hashlib  # pylint: disable=g-import-not-at-top
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes()
                           + np.packbits(fov).tobytes(),
                           digest_size=16).digest()

  def predict(self, images, fov):
    keys = [self._key(i, f) for i, f in zip(images, fov)]
    if self.recording:
      maps = np.asarray(self._model.predict(images, fov), np.float32)
      self._maps.update(zip(keys, maps))
      return maps
    return np.stack([self._maps[k] for k in keys])


if __name__ == "__main__":
  main()
