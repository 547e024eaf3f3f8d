"""efiqa pretrain-encoder: label-free masked-image pretraining of a small ViT."""
NAME = "pretrain-encoder"
HELP = ("Pretrain a small ViT encoder self-supervised (masked image "
        "modelling) on photographs; writes a model `--encoder` accepts.")


def add_arguments(p):
  p.add_argument("inputs", nargs="+", help="photographs: files, folders, "
                 "globs or a CSV with a 'path' column")
  p.add_argument("--out", required=True, help="encoder model directory")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
  config_util.add_config_arguments(p, "encoder_mim")


def run(args) -> int:
  import sys  # pylint: disable=g-import-not-at-top
  from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
  from efiqa_jax.encoders import pretrain  # pylint: disable=g-import-not-at-top
  try:
    cfg = config_util.config_from_args(args)
    res = pretrain.pretrain_mim(args.inputs, args.out, cfg,
                                progress=not args.quiet)
  except sources.NoInputsError as e:
    return sources.no_inputs_exit(NAME, e)
  except (FileNotFoundError, ValueError) as e:
    print(f"efiqa pretrain-encoder: error: {e}", file=sys.stderr)
    return 2
  print(f"{res.n_images} photographs, {res.steps} steps, loss "
        f"{res.first_loss:.4f} -> {res.final_loss:.4f} in {res.seconds:.0f} s; "
        f"encoder: {res.out_dir}")
  return 0 if not res.failed else 3
