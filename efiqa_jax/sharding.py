"""Meshes, shardings and THE host -> global array boundary.

Every host-local numpy batch becomes a global `jax.Array` in `to_global`
(via `jax.make_array_from_process_local_data`) and nowhere else, so the rule
"each process feeds only its own rows" lives in one place.

Meshes come from config: `config.mesh = {"data": -1, "fsdp": 1, "model": 1}`
(`mesh_from_config`; the CLI's `--mesh data:-1,model:2` is the same thing
spelled as text). Batches are split over the `data` and `fsdp` axes;
parameters are placed by ONE rule format (`parse_rules`):

  [(regex, spec), ...]   spec: a PartitionSpec tuple literal such as
                         "(None, 'model')", or a tactic: "replicate",
                         "fsdp" / "fsdp(min_mb=4)" (the largest dimension
                         divisible by the `fsdp` axis, tensors under
                         min_mb MiB replicated)

with ONE matching semantics: `re.fullmatch` on the '/'-joined parameter
path ('blocks/0/mlp/fc1/kernel'), first match wins, a parameter no rule
matches is an error (configs end with `(".*", "replicate")`). The rules are
applied to the whole train state from `eval_shape`: optimizer state follows
its parameters through `optax.tree_map_params` (`opt_state_shardings`).
The CLI's `--param-sharding "('regex', spec)"` rules go before a config's
(`with_rules`).

Record-to-process assignment (`process_slice`) is STRIDED and lives in
`efiqa_jax.runtime` (re-exported here): process p of P reads global
positions p, p+P, p+2P, ... With per-process batching this makes global
batch k hold exactly the positions [k*B, (k+1)*B) (B = global batch),
whatever the process count, so a run on 1 or 4 hosts sees the same batches,
and padding lands only in the final batch(es).
"""
from __future__ import annotations

import ast
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from efiqa_jax import runtime

log = logging.getLogger(__name__)

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MODEL_AXIS = "model"
AXES = (DATA_AXIS, FSDP_AXIS, MODEL_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
DEFAULT_MESH = {DATA_AXIS: -1, FSDP_AXIS: 1, MODEL_AXIS: 1}


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


def parse_mesh(spec: Any) -> list[tuple[str, int]]:
  """Mesh axes from config or text, as ordered (name, size) pairs.

  Accepts a mapping (`{"data": -1, "fsdp": 1, "model": 1}`, a ConfigDict),
  (name, size) pairs, or text `"data:-1,model:2"` (the CLI's `--mesh`).
  Axes come out in the order data, fsdp, model, then any others: data
  outermost, model innermost (neighbouring devices).
  """
  if spec is None or spec == "":
    return list(DEFAULT_MESH.items())
  if isinstance(spec, str):
    items = []
    for part in spec.split(","):
      name, sep, n = part.partition(":")
      if not sep or not name.strip():
        raise ValueError(f"mesh {spec!r}: use NAME:SIZE[,NAME:SIZE...], e.g. "
                         "'data:-1,model:2'")
      try:
        items.append((name.strip(), int(n)))
      except ValueError:
        raise ValueError(f"mesh {spec!r}: size {n!r} is not an integer"
                         ) from None
  elif hasattr(spec, "items"):
    items = [(str(k), int(v)) for k, v in spec.items()]
  else:
    items = [(str(k), int(v)) for k, v in spec]
  names = [n for n, _ in items]
  if len(set(names)) != len(names):
    raise ValueError(f"mesh {spec!r} names an axis twice")
  order = {a: i for i, a in enumerate(AXES)}
  return sorted(items, key=lambda kv: (order.get(kv[0], len(AXES)), kv[0]))


def mesh_from_config(spec: Any = None, *,
                     devices: Sequence[jax.Device] | None = None) -> Mesh:
  """`make_mesh(parse_mesh(spec))`: the mesh every trainer and driver uses.

  Without a -1 axis the mesh takes the first prod(sizes) devices (e.g.
  `data: 1` for a single-device run)."""
  axes = parse_mesh(spec)
  devices = list(devices) if devices is not None else jax.devices()
  sizes = [n for _, n in axes]
  if -1 not in sizes and 0 < math.prod(sizes) < len(devices):
    devices = devices[:math.prod(sizes)]
  return make_mesh(axes, devices=devices)


def local_mesh(mesh: Mesh | None = None) -> Mesh:
  """The 1-D `data` mesh over THIS process's devices: inference that runs
  without cross-process collectives (`assess`'s quality models, the
  driver's `LocalDataParallel`), so uneven or resumed per-process slices
  never hang a multi-host run. A given `mesh` is checked to be local."""
  if mesh is None:
    return make_mesh([(DATA_AXIS, -1)], devices=jax.local_devices())
  if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
    raise ValueError(f"mesh {mesh_text(mesh)} spans other processes' "
                     "devices; per-process inference needs a local mesh")
  return mesh


def mesh_text(mesh: Mesh) -> str:
  return ",".join(f"{a}:{n}" for a, n in mesh.shape.items())


def data_sharding(mesh: Mesh, batch_axes: str | Sequence[str] | None = None
                  ) -> NamedSharding:
  """Leading (batch) dimension split over `batch_axes`, the rest replicated.

  Default: every batch axis of the mesh, i.e. `data` and `fsdp` (FSDP splits
  the batch over the devices that split the parameters)."""
  if batch_axes is None:
    batch_axes = [a for a in BATCH_AXES if a in mesh.axis_names]
    if not batch_axes:
      raise ValueError(f"mesh axes {mesh.axis_names} have no batch axis "
                       f"{BATCH_AXES}")
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


# THE record-to-process rule lives in runtime; kept importable here.
process_slice = runtime.process_slice


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


# THE primary-process test and THE barrier live in runtime.
is_primary = runtime.is_primary
barrier = runtime.barrier


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


# ------------------------------------------------------- parameter rules

_FSDP_RE = re.compile(r"fsdp(?:\(\s*min_mb\s*=\s*([0-9.eE+-]+)\s*\))?")
FSDP_MIN_MB = 4.0  # as big_vision: smaller tensors stay replicated


class Tactic:
  """A named placement computed per tensor: 'replicate' or 'fsdp'."""

  def __init__(self, name: str, min_mb: float = FSDP_MIN_MB):
    self.name, self.min_mb = name, float(min_mb)

  def __repr__(self):
    if self.name == "fsdp" and self.min_mb != FSDP_MIN_MB:
      return f"fsdp(min_mb={self.min_mb:g})"
    return self.name

  def __eq__(self, other):
    return isinstance(other, Tactic) and repr(self) == repr(other)

  def __hash__(self):
    return hash(repr(self))


Spec = Any  # PartitionSpec | Tactic


def parse_spec(spec: Any) -> Spec:
  """A PartitionSpec, or a tactic: 'replicate' / 'fsdp' / 'fsdp(min_mb=N)'.

  Accepts PartitionSpecs, tuples/lists of axis names (None, a name, or a
  tuple of names per dimension) and their Python-literal text, e.g.
  "(None, 'model')". '()' and 'replicate' are the same."""
  if isinstance(spec, (P, Tactic)):
    return spec
  if isinstance(spec, str):
    text = spec.strip()
    if text in ("replicate", "replicated"):
      return Tactic("replicate")
    m = _FSDP_RE.fullmatch(text)
    if m:
      return Tactic("fsdp", float(m.group(1)) if m.group(1) else FSDP_MIN_MB)
    try:
      val = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise ValueError(
          f"bad sharding spec {spec!r}: use 'replicate', 'fsdp', "
          "'fsdp(min_mb=N)' or a tuple literal like \"(None, 'model')\""
      ) from None
    return parse_spec(val if isinstance(val, (tuple, list)) else (val,))
  if isinstance(spec, (tuple, list)):
    dims = []
    for a in spec:
      if a is None or isinstance(a, str):
        dims.append(a)
      elif isinstance(a, (tuple, list)) and all(isinstance(x, str) for x in a):
        dims.append(tuple(a))
      else:
        raise ValueError(f"bad sharding spec {spec!r}: each entry is None, "
                         "an axis name or a tuple of axis names")
    return P(*dims)
  raise ValueError(f"bad sharding spec {spec!r}")


def parse_rules(rules: Any) -> list[tuple[str, Spec]]:
  """Rules as [(regex, spec)]; each rule is a pair or its literal text
  "('regex', spec)". Regexes are checked here."""
  out = []
  for r in rules or ():
    val = r
    if isinstance(r, str):
      try:
        val = ast.literal_eval(r)
      except (ValueError, SyntaxError):
        raise ValueError(f"sharding rule {r!r} is not a Python literal "
                         "('regex', spec)") from None
    if (not isinstance(val, (tuple, list)) or len(val) != 2
        or not isinstance(val[0], str)):
      raise ValueError(f"sharding rule {r!r} is not (regex, spec), e.g. "
                       "('.*mlp.*kernel', (None, 'model')) or "
                       "('.*', 'replicate')")
    try:
      re.compile(val[0])
    except re.error as e:
      raise ValueError(f"sharding rule {r!r}: bad regex ({e})") from None
    out.append((val[0], parse_spec(val[1])))
  return out


def rules_text(rules: Any) -> list[list[str]]:
  """JSON-able form of rules (for metadata and fingerprints)."""
  return [[rx, repr(sp) if isinstance(sp, Tactic) else str(tuple(sp))]
          for rx, sp in parse_rules(rules)]


def with_rules(first: Any, then: Any) -> list[tuple[str, Spec]]:
  """`first` (e.g. the CLI's --param-sharding) before `then` (a config's
  rules, ending with the catch-all); first match wins."""
  return parse_rules(first) + parse_rules(then)


REPLICATE_ALL = [(".*", "replicate")]


def path_str(path) -> str:
  """'conv1/conv_a/kernel' from a jax key path (drops a Variable's value)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      if k.name not in ("value", "raw_value"):
        parts.append(k.name)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(getattr(k, "key", k)))
  return "/".join(parts)


def _fsdp_spec(name: str, shape: tuple, itemsize: int, tactic: Tactic,
               mesh: Mesh) -> P:
  n = mesh.shape.get(FSDP_AXIS, 1)
  if n <= 1 or math.prod(shape) * itemsize < tactic.min_mb * 2**20:
    return P()
  for d in sorted(range(len(shape)), key=lambda i: (-shape[i], -i)):
    if shape[d] % n == 0:
      spec = [None] * len(shape)
      spec[d] = FSDP_AXIS
      return P(*spec)
  log.debug("fsdp: no dimension of %s %s divisible by %d; replicated", name,
            shape, n)
  return P()


def spec_for(name: str, shape: tuple, dtype, rules, mesh: Mesh) -> P:
  """The PartitionSpec of one tensor; raises when it fits no rule."""
  for rx, spec in rules:
    if not re.fullmatch(rx, name):
      continue
    if isinstance(spec, Tactic):
      if spec.name == "replicate":
        return P()
      return _fsdp_spec(name, tuple(shape), np.dtype(dtype).itemsize, spec,
                        mesh)
    if len(spec) > len(shape):
      raise ValueError(f"sharding rule {rx!r}: spec {tuple(spec)} has more "
                       f"entries than {name} {tuple(shape)} has dimensions")
    for dim, ax in zip(shape, spec):
      if ax is None:
        continue
      axes = ax if isinstance(ax, tuple) else (ax,)
      for a in axes:
        if a not in mesh.axis_names:
          raise ValueError(f"sharding rule {rx!r}: axis {a!r} is not in the "
                           f"mesh {dict(mesh.shape)}")
      k = math.prod(mesh.shape[a] for a in axes)
      if dim % k:
        raise ValueError(f"sharding rule {rx!r}: {name} {tuple(shape)}: "
                         f"dim {dim} is not divisible by mesh axes {axes} "
                         f"({k})")
    return spec
  raise ValueError(f"{name} {tuple(shape)} matches no sharding rule (rules "
                   f"{[r for r, _ in rules]}, matched with re.fullmatch; end "
                   "them with ('.*', 'replicate'))")


def tree_shardings(abstract_tree, rules: Any, mesh: Mesh):
  """NamedSharding per leaf of a parameter tree (arrays or
  ShapeDtypeStructs, nnx State or pure dicts) by `rules`."""
  rules = parse_rules(rules)
  used = set()

  def one(path, leaf):
    name = path_str(path)
    spec = spec_for(name, tuple(np.shape(leaf)), leaf.dtype, rules, mesh)
    for i, (rx, _) in enumerate(rules):
      if re.fullmatch(rx, name):
        used.add(i)
        break
    return NamedSharding(mesh, spec)

  out = jax.tree_util.tree_map_with_path(one, abstract_tree)
  for i, (rx, _) in enumerate(rules):
    if i not in used and jax.tree.leaves(abstract_tree):
      log.warning("sharding rule %r matches no parameter (rules match the "
                  "whole '/'-joined path, e.g. %r)", rx,
                  path_str(jax.tree_util.tree_flatten_with_path(
                      abstract_tree)[0][0][0]))
  return out


def opt_state_shardings(tx, abstract_opt_state, param_shardings, mesh: Mesh):
  """Optimizer state laid out like its parameters (`optax.tree_map_params`);
  counters, hyperparameters and other non-parameter leaves replicated."""
  import optax  # pylint: disable=g-import-not-at-top
  repl = replicated(mesh)
  return optax.tree_map_params(
      tx, lambda _, sh: sh, abstract_opt_state, param_shardings,
      transform_non_params=lambda _: repl)


def abstract_with(tree, shardings):
  """ShapeDtypeStructs carrying `shardings`: an orbax restore target, so a
  checkpoint lands straight in its shards (never whole on one device)."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s),
      tree, shardings)


def place(host_tree, shardings):
  """Host arrays (identical on every process) -> global arrays, each device
  receiving only its own shard (`make_array_from_callback`)."""
  def one(x, sh):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda i: x[i])
  return jax.tree.map(one, host_tree, shardings)


def to_host(tree):
  """Global arrays -> numpy on every process (gathered when sharded across
  processes; every process must call it)."""
  def one(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.sharding.is_fully_replicated:  # every process holds it whole
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)


def parse_param_rules(rules: Any) -> list[tuple[str, Spec]]:
  """The CLI's `--param-sharding` rules, then the catch-all ('.*',
  'replicate'): parameters no rule names are replicated."""
  return with_rules(rules, REPLICATE_ALL)


def param_specs(state_dict: dict, rules: Any, mesh: Mesh) -> dict:
  """Pure param dict -> same-shaped dict of PartitionSpecs by `rules`
  (`tree_shardings`: unmatched parameters are an error). Errors name the
  parameter when a rule does not fit its shape."""
  return jax.tree.map(lambda s: s.spec,
                      tree_shardings(state_dict, rules, mesh))


def shard_model(model, mesh: Mesh, rules: Any = ()):
  """(graphdef, state) of an nnx model with every array placed on `mesh` by
  `rules` (the catch-all replicate appended).

  Uses `make_array_from_callback` per shard, which works when the mesh
  spans other processes (every process holds the full host copy)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  shardings = tree_shardings(pure, parse_param_rules(rules), mesh)
  nnx.replace_by_pure_dict(state, place(to_host(pure), shardings))
  return graphdef, state


def replicates_everything(model, mesh: Mesh, rules: Any = ()) -> bool:
  """True when `rules` (plus the catch-all) shard no parameter of `model`."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  pure = nnx.to_pure_dict(nnx.state(model))
  return all(s.is_fully_replicated for s in jax.tree.leaves(
      tree_shardings(pure, parse_param_rules(rules), mesh)))


def describe_shardings(shardings) -> list[str]:
  """'path: spec' lines for the non-replicated leaves (logs)."""
  out = []
  for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]:
    if isinstance(s, NamedSharding) and not s.is_fully_replicated:
      out.append(f"{path_str(path)}: {tuple(s.spec)}")
  return out
