"""efiqa pseudo-label: teacher anomaly maps and patch pseudo-labels."""
from efiqa_jax import commands

NAME = "pseudo-label"
HELP = ("Teacher anomaly maps (|f(x)|) and patch pseudo-labels for vessel maps "
        "or, with --from-photos, photographs.")


def add_arguments(p):
  p.add_argument("inputs", nargs="+", help="vessel maps (or photographs with "
                 "--from-photos): files, folders, globs or a CSV; with "
                 "--from-photos also prepared folders (efiqa prepare "
                 "--size WORK_SIZE) and tfds:NAME[:SPLIT] (a built data/ "
                 "dataset)")
  p.add_argument("--teacher", required=True,
                 help="teacher model directory, or 'default' (the bundled "
                 "teacher, as in assess --model default)")
  p.add_argument("--out", required=True,
                 help="output folder (anomaly/, labels/, manifest.csv)")
  p.add_argument("--from-photos", action="store_true",
                 help="inputs are photographs: compute label-free vessel "
                 "maps first")
  p.add_argument("--work-size", type=int, default=None,
                 help="--from-photos: FOV crop side before the vessel map "
                 "(default: the side the teacher was calibrated at, "
                 "efiqa calibrate-teacher --work-size, else 512)")
  p.add_argument("--threshold", type=float, default=None,
                 help="pixel |f(x)| threshold (default: the teacher's "
                 "calibrated one, else the reference's 0.02)")
  p.add_argument("--grid", type=int, default=14,
                 help="cells per side: the student's token grid; 14 = the "
                 "paper's ViT at 224/16 (what configs/adapter.py trains on), "
                 "16 for 256/16 or DINOv2 at 224/14")
  p.add_argument("--relax", type=float, default=None,
                 help="share of a cell that must be anomalous (default: the "
                 "teacher's calibrated one, else the reference's 0.9)")
  p.add_argument("--mode", choices=("hard", "soft"), default="hard",
                 help="hard: 0/255 per cell; soft: the cell's mean of "
                 "clip((|f(x)| - t) / t, 0, 1)")
  commands.add_driver_arguments(
      p, holds="labels made with another rule, teacher or input kind")


def run(args) -> int:
  from efiqa_jax import pseudo_labels  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  if args.teacher in ("default", "teacher"):
    from efiqa_jax import quality_model  # pylint: disable=g-import-not-at-top
    args.teacher = quality_model.DEFAULT_MODEL_DIR
  from efiqa_jax import checkpoints, sources  # pylint: disable=g-import-not-at-top
  try:
    if args.work_size is None:  # its threshold was measured at that side
      args.work_size = int(checkpoints.read_meta(args.teacher).get(
          "work_size") or 512)
    spec, origin = pseudo_labels.teacher_label_spec(
        args.teacher, args.grid, threshold=args.threshold, relax=args.relax,
        mode=args.mode)
    if not args.quiet:
      print(f"pseudo-label: |f(x)| > {spec.threshold:g}, cell share >= "
            f"{spec.relax:g} ({origin})", file=sys.stderr)
    res = pseudo_labels.write_pseudo_labels(
        args.inputs, args.teacher, args.out, from_photos=args.from_photos,
        spec=spec, batch_size=args.batch_size, progress=not args.quiet,
        overwrite=args.overwrite, read_threads=args.threads,
        work_size=args.work_size)
  except sources.NoInputsError as e:
    return sources.no_inputs_exit(NAME, e)
  except (FileNotFoundError, ValueError) as e:
    print(f"efiqa pseudo-label: error: {e}", file=sys.stderr)
    return 2
  print(f"{res['total']} inputs: {res['ok']} labelled, {res['failed']} failed"
        f" ({res['skipped']} already done); {args.out}/manifest.csv")
  return 0 if res["failed"] == 0 else 3
