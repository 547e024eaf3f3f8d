"""efiqa distill: pseudo-labels -> features -> adapter, in one command."""
NAME = "distill"
HELP = ("Teacher pseudo-labels -> encoder features -> adapter training on a "
        "set of photographs (resumable, WORKDIR/{pseudo,features,train}).")


def add_arguments(p):
  p.add_argument("inputs", nargs="+", help="photographs: files, folders, "
                 "globs or a CSV with a 'path' column, prepared folders "
                 "(efiqa prepare --size WORK_SIZE; not with --preprocess "
                 "efiqa) or tfds:NAME[/CONFIG][:SPLIT]")
  p.add_argument("--teacher", required=True,
                 help="teacher model directory (local or gs://)")
  p.add_argument("--encoder", required=True,
                 help="ViT encoder directory (local or gs://)")
  p.add_argument("--workdir", required=True,
                 help="pseudo/, features/ and train/ go here, local or gs:// "
                 "(a rerun resumes)")
  p.add_argument("--preprocess", choices=("efiqa", "fov"), default=None,
                 help="what the encoder sees: 'fov' (default: the FOV crop "
                 "the pseudo-labels are made on) or 'efiqa' (the whole "
                 "photograph, as EFIQA's extractor; the pseudo-labels are "
                 "mapped to it). The adapter records it")
  p.add_argument("--batch-size", type=int, default=8,
                 help="pseudo-label / extract batch")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
  config_util.add_config_arguments(p, "adapter")


def run(args) -> int:
  import sys  # pylint: disable=g-import-not-at-top
  from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
  from efiqa_jax.student import distill  # pylint: disable=g-import-not-at-top
  try:
    cfg = config_util.config_from_args(args)
    res = distill.distill(args.inputs, args.teacher, args.encoder,
                          args.workdir, cfg, batch_size=args.batch_size,
                          progress=not args.quiet,
                          preprocess=args.preprocess)
  except sources.NoInputsError as e:
    return sources.no_inputs_exit(NAME, e)
  except (FileNotFoundError, ValueError) as e:
    print(f"efiqa distill: error: {e}", file=sys.stderr)
    return 2
  from efiqa_jax import runtime  # pylint: disable=g-import-not-at-top
  if runtime.is_primary():  # one report for the one adapter
    print(f"step {res.step}/{res.total_steps} loss {res.final_loss:.5f}; "
          f"adapter: {res.adapter_dir}")
  return 0
