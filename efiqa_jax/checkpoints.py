"""Model checkpoints: an orbax parameter tree plus an `efiqa.json` sidecar.

Layout of a model directory (written by `save_model`, read by `load_model`):

  DIR/efiqa.json   {"format": "efiqa-model", "version": 1,
                    "architecture": "unet" | "rrwnet" | ...,
                    "kwargs": constructor kwargs (JSON),
                    ...caller's meta: source path + sha256, preprocessing...}
  DIR/params/      orbax StandardCheckpointer tree of the nnx.Param values
                   (nested dict, float32 numpy on disk)

The module is rebuilt abstractly from the sidecar (no random init) and filled
strictly: every stored array must match a parameter by path and shape, and
every parameter must be stored. The teacher trainer, `efiqa port` and
`efiqa assess` share this format.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

from etils import epath

from efiqa_jax import files
from efiqa_jax import registry

FORMAT = "efiqa-model"
VERSION = 1
SIDECAR = "efiqa.json"
PARAMS = "params"

def register_architecture(name: str, factory: Callable[..., Any]):
  """Adds `factory(**kwargs, rngs=nnx.Rngs)` under `name` at run time (the
  library's own architectures are listed in `efiqa_jax.registry`)."""
  registry.register(name, factory)


def architecture_factory(name: str) -> Callable[..., Any]:
  return registry.factory(name)


def check_kind(path: str | os.PathLike, kind: str | tuple[str, ...],
               meta: dict | None = None) -> dict:
  """The sidecar of `path` if it holds a model of `kind`, else ValueError
  with one line saying what it holds and what was expected. Reads only the
  JSON: nothing is built or imported."""
  kinds = (kind,) if isinstance(kind, str) else tuple(kind)
  meta = read_meta(path) if meta is None else meta
  name = meta.get("architecture")
  try:
    got = registry.kind_of(name)
  except ValueError:
    got = None
  if got not in kinds:
    want = " or ".join(registry.KINDS.get(k, k) for k in kinds)
    raise ValueError(f"{path} holds {registry.describe(name)}; expected "
                     f"{want}")
  return meta


def architecture_of(model) -> tuple[str, dict]:
  """(name, kwargs) for a model exposing `ARCH` and `config()`."""
  name = getattr(model, "ARCH", None)
  if name is None or not hasattr(model, "config"):
    raise TypeError(f"{type(model).__name__} has no ARCH/config(); cannot be "
                    "saved as a self-describing model")
  return name, model.config()


def build_abstract(name: str, kwargs: dict):
  """The module with ShapeDtypeStruct parameters (nothing is initialised)."""
  from flax import nnx
  factory = architecture_factory(name)
  return nnx.eval_shape(lambda: factory(**kwargs, rngs=nnx.Rngs(0)))


def _flat(tree, prefix=()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def save_model(path: str | os.PathLike, model, meta: dict | None = None, *,
               overwrite: bool = False) -> epath.Path:
  """Write `model`'s parameters and the JSON sidecar to directory `path`."""
  import numpy as np
  import orbax.checkpoint as ocp
  from flax import nnx

  from efiqa_jax import runtime
  from efiqa_jax import sharding

  path = files.abs_path(path)
  if path.exists() and any(path.iterdir()) and not overwrite:
    raise FileExistsError(f"{path} exists and is not empty (overwrite=False)")
  # Multi-host: every process checks before anyone writes; orbax's save is
  # collective; the sidecar has one writer (two racing os.replace calls of
  # the same temporary file kill one process and hang the other).
  runtime.barrier(f"efiqa_save_model_check:{path}")
  name, kwargs = architecture_of(model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  # Plain host float arrays: the file does not depend on the saving devices
  # (gathered where a parameter is sharded across processes).
  params = sharding.to_host(params)
  path.mkdir(parents=True, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path / PARAMS, params, force=True)
  ckptr.wait_until_finished()
  sidecar = {"format": FORMAT, "version": VERSION, "architecture": name,
             "kwargs": kwargs}
  for k, v in (meta or {}).items():
    if k in sidecar:
      raise ValueError(f"meta key {k!r} is reserved")
    sidecar[k] = v
  if runtime.is_primary():
    files.atomic_write_text(path / SIDECAR,
                            json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
  runtime.barrier(f"efiqa_save_model_done:{path}")
  return path


def read_meta(path: str | os.PathLike) -> dict:
  path = files.abs_path(path)
  f = path / SIDECAR
  if not f.is_file():
    raise FileNotFoundError(f"{path} is not an efiqa model directory (no "
                            f"{SIDECAR})")
  meta = json.loads(f.read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(f"{f}: format {meta.get('format')!r} != {FORMAT!r}")
  if meta.get("version") != VERSION:
    raise ValueError(f"{f}: unsupported version {meta.get('version')!r}")
  return meta


def cast_frozen_kernels(model) -> None:
  """Store a frozen model's matmul/conv kernels in its 16-bit compute dtype.

  Parameters are float32 so that they can be trained; run frozen in bfloat16
  they would otherwise be cast inside every call (the reference PyTorch model
  is held in bfloat16 too). The forward is unchanged; biases, norms and
  tables stay float32. No-op for float32 models."""
  import jax.numpy as jnp
  from flax import nnx

  dtype = getattr(model, "dtype", None)
  if dtype is None or jnp.dtype(dtype).itemsize >= 4:
    return
  for path, var in nnx.iter_graph(model):
    if (isinstance(var, nnx.Param) and path and path[-1] == "kernel"
        and jnp.issubdtype(var[...].dtype, jnp.floating)):
      var.set_value(var[...].astype(dtype))  # (`var[...] =` keeps the dtype)


def _check_stored(path: epath.Path, name: str, want: dict, got: dict):
  missing = sorted("/".join(map(str, k)) for k in want.keys() - got.keys())
  extra = sorted("/".join(map(str, k)) for k in got.keys() - want.keys())
  bad = sorted(f"{'/'.join(map(str, k))}: stored {tuple(got[k].shape)} != "
               f"model {tuple(want[k].shape)}"
               for k in want.keys() & got.keys()
               if tuple(got[k].shape) != tuple(want[k].shape))
  if missing or extra or bad:
    raise ValueError(f"{path}: parameters do not match the {name} "
                     f"architecture; missing={missing} extra={extra} "
                     f"shape mismatches={bad}")


def _nest(flat: dict) -> dict:
  nested: dict = {}
  for k, v in flat.items():
    d = nested
    for part in k[:-1]:
      d = d.setdefault(part, {})
    d[k[-1]] = v
  return nested


def restore_params(path: str | os.PathLike, target: dict) -> dict:
  """The stored parameter tree restored into `target`'s shardings.

  `target`: a pure dict of `jax.ShapeDtypeStruct`s with shardings (e.g.
  `sharding.abstract_with(params, shardings)`). Each process reads only the
  shards its devices hold; nothing is assembled on one device. Paths and
  shapes are checked strictly against the stored tree first."""
  import jax
  import orbax.checkpoint as ocp

  path = files.abs_path(path)
  ckptr = ocp.StandardCheckpointer()
  stored = ckptr.metadata(path / PARAMS)
  stored = getattr(getattr(stored, "item_metadata", stored), "tree", stored)
  _check_stored(path, read_meta(path)["architecture"], _flat(target),
                _flat(stored))
  # Stored as float32: restore in the stored dtype, cast afterwards.
  f32 = jax.tree.map(lambda t, m: jax.ShapeDtypeStruct(
      t.shape, m.dtype, sharding=t.sharding), target, _nest(_flat(stored)))
  got = ckptr.restore(path / PARAMS, f32)
  return jax.tree.map(
      lambda a, t: a if a.dtype == t.dtype else jax.jit(
          lambda x: x.astype(t.dtype), out_shardings=t.sharding)(a),
      got, target)


def load_model(path: str | os.PathLike, *, dtype: Any = None,
               architecture: str | None = None, frozen: bool = False,
               kind: str | tuple[str, ...] | None = None,
               mesh: Any = None, rules: Any = None):
  """Rebuild the module described by `path/efiqa.json` and load its params.

  Args:
    dtype: override the compute dtype stored in the sidecar (e.g. bfloat16).
    architecture: if given, the stored architecture must equal it.
    kind: if given, the stored architecture must be of this kind (or one of
      these kinds; `efiqa_jax.registry`), checked before anything is built.
    frozen: the weights will not be trained: with a 16-bit compute dtype the
      kernels are stored in it (`cast_frozen_kernels`).
    mesh, rules: place the parameters on `mesh` by sharding rules
      (`efiqa_jax.sharding`; default: replicated) straight from the
      checkpoint, shard by shard. Without a mesh they land on the default
      device.
  Returns:
    (model, meta) with meta the sidecar dict.
  """
  path = files.abs_path(path)
  meta = read_meta(path)
  name = meta["architecture"]
  # Checked on the sidecar alone, before anything is imported or built.
  if kind is not None:
    check_kind(path, kind, meta)
  if architecture is not None and name != architecture:
    raise ValueError(f"{path} holds {registry.describe(name)}; expected "
                     f"{registry.describe(architecture)}")
  registry.info(name)

  import jax
  import jax.numpy as jnp
  import numpy as np
  import orbax.checkpoint as ocp
  from flax import nnx

  kwargs = dict(meta["kwargs"])
  if dtype is not None:
    kwargs["dtype"] = jnp.dtype(dtype).name
  if "dtype" in kwargs:
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  model = build_abstract(name, kwargs)
  state = nnx.state(model, nnx.Param)
  want = nnx.to_pure_dict(state)
  if mesh is not None:
    from efiqa_jax import sharding  # pylint: disable=g-import-not-at-top
    shardings = sharding.tree_shardings(
        want, rules if rules is not None else sharding.REPLICATE_ALL, mesh)
    nested = restore_params(path, sharding.abstract_with(want, shardings))
  else:
    got = _flat(ocp.StandardCheckpointer().restore(path / PARAMS))
    _check_stored(path, name, _flat(want), got)
    nested = _nest({k: jnp.asarray(np.asarray(got[k]), dtype=w.dtype)
                    for k, w in _flat(want).items()})
  nnx.replace_by_pure_dict(state, nested)
  nnx.update(model, state)
  if frozen:
    cast_frozen_kernels(model)
  jax.tree.map(lambda a: a.block_until_ready(),
               nnx.state(model, nnx.Param))
  return model, meta


def load_unet_checkpoint(path: str | os.PathLike, *, dtype: Any = None):
  """`load_model` restricted to the U-Net (VUAD teacher)."""
  return load_model(path, dtype=dtype, architecture="unet", kind="teacher")
