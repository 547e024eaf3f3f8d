"""Speed of the synthetic fundus generator on ONE core (threads pinned to 1).

Prints JSON lines:
  {"name": "synth_512", "ours": img/s, "unit": "img/s", "target": 20}
    generate() incl. random degradation/lesions as in a dataset, no file I/O;
  {"name": "synth_512_clean", ...}  anatomy only (degrade=False, lesions=False);
  {"name": "synth_512_write", ...}  write_dataset() incl. PNG/JPEG writing;
  {"name": "degrade_real_<WxH>", "ours": img/s, ...} degrade() on
    skimage.data.retina() (1411x1411).
Usage: PYTHONPATH=$PWD python bench/synth.py [--n 40] [--size 512]
"""
import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
           "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
  os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def _rate(fn, n):
  fn(10_000)   # warm-up (imports, caches)
  t0 = time.perf_counter()
  for i in range(n):
    fn(i)
  return n / (time.perf_counter() - t0)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--n", type=int, default=40)
  ap.add_argument("--size", type=int, default=512)
  a = ap.parse_args()
  from efiqa_jax.synth import degrade, generate, write_dataset
  s = a.size
  r = _rate(lambda i: generate(i, s), a.n)
  print(json.dumps({"name": f"synth_{s}", "ours": round(r, 2), "unit": "img/s",
                    "target": 20}))
  r = _rate(lambda i: generate(i, s, degrade=False, lesions=False), a.n)
  print(json.dumps({"name": f"synth_{s}_clean", "ours": round(r, 2), "unit": "img/s",
                    "target": 20}))
  with tempfile.TemporaryDirectory() as d:
    write_dataset(os.path.join(d, "warm"), 2, 1, s)
    t0 = time.perf_counter()
    write_dataset(os.path.join(d, "ds"), a.n, 0, s)
    r = a.n / (time.perf_counter() - t0)
  print(json.dumps({"name": f"synth_{s}_write", "ours": round(r, 2), "unit": "img/s",
                    "target": 20}))
  try:
    from skimage import data
    img = data.retina()
  except Exception as e:   # pooch cache absent: say so instead of skipping silently
    print(json.dumps({"name": "degrade_real", "error": repr(e)}))
    return
  fov = img.max(axis=-1) > 20
  n = max(4, a.n // 4)
  r = _rate(lambda i: degrade(img, fov, i), n)
  print(json.dumps({"name": f"degrade_real_{img.shape[1]}x{img.shape[0]}",
                    "ours": round(r, 2), "unit": "img/s"}))


if __name__ == "__main__":
  main()
