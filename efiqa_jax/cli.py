"""The `efiqa` command: one subcommand per module in `efiqa_jax.commands`.

Global options come before the command:
  efiqa [--coordinator-address HOST:PORT --num-processes N --process-id I]
        [--log-level LEVEL] COMMAND ...
Without the three process options a multi-process launcher (TPU pod slice,
SLURM, Open MPI, JAX_* environment variables) is detected
(`efiqa_jax.runtime.initialize`); a partial set is an error.
"""
import argparse
import importlib
import pkgutil
import sys

from efiqa_jax import __version__
from efiqa_jax import commands as _commands
from efiqa_jax import runtime

EXIT_CODES = (
    "Exit codes: 0 done; 1 the run failed (e.g. a non-finite loss); 2 bad "
    "arguments, config or multi-process configuration, or a workdir holding "
    "a run with other settings; 3 done, but some inputs could not be used "
    "(listed); 4 the inputs named no image; 75 stopped by SIGTERM or a "
    "preemption notice after saving a checkpoint (rerun the same command to "
    "resume); 130 stopped by Ctrl-C after saving a checkpoint (a second "
    "Ctrl-C exits at once).")


def _command_modules():
  mods = []
  for info in pkgutil.iter_modules(_commands.__path__):
    if info.name.startswith("_"):
      continue
    mods.append(importlib.import_module(f"{_commands.__name__}.{info.name}"))
  return sorted(mods, key=lambda m: m.NAME)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows each option's default, except where there is none to show (None,
  a store_true flag) or the help text already says it in words."""

  def _get_help_string(self, action):
    text = action.help or ""
    if (any(action.default is v for v in (None, False, argparse.SUPPRESS))
        or "default" in text.lower() or action.required
        or not action.option_strings):
      return text
    return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
  """The whole command line. Imports every command module but nothing heavy
  (jax, flax, TensorFlow stay inside the commands' `run`), so `--help` is
  instant; tests/test_cli.py holds it to that."""
  parser = argparse.ArgumentParser(
      prog="efiqa",
      description=("Label-free, explainable fundus image quality assessment "
                   "(EFIQA) in JAX."),
      epilog=EXIT_CODES,
      formatter_class=HelpFormatter,
  )
  parser.add_argument("--version", action="version",
                      version=f"efiqa-jax {__version__}")
  g = parser.add_argument_group(
      "multi-process runs (TPU pod slices, GPU clusters)",
      "All three, or none: without them a TPU pod slice, SLURM (srun), "
      "Open MPI (mpirun) or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
      "JAX_PROCESS_ID are detected; --num-processes 1 alone forces one "
      "process.")
  g.add_argument("--coordinator-address", metavar="HOST:PORT",
                 help="address of process 0's coordinator")
  g.add_argument("--num-processes", type=int, metavar="N",
                 help="how many processes run this command")
  g.add_argument("--process-id", type=int, metavar="I",
                 help="this process's index in [0, N)")
  parser.add_argument("--log-level", default="info",
                      choices=runtime.LOG_LEVELS,
                      help="our log lines at this level; absl/orbax/jax "
                           "INFO only with debug (default: info)")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for mod in _command_modules():
    # argparse %-formats `help` (not `description`): a literal % must be %%.
    p = sub.add_parser(mod.NAME, help=mod.HELP.replace("%", "%%"),
                       description=mod.HELP, formatter_class=HelpFormatter)
    mod.add_arguments(p)
    p.set_defaults(_run=mod.run)
  return parser


def main(argv=None) -> int:
  parser = build_parser()
  # `--config.KEY=VALUE` overrides (ml_collections style) are collected for
  # commands that opt in with `parser.set_defaults(config_overrides_ok=True)`
  # (an ml_collections --config file); anything else unknown is an error.
  args, extra = parser.parse_known_args(argv)
  overrides = [a for a in extra if a.startswith("--config.")]
  unknown = [a for a in extra if not a.startswith("--config.")]
  if unknown or (overrides and not getattr(args, "config_overrides_ok",
                                           False)):
    parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
  args.config_overrides = overrides
  if not getattr(args, "_run", None):
    parser.print_help()
    return runtime.EXIT_USAGE
  runtime.setup_logging(args.log_level)
  try:
    runtime.initialize(args.coordinator_address, args.num_processes,
                       args.process_id)
  except (runtime.DistributedConfigError, runtime.DistributedStartError) as e:
    print(f"efiqa: error: {e}", file=sys.stderr)
    return runtime.EXIT_USAGE
  try:
    return int(args._run(args) or 0)
  except runtime.Interrupted as e:
    print(f"efiqa {args.command}: {e}", file=sys.stderr)
    return e.exit_code
  except KeyboardInterrupt:  # Ctrl-C outside a training loop
    print(f"efiqa {args.command}: interrupted", file=sys.stderr)
    return runtime.EXIT_INTERRUPTED
  except ValueError as e:
    # A config typo, unknown variant or broken constraint: one line, not a
    # traceback (the loader names the key or the variant).
    from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
    if not isinstance(e, config_util.ConfigError):
      raise
    print(f"efiqa {args.command}: config error: {e}", file=sys.stderr)
    return runtime.EXIT_USAGE


if __name__ == "__main__":
  sys.exit(main())
