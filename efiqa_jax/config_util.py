"""Loading ml_collections configs the way big_vision does, without absl flags.

`load_config("configs/teacher.py:tiny", ["--config.lr=0.01"])` imports the file,
calls `get_config("tiny")` and applies `--config.a.b=value` overrides, each
parsed with the type of the field it replaces. An unknown key is an error that
names the key: a typo must never silently train the default.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Sequence

import ml_collections


class ConfigError(ValueError):
  pass


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
      if p not in node:
        raise ConfigError(f"unknown config key: {key} (no field {p!r})")
      node = node[p]
    leaf = parts[-1]
    if leaf not in node:
      raise ConfigError(
          f"unknown config key: {key}; known here: {sorted(node.keys())}")
    old = node[leaf]
    try:
      new = _parse_value(text, old)
    except (ConfigError, ValueError) as e:
      raise ConfigError(f"bad value for {key}: {e}") from None
    with node.unlocked() if hasattr(node, "unlocked") else _null():
      node[leaf] = new
  return config


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def load_config(spec: str, overrides: Sequence[str] = ()
                ) -> ml_collections.ConfigDict:
  """Loads `path[:arg]` and applies overrides."""
  path, arg = spec, None
  if ":" in spec and not os.path.isfile(spec):
    path, arg = spec.split(":", 1)
  mod = _import_file(path)
  cfg = mod.get_config(arg) if arg is not None else mod.get_config()
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config must return a ConfigDict")
  return apply_overrides(cfg, overrides)


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
      help=help or "ml_collections config file[:variant]")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="config.KEY=VALUE", help="config override")
  parser.set_defaults(config_overrides_ok=True)
  parser.epilog = ("Override any config field with --config.KEY=VALUE or "
                   "--set config.KEY=VALUE.")


def add_trainer_arguments(parser) -> None:
  """Options every training command shares (they set config fields)."""
  parser.add_argument(
      "--profile-steps", metavar="A:B", default=None,
      help="write a jax.profiler trace of steps A+1..B to WORKDIR/profile "
           "(config.profile_steps)")
  parser.epilog = (parser.epilog or "") + (
      " SIGTERM (or a preemption notice) saves a checkpoint and exits 75;"
      " Ctrl-C saves and exits 130; the same command resumes. A workdir"
      " holding a run with other settings is refused (exit 2).")


def config_from_args(args, extra: Sequence[str] = ()
                     ) -> ml_collections.ConfigDict:
  """The config that `add_config_arguments`' arguments describe."""
  flags = []
  if getattr(args, "profile_steps", None):
    flags.append(f"config.profile_steps={args.profile_steps}")
  return load_config(args.config, list(getattr(args, "overrides", []) or [])
                     + list(extra)
                     + list(getattr(args, "config_overrides", None) or [])
                     + flags)
