"""`efiqa assess` end to end: images/s of ours vs a per-image PyTorch pipeline.

Both sides compute the same function (the bundled default model) on the same
photograph files and write the same per-image outputs:

  ours       efiqa_jax.assess.assess(paths, out_dir, quality_model=...): grain
             decode + FOV crop threads ahead of the jitted batched vessel map
             + teacher + pooling, map .npy + overlay PNG in a thread pool,
             the journal, scores.csv, report.html.
  reference  efiqa_jax.reference.assess.ReferenceAssessor: per image
             (batch 1, like penway/EFIQA's scripts) prepare_fundus (PIL decode
             + our numpy FOV crop: the same code as ours), the label-free
             Hessian vessel segmenter ported line by line to torch, RefUNetRes
             with the default model's weights, |f(x)|, pooling, score, grade,
             map .npy + overlay PNG + a CSV row.

Prints two JSON lines per photograph set on stdout:

  {"name": "assess_end_to_end", "set": "real"|"synthetic", "ours": img/s,
   "reference": img/s, "unit": "img/s", "ratio": ours / reference, ...}
  {"name": "assess_maps_only", ...}   the map computation alone (crops in,
      64x64 maps out): our jitted batched call vs the torch chain at batch 1

ratio > 1 means efiqa_jax is faster. Each round runs ours and the reference
back to back on the same files (order alternating between rounds) and the
line reports the median round; every round's numbers, the agreement of the
two pipelines' outputs and where our wall time goes go to stderr as JSON.
Compilation is excluded: one untimed warm-up run per side first.

  PYTHONPATH=$PWD python bench/assess.py            # 96 real + 96 synthetic
  PYTHONPATH=$PWD python bench/assess.py --real 32 --synthetic 32  # as before
  PYTHONPATH=$PWD python bench/assess.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _find_fundus_dir(arg: str | None) -> pathlib.Path | None:
  cands = [arg] if arg else [os.environ.get("EFIQA_SHARED_FUNDUS"),
                             REPO.parent / "shared" / "data" / "fundus",
                             REPO.parent.parent / "shared" / "data" / "fundus"]
  for c in cands:
    if c and pathlib.Path(c).is_dir():
      return pathlib.Path(c)
  return None


def real_paths(folder: pathlib.Path, n: int) -> list[str]:
  """The real photographs (not the masks / vessel maps), cycled to n."""
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
  photos = [p for p in sources.list_inputs([str(folder)])
            if "mask" not in p and "vessels" not in p]
  return [photos[i % len(photos)] for i in range(n)]


def write_synthetic(out: str, n: int, side: int, seed: int = 0) -> list[str]:
  """n synthetic fundus photographs as JPEGs (quality 95), each a
  side x side FOV on a black (4/3 side) x side frame like a camera's."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from efiqa_jax import synth  # pylint: disable=g-import-not-at-top
  paths = []
  for i in range(n):
    img = synth.generate(seed + i, 768).image
    disc = Image.fromarray(img).resize((side, side), Image.BICUBIC)
    frame = Image.new("RGB", (side * 4 // 3, side))
    frame.paste(disc, ((side * 4 // 3 - side) // 2, 0))
    p = os.path.join(out, f"synth_{i:03d}.jpg")
    frame.save(p, quality=95)
    paths.append(p)
  del np
  return paths


class _Timed:
  """Wraps assess's batch iterator / model to split its wall time."""

  def __init__(self):
    self.wait = 0.0     # main thread blocked on the input pipeline
    self.first_wait = None  # of which the first batch (pipeline fill)
    self.predict = 0.0  # main thread in the model (device compute)

  def install(self, qmod):
    from efiqa_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    orig_batches = input_pipeline.inference_batches
    orig_predict = qmod.predict
    timer = self

    def batches(*a, **kw):
      inner = orig_batches(*a, **kw)

      class It:
        def __len__(self):
          return len(inner)

        def __iter__(self):
          it = iter(inner)
          while True:
            t0 = time.perf_counter()
            try:
              b = next(it)
            except StopIteration:
              return
            finally:
              dt = time.perf_counter() - t0
              timer.wait += dt
              if timer.first_wait is None:
                timer.first_wait = dt
            yield b
      return It()

    def predict(*a, **kw):
      t0 = time.perf_counter()
      try:
        return orig_predict(*a, **kw)
      finally:
        timer.predict += time.perf_counter() - t0

    input_pipeline.inference_batches = batches
    qmod.predict = predict

    def uninstall():
      input_pipeline.inference_batches = orig_batches
      del qmod.predict
    return uninstall


def run_ours(qmod, paths, out_dir, batch, threads, workers, timer=None):
  from efiqa_jax import assess as assess_lib  # pylint: disable=g-import-not-at-top
  undo = timer.install(qmod) if timer is not None else None
  try:
    t0 = time.perf_counter()
    res = assess_lib.assess(paths, out_dir, quality_model=qmod,
                            batch_size=batch, num_threads=threads,
                            num_workers=workers, progress=False)
    dt = time.perf_counter() - t0
  finally:
    if undo:
      undo()
  if res.ok != len(paths):
    raise RuntimeError(f"ours: {res.failed} of {res.total} images failed")
  return dt


def run_reference(ref, paths, ids, out_dir):
  t0 = time.perf_counter()
  rows = ref.assess(paths, ids, out_dir)
  dt = time.perf_counter() - t0
  bad = [r for r in rows if r["status"] != "ok"]
  if bad:
    raise RuntimeError(f"reference: {len(bad)} images failed: {bad[:2]}")
  return dt


def agreement(ours_dir: str, ref_dir: str) -> dict:
  """Max differences between the two pipelines' scores.csv rows and maps."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  def rows(d):
    with open(os.path.join(d, "scores.csv")) as f:
      return {r["id"]: r for r in csv.DictReader(f)}

  a, b = rows(ours_dir), rows(ref_dir)
  if set(a) != set(b):
    raise RuntimeError(f"different ids: {sorted(set(a) ^ set(b))[:5]}")
  dq = max(abs(float(a[k]["quality"]) - float(b[k]["quality"])) for k in a)
  df = max(abs(float(a[k]["degraded_fraction"]) -
               float(b[k]["degraded_fraction"])) for k in a)
  grades = sum(a[k]["grade"] == b[k]["grade"] for k in a)
  dm = max(float(np.abs(np.load(os.path.join(ours_dir, "maps", k + ".npy")) -
                        np.load(os.path.join(ref_dir, "maps", k + ".npy"))
                        ).max()) for k in a)
  return dict(n=len(a), max_abs_quality_diff=dq,
              max_abs_degraded_fraction_diff=df, max_abs_map_diff=dm,
              grades_equal=f"{grades}/{len(a)}")


def breakdown(qmod, ref, paths, batch, threads) -> dict:
  """Per-image costs, each measured alone (ms/image), same machine: ours
  (prepare, input pipeline, batched device maps, writes) and the
  reference's torch maps at batch 1."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from efiqa_jax import driver  # pylint: disable=g-import-not-at-top
  from efiqa_jax import fundus  # pylint: disable=g-import-not-at-top
  from efiqa_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
  from efiqa_jax import report as report_lib  # pylint: disable=g-import-not-at-top
  from efiqa_jax.kernels import png  # pylint: disable=g-import-not-at-top
  n = len(paths)
  t0 = time.perf_counter()
  preps = [fundus.prepare_fundus(p, qmod.work_size) for p in paths]
  serial_prepare = (time.perf_counter() - t0) / n
  # The input pipeline alone, as assess builds it (threads + prefetch).
  t0 = time.perf_counter()
  for _ in input_pipeline.inference_batches(
      paths, batch, prepare=sources.PrepareFundus(qmod.work_size),
      process_index=0, process_count=1, read_threads=threads):
    pass
  pipeline = (time.perf_counter() - t0) / n
  ims = np.stack([p.image for p in preps])
  fov = np.stack([p.fov_mask for p in preps])
  qmod.predict(ims[:batch], fov[:batch])  # compiled already; page in
  t0 = time.perf_counter()
  maps = qmod.predict(ims, fov)
  device = (time.perf_counter() - t0) / n
  t0 = time.perf_counter()
  for k in range(n):
    ref.maps(ims[k:k + 1], fov[k:k + 1])
  ref_maps = (time.perf_counter() - t0) / n
  with tempfile.TemporaryDirectory() as d:
    for sub in ("maps", "overlays"):
      os.makedirs(os.path.join(d, sub))
    t0 = time.perf_counter()
    for s in range(0, n - batch + 1, batch):  # overlays per batch, as assess
      ovs = np.asarray(report_lib.overlay_batch(
          ims[s:s + batch], maps[s:s + batch], fov[s:s + batch]))
      for k in range(batch):
        # What assess's writer does per image (overlay PNG, then the map).
        driver.write_atomic(os.path.join(d, "overlays", f"x{s + k}.png"),
                            png.encode_png(ovs[k]))
        driver.write_npy(os.path.join(d, "maps", f"x{s + k}.npy"),
                         np.asarray(maps[s + k], np.float32))
    writes = (time.perf_counter() - t0) / (n - n % batch)
  return {k: round(v * 1e3, 1) for k, v in dict(
      prepare_serial_ms=serial_prepare, input_pipeline_ms=pipeline,
      device_ms=device, writes_serial_ms=writes,
      reference_torch_maps_ms=ref_maps).items()}


def pick_torch_threads(ref, threads: int) -> dict:
  """Gives the reference its best thread count. On a small CPU shared with
  other jobs torch's OpenMP threads can be many times slower than one
  thread (measured 3.4-4.7 s vs 0.21 s for one 512 px vessel map at load
  average ~9 on 2 cores), so both are timed on one crop (best of 2)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from efiqa_jax import synth  # pylint: disable=g-import-not-at-top
  if threads > 0:
    torch.set_num_threads(threads)
    return {}
  s = synth.generate(0, ref.work_size, degrade=False)
  im, fov = s.image[None], s.fov_mask[None]
  trial = {}
  for t in sorted({1, torch.get_num_threads()}):
    torch.set_num_threads(t)
    ref.maps(im, fov)
    times = []
    for _ in range(2):
      t0 = time.perf_counter()
      ref.maps(im, fov)
      times.append(time.perf_counter() - t0)
    trial[t] = round(min(times), 3)
  torch.set_num_threads(min(trial, key=trial.get))
  del np
  return trial


def bench_set(name, paths, qmod, ref, args, tmp) -> dict:
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
  ids = sources.unique_ids(paths)
  n = len(paths)
  # Warm-up: compilation (ours) and first-call allocations (torch).
  run_ours(qmod, paths[:args.batch], os.path.join(tmp, f"{name}_warm_o"),
           args.batch, args.threads, args.workers)
  run_reference(ref, paths[:1], ids[:1], os.path.join(tmp, f"{name}_warm_r"))
  rounds = []
  agree = None
  for r in range(args.rounds):
    od = os.path.join(tmp, f"{name}_ours_{r}")
    rd = os.path.join(tmp, f"{name}_ref_{r}")
    timer = _Timed()
    if r % 2 == 0:
      to = run_ours(qmod, paths, od, args.batch, args.threads, args.workers,
                    timer)
      tr = run_reference(ref, paths, ids, rd)
    else:
      tr = run_reference(ref, paths, ids, rd)
      to = run_ours(qmod, paths, od, args.batch, args.threads, args.workers,
                    timer)
    if agree is None:
      agree = agreement(od, rd)
    rd_ = dict(round=r, ours=n / to, reference=n / tr, ratio=tr / to,
               ours_wait_input_s=round(timer.wait, 3),
               ours_wait_first_batch_s=round(timer.first_wait or 0.0, 3),
               ours_predict_s=round(timer.predict, 3), ours_wall_s=round(to, 3),
               reference_wall_s=round(tr, 3), load_avg=os.getloadavg()[0])
    rounds.append(rd_)
    print(json.dumps({"set": name, **rd_}), file=sys.stderr, flush=True)
  parts = breakdown(qmod, ref, paths, args.batch, args.threads)
  med = sorted(rounds, key=lambda x: x["ratio"])[len(rounds) // 2]
  print(json.dumps({"set": name, "agreement": agree, "ours_parts": parts}),
        file=sys.stderr, flush=True)
  maps = {"name": "assess_maps_only", "set": name,
          "ours": 1e3 / parts["device_ms"],
          "reference": 1e3 / parts["reference_torch_maps_ms"],
          "unit": "img/s",
          "ratio": parts["reference_torch_maps_ms"] / parts["device_ms"]}
  return [{"name": "assess_end_to_end", "set": name, "ours": med["ours"],
           "reference": med["reference"], "unit": "img/s",
           "ratio": med["ratio"], "images": n,
           "ratios": [round(x["ratio"], 3) for x in rounds],
           "max_abs_quality_diff": agree["max_abs_quality_diff"]}, maps]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--fundus-dir", default=None,
                  help="real photographs (default ../shared/data/fundus)")
  # 96 per set (12 batches of 8): the throughput of a long run. With 32 the
  # pipeline fill before the first batch and the last batch's writes, which a
  # million-photograph job pays once, were ~25 % of our wall time.
  ap.add_argument("--real", type=int, default=96,
                  help="records from the real photographs (cycled); 0 = skip")
  ap.add_argument("--synthetic", type=int, default=96,
                  help="synthetic JPEG photographs; 0 = skip")
  ap.add_argument("--synthetic-side", type=int, default=1600,
                  help="FOV diameter of the synthetic JPEGs (px)")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--threads", type=int, default=None,
                  help="ours: decode threads (default: assess's, "
                  "min(4, CPU cores))")
  ap.add_argument("--workers", type=int, default=0)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--torch-threads", type=int, default=0,
                  help="torch intra-op threads for the reference; 0 = the "
                  "faster of 1 and torch's default, timed on one image")
  ap.add_argument("--quick", action="store_true",
                  help="2 real + 2 synthetic (800 px), batch 2, 1 round")
  args = ap.parse_args(argv)
  if args.threads is None:
    from efiqa_jax import assess as assess_lib  # pylint: disable=g-import-not-at-top
    args.threads = assess_lib.default_num_threads()
  if args.quick:
    args.real, args.synthetic, args.synthetic_side = 2, 2, 800
    args.batch, args.rounds = 2, 1

  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from efiqa_jax import quality_model as qm_lib  # pylint: disable=g-import-not-at-top
  from efiqa_jax.reference.assess import ReferenceAssessor  # pylint: disable=g-import-not-at-top

  qmod = qm_lib.load_quality_model("default", batch_size=args.batch)
  ref = ReferenceAssessor(qmod)
  thread_trial = pick_torch_threads(ref, args.torch_threads)
  info = dict(batch=args.batch, threads=args.threads, workers=args.workers,
              rounds=args.rounds, jax=jax.__version__, torch=torch.__version__,
              torch_threads=torch.get_num_threads(),
              torch_thread_trial_s=thread_trial, cpu_count=os.cpu_count(),
              jax_devices=str(jax.devices()), model=qmod.name,
              work_size=qmod.work_size, teacher_size=qmod.teacher_size,
              base_channels=qmod.meta.get("kwargs", {}).get("base_channels"))
  print(json.dumps({"info": info}), file=sys.stderr, flush=True)
  with tempfile.TemporaryDirectory(prefix="efiqa_bench_assess_") as tmp:
    sets = []
    if args.real:
      folder = _find_fundus_dir(args.fundus_dir)
      if folder is None:
        print("real set skipped: ../shared/data/fundus is absent",
              file=sys.stderr)
      else:
        sets.append(("real", real_paths(folder, args.real)))
    if args.synthetic:
      sdir = os.path.join(tmp, "synthetic")
      os.makedirs(sdir)
      sets.append(("synthetic", write_synthetic(sdir, args.synthetic,
                                                args.synthetic_side)))
    for name, paths in sets:
      for line in bench_set(name, paths, qmod, ref, args, tmp):
        print(json.dumps(line), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
