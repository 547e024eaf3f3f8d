"""Speed of the label-free vessel segmenter (efiqa_jax.vessels).

Prints JSON lines:
  {"name": "vessels_512_b8", "ours_ms_per_img": ..., "baseline_ms_per_img":
   ..., "ratio": baseline/ours, "compile_s": ...}
ours: jitted vessel_probability on a batch of 8 512x512 crops (warm; best and
median of --reps). baseline: skimage.filters.sato (multi-scale Hessian
ridge filter, same five sigmas) on the green channel, one image at a time:
the obvious NumPy/SciPy way to do the same job (and it does less: no
background normalisation, no pyramid, no FOV handling).
Usage: PYTHONPATH=$PWD python bench/bench_vessels.py [--reps 5] [--batch 8]
"""
import argparse
import json
import time

import numpy as np


def _images(n, size, seed=0):
  """Real photo (skimage retina) crops when possible, else noise."""
  try:
    from skimage import data, transform
    r = data.retina()
    r = (transform.resize(r, (size, size), anti_aliasing=True) * 255)
    base = r.astype(np.uint8)
  except Exception:  # noqa: BLE001 (bench must still run offline)
    base = np.random.default_rng(seed).integers(0, 255, (size, size, 3),
                                                dtype=np.uint8)
  yy, xx = np.mgrid[:size, :size]
  fov = np.hypot(yy - size / 2, xx - size / 2) < 0.48 * size
  imgs = np.stack([np.roll(base, k, axis=1) for k in range(n)])
  return imgs * fov[None, ..., None], np.broadcast_to(fov, (n, size, size))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--size", type=int, default=512)
  a = ap.parse_args()
  import jax
  from efiqa_jax import vessels
  imgs, masks = _images(a.batch, a.size)
  imgs, masks = jax.device_put(imgs), jax.device_put(np.ascontiguousarray(masks))
  t0 = time.perf_counter()
  vessels.vessel_probability(imgs, masks).block_until_ready()
  compile_s = time.perf_counter() - t0
  ts = []
  for _ in range(a.reps):
    t0 = time.perf_counter()
    vessels.vessel_probability(imgs, masks).block_until_ready()
    ts.append((time.perf_counter() - t0) / a.batch * 1e3)

  from skimage.filters import sato
  g = np.asarray(imgs)[..., 1].astype(np.float32) / 255.0
  sig = (*vessels.DEFAULT_CONFIG.full_res_sigmas,
         *vessels.DEFAULT_CONFIG.half_res_sigmas)
  bs = []
  for _ in range(max(1, a.reps // 2)):
    t0 = time.perf_counter()
    for k in range(min(a.batch, 4)):
      sato(g[k], sigmas=sig, black_ridges=True)
    bs.append((time.perf_counter() - t0) / min(a.batch, 4) * 1e3)
  ours, base = min(ts), min(bs)
  print(json.dumps({
      "name": f"vessels_{a.size}_b{a.batch}",
      "ours_ms_per_img": round(ours, 1),
      "ours_median_ms_per_img": round(float(np.median(ts)), 1),
      "baseline_ms_per_img": round(base, 1),
      "baseline": "skimage.filters.sato, 5 sigmas, green channel",
      "ratio": round(base / ours, 2),
      "compile_s": round(compile_s, 1),
      "device": str(jax.devices()[0]),
  }))


if __name__ == "__main__":
  main()
