"""efiqa pseudo-label: teacher anomaly maps and patch pseudo-labels."""
NAME = "pseudo-label"
HELP = ("Teacher anomaly maps (|f(x)|) and patch pseudo-labels for vessel maps "
        "or, with --from-photos, photographs.")


def add_arguments(p):
  p.add_argument("inputs", nargs="+", help="vessel maps (or photographs with "
                 "--from-photos): files, folders, globs or a CSV")
  p.add_argument("--teacher", required=True, help="teacher model directory")
  p.add_argument("--out", required=True)
  p.add_argument("--from-photos", action="store_true",
                 help="inputs are photographs: compute label-free vessel "
                 "maps first")
  p.add_argument("--work-size", type=int, default=512,
                 help="--from-photos: FOV crop side before the vessel map "
                 "(default 512)")
  p.add_argument("--threshold", type=float, default=None,
                 help="pixel |f(x)| threshold (default: the teacher's "
                 "calibrated one, else the reference's 0.02)")
  p.add_argument("--grid", type=int, default=16,
                 help="cells per side: 16 for 256/16, 14 for 224/16")
  p.add_argument("--relax", type=float, default=None,
                 help="share of a cell that must be anomalous (default: the "
                 "teacher's calibrated one, else the reference's 0.9)")
  p.add_argument("--mode", choices=("hard", "soft"), default="hard")
  p.add_argument("--batch-size", type=int, default=8,
                 help="inputs per step over all processes (default 8)")
  p.add_argument("--threads", type=int, default=4,
                 help="decode threads (default 4)")
  p.add_argument("--overwrite", action="store_true",
                 help="redo everything when OUT holds labels made with "
                 "another rule, teacher or input kind (refused otherwise)")
  p.add_argument("--quiet", action="store_true")


def run(args) -> int:
  from efiqa_jax import pseudo_labels  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  spec, origin = pseudo_labels.teacher_label_spec(
      args.teacher, args.grid, threshold=args.threshold, relax=args.relax,
      mode=args.mode)
  if not args.quiet:
    print(f"pseudo-label: |f(x)| > {spec.threshold:g}, cell share >= "
          f"{spec.relax:g} ({origin})", file=sys.stderr)
  try:
    res = pseudo_labels.write_pseudo_labels(
        args.inputs, args.teacher, args.out, from_photos=args.from_photos,
        spec=spec, batch_size=args.batch_size, progress=not args.quiet,
        overwrite=args.overwrite, read_threads=args.threads,
        work_size=args.work_size)
  except (FileNotFoundError, ValueError) as e:
    print(f"efiqa pseudo-label: error: {e}", file=sys.stderr)
    return 2
  print(f"{res['total']} inputs: {res['ok']} labelled, {res['failed']} failed"
        f" ({res['skipped']} already done); {args.out}/manifest.csv")
  return 0 if res["failed"] == 0 else 3
