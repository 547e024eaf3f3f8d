"""Generic strict state-dict -> NNX mapping.

A mapping is a list of `Rule(target, sources, hook)`: `target` is a parameter
path in the NNX module (tuple of attribute names), `sources` one or more
state-dict keys holding the same tensor (several when the source registers a
module twice), `hook` converts the source layout to the target layout.
`apply_mapping` fills the module or raises `PortError` listing every problem
at once: parameters not filled, keys absent from the checkpoint, checkpoint
keys not consumed, shape mismatches, unequal duplicates.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

Hook = Callable[[np.ndarray], np.ndarray]

# Wrappers some training scripts put around the state dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


class PortError(ValueError):
  """A checkpoint does not match the target module exactly."""

  def __init__(self, message: str, *, missing=(), absent=(), extra=(),
               shape=(), unequal=()):
    self.missing = list(missing)    # target params nothing maps to
    self.absent = list(absent)      # source keys the mapping needs, not found
    self.extra = list(extra)        # checkpoint keys never consumed
    self.shape = list(shape)        # "target: got (...) want (...)"
    self.unequal = list(unequal)    # duplicated keys holding different values
    parts = [message]
    for name, items in (("parameters not filled", self.missing),
                        ("keys missing from the checkpoint", self.absent),
                        ("unexpected checkpoint keys", self.extra),
                        ("shape mismatches", self.shape),
                        ("duplicated keys that differ", self.unequal)):
      if items:
        shown = ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")
        parts.append(f"{name} ({len(items)}): {shown}")
    super().__init__("\n  ".join(parts))


@dataclasses.dataclass(frozen=True)
class Rule:
  target: tuple[str, ...]
  sources: tuple[str, ...]
  hook: Hook | None = None


# Layout hooks (torch -> flax).
def conv_kernel(w: np.ndarray) -> np.ndarray:
  """Conv2d weight (O, I, kh, kw) -> flax kernel (kh, kw, I, O)."""
  return np.transpose(w, (2, 3, 1, 0))


def conv_transpose_kernel(w: np.ndarray) -> np.ndarray:
  """ConvTranspose2d weight (I, O, kh, kw) -> flax ConvTranspose kernel.

  flax's ConvTranspose (transpose_kernel=False) is a dilated-input correlation
  with kernel (kh, kw, I, O); torch's is the gradient of a convolution, i.e.
  the same with the kernel flipped in space.
  """
  return np.ascontiguousarray(np.transpose(w, (2, 3, 0, 1))[::-1, ::-1])


def identity(w: np.ndarray) -> np.ndarray:
  return w


def sha256_file(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _to_numpy(t) -> np.ndarray:
  import torch
  if not isinstance(t, torch.Tensor):
    raise TypeError(f"expected a tensor, got {type(t).__name__}")
  t = t.detach().cpu()
  if t.dtype in (torch.bfloat16, torch.float16):
    t = t.float()
  return t.numpy().copy()


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray],
                                                       dict]:
  """Read a torch `.pth`/`.pt`/`.bin` (weights_only) or `.safetensors` file.

  Returns (state dict as numpy float arrays, notes) where notes records any
  unwrapping done (e.g. {"unwrapped": "state_dict", "stripped_prefix":
  "module."}).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint not found: {path}")
  notes: dict[str, Any] = {}
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file
    sd = dict(load_file(str(path)))
  else:
    import torch
    # weights_only: never unpickle arbitrary objects from a downloaded file.
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
      raise PortError(f"{path}: expected a state dict, got "
                      f"{type(obj).__name__}")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
      wrapped = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
      if not wrapped:
        raise PortError(f"{path}: not a flat state dict and none of "
                        f"{_WRAPPER_KEYS} holds one; top-level keys: "
                        f"{sorted(map(str, obj))[:20]}")
      notes["unwrapped"] = wrapped[0]
      notes["ignored_top_level_keys"] = sorted(
          str(k) for k in obj if k != wrapped[0])
      obj = obj[wrapped[0]]
    sd = {str(k): _to_numpy(v) for k, v in obj.items()}
  if sd and all(k.startswith("module.") for k in sd):
    # nn.DataParallel / DDP wrapper prefix.
    sd = {k[len("module."):]: v for k, v in sd.items()}
    notes["stripped_prefix"] = "module."
  return sd, notes


def _params(model) -> dict[tuple[str, ...], Any]:
  from flax import nnx
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {tuple(str(p) for p in path): var for path, var in flat}


def apply_mapping(model, state_dict: Mapping[str, np.ndarray],
                  rules: Sequence[Rule], *, what: str = "checkpoint",
                  atol_duplicates: float = 0.0) -> None:
  """Fill `model`'s nnx.Params from `state_dict` following `rules`, strictly.

  `model` may be abstract (from nnx.eval_shape): values are set, not read.
  Duplicated sources must be equal (within `atol_duplicates`, default exact).
  """
  import jax.numpy as jnp
  from flax import nnx

  params = _params(model)
  targets = {r.target for r in rules}
  missing = sorted("/".join(p) for p in params.keys() - targets)
  unknown_targets = sorted("/".join(t) for t in targets - params.keys())
  if unknown_targets:
    # A bug in the mapping table, not in the checkpoint.
    raise ValueError(f"mapping names parameters the module lacks: "
                     f"{unknown_targets}")
  absent, shape, unequal = [], [], []
  consumed: set[str] = set()
  values: dict[tuple[str, ...], np.ndarray] = {}
  for rule in rules:
    srcs = [k for k in rule.sources if k in state_dict]
    absent += [k for k in rule.sources if k not in state_dict]
    consumed.update(srcs)
    if len(srcs) != len(rule.sources):
      continue
    first = state_dict[srcs[0]]
    for k in srcs[1:]:
      other = state_dict[k]
      if other.shape != first.shape or not np.allclose(
          other, first, rtol=0.0, atol=atol_duplicates):
        unequal.append(f"{srcs[0]} != {k}")
    hook = rule.hook or identity
    v = np.asarray(hook(np.asarray(first)))
    want = tuple(params[rule.target].shape)
    if v.shape != want:
      shape.append(f"{'/'.join(rule.target)} <- {srcs[0]}: got "
                   f"{tuple(first.shape)} -> {v.shape}, want {want}")
      continue
    values[rule.target] = v
  extra = sorted(set(state_dict) - consumed)
  if missing or absent or extra or shape or unequal:
    raise PortError(f"{what} does not match {type(model).__name__} exactly",
                    missing=missing, absent=sorted(absent), extra=extra,
                    shape=shape, unequal=unequal)
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  for path in list(flat):
    key = tuple(str(p) for p in path)
    var = flat[path]
    flat[path] = var.replace(jnp.asarray(values[key], dtype=var.dtype))
  nnx.update(model, nnx.from_flat_state(flat))
