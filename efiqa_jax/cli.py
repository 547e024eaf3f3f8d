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
      formatter_class=HelpFormatter,
  )
  parser.add_argument("--version", action="version",
                      version=f"efiqa-jax {__version__}")
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
    return 2
  try:
    return int(args._run(args) or 0)
  except ValueError as e:
    # A config typo, unknown variant or broken constraint: one line, not a
    # traceback (the loader names the key or the variant).
    from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
    if not isinstance(e, config_util.ConfigError):
      raise
    print(f"efiqa {args.command}: config error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
