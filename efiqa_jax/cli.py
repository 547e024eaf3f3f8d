"""The `efiqa` command: one subcommand per module in `efiqa_jax.commands`."""
import argparse
import importlib
import pkgutil
import sys

from efiqa_jax import __version__
from efiqa_jax import commands as _commands


def _command_modules():
  mods = []
  for info in pkgutil.iter_modules(_commands.__path__):
    if info.name.startswith("_"):
      continue
    mods.append(importlib.import_module(f"{_commands.__name__}.{info.name}"))
  return sorted(mods, key=lambda m: m.NAME)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="efiqa",
      description=("Label-free, explainable fundus image quality assessment "
                   "(EFIQA) in JAX."),
  )
  parser.add_argument("--version", action="version",
                      version=f"efiqa-jax {__version__}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for mod in _command_modules():
    # argparse %-formats `help` (not `description`): a literal % must be %%.
    p = sub.add_parser(mod.NAME, help=mod.HELP.replace("%", "%%"),
                       description=mod.HELP)
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
    return 2
  return int(args._run(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
