"""`efiqa` subcommands, one module each.

Every module defines NAME, HELP, `add_arguments(parser)` and `run(args) -> int`.
`run` is a thin shell: it parses nothing itself and calls one library function
that notebooks and Python users call directly. Heavy imports (jax, flax) stay
inside `run` so that `efiqa --help` is instant.
"""


def add_driver_arguments(p, *, holds: str, batch_size: int = 8,
                         threads: int = 4, workers: bool = False) -> None:
  """The inference driver's flags (`efiqa_jax.driver`): --batch-size,
  --threads, (--workers,) --overwrite, --quiet. `holds`: what --overwrite
  redoes, e.g. "maps made with other settings"."""
  p.add_argument("--batch-size", type=int, default=batch_size,
                 help=f"inputs per step over all processes (default "
                 f"{batch_size})")
  p.add_argument("--threads", type=int, default=threads,
                 help=f"decode/FOV threads (per worker process; default "
                 f"{threads})")
  if workers:
    p.add_argument("--workers", "--num-workers", dest="workers", type=int,
                   default=0, help="decode/FOV worker processes (grain "
                   "multiprocessing; default 0: threads in this process)")
  p.add_argument("--overwrite", action="store_true",
                 help=f"redo everything when OUT holds {holds} (refused "
                 "otherwise, with the difference)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_driver(name: str, fn, quiet: bool):
  """(fn(), None) with every row that is not ok listed unless `quiet`, or
  (None, exit code) after one line on stderr: no image (EXIT_NO_INPUTS), a
  missing file or a bad value (EXIT_USAGE). For the driver's commands."""
  import sys  # pylint: disable=g-import-not-at-top
  from efiqa_jax import runtime  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
  try:
    res = fn()
  except sources.NoInputsError as e:
    return None, sources.no_inputs_exit(name, e)
  except (FileNotFoundError, ValueError) as e:
    print(f"efiqa {name}: error: {e}", file=sys.stderr)
    return None, runtime.EXIT_USAGE
  if not quiet:
    for r in res.rows:
      if r["status"] != "ok":
        print(f"  {r['status']}: {r['image']}: {r['message']}")
  return res, None


def run_training(name: str, fn):
  """(fn(), None), or (None, exit code) after one line on stderr for what a
  training command's library call raises: no image (EXIT_NO_INPUTS), a
  non-finite loss (EXIT_FAILED), a missing file or a bad value (EXIT_USAGE).
  A ConfigError propagates: the CLI prints "config error: ..." (exit 2)."""
  import sys  # pylint: disable=g-import-not-at-top
  from efiqa_jax import runtime  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
  from efiqa_jax import trainer  # pylint: disable=g-import-not-at-top
  try:
    return fn(), None
  except sources.NoInputsError as e:
    return None, sources.no_inputs_exit(name, e)
  except trainer.NonFiniteLossError as e:
    print(f"efiqa {name}: error: {e}", file=sys.stderr)
    return None, runtime.EXIT_FAILED
  except (FileNotFoundError, ValueError) as e:
    print(f"efiqa {name}: error: {e}", file=sys.stderr)
    return None, runtime.EXIT_USAGE
