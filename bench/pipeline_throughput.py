"""Input-pipeline throughput: images/s of `inference_batches` per setting.

Reports each setting as a ratio to the serial baseline (1 read thread, no
workers, no prefetch), measured in the same run on the same machine:

  PYTHONPATH=$PWD python bench/pipeline_throughput.py --n 64 --size 512

Inputs: the photographs in ../shared/data/fundus (or --folder), read in a
loop to make --n records (nothing is copied). Decoding + FOV crop is
`efiqa_jax.fundus.prepare_fundus`. Timing starts after the first batch
(worker start-up excluded); there is no device work, so this is the upper
bound the pipeline can feed. On a machine with few, shared cores, worker
processes cannot win; run it where the CPUs are free.
"""
import argparse
import os
import time

from efiqa_jax import input_pipeline as ip
from efiqa_jax import sources


def _run(paths, batch, size, **kw):
  b = ip.inference_batches(paths, batch, size=size, process_index=0,
                           process_count=1, **kw)
  it = iter(b)
  next(it)  # worker start-up and first fill are not throughput
  t0 = time.perf_counter()
  n = 0
  for x in it:
    n += int(x["valid"].sum())
  return n / (time.perf_counter() - t0)


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  ap = argparse.ArgumentParser()
  ap.add_argument("--folder", default=os.path.join(
      here, "..", "..", "shared", "data", "fundus"))
  ap.add_argument("--n", type=int, default=64)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--size", type=int, default=512)
  ap.add_argument("--workers", type=int, nargs="*", default=[0, 2])
  ap.add_argument("--threads", type=int, nargs="*", default=[1, 4])
  args = ap.parse_args()
  photos = [p for p in sources.list_inputs([args.folder])
            if "mask" not in p and "vessels" not in p]
  paths = [photos[i % len(photos)] for i in range(args.n)]
  print(f"{args.n} records from {len(photos)} photographs, size {args.size}, "
        f"batch {args.batch}, {os.cpu_count()} CPUs")
  base = _run(paths, args.batch, args.size, read_threads=1,
              prefetch_batches=0)
  print(f"baseline serial: {base:.1f} img/s (ratio 1.00)")
  for w in args.workers:
    for t in args.threads:
      r = _run(paths, args.batch, args.size, num_workers=w, read_threads=t,
               prefetch_batches=2)
      print(f"workers={w} threads={t}: {r:.1f} img/s "
            f"(ratio {r / base:.2f})")


if __name__ == "__main__":
  main()
