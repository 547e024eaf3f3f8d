"""The one training loop. Teacher, adapter, MIM pretraining, the EyeQ head and
the pooling calibration are `Task`s on it: each supplies `build` (the model,
randomly initialised from its config's seed), `loss`, a batch source, and
optionally a trainable filter, frozen-weight loading, image panels and an
export. `fit(task, TrainConfig, workdir)` owns everything else:

  * mesh and sharded abstract init: `eval_shape(build)` -> shardings from
    the rules (`efiqa_jax.sharding`; optimizer state follows its
    parameters) -> `jit(init, out_shardings=...)`: nothing is ever whole on
    one device; a resumed run restores straight into those shardings and
    never runs the init;
  * the optimizer from config: AdamW (torch defaults), optional global-norm
    clipping, learning-rate schedules with warm-up (`make_schedule`);
    numbers live in the optimizer state (`optax.inject_hyperparams`);
  * checkpoints: an async orbax `CheckpointManager` in WORKDIR/checkpoints
    holding {state, data-iterator state, run fingerprint}; a rerun of the
    same command resumes from the latest one and reproduces the
    uninterrupted run bit for bit; a changed config is refused with the
    difference (`FingerprintMismatch`);
  * metrics on process 0 only (`metric_writers`: metrics.jsonl, TensorBoard
    events, image panels that gather only the images they show), line
    progress or a bar (`progress`), the lagged non-finite-loss guard;
  * `profile_steps="A:B"`: a `jax.profiler` trace of steps A..B in
    WORKDIR/profile;
  * stopping: SIGTERM, or orbax's preemption sync point (every process at
    the same step), saves a checkpoint on every process and raises
    `runtime.Interrupted` with exit code 75; Ctrl-C (SIGINT) does the same
    with 130 (a second Ctrl-C exits at once). The same command resumes.

Per-step randomness is `fold_in(key(seed), step)`, the data order a function
of the step (or a checkpointed grain iterator), so where a run stops does
not change what it computes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from efiqa_jax import files
from efiqa_jax import metric_writers
from efiqa_jax import progress as progress_lib
from efiqa_jax import runtime
from efiqa_jax import sharding as sh

log = logging.getLogger(__name__)

Interrupted = runtime.Interrupted


class NonFiniteLossError(FloatingPointError):
  pass


class FingerprintMismatch(ValueError):
  """The workdir holds a run with other settings."""


# --------------------------------------------------------------- config


@dataclasses.dataclass
class TrainConfig:
  """What the loop needs from a task's ml_collections config."""
  total_steps: int
  seed: int = 0
  lr: float = 1e-3
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.01
  grad_clip_norm: float = 0.0
  schedule: Mapping[str, Any] | None = None  # see make_schedule
  mesh: Any = None  # None: sharding.DEFAULT_MESH; "local": one local device
  rules: Any = tuple(sh.REPLICATE_ALL)
  checkpoint_every: int = 1000
  keep_checkpoints: int = 2
  log_every: int = 50
  image_every: int = 0
  num_panel_images: int = 4
  progress: bool = True
  profile_steps: str = ""
  max_steps: int = -1  # > 0: stop after this step (checkpoint saved)
  steps_per_call: int = 1  # > 1: that many steps per jitted call (scan)
  tensorboard: bool | None = None
  async_checkpoints: bool = True


def schedule_config(config) -> dict:
  """`config.schedule` as a plain dict (defaults: constant, no warm-up)."""
  s = config.get("schedule") if hasattr(config, "get") else None
  d = dict(kind="constant", warmup_steps=0, end_fraction=0.0)
  if s is not None:
    d.update({k: v for k, v in dict(s).items()})
  return d


def make_schedule(lr: float, total_steps: int, schedule: Mapping | None):
  """The learning rate: a float (constant, no warm-up) or an optax schedule.

  schedule = {"kind": "constant" | "cosine" | "linear", "warmup_steps": W,
  "end_fraction": f}: linear warm-up from 0 over W steps, then constant, or
  cosine / linear decay to f * lr at the last step.
  """
  s = dict(kind="constant", warmup_steps=0, end_fraction=0.0)
  s.update(dict(schedule or {}))
  unknown = set(s) - {"kind", "warmup_steps", "end_fraction"}
  if unknown:
    raise ValueError(f"unknown schedule fields {sorted(unknown)} (known: "
                     "kind, warmup_steps, end_fraction)")
  kind, lr = str(s["kind"]), float(lr)
  warm = int(s["warmup_steps"])
  end = lr * float(s["end_fraction"])
  total = max(int(total_steps), 1)
  if warm < 0 or (warm and warm >= total and kind != "constant"):
    raise ValueError(f"schedule.warmup_steps={warm} must be in [0, "
                     f"{total}) for {total} steps")
  if kind == "constant":
    if not warm:
      return lr
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)],
        [warm])
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(total, 2),
                                              end)
  if kind == "linear":
    decay = optax.linear_schedule(lr, end, max(total - warm, 1))
    if not warm:
      return decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warm), decay], [warm])
  raise ValueError(f"schedule.kind={kind!r} is not one of constant, cosine, "
                   "linear")


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  """AdamW (torch defaults) with its numbers held in the optimizer state
  (one compilation serves any lr; the numbers are checkpointed)."""
  parts = []
  if tc.grad_clip_norm and tc.grad_clip_norm > 0:
    parts.append(optax.inject_hyperparams(optax.clip_by_global_norm)(
        max_norm=float(tc.grad_clip_norm)))
  parts.append(optax.inject_hyperparams(optax.adamw)(
      learning_rate=make_schedule(tc.lr, tc.total_steps, tc.schedule),
      b1=float(tc.b1), b2=float(tc.b2), eps=float(tc.eps),
      weight_decay=float(tc.weight_decay)))
  return optax.chain(*parts)


def parse_profile_steps(text: str) -> tuple[int, int] | None:
  if not text:
    return None
  a, sep, b = str(text).partition(":")
  try:
    lo, hi = int(a), int(b)
  except ValueError:
    lo = hi = -1
  if not sep or not 0 <= lo < hi:
    raise ValueError(f"profile steps {text!r}: use A:B with 0 <= A < B "
                     "(trace steps A+1..B)")
  return lo, hi


# ------------------------------------------------------------ fingerprint

# Config keys that do not change what a run computes: they may differ on
# resume.
VOLATILE_KEYS = ("progress", "progress_bar", "log_every", "image_every",
                 "num_panel_images", "checkpoint_every", "keep_checkpoints",
                 "max_steps", "profile_steps", "mesh", "sharding",
                 "param_sharding", "num_threads", "prefetch", "data_threads",
                 "pixel_cache_gb", "tensorboard", "async_checkpoints")


def flatten(d: Mapping, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def jsonable(obj):
  return json.loads(json.dumps(obj, default=str))


def config_fingerprint(config, extra: Mapping | None = None,
                       volatile: Sequence[str] = VOLATILE_KEYS) -> dict:
  """The flattened config without keys that do not change results, plus
  `extra` (data identity, model sha, ...)."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  flat = flatten(jsonable(d))
  out = {k: v for k, v in flat.items()
         if not any(part in volatile for part in k.split("."))}
  for k, v in flatten(jsonable(dict(extra or {}))).items():
    out[k] = v
  return out


def fingerprint_diff(old: Mapping, new: Mapping, limit: int = 6) -> str:
  keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  # The trainer's own entries repeat config fields under other names: name
  # the config's where there are any.
  own = [k for k in keys if not k.startswith("_trainer.")]
  keys = own or keys
  parts = [f"{k} {json.dumps(old.get(k, '<unset>'))} -> "
           f"{json.dumps(new.get(k, '<unset>'))}" for k in keys[:limit]]
  if len(keys) > limit:
    parts.append(f"and {len(keys) - limit} more")
  return "; ".join(parts)


# ------------------------------------------------------------------ task


@dataclasses.dataclass
class Task:
  """What a trainer supplies; everything else is `fit`'s.

  build: () -> nnx.Module (or a pytree of arrays): the model, randomly
    initialised from the config's seed; traced under eval_shape and jit.
  loss: (model, batch, rng, step) -> (scalar loss, {name: scalar}). `batch`
    holds the device entries of a step's global batch; a metric named
    "skip_update" (bool) makes that step change nothing (and it is left out
    of the logged loss).
  batches: () -> iterator of host-local batches {name: numpy} from step 0,
    this process's rows of each global batch. A grain DatasetIterator's
    state is checkpointed (resume restores it); any other iterator is
    fast-forwarded by drawing the steps already done.
  step_inputs: step -> {name: scalar} added to the step's batch (same on
    every process; replicated), e.g. a schedule value computed on the host.
  host_metrics: (host batch, step) -> {name: float} logged with the metrics.
  trainable: nnx filter of what gets gradients and optimizer state; other
    nnx.Params are frozen (never differentiated, no optimizer state).
  load_frozen: (abstract frozen State, shardings) -> State placed in them
    (e.g. a pretrained encoder restored straight into its shards); without
    it the frozen weights are those `build` makes.
  panels: (model, first rows of the batch, rng, step) -> {name: (k,H,W,C)
    in [0,1]}; runs on the first `num_panel_images` rows only.
  export: (model with host parameters, FitResult) -> path; every process
    calls it (`checkpoints.save_model` is collective).
  jit_key: hashable identity of the compiled functions (model structure,
    loss settings): a second run in the same process reuses them.
  """
  name: str
  build: Callable[[], Any]
  loss: Callable[..., tuple[Any, Mapping[str, Any]]]
  batches: Callable[[], Iterator[Mapping[str, np.ndarray]]]
  global_batch: int
  fingerprint: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  device_keys: Sequence[str] | None = None
  step_inputs: Callable[[int], Mapping[str, Any]] | None = None
  host_metrics: Callable[[Mapping, int], Mapping[str, float]] | None = None
  trainable: Any = nnx.Param
  load_frozen: Callable[[Any, Any], Any] | None = None
  panels: Callable[..., Mapping[str, Any]] | None = None
  export: Callable[[Any, "FitResult"], Any] | None = None
  jit_key: Hashable | None = None


@dataclasses.dataclass
class FitResult:
  workdir: str | None
  step: int
  total_steps: int
  history: list            # [(step, mean loss over the logging window)]
  final_loss: float        # last logged loss at or before `step`
  params: Any              # trainable parameters, host numpy
  opt_state: Any           # optimizer state, host numpy
  frozen: Any              # frozen parameters (host numpy), if any
  graphdef: Any
  rest: Any                # non-parameter state, host numpy
  export: Any = None       # what task.export returned
  start_step: int = 0

  def model(self):
    """The trained model (host numpy parameters)."""
    if self.graphdef is None:
      return self.params
    return nnx.merge(self.graphdef, self.params, self.frozen, self.rest)


# ----------------------------------------------------------- the loop

# Run-once functions (random init) gain nothing from XLA's optimisation
# passes, which take tens of seconds on threefry-heavy graphs on CPU.
_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}
_JIT_CACHE: dict = {}


def _spec_key(shardings) -> tuple:
  return tuple((sh.path_str(p), str(s.spec)) for p, s in
               jax.tree_util.tree_flatten_with_path(shardings)[0])


def _is_module(x) -> bool:
  return isinstance(x, nnx.Module)


def _abstract(task: Task):
  abs_model = nnx.eval_shape(task.build)
  if _is_module(abs_model):
    graphdef, params, frozen, rest = nnx.split(abs_model, task.trainable,
                                               nnx.Param, ...)
    return graphdef, params, frozen, rest
  return None, abs_model, {}, {}


def _split_built(task: Task):
  m = task.build()
  if _is_module(m):
    _, p, f, r = nnx.split(m, task.trainable, nnx.Param, ...)
    return p, f, r
  return m, {}, {}


def _merge(graphdef, params, frozen, rest):
  if graphdef is None:
    return params
  return nnx.merge(graphdef, params, frozen, rest)


def _mesh(tc: TrainConfig):
  if tc.mesh == "local":
    return sh.make_mesh([(sh.DATA_AXIS, 1)], devices=jax.local_devices()[:1])
  return sh.mesh_from_config(tc.mesh)


class _Stop:
  """SIGTERM / SIGINT -> a flag the loop reads at step boundaries.

  With several processes, SIGTERM is left to jax's preemption notifier
  (orbax's `reached_preemption` gives every process the same step); Ctrl-C
  is turned into SIGTERM so it takes the same path."""

  def __init__(self, multi: bool):
    self.multi = multi
    self.signal: str | None = None
    self._old = {}

  def _on(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.signal is not None and signum == signal.SIGINT:
      print("interrupted again: exiting without saving", file=sys.stderr,
            flush=True)
      os._exit(runtime.EXIT_INTERRUPTED)  # pylint: disable=protected-access
    self.signal = name
    print(f"{name}: stopping at the next step boundary (checkpoint, then exit;"
          " Ctrl-C again to exit at once)", file=sys.stderr, flush=True)
    if self.multi and signum == signal.SIGINT:
      signal.raise_signal(signal.SIGTERM)  # jax's notifier: same step everywhere

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    sigs = [signal.SIGINT] + ([] if self.multi else [signal.SIGTERM])
    for s in sigs:
      self._old[s] = signal.signal(s, self._on)
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}


def _stack(hosts: list, keys) -> dict:
  """k host batches -> one: per-example arrays (lbs, k, ...), scalars (k,)."""
  out = {}
  for key in keys:
    vals = [np.asarray(h[key]) for h in hosts]
    out[key] = (np.stack(vals) if vals[0].ndim == 0 else
                np.stack(vals, axis=1))
  return out


def fit(task: Task, tc: TrainConfig, workdir: str | os.PathLike | None, *,
        _stop_after_steps: int | None = None) -> FitResult:
  """Trains `task` (resuming from `workdir`), exports it, returns the result.

  workdir None: an in-memory fit (no checkpoints, metrics or export).
  `_stop_after_steps` (tests only) returns abruptly after that many steps
  of this call, without a checkpoint, like a killed job.
  Raises `runtime.Interrupted` (exit code 75 or 130) when stopped by a
  signal, after saving; signals are caught from here on, so a Ctrl-C during
  a compilation waits for it instead of tearing the process down.
  """
  runtime.initialize()
  with _Stop(multi=jax.process_count() > 1) as stopper:
    return _fit(task, tc, workdir, stopper, _stop_after_steps)


def _fit(task, tc, workdir, stopper, _stop_after_steps):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  pc = jax.process_count()
  primary = runtime.is_primary()
  total = int(tc.total_steps)
  if total < 1:
    raise ValueError(f"{task.name}: {total} training steps")
  spc = max(1, int(tc.steps_per_call))
  wd = epath.Path(workdir) if workdir is not None else None
  if wd is not None:
    wd.mkdir(parents=True, exist_ok=True)
  prof = parse_profile_steps(tc.profile_steps)

  # ---- mesh, abstract state, shardings
  mesh = _mesh(tc)
  dsh, repl = sh.data_sharding(mesh), sh.replicated(mesh)
  gbs = int(task.global_batch)
  sh.local_batch_size(gbs, dsh, pc if tc.mesh != "local" else 1)
  graphdef, abs_params, abs_frozen, abs_rest = _abstract(task)
  rules = sh.parse_rules(tc.rules)
  p_sh = sh.tree_shardings(abs_params, rules, mesh)
  f_sh = sh.tree_shardings(abs_frozen, rules, mesh)
  r_sh = jax.tree.map(lambda _: repl, abs_rest)
  tx = make_optimizer(tc)
  abs_opt = jax.eval_shape(tx.init, abs_params)
  o_sh = sh.opt_state_shardings(tx, abs_opt, p_sh, mesh)
  state_sh = dict(params=p_sh, opt_state=o_sh, step=repl)
  abs_state = dict(params=abs_params, opt_state=abs_opt,
                   step=jax.ShapeDtypeStruct((), jnp.int32))
  nparams = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abs_params))
  nfrozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abs_frozen))
  log.info("%s: %d trainable parameters%s; mesh %s over %d devices "
           "(%d processes)", task.name, nparams,
           f", {nfrozen} frozen" if nfrozen else "", sh.mesh_text(mesh),
           mesh.devices.size, pc)
  for line in sh.describe_shardings(state_sh["params"]):
    log.debug("sharded %s", line)
  mesh_key = (tuple(d.id for d in mesh.devices.flat), mesh.axis_names,
              tuple(mesh.shape.values()))
  cache_key = None if task.jit_key is None else (
      task.jit_key, mesh_key, _spec_key(p_sh), _spec_key(f_sh),
      _spec_key(o_sh), jax.tree.structure(abs_opt), repr(tx_key(tc)), spc)

  def cached(name, make):
    if cache_key is None:
      return make()
    k = (name,) + cache_key
    if k not in _JIT_CACHE:
      _JIT_CACHE[k] = make()
    return _JIT_CACHE[k]

  # ---- checkpoints: refuse a different run, find where to start
  mngr = None
  start = 0
  fp = flatten(jsonable(dict(task.fingerprint, _trainer=dict(
      total_steps=total, global_batch=gbs, seed=int(tc.seed),
      optimizer=tx_key(tc), steps_per_call=spc))))
  if wd is not None:
    mngr = ocp.CheckpointManager(
        wd / "checkpoints", options=ocp.CheckpointManagerOptions(
            max_to_keep=int(tc.keep_checkpoints), create=True,
            enable_async_checkpointing=bool(tc.async_checkpoints)))
    latest = mngr.latest_step()
    if latest is not None:
      old = _read_fingerprint(mngr, latest, ocp)
      problem = None
      if old is None:
        problem = (f"{wd} holds checkpoint {latest} without a run fingerprint "
                   "(written by an older efiqa-jax); use a new --workdir")
      elif old != fp:
        problem = (f"{wd} holds a run with other settings: "
                   f"{fingerprint_diff(old, fp)} (resume needs the same "
                   "config; use a new --workdir)")
      if problem:
        mngr.close()
        raise FingerprintMismatch(problem)
      start = int(latest)
    if primary:
      _atomic_json(wd / "run.json", fp)

  # ---- state: restored into its shardings, or initialised in them
  key = jax.jit(lambda: jax.random.key(int(tc.seed)), out_shardings=repl)()
  if task.load_frozen is not None:
    frozen = task.load_frozen(abs_frozen, f_sh)

    def init_fn():
      p, _, r = _split_built(task)
      return p, r
    init_sh = (p_sh, r_sh)
  else:
    init_fn = functools.partial(_split_built, task)
    init_sh = (p_sh, f_sh, r_sh)
  it = task.batches()
  grain_iter = hasattr(it, "get_state") and hasattr(it, "set_state")
  if start:
    if task.load_frozen is None:
      # Only the frozen part and the non-parameter state are needed.
      _, frozen, rest = cached("init", lambda: jax.jit(
          init_fn, out_shardings=init_sh).lower().compile(
              compiler_options=_FAST_COMPILE))()
    else:
      _, rest = cached("init", lambda: jax.jit(
          init_fn, out_shardings=init_sh).lower().compile(
              compiler_options=_FAST_COMPILE))()
    items = dict(state=ocp.args.StandardRestore(
        sh.abstract_with(abs_state, state_sh)))
    if grain_iter:
      from efiqa_jax import input_pipeline  # pylint: disable=g-import-not-at-top
      items["data_iter"] = input_pipeline.iterator_checkpoint_args(
          it, restore=True)
    state = mngr.restore(start, args=ocp.args.Composite(**items))["state"]
    got = int(jax.device_get(state["step"]))
    if got != start:
      raise RuntimeError(f"checkpoint {start} holds step {got}")
    if not grain_iter:
      for _ in range(start):  # step-indexed sources: skip what was done
        next(it)
    log.info("%s: resumed at step %d/%d from %s", task.name, start, total,
             wd / "checkpoints")
  else:
    out = cached("init", lambda: jax.jit(
        init_fn, out_shardings=init_sh).lower().compile(
            compiler_options=_FAST_COMPILE))()
    if task.load_frozen is None:
      params, frozen, rest = out
    else:
      params, rest = out
    opt_state = cached("opt_init", lambda: jax.jit(
        tx.init, out_shardings=o_sh).lower(abs_params).compile(
            compiler_options=_FAST_COMPILE))(params)
    state = dict(params=params, opt_state=opt_state,
                 step=sh.to_global({"s": np.int32(0)}, repl)["s"])

  writer = metric_writers.NullWriter()
  if wd is not None:
    writer = metric_writers.create(wd, primary=primary, resume_step=start,
                                   tensorboard=tc.tensorboard)
    if start == 0:
      writer.write_hparams(fp)

  # ---- the jitted step
  batch_sh: dict = {}

  def one_step(state, frozen, rest, batch, key):
    step = state["step"]
    rng = jax.random.fold_in(key, step)

    def loss_fn(p):
      loss, metrics = task.loss(_merge(graphdef, p, frozen, rest), batch,
                                rng, step)
      return loss, dict(metrics)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"],
                                   state["params"])
    params = optax.apply_updates(state["params"], updates)
    skip = metrics.pop("skip_update", None)
    if skip is not None:  # this step changes nothing
      params = jax.tree.map(lambda a, b: jnp.where(skip, b, a), params,
                            state["params"])
      opt_state = jax.tree.map(lambda a, b: jnp.where(skip, b, a), opt_state,
                               state["opt_state"])
      metrics["skip_update"] = skip
    out = dict(loss=loss, grad_norm=optax.tree.norm(grads),
               param_norm=optax.tree.norm(params), lr=_current_lr(opt_state))
    out.update({n: jnp.asarray(v, jnp.float32) for n, v in metrics.items()})
    return dict(params=params, opt_state=opt_state, step=step + 1), out

  def multi_step(state, frozen, rest, batch, key):
    # Per-example entries arrive as (batch, k, ...), per-step ones as (k,).
    xs = {n: (v if batch_sh[n] is repl else jnp.moveaxis(v, 1, 0))
          for n, v in batch.items()}
    return jax.lax.scan(lambda st, b: one_step(st, frozen, rest, b, key),
                        state, xs)

  abs_state_sh = sh.abstract_with(abs_state, state_sh)
  feed_pc = pc if tc.mesh != "local" else 1
  compiled: dict = {}

  def abstract_batch(host):
    return {n: jax.ShapeDtypeStruct(_global_shape(v, batch_sh[n], feed_pc),
                                    v.dtype, sharding=batch_sh[n])
            for n, v in host.items()}

  def step_fn(host, k):
    if k not in compiled:
      ab = abstract_batch(host)
      sig = tuple(sorted((n, a.shape, str(a.dtype)) for n, a in ab.items()))
      compiled[k] = cached(("step", k, sig), lambda: jax.jit(
          one_step if k == 1 else multi_step,
          in_shardings=(state_sh, f_sh, r_sh, dict(batch_sh), repl),
          out_shardings=(state_sh, repl), donate_argnums=(0,)).lower(
              abs_state_sh, frozen, rest, ab, key).compile())
    return compiled[k]

  panel_fn = None
  if task.panels is not None and tc.image_every and wd is not None:
    if spc > 1:
      raise ValueError("image panels need steps_per_call = 1")
    npanel = min(int(tc.num_panel_images), gbs)

    def panel_fn_(params, frozen, rest, batch, key, step):
      # Slice first: only the shown rows leave their devices.
      first = {n: (v if v.ndim == 0 else v[:npanel]) for n, v in batch.items()}
      return task.panels(_merge(graphdef, params, frozen, rest), first,
                         jax.random.fold_in(key, step), step)

    def make_panels(host):
      abs_step = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
      return jax.jit(panel_fn_, out_shardings=repl).lower(
          abs_state_sh["params"], frozen, rest, abstract_batch(host), key,
          abs_step).compile()

  # ---- the loop
  stop_at = total
  if tc.max_steps and int(tc.max_steps) > 0:
    stop_at = min(total, int(tc.max_steps))
  history, window = [], []
  pending = None  # (steps done, metrics, k), checked one call late
  bar = progress_lib.Progress(total, task.name, initial=start,
                              enabled=primary and bool(tc.progress))
  keys = None
  t0, done_here = time.monotonic(), 0
  step = start
  profiling = False

  def stop_before_first_step():
    if pc == 1 and stopper.signal and step == start:
      raise Interrupted(
          f"{task.name}: stopped by {stopper.signal} before the first step; "
          "nothing to save", runtime.EXIT_INTERRUPTED
          if stopper.signal == "SIGINT" else runtime.EXIT_PREEMPTED, step)

  try:
    with jax.set_mesh(mesh):
      while step < stop_at:
        stop_before_first_step()
        k = min(spc, stop_at - step)
        hosts = []
        for j in range(k):
          h = dict(next(it))
          if task.step_inputs is not None:
            h.update({n: np.asarray(v) for n, v in
                      task.step_inputs(step + j).items()})
          hosts.append(h)
        if keys is None:
          keys = (list(task.device_keys) if task.device_keys is not None
                  else [n for n, v in hosts[0].items()
                        if np.asarray(v).dtype.kind in "biufc"])
          if task.step_inputs is not None:
            keys += [n for n in task.step_inputs(step) if n not in keys]
          batch_sh.update({n: (repl if np.ndim(hosts[0][n]) == 0 else dsh)
                           for n in keys})
        host = ({n: np.asarray(hosts[0][n]) for n in keys} if k == 1
                else _stack(hosts, keys))
        gbatch = sh.to_global(host, batch_sh, keys=keys)
        first_call = not compiled
        fn = step_fn(host, k)
        stop_before_first_step()  # a signal while compiling
        if first_call:
          if panel_fn is None and task.panels is not None and (
              tc.image_every and wd is not None):
            panel_fn = cached(("panels", tuple(sorted(
                (n, np.shape(v), str(np.asarray(v).dtype))
                for n, v in host.items()))), lambda: make_panels(host))
          if pc > 1:
            # Every process has compiled: gloo gives up on a collective
            # after 30 s, so nobody steps while another still compiles.
            runtime.barrier(f"{task.name}:compiled")
        if prof and not profiling and step <= prof[0] < step + k:
          jax.profiler.start_trace(os.fspath(wd / "profile") if wd else
                                   "/tmp/efiqa_profile")
          profiling = True
        prev = step
        state, metrics = fn(state, frozen, rest, gbatch, key)
        step += k
        done_here += k
        if pending is not None:
          _check_finite(pending, mngr)
        pending = (step, metrics, k)
        extra = {}
        if task.host_metrics is not None:
          rows = [task.host_metrics(h, prev + j) for j, h in enumerate(hosts)]
          extra = {n: float(np.mean([r[n] for r in rows])) for n in rows[0]}
        window.append((metrics, k, extra))
        if profiling and step >= prof[1]:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
          profiling = False
          log.info("%s: trace of steps %d-%d in %s", task.name, prof[0] + 1,
                   step, wd / "profile" if wd else "/tmp/efiqa_profile")
        bar.update(k)
        if _crossed(prev, step, tc.log_every) or step == stop_at:
          _check_finite(pending, mngr)
          scal = _window_mean(window)
          scal["steps_per_sec"] = done_here / max(time.monotonic() - t0, 1e-9)
          writer.write_scalars(step, scal)
          if "loss" in scal:
            history.append((step, scal["loss"]))
            bar.set_postfix(loss=scal["loss"])
          if primary and wd is not None:
            log.info("%s step %d/%d: %s", task.name, step, total, ", ".join(
                f"{n}={v:.4g}" for n, v in scal.items()))
          window = []
        if panel_fn is not None and _crossed(prev, step, tc.image_every):
          out = panel_fn(state["params"], frozen, rest, gbatch, key,
                         sh.to_global({"s": np.int32(step - 1)}, repl)["s"])
          if primary:
            writer.write_images(step, jax.device_get(out))
        # One process: its own signal. Several: only the preemption sync
        # point, which gives every process the same step (a signal reaches
        # the others through JAX's preemption notifier).
        if pc > 1:
          stop = mngr is not None and mngr.reached_preemption(step)
        else:
          stop = stopper.signal is not None
        if stop:
          _check_finite(pending, mngr)
          saved = _save(mngr, step, state, it, grain_iter, fp, ocp,
                        force=True)
          if mngr is not None:
            mngr.wait_until_finished()
          writer.flush()
          code = (runtime.EXIT_INTERRUPTED if stopper.signal == "SIGINT"
                  else runtime.EXIT_PREEMPTED)
          why = stopper.signal or "a preemption notice"
          raise Interrupted(
              f"{task.name}: stopped by {why} after step {step}/{total}"
              + (f"; checkpoint {saved} saved, rerun the same command to "
                 "resume" if saved is not None else ""), code, step)
        if _crossed(prev, step, tc.checkpoint_every) and step < total:
          _check_finite(pending, mngr)  # never checkpoint a NaN state
          _save(mngr, step, state, it, grain_iter, fp, ocp)
          writer.flush()  # an object store keeps the rows up to here
        if _stop_after_steps is not None and done_here >= _stop_after_steps:
          return FitResult(os.fspath(wd) if wd else None, step, total,
                           history, float("nan"), None, None, None, graphdef,
                           None, start_step=start)
    if pending is not None:
      _check_finite(pending, mngr)
    if mngr is not None and step > (mngr.latest_step() or 0):
      _save(mngr, step, state, it, grain_iter, fp, ocp, force=True)
    if mngr is not None:
      mngr.wait_until_finished()
  finally:
    if profiling:
      jax.profiler.stop_trace()
    bar.close()
    writer.close()
    if mngr is not None:
      mngr.close()
    if hasattr(it, "close"):
      try:
        it.close()
      except Exception:  # pylint: disable=broad-except
        pass

  final_loss = history[-1][1] if history else _logged_loss(wd, step)
  res = FitResult(os.fspath(wd) if wd else None, step, total, history,
                  final_loss, sh.to_host(state["params"]),
                  sh.to_host(state["opt_state"]), sh.to_host(frozen),
                  graphdef, sh.to_host(rest), start_step=start)
  if task.export is not None and step >= total:
    res.export = task.export(res.model(), res)
  return res


def tx_key(tc: TrainConfig) -> dict:
  return dict(lr=float(tc.lr), b1=float(tc.b1), b2=float(tc.b2),
              eps=float(tc.eps), weight_decay=float(tc.weight_decay),
              grad_clip_norm=float(tc.grad_clip_norm or 0.0),
              schedule=dict(tc.schedule or {}))


def _current_lr(opt_state):
  """The learning rate the step used (inject_hyperparams keeps it)."""
  for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(
      x, "hyperparams")):
    hp = getattr(s, "hyperparams", None)
    if hp and "learning_rate" in hp:
      return jnp.asarray(hp["learning_rate"], jnp.float32)
  return jnp.float32(jnp.nan)


def _global_shape(x: np.ndarray, s, pc: int) -> tuple:
  shape = tuple(np.shape(x))
  if not shape or s.is_fully_replicated:
    return shape
  return (shape[0] * pc,) + shape[1:]


def _crossed(prev: int, now: int, every) -> bool:
  every = int(every or 0)
  return every > 0 and now // every > prev // every


def _window_mean(window) -> dict:
  """Means over the logging window; a skipped update's loss is left out."""
  vals = jax.device_get([m for m, _, _ in window])
  rows = []
  for (m, k, extra), v in zip(window, vals):
    for j in range(k):
      r = {n: float(np.asarray(a).reshape(-1)[j] if k > 1 else a)
           for n, a in v.items()}
      r.update(extra)
      rows.append(r)
  out = {}
  skip = np.array([r.get("skip_update", 0.0) for r in rows]) > 0
  for n in rows[0]:
    if n == "skip_update":
      out["skipped_updates"] = float(skip.sum())
      continue
    a = np.array([r[n] for r in rows])
    if n == "loss" and skip.any():
      a = a[~skip]
      if not len(a):
        continue
    out[n] = float(np.mean(a))
  return out


def _check_finite(pending, mngr):
  step_done, metrics, k = pending
  loss = np.asarray(jax.device_get(metrics["loss"])).reshape(-1)
  if not np.isfinite(loss).all():
    j = int(np.argmin(np.isfinite(loss)))
    last = mngr.latest_step() if mngr is not None else None
    raise NonFiniteLossError(
        f"non-finite loss ({loss[j]}) at step {step_done - k + j + 1}; "
        f"training stopped. Last good checkpoint: step {last}. Lower the "
        "learning rate, check the inputs for NaN/Inf, or clip gradients.")


def _save(mngr, step, state, it, grain_iter, fp, ocp, force=False):
  if mngr is None:
    return None
  latest = mngr.latest_step()
  if latest is not None and latest >= step:
    return latest
  items = dict(state=ocp.args.StandardSave(state),
               fingerprint=ocp.args.JsonSave(fp))
  if grain_iter:
    from efiqa_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    items["data_iter"] = input_pipeline.iterator_checkpoint_args(it)
  mngr.save(step, args=ocp.args.Composite(**items), force=force)
  return step


def _read_fingerprint(mngr, step, ocp):
  try:
    got = mngr.restore(step, args=ocp.args.Composite(
        fingerprint=ocp.args.JsonRestore()))
  except (KeyError, ValueError, FileNotFoundError):
    return None
  return got.get("fingerprint") if hasattr(got, "get") else got["fingerprint"]


def _atomic_json(path: epath.Path, obj) -> None:
  files.atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True)
                          + "\n")


def _logged_loss(wd, upto: int) -> float:
  """The last loss logged at or before `upto` (a rerun of a finished run
  reports the loss it finished with)."""
  loss = float("nan")
  if wd is None:
    return loss
  for row in metric_writers.read_metrics(wd):
    if row.get("step", upto + 1) <= upto and "loss" in row:
      loss = float(row["loss"])
  return loss
