"""efiqa pretrain-encoder: label-free masked-image pretraining of a small ViT."""
NAME = "pretrain-encoder"
HELP = ("Pretrain a small ViT encoder self-supervised (masked image "
        "modelling) on photographs; writes a model `--encoder` accepts "
        "(checkpoints in OUT/train: a rerun resumes).")


def add_arguments(p):
  p.add_argument("inputs", nargs="+", help="photographs: files, folders, "
                 "globs or a CSV with a 'path' column; or one folder of "
                 "`efiqa prepare --size WORK_SIZE` (streamed, not decoded "
                 "again)")
  p.add_argument("--out", required=True, help="encoder model directory")
  p.add_argument("--workdir", default=None,
                 help="checkpoints and metrics (default OUT/train)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
  config_util.add_config_arguments(p, "encoder_mim")
  config_util.add_trainer_arguments(p)


def run(args) -> int:
  from efiqa_jax import commands  # pylint: disable=g-import-not-at-top
  from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
  from efiqa_jax import runtime  # pylint: disable=g-import-not-at-top
  from efiqa_jax.encoders import pretrain  # pylint: disable=g-import-not-at-top
  cfg = config_util.config_from_args(args)
  res, code = commands.run_training(
      NAME, lambda: pretrain.pretrain_mim(args.inputs, args.out, cfg,
                                          progress=not args.quiet,
                                          workdir=args.workdir))
  if code is not None:
    return code
  if runtime.is_primary():
    print(f"{res.n_images} photographs, {res.steps} steps, loss "
          f"{res.first_loss:.4f} -> {res.final_loss:.4f} in "
          f"{res.seconds:.0f} s; encoder: {res.out_dir}")
  return 0 if not res.failed else 3
