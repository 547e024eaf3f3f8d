"""Loading ml_collections configs the way big_vision does, without absl flags.

`load_config("teacher:tiny", ["--config.lr=0.01"])` finds the bundled
`teacher.py` (or a file: `configs/teacher.py:tiny`, `my/exp.py`), calls
`get_config("tiny")`, applies `--config.a.b=value` overrides, each parsed with
the type of the field it replaces, and runs the file's `check(config)` if it
has one (constraints downstream commands need, e.g. a teacher's image size).
An unknown key, variant or a broken constraint is a `ConfigError` with one
line that names it: a typo must never silently train the default.

The bundled configs are the repository's `configs/` folder; setup.py installs
it as `efiqa_jax/configs`, so names work from any install and any folder.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Sequence

import ml_collections


class ConfigError(ValueError):
  pass


def config_dir() -> str:
  """The bundled configs: efiqa_jax/configs when installed from a wheel,
  configs/ beside efiqa_jax in a checkout (and an editable install)."""
  here = os.path.dirname(os.path.abspath(__file__))
  for d in (os.path.join(here, "configs"),
            os.path.join(os.path.dirname(here), "configs")):
    if os.path.isfile(os.path.join(d, "teacher.py")):
      return d
  raise ConfigError(f"the bundled configs are missing (looked in {here}/"
                    "configs and ../configs); reinstall efiqa-jax")


def available() -> list[str]:
  """Names of the bundled configs (`teacher`, `adapter`, ...)."""
  return sorted(f[:-3] for f in os.listdir(config_dir())
                if f.endswith(".py") and not f.startswith("_"))


def resolve(spec: str) -> tuple[str, str | None]:
  """`name[:variant]` or `path.py[:variant]` -> (file, variant or None).

  A name is a bundled config. A path that does not exist but looks like one
  of the repository's (`configs/NAME.py`) is the bundled NAME, so the
  README's commands work from any folder."""
  path, arg = spec, None
  if ":" in spec and not os.path.isfile(spec):
    path, arg = spec.split(":", 1)
  if os.path.isfile(path):
    return path, arg
  stem, ext = os.path.splitext(os.path.basename(path))
  is_name = (not ext and os.sep not in path and "/" not in path)
  looks_bundled = (ext == ".py" and os.path.basename(os.path.dirname(
      os.path.normpath(path))) in ("configs", ""))
  if is_name or looks_bundled:
    bundled = os.path.join(config_dir(), stem + ".py")
    if os.path.isfile(bundled) and not stem.startswith("_"):
      return bundled, arg
  raise ConfigError(f"config not found: {path!r} (a file, or one of the "
                    f"bundled configs: {', '.join(available())})")


def _import_file(path: str):
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  name = "efiqa_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if not hasattr(mod, "get_config"):
    raise ConfigError(f"{path} defines no get_config(arg=None)")
  return mod


def load_sibling(name: str):
  """Imports bundled config module `name` (for configs built on another)."""
  return _import_file(os.path.join(config_dir(), name + ".py"))


def _parse_value(text: str, old):
  if isinstance(old, bool):
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise ConfigError(f"expected a boolean, got {text!r}")
  if isinstance(old, int) and not isinstance(old, bool):
    try:
      return int(text)
    except ValueError:
      f = float(text)
      if f != int(f):
        raise ConfigError(f"expected an integer, got {text!r}")
      return int(f)
  if isinstance(old, float):
    return float(text)
  if isinstance(old, str):
    return text
  if old is None or isinstance(old, (list, tuple, dict)):
    try:
      val = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      val = text
    if isinstance(old, tuple) and isinstance(val, list):
      val = tuple(val)
    return val
  return ast.literal_eval(text)


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies `--config.key=value` (or `key=value`) strings in order."""
  for item in overrides:
    item = item.strip()
    if item.startswith("--"):
      item = item[2:]
    if item.startswith("config."):
      item = item[len("config."):]
    if "=" not in item:
      raise ConfigError(f"override must look like --config.key=value: {item!r}")
    key, text = item.split("=", 1)
    parts = key.split(".")
    node = config
    for p in parts[:-1]:
      if p not in node or not hasattr(node[p], "keys"):
        raise ConfigError(f"unknown config key: {key} (no field {p!r}"
                          f"{_did_you_mean(p, node)})")
      node = node[p]
    leaf = parts[-1]
    if leaf not in node:
      raise ConfigError(
          f"unknown config key: {key}{_did_you_mean(leaf, node)}; known "
          f"here: {', '.join(sorted(node.keys()))}")
    old = node[leaf]
    try:
      new = _parse_value(text, old)
    except (ConfigError, ValueError) as e:
      raise ConfigError(f"bad value for {key}: {e}") from None
    with node.unlocked() if hasattr(node, "unlocked") else _null():
      node[leaf] = new
  return config


def _did_you_mean(name: str, node) -> str:
  import difflib  # pylint: disable=g-import-not-at-top
  close = difflib.get_close_matches(name, list(node.keys()), n=1)
  return f"; did you mean {close[0]!r}?" if close else ""


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def load_config(spec: str, overrides: Sequence[str] = ()
                ) -> ml_collections.ConfigDict:
  """Loads `name[:variant]` or `path[:variant]`, applies overrides, checks."""
  path, arg = resolve(spec)
  mod = _import_file(path)
  try:
    cfg = mod.get_config(arg) if arg is not None else mod.get_config()
  except ValueError as e:  # the configs' "unknown variant ..."
    raise ConfigError(f"{spec}: {e}") from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config must return a ConfigDict")
  cfg = apply_overrides(cfg, overrides)
  check = getattr(mod, "check", None)
  if check is not None:
    try:
      check(cfg)
    except ValueError as e:
      raise ConfigError(f"{spec}: {e}") from None
  return cfg


# ------------------------------------------------------------------ CLI


def add_config_arguments(parser, default: str | None = None, *,
                         help: str | None = None) -> None:  # pylint: disable=redefined-builtin
  """`--config FILE[:VARIANT]` plus overrides, the same on every command.

  Overrides: `--config.KEY=VALUE` (collected by `efiqa_jax.cli.main` for
  commands that opt in, as set here) or `--set config.KEY=VALUE` (repeatable;
  handy where a shell or a notebook builds the argument list).
  """
  parser.add_argument(
      "--config", default=default, required=default is None,
      metavar="NAME[:VARIANT]|FILE[:VARIANT]",
      help=help or "a bundled config by name (e.g. teacher:tiny) or an "
      "ml_collections config file[:variant]")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="config.KEY=VALUE",
                      help="config override (repeatable)")
  parser.set_defaults(config_overrides_ok=True)
  parser.epilog = ("Override any config field with --config.KEY=VALUE or "
                   "--set config.KEY=VALUE.")


def config_from_args(args, extra: Sequence[str] = ()
                     ) -> ml_collections.ConfigDict:
  """The config that `add_config_arguments`' arguments describe."""
  return load_config(args.config, list(getattr(args, "overrides", []) or [])
                     + list(extra)
                     + list(getattr(args, "config_overrides", None) or []))
