"""Meshes, shardings and THE host -> global array boundary.

Every host-local numpy batch becomes a global `jax.Array` in `to_global`
(via `jax.make_array_from_process_local_data`) and nowhere else, so the rule
"each process feeds only its own rows" lives in one place.

Record-to-process assignment (`process_slice`) is STRIDED: process p of P
reads global positions p, p+P, p+2P, ... With per-process batching this
makes global batch k hold exactly the positions [k*B, (k+1)*B) (B = global
batch), whatever the process count, so a run on 1 or 4 hosts sees the same
batches, and padding lands only in the final batch(es).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(axes: Sequence[tuple[str, int]] | Mapping[str, int] | None = None,
              *, devices: Sequence[jax.Device] | None = None,
              axis_types: Sequence[AxisType] | None = None) -> Mesh:
  """A device mesh; default 1-D ('data',) over all devices.

  Args:
    axes: (name, size) pairs, e.g. `[("data", -1)]` or
      `[("data", -1), ("model", 2)]` (what a config's `mesh` field holds); one
      size may be -1 and is filled with the remaining devices.
    devices: defaults to `jax.devices()` (all processes).
    axis_types: defaults to `AxisType.Auto` for every axis. We choose Auto
      on purpose: shardings are placed explicitly at the jit boundary
      (`to_global`, `in_shardings`/`out_shardings`) and the compiler
      propagates them inside. Explicit mode would make shardings part of the
      types and require `out_sharding=` on reshapes/einsums inside the Flax
      models and the jitted preprocessing, which are not written for it.
  """
  if axes is None:
    axes = [(DATA_AXIS, -1)]
  items = list(axes.items()) if isinstance(axes, Mapping) else [
      tuple(a) for a in axes]
  names = [str(n) for n, _ in items]
  shapes = [int(s) for _, s in items]
  devices = list(devices) if devices is not None else jax.devices()
  if shapes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {items}")
  known = math.prod(s for s in shapes if s != -1)
  if -1 in shapes:
    if known <= 0 or len(devices) % known:
      raise ValueError(f"cannot fill mesh {items} from {len(devices)} devices")
    shapes[shapes.index(-1)] = len(devices) // known
  if math.prod(shapes) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, shapes))} needs "
                     f"{math.prod(shapes)} devices, have {len(devices)}")
  if axis_types is None:
    axis_types = (AxisType.Auto,) * len(shapes)
  return jax.make_mesh(tuple(shapes), tuple(names), tuple(axis_types),
                       devices=devices)


def data_sharding(mesh: Mesh, batch_axes: str | Sequence[str] = DATA_AXIS
                  ) -> NamedSharding:
  """Leading (batch) dimension split over `batch_axes`, the rest replicated."""
  if isinstance(batch_axes, str):
    batch_axes = (batch_axes,)
  missing = [a for a in batch_axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"batch axes {missing} not in mesh axes {mesh.axis_names}")
  return NamedSharding(mesh, P(tuple(batch_axes)))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated over the mesh."""
  return NamedSharding(mesh, P())


def batch_shards(sharding: NamedSharding) -> int:
  """How many ways the leading dimension is split."""
  spec = sharding.spec
  if not spec or spec[0] is None:
    return 1
  axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  return math.prod(sharding.mesh.shape[a] for a in axes)


def local_batch_size(global_batch: int, sharding: NamedSharding,
                     process_count: int | None = None) -> int:
  """Rows each process feeds per step; validates divisibility."""
  pc = jax.process_count() if process_count is None else process_count
  shards = batch_shards(sharding)
  if global_batch <= 0 or global_batch % shards:
    raise ValueError(f"global batch {global_batch} must be a positive "
                     f"multiple of the {shards} batch shards of the mesh")
  if global_batch % pc:
    raise ValueError(f"global batch {global_batch} must be a multiple of the "
                     f"process count {pc}")
  return global_batch // pc


def process_slice(n: int, process_index: int | None = None,
                  process_count: int | None = None) -> slice:
  """The positions of `range(n)` that process `process_index` reads.

  Strided: `slice(process_index, n, process_count)`. Disjoint across
  processes and their union is range(n). Counts differ by at most one; the
  inference pipeline pads them to the same number of steps.
  """
  p = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if not 0 <= p < pc:
    raise ValueError(f"process_index {p} not in [0, {pc})")
  return slice(p, n, pc)


def inference_steps(n: int, global_batch: int) -> int:
  """Steps every process runs to cover n records: ceil(n / global_batch).

  Computed from the GLOBAL count only, so all processes agree without
  communicating (a process with fewer local records runs padding steps
  instead of stopping early and hanging the collectives of the others).
  """
  if global_batch <= 0:
    raise ValueError(f"global_batch must be positive, got {global_batch}")
  return -(-int(n) // int(global_batch))


def _is_device_dtype(x: np.ndarray) -> bool:
  return x.dtype.kind in "biufc"


def to_global(host_batch: Mapping[str, np.ndarray],
              sharding: NamedSharding | Mapping[str, NamedSharding],
              keys: Sequence[str] | None = None) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global `jax.Array`s. THE one place for this.

  Each process passes ITS rows (leading dim = local batch); the global array
  has leading dim local * (number of processes the batch axis spans). With a
  replicated sharding every process must pass the same full value.

  Args:
    host_batch: name -> numpy array.
    sharding: one sharding for all keys, or a per-key mapping.
    keys: which entries to convert. Default: every numeric/bool entry; string
      entries (status, message, path) are host-side metadata and are left
      out of the result (they stay in `host_batch`). Naming a string key in
      `keys` raises TypeError.
  """
  if keys is None:
    keys = [k for k, v in host_batch.items()
            if _is_device_dtype(np.asarray(v))]
  out = {}
  for k in keys:
    x = np.asarray(host_batch[k])
    if not _is_device_dtype(x):
      raise TypeError(f"{k!r} has dtype {x.dtype}; only numeric/bool arrays "
                      "can become jax.Arrays")
    sh = sharding[k] if isinstance(sharding, Mapping) else sharding
    spec = sh.spec
    if spec and spec[0] is not None:
      if x.ndim == 0:
        raise ValueError(f"{k!r} is a scalar but the sharding splits dim 0")
      local_devices = len(sh.addressable_devices)
      shards = batch_shards(sh)
      # Rows per local device along the batch axis must be whole.
      local_shards = max(1, shards * local_devices // len(sh.device_set))
      if x.shape[0] % local_shards:
        raise ValueError(
            f"{k!r}: local batch {x.shape[0]} is not divisible by the "
            f"{local_shards} batch shards on this process")
    out[k] = jax.make_array_from_process_local_data(sh, x)
  return out


def global_from_full(full_batch: Mapping[str, np.ndarray], sharding,
                     keys: Sequence[str] | None = None) -> dict[str, jax.Array]:
  """`to_global` for pipelines where every process builds the WHOLE global
  batch (same seed, same draw): each process feeds only its contiguous share
  of rows, [B*p/P, B*(p+1)/P)."""
  pc, pi = jax.process_count(), jax.process_index()
  local = {}
  for k, v in full_batch.items():
    v = np.asarray(v)
    if pc > 1 and v.ndim:
      if v.shape[0] % pc:
        raise ValueError(f"{k!r}: global batch {v.shape[0]} is not divisible "
                         f"by the {pc} processes")
      v = v[v.shape[0] * pi // pc:v.shape[0] * (pi + 1) // pc]
    local[k] = v
  return to_global(local, sharding, keys)


def is_primary() -> bool:
  """The process that writes shared files (sidecars, manifests, reports)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """All processes wait here (no-op with one process).

  Files one process writes are only read by the others after a barrier, and
  checks that read the filesystem run on every process before anyone writes.
  """
  if jax.process_count() > 1:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    ocp.multihost.sync_global_processes(name)


def to_host_local(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in host order.

  The inverse of `to_global` for one array: row j of the result belongs to
  row j of the host batch this process fed (so per-image outputs can be
  written next to the host batch's paths without gathering). Fully
  replicated arrays come back whole.
  """
  if x.sharding.is_fully_replicated:
    return np.asarray(x.addressable_shards[0].data)
  pieces = {}
  for s in x.addressable_shards:
    sl = s.index[0] if s.index else slice(None)
    start = sl.start or 0
    if start not in pieces:  # replicas on other mesh axes hold the same rows
      pieces[start] = np.asarray(s.data)
  return np.concatenate([pieces[k] for k in sorted(pieces)], axis=0)
