"""Every model architecture a model directory can hold, in one table.

`efiqa.json` names its architecture; `checkpoints.load_model` looks the name
up here and imports the factory only then. Nothing registers itself as a side
effect of an import: a name missing from this table is unknown everywhere,
whichever modules happen to be imported (before, `efiqa train-eyeq-head
--adapter DIR` failed with "unknown architecture 'adapter_linear'" because
nothing had imported the adapters module yet). Importing this module imports
nothing heavy, so the CLI can check a directory before it loads jax.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Architecture:
  factory: str   # "module:attribute", called as factory(**kwargs, rngs=)
  kind: str      # what the model is for: teacher | encoder | adapter | ...
  what: str      # one phrase for messages


ARCHITECTURES: dict[str, Architecture] = {
    "unet": Architecture("efiqa_jax.models.unet:UNet", "teacher",
                         "VUAD teacher U-Net"),
    "rrwnet": Architecture("efiqa_jax.models.rrwnet:RRWNet", "segmenter",
                           "RRWNet / R2-V2 vessel segmenter"),
    "vit": Architecture("efiqa_jax.models.vit:VisionTransformer", "encoder",
                        "ViT encoder"),
    "adapter_linear": Architecture("efiqa_jax.models.adapters:LinearAdapter",
                                   "adapter", "linear adapter (sc_linear)"),
    "adapter_mlp": Architecture("efiqa_jax.models.adapters:MLPAdapter",
                                "adapter", "MLP adapter"),
    "modern_head_64to16": Architecture(
        "efiqa_jax.models.adapters:ModernHead64to16", "adapter",
        "EFIQA-CP adapter head (ModernHead64to16)"),
    "eyeq_head": Architecture("efiqa_jax.student.eyeq_head:EyeQHead",
                              "eyeq_head", "EyeQ 3-class head"),
}

# kind -> how a command names what it expects
KINDS = {
    "teacher": "a teacher model (efiqa train-teacher's WORKDIR/export, "
               "efiqa calibrate-teacher's output or efiqa port vuad)",
    "encoder": "a ViT encoder (efiqa port dinov3 ..., efiqa "
               "pretrain-encoder)",
    "adapter": "an adapter (efiqa train-adapter's WORKDIR/adapter or efiqa "
               "port adapter)",
    "segmenter": "a vessel segmenter (efiqa port rrwnet)",
    "eyeq_head": "an EyeQ head (efiqa train-eyeq-head)",
}

_EXTRA: dict[str, Callable[..., Any]] = {}
_EXTRA_INFO: dict[str, Architecture] = {}


def register(name: str, factory: Callable[..., Any], kind: str = "other",
             what: str | None = None) -> None:
  """Adds an architecture at run time (user code and tests); the library's
  own are all in ARCHITECTURES."""
  if name in ARCHITECTURES:
    raise ValueError(f"architecture {name!r} is already defined")
  _EXTRA[name] = factory
  _EXTRA_INFO[name] = Architecture("", kind, what or name)


def known() -> list[str]:
  return sorted(set(ARCHITECTURES) | set(_EXTRA))


def info(name: str) -> Architecture:
  if name in ARCHITECTURES:
    return ARCHITECTURES[name]
  if name in _EXTRA_INFO:
    return _EXTRA_INFO[name]
  raise ValueError(f"unknown architecture {name!r}; known: {known()}")


def kind_of(name: str) -> str:
  return info(name).kind


def factory(name: str) -> Callable[..., Any]:
  """The constructor of `name`, imported now."""
  if name in _EXTRA:
    return _EXTRA[name]
  spec = info(name).factory
  mod, attr = spec.split(":")
  return getattr(importlib.import_module(mod), attr)


def describe(name: str) -> str:
  """'a ViT encoder (architecture 'vit')' for messages."""
  try:
    what = info(name).what
  except ValueError:
    return f"an unknown architecture {name!r}"
  art = "an" if what[:1].lower() in "aeiou" else "a"
  return f"{art} {what} (architecture {name!r})"
