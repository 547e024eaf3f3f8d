"""Peak host RSS of `efiqa train-teacher`, `train-adapter` (end to end) and
`pretrain-encoder` streaming prepared folders of 2 k and 20 k records (issue 14 §3-4: host
memory must not grow with the dataset; the bar is 20 k within 20 % of 2 k).

Each folder is written with the prepared writer (`prepared.encode_record`,
`files.ShardWriter`, the manifest and prepared.json `efiqa prepare` writes):
the records are copies of a few clean synthetic photographs (`efiqa_jax.synth`
at --size, vessels from `vessels.vessel_probability`, as `prepare --vessels`
stores them) under distinct ids, so writing 20 k records costs seconds, not
hours of segmentation. Then `python -m efiqa_jax train-teacher` (the tiny
teacher at --size, data.source=prepared) runs the same number of steps on
each folder in a fresh process; its peak RSS is `ru_maxrss` from
`os.wait4` of that process (workers included when --workers > 0: they are
its children and it waits for them).

--trainer adapter: `python -m efiqa_jax train-adapter` end to end
(configs/adapter.py:tiny, mode=end_to_end, image batching, batch 8) from
the same kind of folder (no vessel maps) with one label PNG per record (on
the --size / 16 token grid)
and a tiny random ViT encoder (patch 16, D 16, depth 1) at --size: the
frozen encoder runs on the streamed crops.

--trainer mim: `python -m efiqa_jax pretrain-encoder` (configs/
encoder_mim.py:tiny at --size, batch 8) on the same kind of folder as the
adapter's.

Prints one JSON line per folder and one with the ratio:
  {"records": 2000, "steps": S, "peak_rss_mb": ..., "wall_s": ...}
  {"name": "train_rss", "ratio_20k_over_2k": ..., "bar": 1.2}

  PYTHONPATH=$PWD python bench/train_rss.py [--out /work/runs/rss] \
      [--trainer teacher|adapter|mim] [--sizes 2000,20000] [--steps 200] \
      [--workers 0] [--old-loader]

--old-loader measures the reference instead: the same maps as PNGs through
`teacher/data.load_vessel_maps` (data.source=folder, precomputed), which
holds every map in RAM on every host.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _crops_and_maps(distinct: int, size: int,
                    with_vessels: bool = True) -> list:
  """(fundus.Prepared, label-free vessel map or None) of `distinct` clean
  synthetic photographs drawn at twice `size`, cropped at `size`."""
  from efiqa_jax import fundus, synth, vessels
  out = []
  for i in range(distinct):
    buf = io.BytesIO()
    Image.fromarray(synth.generate(i, size * 2, degrade=False).image).save(
        buf, "PNG")
    p = fundus.prepare_fundus(buf.getvalue(), size=size)
    assert p.status == "ok", (p.status, p.message)
    v = (np.asarray(vessels.vessel_probability(p.image[None],
                                               p.fov_mask[None]))[0]
         if with_vessels else None)
    out.append((p, v))
  return out


def write_prepared(out: pathlib.Path, n: int, size: int, *,
                   distinct: int = 8, per_shard: int = 1024,
                   with_vessels: bool = True) -> None:
  """A prepared folder (--vessels unless with_vessels=False) of n records
  at `size` px."""
  from efiqa_jax import driver, files, prepared
  if (out / prepared.METADATA).exists():
    meta = prepared.read_metadata(out)
    if (meta["counts"]["total"] == n and meta["preprocessing"]["size"] == size
        and bool(meta["preprocessing"]["vessels"]) == with_vessels):
      return
  out.mkdir(parents=True, exist_ok=True)
  base = _crops_and_maps(distinct, size, with_vessels)
  w = files.ShardWriter(str(out), "records", "bench", per_shard,
                        options=prepared.WRITER_OPTIONS)
  for i in range(n):
    p, v = base[i % distinct]
    rid = f"syn{i:06d}"
    crop = [p.crop_x0, p.crop_y0, p.crop_size, p.orig_h, p.orig_w]
    fov = [p.fov.cx, p.fov.cy, p.fov.r]
    w.add(prepared.encode_record(dict(
        id=rid, path=f"synthetic/{rid}.png", index=i, status="ok",
        message="", crop=crop, fov=fov, image=p.image, fov_mask=p.fov_mask,
        vessels=v)), dict(image=f"synthetic/{rid}.png", id=rid, status="ok",
                          message=""))
  rows = w.drain(final=True)
  shards = {}
  for r in rows:
    shards[r["shard"]] = shards.get(r["shard"], 0) + 1
  driver.write_csv(out / prepared.MANIFEST, prepared.MANIFEST_FIELDS, rows)
  meta = {
      "format": prepared.FORMAT, "format_version": prepared.FORMAT_VERSION,
      "preprocessing": {
          "size": size, "crop": "fundus.prepare_fundus",
          "vessels": ("vessels.vessel_probability" if with_vessels
                      else None),
          "vessel_config": ("default (bench/train_rss.py)" if with_vessels
                            else None)},
      "writer_options": prepared.WRITER_OPTIONS,
      "records_per_shard": per_shard,
      "counts": {"total": n, "ok": n, "failed": 0, "pending": 0,
                 "by_status": {"ok": n}},
      "shards": [{"name": k, "records": c, "listed": c}
                 for k, c in sorted(shards.items())],
      "manifest": prepared.MANIFEST,
      "versions": prepared._versions()}  # pylint: disable=protected-access
  (out / prepared.METADATA).write_text(json.dumps(meta, indent=1))


def write_map_folder(out: pathlib.Path, n: int, size: int,
                     distinct: int = 8) -> None:
  """n vessel-map PNGs (the old loader's `data.vessels=precomputed` input):
  the same maps as the prepared records, as uint8 images."""
  if out.exists() and len(list(out.glob("*.png"))) == n:
    return
  out.mkdir(parents=True, exist_ok=True)
  pngs = []
  for _, v in _crops_and_maps(distinct, size):
    b = io.BytesIO()
    Image.fromarray(np.round(v * 255).astype(np.uint8)).save(b, "PNG")
    pngs.append(b.getvalue())
  for i in range(n):
    (out / f"map{i:06d}.png").write_bytes(pngs[i % distinct])


def write_adapter_inputs(out: pathlib.Path, n: int,
                         grid: int) -> tuple[str, str]:
  """(labels folder with one random grid x grid label PNG per record id of
  write_prepared, a tiny random ViT encoder, patch 16) for train-adapter."""
  from flax import nnx
  from efiqa_jax import checkpoints
  from efiqa_jax.models import vit
  labels = out / f"labels_{n}" / "labels"
  if len(list(labels.glob("*.png"))) != n:
    labels.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
      Image.fromarray((rng.random((grid, grid)) < 0.3).astype(np.uint8)
                      * 255).save(labels / f"syn{i:06d}.png")
  enc = out / "encoder"
  if not (enc / checkpoints.SIDECAR).exists():
    m = vit.VisionTransformer(patch_size=16, hidden_size=16, depth=1,
                              num_heads=2, mlp_hidden=32, num_registers=4,
                              layerscale=True, qkv_bias="qv", ln_eps=1e-5,
                              pos="rope", rngs=nnx.Rngs(0))
    checkpoints.save_model(str(enc), m, overwrite=True)
  return str(labels.parent), str(enc)


def peak_rss_of(argv: list[str], env: dict) -> tuple[float, float, int]:
  """(peak RSS MB, wall s, exit code) of one process."""
  t0 = time.perf_counter()
  with open(os.devnull, "w") as null:
    p = subprocess.Popen(argv, cwd=REPO, env=env, stdout=null,
                         stderr=subprocess.PIPE)
  _, status, ru = os.wait4(p.pid, 0)
  err = p.stderr.read().decode(errors="replace")
  p.returncode = os.waitstatus_to_exitcode(status)
  if p.returncode:
    sys.stderr.write(err[-3000:])
  return ru.ru_maxrss / 1024.0, time.perf_counter() - t0, p.returncode


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="/tmp/efiqa-train-rss")
  ap.add_argument("--trainer", choices=("teacher", "adapter", "mim"),
                  default="teacher")
  ap.add_argument("--sizes", default="2000,20000")
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--workers", type=int, default=0)
  ap.add_argument("--old-loader", action="store_true",
                  help="reference: the same maps as PNGs through "
                  "load_vessel_maps (data.source=folder, precomputed), "
                  "which holds every map in RAM")
  a = ap.parse_args()
  out = pathlib.Path(a.out)
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  peaks = {}
  for n in (int(s) for s in a.sizes.split(",")):
    t0 = time.perf_counter()
    if a.trainer in ("adapter", "mim"):
      if a.old_loader:
        raise SystemExit("--old-loader: teacher only (the other trainers' "
                         "in-RAM loaders are gone)")
      folder = out / f"prepared_novessels_{n}"
      write_prepared(folder, n, a.size, with_vessels=False)
      if a.trainer == "adapter":
        labels, enc = write_adapter_inputs(out, n, a.size // 16)
    elif a.old_loader:
      folder = out / f"maps_{n}"
      write_map_folder(folder, n, a.size)
      data = ["--config.data.source=folder", f"--config.data.path={folder}",
              "--config.data.vessels=precomputed"]
    else:
      folder = out / f"prepared_{n}"
      write_prepared(folder, n, a.size)
      data = ["--config.data.source=prepared",
              f"--config.data.path={folder}",
              "--config.data.vessels=label_free"]
    wrote = time.perf_counter() - t0
    wd = out / f"workdir_{n}"
    subprocess.run(["rm", "-rf", str(wd)], check=True)
    if a.trainer == "mim":
      argv = [sys.executable, "-m", "efiqa_jax", "pretrain-encoder",
              str(folder), "--out", str(wd / "encoder"), "--workdir",
              str(wd), "--quiet", "--config", "configs/encoder_mim.py:tiny",
              f"--config.size={a.size}", f"--config.work_size={a.size}",
              f"--config.steps={a.steps}", "--config.batch_size=8",
              f"--config.data_workers={a.workers}",
              "--config.data_threads=2", "--config.log_every=50",
              "--config.checkpoint_every=100000"]
    elif a.trainer == "adapter":
      argv = [sys.executable, "-m", "efiqa_jax", "train-adapter", "--config",
              "configs/adapter.py:tiny", "--workdir", str(wd),
              "config.mode=end_to_end", f"config.images={folder}",
              f"config.labels_dir={labels}", f"config.encoder={enc}",
              f"config.size={a.size}", f"config.work_size={a.size}",
              "config.batching=image", "config.batch_size=8",
              "config.epochs=1", f"config.max_steps={a.steps}",
              f"config.data_workers={a.workers}", "config.data_threads=2",
              "config.log_every=50", "config.checkpoint_every=100000",
              "config.progress=False"]
    else:
      argv = [sys.executable, "-m", "efiqa_jax", "train-teacher", "--config",
              "configs/teacher.py:tiny", *data,
              f"--config.data.work_size={a.size}",
              f"--config.data.load_size={a.size}",
              f"--config.image_size={a.size}", "--config.num_epochs=1",
              f"--config.max_steps={a.steps}", "--config.progress_bar=False",
              f"--config.data.num_workers={a.workers}",
              "--config.data.num_threads=2", "--config.data.prefetch=2",
              "--config.log_every=50", "--config.image_every=100000",
              "--config.checkpoint_every=100000",
              "--config.augment.fov_min_diameter_px=28", "--workdir", str(wd)]
    rss, wall, rc = peak_rss_of(argv, env)
    if rc:
      print(json.dumps({"records": n, "error": f"exit {rc}"}))
      return 1
    peaks[n] = rss
    print(json.dumps({"records": n, "trainer": a.trainer,
                      "loader": "old (in RAM)" if a.old_loader
                      else "prepared (streamed)",
                      "steps": a.steps, "workers": a.workers,
                      "size": a.size, "peak_rss_mb": round(rss, 1),
                      # What the previous loaders held instead: teacher,
                      # `load_vessel_maps`' uint8 maps at load_size = size;
                      # adapter, the float32 encoder inputs the previous
                      # end-to-end loader cached (up to 4 GB).
                      ("in_ram_maps_mb" if a.trainer == "teacher" else
                       "in_ram_pixels_mb"): round(
                           n * a.size ** 2 / 2 ** 20 if a.trainer == "teacher"
                           else min(n * a.size ** 2 * 12, 4e9) / 2 ** 20, 1),
                      "wall_s": round(wall, 1),
                      "write_folder_s": round(wrote, 1)}), flush=True)
  if len(peaks) >= 2:
    lo, hi = min(peaks), max(peaks)
    print(json.dumps({"name": "train_rss",
                      f"ratio_{hi}_over_{lo}": round(peaks[hi] / peaks[lo], 3),
                      "bar": 1.2}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
