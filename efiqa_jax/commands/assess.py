"""efiqa assess: quality map, score and grade for every photograph."""
NAME = "assess"
HELP = ("Assess fundus photographs: a quality map, a score and a grade per "
        "image (scores.csv, maps/, overlays/, report.html).")


def add_arguments(p):
  p.add_argument("inputs", nargs="+",
                 help="image files, folders (recursive), globs, a CSV with "
                 "a 'path' column, or prepared folders (efiqa prepare, at the "
                 "model's work size), or tfds:NAME[:SPLIT] (a built data/ "
                 "dataset, under TFDS_DATA_DIR)")
  p.add_argument("--out", required=True, help="output folder (re-running "
                 "into it skips finished images)")
  p.add_argument("--model", default="default",
                 help="'default' (bundled teacher), a teacher model directory, "
                 "or 'student' (with --encoder and --adapter)")
  p.add_argument("--encoder", default=None,
                 help="student: ViT encoder model directory (efiqa port ...); "
                 "default: none (required with --model student)")
  p.add_argument("--adapter", default=None,
                 help="student: adapter model directory (efiqa port adapter "
                 "or train-adapter's WORKDIR/adapter); default: none "
                 "(required with --model student)")
  p.add_argument("--calibration", default=None,
                 help="student: calibration JSON (efiqa calibrate); default: "
                 "the default pooling (quality = 1 - mean map over the FOV)")
  p.add_argument("--encoder-dtype", choices=("float32", "bfloat16"),
                 default=None, help="student: encoder compute dtype "
                 "(default: the dtype stored with the encoder)")
  p.add_argument("--map-filter", choices=("efiqa", "none"), default=None,
                 help="student: 'efiqa' (default) post-processes the map as "
                 "the paper does (grey opening + closing over 3x3 cells, "
                 "Gaussian of 1 cell); 'none' keeps sigmoid(logits)")
  p.add_argument("--preprocess", choices=("efiqa", "fov"), default=None,
                 help="student: what the encoder sees. 'efiqa': the whole "
                 "photograph (EFIQA's extractor and demo; map and overlay "
                 "on the whole photograph); 'fov': the FOV crop (map on the "
                 "crop square). Both then: PIL bicubic (antialiased) resize "
                 "to the adapter's size, /255, ImageNet mean/std. Default: "
                 "what the adapter records (ported official weights: efiqa; "
                 "train-adapter: what it was trained on), else fov")
  p.add_argument("--save-logits", action="store_true",
                 help="student: also write DIR/logits/<id>.npy (gh, gw) raw "
                 "adapter logits")
  p.add_argument("--batch-size", type=int, default=8,
                 help="images per jitted call (split over local devices)")
  p.add_argument("--threads", type=int, default=None,
                 help="decode/FOV threads (per worker process); default "
                 "min(4, CPU cores)")
  p.add_argument("--workers", "--num-workers", dest="workers", type=int,
                 default=0,
                 help="decode/FOV worker processes (grain multiprocessing; "
                 "0 = threads in this process). Decoding is GIL-bound in "
                 "threads: on a many-core GPU/TPU host use ~one per core")
  p.add_argument("--no-overlays", action="store_true",
                 help="write no overlays/<id>.png (the report does not "
                 "use them: it layers report/<id>.png over report/<id>.jpg)")
  p.add_argument("--overwrite", action="store_true",
                 help="redo everything when OUT holds results of another "
                 "model or settings (refused otherwise, with the difference)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
  import sys  # pylint: disable=g-import-not-at-top
  from efiqa_jax import assess  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
  try:
    res = assess.assess(args.inputs, args.out, model=args.model,
                        batch_size=args.batch_size, num_threads=args.threads,
                        num_workers=args.workers,
                        overlays=not args.no_overlays,
                        progress=not args.quiet,
                        save_logits=args.save_logits,
                        overwrite=args.overwrite,
                        model_kwargs={"encoder": args.encoder,
                                      "adapter": args.adapter,
                                      "calibration": args.calibration,
                                      "dtype": args.encoder_dtype,
                                      "map_filter": args.map_filter,
                                      "preprocess": args.preprocess})
  except sources.NoInputsError as e:
    return sources.no_inputs_exit(NAME, e)
  except (FileNotFoundError, ValueError) as e:
    print(f"efiqa assess: error: {e}", file=sys.stderr)
    return assess.EXIT_USAGE
  print(f"{res.total} images: {res.ok} assessed, {res.failed} failed"
        f" ({res.skipped_done} already done); {res.scores_csv}")
  return res.exit_code
