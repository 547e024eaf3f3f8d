"""efiqa benchmark: synthetic degradations on good photographs."""
NAME = "benchmark"
HELP = ("Degrade good photographs with the project's synthetic degradations "
        "and report map AUROC, ranking against severity, and a "
        "vessel-density baseline.")


def add_arguments(p):
  p.add_argument("inputs", nargs="+", help="good photographs: files, folders, "
                 "globs or a CSV, prepared folders (efiqa prepare at the "
                 "model's work size) or tfds:NAME[/CONFIG][:SPLIT]")
  p.add_argument("--model", default="default",
                 help="'default' (bundled teacher) or a teacher directory")
  p.add_argument("--kinds", default="",
                 help="comma-separated degradation kinds, or 'hiding' for "
                 "those that hide vessels (default: all)")
  p.add_argument("--split", default=None,
                 choices=("heldout", "calibration", "train"),
                 help="only this split of a folder of good photographs (or "
                 "of its prepared folder), as build-default-model splits it "
                 "(e.g. --split heldout on ../shared/data/fundus_train)")
  p.add_argument("--severities", default="0.35,0.65,0.95",
                 help="comma-separated degradation severities in (0, 1]")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the degradations")
  p.add_argument("--json", default=None, help="also write the result to "
                 "this JSON file (default: print only)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
  import sys  # pylint: disable=g-import-not-at-top
  from efiqa_jax import benchmark  # pylint: disable=g-import-not-at-top
  from efiqa_jax import synth  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
  kinds = [k for k in args.kinds.split(",") if k] or None
  if kinds == ["hiding"]:
    kinds = list(synth.VESSEL_HIDING)
  sev = tuple(float(s) for s in args.severities.split(",") if s)
  try:
    res = benchmark.run_benchmark(args.inputs, model=args.model, kinds=kinds,
                                  severities=sev, seed=args.seed,
                                  split=args.split, out_json=args.json,
                                  progress=not args.quiet)
  except sources.NoInputsError as e:
    return sources.no_inputs_exit(NAME, e)
  except (FileNotFoundError, ValueError) as e:  # e.g. another prepared size
    print(f"efiqa benchmark: error: {e}", file=sys.stderr)
    return 2
  print(res.to_markdown())
  for f in res.failed:
    print(f"not assessed: {f['image']}: {f['status']}: {f['message']}")
  return 0
