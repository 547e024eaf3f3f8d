"""Speed of the synthetic fundus generator on ONE core (threads pinned to 1).

Prints JSON lines ("ours" from process CPU time, "wall" from the wall clock):
  {"name": "synth_512", "ours": img/s, "unit": "img/s", "wall": img/s, "target": 20}
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
  """(img/s by process CPU time, img/s by wall clock).

  Threads are pinned to 1, so process CPU time is single-core time; it is the
  headline number because the shared development machine is oversubscribed
  (wall clock there measures the neighbours). Both are printed.
  """
  fn(10_000)   # warm-up (imports, caches)
  c0, t0 = time.process_time(), time.perf_counter()
  for i in range(n):
    fn(i)
  return n / (time.process_time() - c0), n / (time.perf_counter() - t0)


def _emit(name, rates, target=20):
  rec = {"name": name, "ours": round(rates[0], 2), "unit": "img/s",
         "wall": round(rates[1], 2), "target": target}
  print(json.dumps(rec), flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--n", type=int, default=40)
  ap.add_argument("--size", type=int, default=512)
  a = ap.parse_args()
  from efiqa_jax.synth import degrade, generate, write_dataset
  s = a.size
  _emit(f"synth_{s}", _rate(lambda i: generate(i, s), a.n))
  _emit(f"synth_{s}_clean",
        _rate(lambda i: generate(i, s, degrade=False, lesions=False), a.n))
  with tempfile.TemporaryDirectory() as d:
    write_dataset(os.path.join(d, "warm"), 2, 1, s)
    c0, t0 = time.process_time(), time.perf_counter()
    write_dataset(os.path.join(d, "ds"), a.n, 0, s)
    _emit(f"synth_{s}_write", (a.n / (time.process_time() - c0),
                               a.n / (time.perf_counter() - t0)))
  try:
    from skimage import data
    img = data.retina()
  except Exception as e:   # no cached copy: say so instead of skipping silently
    print(json.dumps({"name": "degrade_real", "error": repr(e)}))
    return
  fov = img.max(axis=-1) > 25
  n = max(4, a.n // 4)
  _emit(f"degrade_real_{img.shape[1]}x{img.shape[0]}",
        _rate(lambda i: degrade(img, fov, i), n), target=None)


if __name__ == "__main__":
  main()
