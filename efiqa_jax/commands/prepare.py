"""efiqa prepare: decode and FOV-crop photographs once into sharded records."""
from efiqa_jax import commands

NAME = "prepare"
HELP = ("Decode, find the FOV and crop every photograph once (the code assess "
        "runs); write ArrayRecord shards, manifest.csv and prepared.json. "
        "assess, extract, pseudo-label --from-photos, vessels and the "
        "trainers read the folder instead of the photographs. Resumable, "
        "multi-process.")


def add_arguments(p):
  p.add_argument("inputs", nargs="+",
                 help="image files, folders (recursive), globs, a CSV with "
                 "a 'path' column, or tfds:NAME[:SPLIT] (a built data/ "
                 "dataset, under TFDS_DATA_DIR)")
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
  commands.add_driver_arguments(
      p, holds="records prepared with other settings", workers=True)


def run(args) -> int:
  from efiqa_jax import prepared  # pylint: disable=g-import-not-at-top
  res, code = commands.run_driver(NAME, lambda: prepared.prepare(
      args.inputs, args.out, size=args.size, vessels=args.vessels,
      records_per_shard=args.records_per_shard, batch_size=args.batch_size,
      overwrite=args.overwrite, num_workers=args.workers,
      read_threads=args.threads, progress=not args.quiet), args.quiet)
  if res is None:
    return code
  print(f"efiqa prepare: {res.ok}/{res.total} prepared, {res.failed} failed "
        f"({res.skipped} already done); {res.out_dir / prepared.METADATA}")
  return 0 if res.failed == 0 else 3
