"""Process start-up, logging and cross-process coordination: THE one place.

`initialize()` starts `jax.distributed` once per process, before anything
touches a device. The `efiqa` command calls it from its global options
(`efiqa [--coordinator-address H:P --num-processes N --process-id I] CMD`);
library users call it themselves (every trainer calls it too; it is
idempotent). Where the configuration comes from, in order:

  1. explicit arguments: all three, or `num_processes=1` alone (one process,
     no auto-detection); anything else is a `DistributedConfigError`;
  2. JAX's environment variables `JAX_COORDINATOR_ADDRESS`,
     `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (all three);
  3. auto-detection of a launcher: Cloud TPU VM pod slices (GCE or GKE),
     SLURM (`srun`), Open MPI (`mpirun`), via JAX's cluster detection;
  4. otherwise: one process.
A partial configuration is an error, never a silent single-host run, and a
failed start raises (`DistributedStartError`) instead of being swallowed.
On CPU, cross-process collectives use gloo.

Also here: `barrier(name)` (THE barrier: the coordination service's, no
device collective, so no 30 s gloo timeout while another process writes a
large file), `is_primary()`, `process_slice(n)` (THE rule assigning records
to processes, strided) and `setup_logging(level)` (our INFO lines; absl,
orbax, grain and jax at WARNING unless `level` is debug).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

# Exit codes shared by the commands (README "Exit codes").
EXIT_OK = 0
EXIT_FAILED = 1        # the run failed (e.g. non-finite loss)
EXIT_USAGE = 2         # bad arguments / config / distributed configuration
EXIT_PREEMPTED = 75    # SIGTERM or preemption notice: checkpoint saved, rerun
EXIT_INTERRUPTED = 130  # Ctrl-C: checkpoint saved (if any step ran), rerun

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Third-party loggers that are quiet (WARNING) unless --log-level debug.
_NOISY = ("absl", "orbax", "jax", "grain", "tensorflow", "tensorboard",
          "etils", "clu", "PIL", "matplotlib", "urllib3", "gcsfs", "fsspec",
          "google", "aiohttp")


class Interrupted(Exception):
  """A run stopped early on request (SIGTERM, preemption notice, Ctrl-C)
  after saving what it had; `exit_code` is what the command returns."""

  def __init__(self, message: str, exit_code: int, step: int | None = None):
    super().__init__(message)
    self.exit_code, self.step = int(exit_code), step


class DistributedConfigError(ValueError):
  """A partial or inconsistent multi-process configuration."""


class DistributedStartError(RuntimeError):
  """`jax.distributed` was configured but could not start."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  process_index: int
  process_count: int
  source: str  # 'flags' | 'env' | launcher name | 'single'


_lock = threading.Lock()
_info: ProcessInfo | None = None


def _already_started() -> bool:
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client is not None


_FLAGS = ("--coordinator-address", "--num-processes", "--process-id")


def _explicit(coordinator_address, num_processes, process_id,
              names=_FLAGS):
  """(address, n, i) from explicit settings, None when none is given."""
  where = "/".join(names)
  given = dict(zip(names, (coordinator_address, num_processes, process_id)))
  if all(v is None for v in given.values()):
    return None
  try:
    n = None if num_processes is None else int(num_processes)
    i = None if process_id is None else int(process_id)
  except ValueError:
    raise DistributedConfigError(
        f"number of processes {num_processes!r} and process id "
        f"{process_id!r} (from {where}) must be integers") from None
  if n == 1 and coordinator_address is None and i in (None, 0):
    return ("", 1, 0)  # one process, said explicitly: no auto-detection
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise DistributedConfigError(
        f"incomplete multi-process configuration: {', '.join(missing)} "
        f"missing (give all of {', '.join(names)}, or none of them to "
        "auto-detect a TPU pod slice, SLURM or Open MPI)")
  if n < 1 or not 0 <= i < n:
    raise DistributedConfigError(
        f"process id {i} is not in [0, {n}) (from {where})")
  addr = str(coordinator_address)
  host, _, port = addr.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedConfigError(
        f"coordinator address {addr!r} (from {where}) is not HOST:PORT")
  return (addr, n, i)


def _detect_launcher():
  """(name, process count) of a recognised multi-process launcher, or None.

  Only the launchers we document: TPU VM pod slices, SLURM, Open MPI.
  """
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover - private module moved
    return None
  wanted = ("SlurmCluster", "OmpiCluster", "GceTpuCluster", "GkeTpuCluster")
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if env.__name__ not in wanted:
      continue
    try:
      present = env.is_env_present()
    except Exception:  # pylint: disable=broad-except
      present = False
    if not present:
      continue
    try:
      count = int(env.get_process_count())
    except Exception as e:  # pylint: disable=broad-except
      raise DistributedStartError(
          f"{env.__name__} detected but its process count is unreadable: "
          f"{e}") from None
    return env.__name__.replace("Cluster", ""), count
  return None


def _use_gloo():
  import jax  # pylint: disable=g-import-not-at-top
  # Only the CPU client reads it; GPU/TPU collectives are unaffected.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None, *,
               timeout_s: int = 300) -> ProcessInfo:
  """Starts this process's part of a multi-process run (idempotent).

  Raises DistributedConfigError (partial configuration) or
  DistributedStartError (configured, but the start failed).
  """
  global _info
  with _lock:
    cfg = _explicit(coordinator_address, num_processes, process_id)
    source = "flags"
    if cfg is None:
      env = [os.environ.get(k) for k in _ENV]
      if env[1] is not None or env[2] is not None:
        cfg = _explicit(*env, names=_ENV)
        source = "env"
    import jax  # pylint: disable=g-import-not-at-top
    if _info is None and _already_started():  # the caller started it
      _info = ProcessInfo(jax.process_index(), jax.process_count(), "caller")
      _log_process()
    if _info is not None:
      if cfg is not None and (cfg[1], cfg[2]) != (_info.process_count,
                                                  _info.process_index):
        raise DistributedConfigError(
            f"this process already runs as process {_info.process_index} "
            f"of {_info.process_count}; cannot become {cfg[2]} of {cfg[1]}")
      return _info
    launcher = None
    if cfg is None:
      launcher = _detect_launcher()
      if launcher is not None and launcher[1] <= 1:
        launcher = None
      elif launcher is not None:
        source = launcher[0]
      elif os.environ.get(_ENV[0]):
        raise DistributedConfigError(
            "JAX_COORDINATOR_ADDRESS is set but neither JAX_NUM_PROCESSES / "
            "JAX_PROCESS_ID nor a launcher (TPU pod slice, SLURM, Open MPI) "
            "says how many processes there are")
    if (cfg is None or cfg[1] == 1) and launcher is None:
      _info = ProcessInfo(0, 1, "single")
      return _info
    _use_gloo()
    try:
      if cfg is not None:
        jax.distributed.initialize(cfg[0], cfg[1], cfg[2],
                                   initialization_timeout=timeout_s)
      else:
        jax.distributed.initialize(initialization_timeout=timeout_s)
    except Exception as e:  # pylint: disable=broad-except
      what = (f"coordinator {cfg[0]}, process {cfg[2]} of {cfg[1]}"
              if cfg else f"auto-detected {source}")
      msg = str(e).strip().splitlines()[0] if str(e).strip() else type(
          e).__name__
      raise DistributedStartError(
          f"could not start the multi-process run ({what}): {msg}") from None
    _info = ProcessInfo(jax.process_index(), jax.process_count(), source)
    _log_process()
    return _info


def _log_process():
  import jax  # pylint: disable=g-import-not-at-top
  log.info("process %d/%d (%s): %d local devices, %d global (%s)",
           jax.process_index(), jax.process_count(),
           _info.source if _info else "?", jax.local_device_count(),
           jax.device_count(), jax.default_backend())


# ----------------------------------------------------------------- logging


class _ProcessTag(logging.Filter):

  def filter(self, record):
    record.ptag = ""
    if "jax" in sys.modules and _info is not None and _info.process_count > 1:
      record.ptag = f"p{_info.process_index}/{_info.process_count} "
    return True


LOG_LEVELS = ("debug", "info", "warning", "error")


def setup_logging(level: str = "info") -> None:
  """Line-based logs on stderr: ours at `level`; absl/orbax/grain/jax and
  TensorFlow at WARNING unless `level` is 'debug'."""
  level = str(level).lower()
  if level not in LOG_LEVELS:
    raise ValueError(f"log level {level!r} is not one of {LOG_LEVELS}")
  num = getattr(logging, level.upper())
  root = logging.getLogger()
  for h in list(root.handlers):
    if getattr(h, "_efiqa", False):
      root.removeHandler(h)
  handler = logging.StreamHandler(sys.stderr)
  handler._efiqa = True  # pylint: disable=protected-access
  handler.addFilter(_ProcessTag())
  handler.setFormatter(logging.Formatter(
      "%(asctime)s %(levelname).1s %(ptag)s%(message)s", "%H:%M:%S"))
  root.addHandler(handler)
  root.setLevel(num)
  quiet = num if num <= logging.DEBUG else max(num, logging.WARNING)
  for name in _NOISY:
    logging.getLogger(name).setLevel(quiet)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if quiet > 10 else "0")
  try:  # absl's own verbosity (orbax/grain log through it)
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(
        "debug" if quiet <= logging.DEBUG else
        "warning" if quiet <= logging.WARNING else "error")
  except ImportError:
    pass


# --------------------------------------------------- cross-process helpers


def process_index() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index()


def process_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()


def is_primary() -> bool:
  """The process that writes shared files (metrics, manifests, reports)."""
  return process_index() == 0


_barrier_counts: dict[str, int] = {}


def barrier(name: str, timeout_s: float | None = None) -> None:
  """All processes wait here (no-op with one process).

  The coordination service's barrier: no device work, so it does not share
  gloo's 30 s collective timeout. Files one process writes are read by the
  others only after a barrier. Default timeout: EFIQA_BARRIER_TIMEOUT_S or
  1800 s. Every process must pass the same barriers in the same order.
  """
  if process_count() <= 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if timeout_s is None:
    timeout_s = float(os.environ.get("EFIQA_BARRIER_TIMEOUT_S", 1800))
  k = _barrier_counts.get(name, 0)
  _barrier_counts[name] = k + 1
  if client is None:  # started by a runtime without a coordination client
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"{name}#{k}")
    return
  client.wait_at_barrier(f"efiqa:{name}#{k}", int(timeout_s * 1000))


def process_slice(n: int, process_index: int | None = None,  # pylint: disable=redefined-outer-name
                  process_count: int | None = None) -> slice:  # pylint: disable=redefined-outer-name
  """The positions of `range(n)` that process `process_index` reads.

  Strided: `slice(process_index, n, process_count)`; disjoint across
  processes, their union is range(n), counts differ by at most one. With
  per-process batching, global batch k holds exactly positions
  [k*B, (k+1)*B) whatever the process count.
  """
  import jax  # pylint: disable=g-import-not-at-top
  p = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if not 0 <= p < pc:
    raise ValueError(f"process_index {p} not in [0, {pc})")
  return slice(p, n, pc)


_kv_counts: dict[str, int] = {}


def _kv_key(name: str) -> str:
  k = _kv_counts.get(name, 0)
  _kv_counts[name] = k + 1
  return f"efiqa-kv:{name}#{k}"


def _kv_timeout_ms(timeout_s: float | None) -> int:
  if timeout_s is None:
    timeout_s = float(os.environ.get("EFIQA_BARRIER_TIMEOUT_S", 1800))
  return int(timeout_s * 1000)


def broadcast_bytes(name: str, data: bytes | None,
                    timeout_s: float | None = None) -> bytes:
  """Process 0's `data` on every process (others pass None): a decision
  made once, through the coordination service's key-value store (no
  device work). Every process must call it with the same names in the
  same order."""
  if process_count() <= 1:
    return data
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  key = _kv_key(name)
  if client is None:  # pragma: no cover - no coordination service
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    n = int(multihost_utils.broadcast_one_to_all(
        np.int64(len(data) if is_primary() else 0)))
    buf = np.frombuffer(data, np.uint8) if is_primary() else np.zeros(
        n, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf)))
  if is_primary():
    client.key_value_set_bytes(key, data)
    return data
  return client.blocking_key_value_get_bytes(key, _kv_timeout_ms(timeout_s))


def all_gather_text(name: str, text: str,
                    timeout_s: float | None = None) -> list[str]:
  """Every process's `text`, in process order, on every process."""
  if process_count() <= 1:
    return [text]
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  key = _kv_key(name)
  if client is None:  # pragma: no cover - no coordination service
    raise RuntimeError("all_gather_text needs jax.distributed's client")
  client.key_value_set(f"{key}/p{process_index()}", text)
  return [client.blocking_key_value_get(f"{key}/p{i}",
                                        _kv_timeout_ms(timeout_s))
          for i in range(process_count())]
