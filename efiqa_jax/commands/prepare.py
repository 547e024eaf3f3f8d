"""efiqa prepare: decode and FOV-crop photographs once into sharded records."""
NAME = "prepare"
HELP = ("Decode, find the FOV and crop every photograph once (the code assess "
        "runs); write ArrayRecord shards, manifest.csv and prepared.json. "
        "assess, extract, pseudo-label --from-photos and vessels read the "
        "folder instead of the photographs. Resumable, multi-process.")


def add_arguments(p):
  p.add_argument("inputs", nargs="+",
                 help="image files, folders (recursive), globs, or a CSV with "
                 "a 'path' column")
  p.add_argument("--out", required=True,
                 help="the prepared folder (re-running into it skips "
                 "finished photographs)")
  p.add_argument("--size", type=int, default=512,
                 help="FOV crop side in pixels: the work size of the "
                 "commands that will read it (default 512)")
  p.add_argument("--vessels", action="store_true",
                 help="also store the label-free vessel probability map of "
                 "each crop (efiqa_jax.vessels)")
  p.add_argument("--records-per-shard", type=int, default=1024,
                 help="records per ArrayRecord shard (default 1024)")
  p.add_argument("--batch-size", type=int, default=8,
                 help="photographs per step over all processes (default 8)")
  p.add_argument("--threads", type=int, default=4,
                 help="decode/FOV threads (per worker process; default 4)")
  p.add_argument("--workers", "--num-workers", dest="workers", type=int,
                 default=0, help="decode/FOV worker processes (grain "
                 "multiprocessing; default 0: threads in this process)")
  p.add_argument("--overwrite", action="store_true",
                 help="start over when OUT was prepared with other settings "
                 "(refused otherwise, with the difference)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
  import sys  # pylint: disable=g-import-not-at-top
  from efiqa_jax import prepared, runtime, sources  # pylint: disable=g-import-not-at-top
  try:
    res = prepared.prepare(args.inputs, args.out, size=args.size,
                           vessels=args.vessels,
                           records_per_shard=args.records_per_shard,
                           batch_size=args.batch_size,
                           overwrite=args.overwrite,
                           num_workers=args.workers,
                           read_threads=args.threads,
                           progress=not args.quiet)
  except sources.NoInputsError as e:
    return sources.no_inputs_exit(NAME, e)
  except (FileNotFoundError, ValueError) as e:
    print(f"efiqa prepare: error: {e}", file=sys.stderr)
    return runtime.EXIT_USAGE
  if not args.quiet:
    for r in res.rows:
      if r["status"] != "ok":
        print(f"  {r['status']}: {r['image']}: {r['message']}")
  print(f"efiqa prepare: {res.ok}/{res.total} prepared, {res.failed} failed "
        f"({res.skipped} already done); {res.out_dir / prepared.METADATA}")
  return 0 if res.failed == 0 else 3
