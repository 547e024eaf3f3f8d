"""Speed of fundus preprocessing, per image on one core.

Reports milliseconds, best of N, for decoding alone and for the whole
prepare_fundus (decode + FOV fit + crop + resize), and their ratio, on the
real photographs in ../shared/data/fundus (or --dir) and on a synthetic
camera-size JPEG (4000x3000, where libjpeg draft decoding matters). The
default clock is this process's CPU time, which a busy shared machine
inflates less than wall time.

  OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python bench/bench_fundus.py \
      [--dir DIR] [--size 512] [--clock cpu|wall]
"""
import argparse
import io
import os
import pathlib
import time

import numpy as np
from PIL import Image

from efiqa_jax import fundus


CLOCK = time.process_time


def best_ms(fn, n):
  ts = []
  for _ in range(n):
    t = CLOCK()
    fn()
    ts.append(CLOCK() - t)
  return 1000 * min(ts)


def camera_jpeg(h=3000, w=4000):
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  d = np.hypot(xx - w / 2, yy - h / 2)
  inside = np.clip(0.48 * w + 0.5 - d, 0, 1)
  shade = 0.8 + 0.2 * np.sin(xx / 57.0) * np.cos(yy / 43.0)
  img = (inside * shade)[..., None] * np.array([220.0, 110.0, 40.0])
  b = io.BytesIO()
  Image.fromarray(img.astype(np.uint8)).save(b, format="JPEG", quality=92)
  return b.getvalue()


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  root = pathlib.Path(__file__).resolve().parents[1]
  ap.add_argument("--dir", default=os.environ.get(
      "EFIQA_SHARED_FUNDUS", str(root.parent / "shared" / "data" / "fundus")))
  ap.add_argument("--size", type=int, default=512)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
  args = ap.parse_args()
  global CLOCK
  CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
  items = []
  d = pathlib.Path(args.dir)
  if d.is_dir():
    for p in sorted(d.rglob("*")):
      if (p.suffix.lower() in (".jpg", ".jpeg", ".png")
          and "mask" not in p.name and "vessels" not in p.name):
        items.append((p.name, p.read_bytes()))
  items.append(("synthetic_4000x3000.jpg", camera_jpeg()))
  print(f"{'image':26s} {'WxH':>10s} {'decode':>8s} {'prepare':>8s} "
        f"{'ratio':>6s} {'prep/nodraft':>12s}")
  rows = []
  for name, data in items:
    dec = fundus.decode_image(data)
    dec_ms = best_ms(lambda: fundus.decode_image(data), args.repeats)
    prep_ms = best_ms(lambda: fundus.prepare_fundus(data, args.size),
                      args.repeats)
    slow_ms = best_ms(lambda: fundus.prepare_fundus(
        data, args.size, fast_decode=False), args.repeats)
    h, w = dec.image.shape[:2]
    rows.append((dec_ms, prep_ms, slow_ms))
    print(f"{name:26s} {f'{w}x{h}':>10s} {dec_ms:7.1f}ms {prep_ms:7.1f}ms "
          f"{prep_ms / dec_ms:6.2f} {slow_ms:10.1f}ms")
  a = np.array(rows[:-1]) if len(rows) > 1 else np.array(rows)
  print(f"real photographs: median decode {np.median(a[:, 0]):.1f} ms, "
        f"prepare {np.median(a[:, 1]):.1f} ms (without JPEG draft "
        f"{np.median(a[:, 2]):.1f} ms), prepare/decode "
        f"{np.median(a[:, 1] / a[:, 0]):.2f}; {args.clock} clock, load average "
        f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
