"""THE inference driver of `assess`, `extract`, `pseudo-label` and `vessels`.

One run, on every process of a multi-process job:
  1. the output folder is checked (a file, or not writable: one clear
     `UsageError`);
  2. process 0 writes a token, checks the run fingerprint (`DIR/run.json`:
     other settings are refused with the difference unless `overwrite`),
     reads every journal and decides the list of work still to do -- ONCE;
     the decision (an index mask, the token, a hash of the input list)
     reaches every process through `runtime.broadcast_bytes`;
  3. every process checks that it sees the same inputs and process 0's token
     (no shared filesystem, or hosts listing different inputs, is refused
     with one line on every process: `runtime.all_gather_text`); only then
     does process 0 change the folder (`overwrite` clears the old outputs,
     the fingerprint is written, a killed run's temporaries are removed),
     and a barrier;
  4. `input_pipeline.inference_batches` gives this process its strided share
     of the todo list (`runtime.process_slice`, THE rule), padded to whole
     batches, every record exactly once;
  5. the command's jitted `step` runs on each batch (every process runs the
     same number of steps, so steps over a global mesh never hang);
  6. the command's `write` turns each valid row into files (temporary name,
     then rename) in a writer pool while the device works on the next
     batch; the journal rows follow once the files are on disk
     (`files.Journal`), in batch order;
  7. a barrier; then every process reads all journals and process 0 calls
     the command's `finish` (manifest / scores.csv / report).
Ctrl-C keeps what is finished (the writes in flight complete and are
journaled) and raises `runtime.Interrupted` (exit 130): the same command
resumes.

A command supplies a `Task`: the grain prepare transform, the step, the
per-record writer, the files that prove a record done, the fingerprint.
"""
from __future__ import annotations

import base64
import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import signal
import threading
import uuid
import zlib
from typing import Any, Callable, Sequence

import numpy as np
from etils import epath

from efiqa_jax import files
from efiqa_jax import runtime

TOKEN = ".efiqa-token"


class UsageError(ValueError):
  """Bad output folder or settings: nothing done (exit 2)."""


class NoSharedFilesystem(UsageError):
  """Processes do not see one output folder, or list different inputs."""


@dataclasses.dataclass
class Task:
  """What a command supplies to `run`.

  command: the command's name (fingerprint, progress, barrier names).
  fingerprint: settings that change results (JSON-able).
  prepare: grain transform, record -> row, with `.blank(status, message,
    path)` (e.g. `sources.PrepareFundus`).
  step: host batch (this process's rows) -> per-row outputs: a dict of
    arrays with the local batch as leading dimension, or None. Called on
    EVERY batch (also all-padding ones), so it may run collectives.
  write: (record, outputs of that row or None) -> journal row (a dict with
    at least `status`), or None when the row is released later by `drain`.
    `record` holds `index` (position in the inputs), `path`, `id`,
    `status`, `message`, `ok` and the row's other host entries (e.g. the
    `image` array); the journal row gets `image` (the path), `id`, `index`. Runs in a
    thread pool; must write its files tmp-then-rename.
  done_files: journal row -> files (relative to the output folder) that must
    exist for the record to count as done on a rerun.
  clear: relative paths/globs removed by `overwrite` (with the journals).
  temporaries: relative globs of what a killed run may leave (temporary
    names), removed by process 0 before any process writes.
  finish: (rows in input order, output folder) -> None; process 0 only,
    after every process finished.
  drain: -> rows now durable that `write` deferred (e.g. ArrayRecord shard
    closed); called after each batch's writes and at the end (`final`).
  unit: the global batch is rounded up to a multiple of this (and of the
    process count).
  sharding: optional data sharding passed to `inference_batches`.
  """
  command: str
  fingerprint: dict
  prepare: Any
  step: Callable[[dict], Any]
  write: Callable[[dict, Any], dict | None]
  done_files: Callable[[dict], Sequence[str]] = lambda row: ()
  clear: Sequence[str] = ()
  temporaries: Sequence[str] = ("*.tmp-*",)
  finish: Callable[[list[dict], epath.Path], None] | None = None
  drain: Callable[[bool], list[dict]] | None = None
  unit: int = 1
  sharding: Any = None


@dataclasses.dataclass
class Result:
  out_dir: epath.Path
  rows: list[dict]       # one per input, in input order
  total: int
  ok: int
  failed: int            # rows whose status is not ok
  skipped: int           # already done before this run (all processes)
  written: int           # rows this process journaled in this run
  failed_here: int       # failure rows this process journaled in this run
  global_batch: int


def output_dir(out, what: str = "--out") -> epath.Path:
  """The output folder, created; a file or an unwritable folder is one
  clear UsageError (never a traceback)."""
  p = epath.Path(out)
  try:
    if p.exists() and not p.is_dir():
      raise UsageError(f"{what} {out} is a file, not a folder")
    p.mkdir(parents=True, exist_ok=True)
    probe = p / f".efiqa-probe-{uuid.uuid4().hex[:8]}"
    probe.write_text("")
    probe.unlink()
  except UsageError:
    raise
  except (PermissionError, OSError) as e:
    reason = e.strerror or type(e).__name__
    raise UsageError(f"cannot write to {what} {out}: {reason}") from None
  return p


def write_atomic(path, data: bytes) -> None:
  """Bytes to `path` under a temporary name, then renamed: a reader (or a
  resumed run) never sees half a file."""
  files.atomic_write_bytes(path, data)  # one upload in a bucket (atomic)


def write_npy(path, arr: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, arr)
  write_atomic(path, buf.getvalue())


def write_csv(path, fields: Sequence[str], rows) -> None:
  """A CSV with `fields` as columns (missing values empty), atomically."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore",
                     lineterminator="\r\n")
  w.writeheader()
  for r in rows:
    w.writerow({c: r.get(c, "") for c in fields})
  write_atomic(path, buf.getvalue().encode())


def global_batch(batch_size: int, unit: int = 1) -> int:
  u = math.lcm(max(1, int(unit)), runtime.process_count())
  return max(u, -(-int(batch_size) // u) * u)


def _inputs_sha(paths: Sequence[str]) -> str:
  return hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]


def _remove(out: epath.Path, patterns: Sequence[str]) -> None:
  for pat in patterns:
    for f in (out.glob(pat) if any(c in pat for c in "*?[") else
              [out / pat]):
      if f.is_dir():
        f.rmtree()
      elif f.exists():
        f.unlink()


def _decide(task: Task, out: epath.Path, paths, ids, overwrite: bool) -> dict:
  """Process 0: fingerprint check and the todo mask (the decision). Writes
  only the token; what changes the folder happens in `_prepare`, once every
  process agreed."""
  token = uuid.uuid4().hex
  (out / TOKEN).write_text(token)
  fp = files.RunFingerprint(task.command, task.fingerprint)
  try:
    same = fp.check(out)
  except files.FingerprintMismatch:
    if not overwrite:
      raise
    same = False
  clear = overwrite and (files.RunFingerprint.read(out) is not None
                         or files.Journal.exists(out))
  if not clear and not same and files.Journal.exists(out):
    raise files.FingerprintMismatch(
        f"{out} holds results without a record of their settings (made by "
        "an older version): use --overwrite to redo them, or another output "
        "folder")
  journal = {} if clear else files.Journal.read(out)
  done = np.zeros(len(paths), bool)
  for i, (p, id_) in enumerate(zip(paths, ids)):
    r = journal.get(id_)
    if r is None or r.get("status") != "ok" or r.get("image") != p:
      continue
    done[i] = all((out / f).exists() for f in task.done_files(r))
  return {"ok": True, "token": token, "inputs": _inputs_sha(paths),
          "clear": bool(clear), "write_fingerprint": bool(clear or not same),
          "done": base64.b64encode(zlib.compress(
              np.packbits(done).tobytes())).decode(), "n": len(paths)}


def _prepare(task: Task, out: epath.Path, decision: dict) -> None:
  """Process 0, after the agreement: --overwrite's clearing, the
  fingerprint, a killed run's temporaries."""
  if decision["clear"]:
    files.Journal.clear(out)
    _remove(out, task.clear)
  if decision["write_fingerprint"]:
    files.RunFingerprint(task.command, task.fingerprint).write(out)
  _remove(out, task.temporaries)


def _agree(task: Task, out_arg, paths, ids, overwrite) -> tuple[
    epath.Path, np.ndarray]:
  """Output folder checks and the todo decision, agreed by every process."""
  pi = runtime.process_index()
  out, local_error = None, ""
  try:
    out = output_dir(out_arg)
  except UsageError as e:
    local_error = str(e)
  decision = None
  if pi == 0:
    try:
      if local_error:
        raise UsageError(local_error)
      decision = _decide(task, out, paths, ids, overwrite)
    except (UsageError, files.FingerprintMismatch) as e:
      decision = {"ok": False, "error": str(e)}
    except Exception as e:  # pylint: disable=broad-except
      if runtime.process_count() == 1:
        raise
      # The others wait for a decision: they must not hang on this one.
      decision = {"ok": False, "error": f"process 0 could not read {out_arg}"
                                        f": {type(e).__name__}: {e}"}
    data = json.dumps(decision).encode()
  else:
    data = None
  decision = json.loads(runtime.broadcast_bytes(f"{task.command}-decide",
                                                data))
  if not decision["ok"]:
    raise UsageError(decision["error"])
  # Every process: the same inputs, and process 0's token in ITS folder.
  problem = local_error
  if not problem and decision["inputs"] != _inputs_sha(paths):
    problem = (f"process {pi} lists other inputs than process 0 "
               f"({len(paths)} vs {decision['n']}): do the hosts see the "
               "same files?")
  if not problem and pi != 0:
    token = out / TOKEN
    seen = token.read_text() if token.exists() else None
    if seen != decision["token"]:
      problem = (f"process {pi} does not see process 0's files in {out_arg}"
                 ": every process must write to one shared folder (a shared "
                 "filesystem or a gs:// bucket)")
  problems = [p for p in runtime.all_gather_text(f"{task.command}-check",
                                                 problem) if p]
  if problems:
    raise NoSharedFilesystem(problems[0])
  if pi == 0:
    _prepare(task, out, decision)
  runtime.barrier(f"{task.command}-prepared")  # nobody writes before that
  done = np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(
      decision["done"])), np.uint8), count=len(paths)).astype(bool)
  return out, done


def _record_of(host: dict, j: int, i: int, path: str, id_: str) -> dict:
  rec = {k: v[j] for k, v in host.items()}
  rec.update(index=i, path=path, id=id_, status=str(host["status"][j]),
             message=str(host["message"][j]), ok=bool(host["ok"][j]))
  return rec


def _row_of(outputs: Any, j: int) -> Any:
  if outputs is None:
    return None
  return {k: (None if v is None else v[j]) for k, v in outputs.items()}


def run(task: Task, paths: Sequence[str], out_dir, *, ids=None,
        source=None, batch_size: int = 8, overwrite: bool = False, num_workers: int = 0,
        read_threads: int = 4, writers: int | None = None,
        progress: bool = True, max_steps: int | None = None) -> Result:
  """Runs `task` over `paths` into `out_dir`; see the module docstring.

  batch_size is the global batch (all processes), rounded up to
  `task.unit` and the process count. max_steps stops early (tests
  simulate a kill with it). Raises UsageError (bad folder, other settings,
  no shared filesystem) before any work, on every process alike.
  source: a random-access source aligned with `paths` (record i stands for
  input i; `sources.Inputs.source`, which also serves prepared records);
  default: the paths themselves. Its `fingerprint` (what prepared the
  records), when not None, joins the task's.
  """
  from efiqa_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from efiqa_jax import progress as progress_lib  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top

  paths = [os.fspath(p) for p in paths]
  ids = list(ids) if ids is not None else sources.unique_ids(paths)
  pi = runtime.process_index()
  if source is not None:
    if len(source) != len(paths):
      raise ValueError(f"source has {len(source)} records for {len(paths)} "
                       "inputs")
    if getattr(source, "fingerprint", None) is not None:
      task = dataclasses.replace(task, fingerprint=dict(
          task.fingerprint, prepared_inputs=source.fingerprint))
  out, done = _agree(task, out_dir, paths, ids, overwrite)
  todo = [i for i in range(len(paths)) if not done[i]]
  gbatch = global_batch(batch_size, task.unit)
  written = failed_here = 0
  if todo:
    journal = files.Journal(out, pi)
    batches = input_pipeline.inference_batches(
        [paths[i] for i in todo] if source is None else
        sources.subset(source, todo), gbatch, prepare=task.prepare,
        sharding=task.sharding, num_workers=num_workers,
        read_threads=read_threads)
    n_writers = writers or max(1, min(8, os.cpu_count() or 1))
    bar = progress_lib.Progress(batches.local_count, task.command,
                                unit="img") if progress and pi == 0 else None
    pending: list[concurrent.futures.Future] = []

    def record(futs, final=False):
      nonlocal written, failed_here
      rows = [f.result() for f in futs]
      rows = [r for r in rows if r is not None]
      if task.drain is not None:
        rows += task.drain(final)
      journal.append(rows)
      written += len(rows)
      failed_here += sum(r.get("status") != "ok" for r in rows)
      if bar is not None:
        bar.update(len(futs))

    def write_one(rec, outs):
      try:
        row = task.write(rec, outs)
      except OSError as e:  # disk full, permissions: a status row
        row = {"status": "write_failed", "message": f"{type(e).__name__}: "
               f"{e.strerror or e}"}
      if row is None:
        return None
      return dict(row, index=rec["index"], image=rec["path"], id=rec["id"])

    pool = concurrent.futures.ThreadPoolExecutor(n_writers)
    old_sigint = None
    if threading.current_thread() is threading.main_thread():
      # Ctrl-C stops here, also when the process started with SIGINT
      # ignored (e.g. a background job of a script).
      old_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
      for k, host in enumerate(batches):
        if max_steps is not None and k >= max_steps:
          break
        outs = task.step(host)
        futs = []
        for j in np.flatnonzero(np.asarray(host["valid"], bool)):
          i = todo[int(host["index"][j])]
          futs.append(pool.submit(write_one,
                                  _record_of(host, j, i, paths[i], ids[i]),
                                  _row_of(outs, j)))
        # The writes of batch k run while the device works on batch k+1.
        record(pending)
        pending = futs
      record(pending, final=True)
      pending = []
    except KeyboardInterrupt:
      # Keep what is finished: the writes in flight complete and are
      # journaled; the rerun resumes from there.
      concurrent.futures.wait(pending)
      record([f for f in pending if f.exception() is None], final=True)
      raise runtime.Interrupted(
          f"interrupted; {written} finished records kept in {out_dir} (run "
          "the same command again to resume)", runtime.EXIT_INTERRUPTED
      ) from None
    finally:
      if old_sigint is not None:
        signal.signal(signal.SIGINT, old_sigint)
      pool.shutdown(wait=True)
      journal.close()
      if bar is not None:
        bar.close()

  runtime.barrier(f"{task.command}-done")
  rows = rows_in_order(out, paths, ids)
  if pi == 0 and task.finish is not None:
    task.finish(rows, out)
  runtime.barrier(f"{task.command}-finished")
  n_ok = sum(r.get("status") == "ok" for r in rows)
  return Result(out_dir=out, rows=rows, total=len(rows), ok=n_ok,
                failed=len(rows) - n_ok, skipped=int(done.sum()),
                written=written, failed_here=failed_here,
                global_batch=gbatch)


class LocalDataParallel:
  """A jitted function data-parallel over this process's devices only
  (each process computes its own rows; no cross-process collective).

  `LocalDataParallel(fn, keys, params)(host)` puts `host[k]` for k in keys
  on a 1-D mesh of the local devices, split over the batch, calls
  `fn(params, *arrays)` (or `fn(*arrays)` without params; params
  replicated), and returns the outputs as numpy. The local batch must be a
  multiple of `unit` (the number of local devices): pass `global_unit`
  (`unit * process_count`) as `Task.unit`.
  """

  def __init__(self, fn: Callable, keys: Sequence[str], params: Any = None):
    import jax  # pylint: disable=g-import-not-at-top
    from efiqa_jax import sharding as sh  # pylint: disable=g-import-not-at-top
    mesh = sh.local_mesh()
    self.sharding = sh.data_sharding(mesh)
    self.unit = sh.batch_shards(self.sharding)
    self.keys = tuple(keys)
    self._fn = jax.jit(fn)
    # Parameters (if any) are replicated on the local devices, passed first.
    self._params = None if params is None else jax.device_put(
        params, sh.replicated(mesh))

  @property
  def global_unit(self) -> int:
    return self.unit * runtime.process_count()

  def __call__(self, host: dict):
    import jax  # pylint: disable=g-import-not-at-top
    args = [jax.device_put(np.asarray(host[k]), self.sharding)
            for k in self.keys]
    if self._params is not None:
      args.insert(0, self._params)
    return jax.tree.map(np.asarray, self._fn(*args))


def rows_in_order(out, paths, ids) -> list[dict]:
  """One journal row per input, in input order; an input without one (a
  run stopped early) gets status 'pending'."""
  from efiqa_jax import files  # pylint: disable=g-import-not-at-top
  journal_rows = files.Journal.read(out)
  rows = []
  for p, id_ in zip(paths, ids):
    r = journal_rows.get(id_)
    if r is None or r.get("image") != p:
      r = {"image": p, "id": id_, "status": "pending",
           "message": "not processed yet (a run stopped early): run the "
                      "same command again"}
    rows.append(r)
  return rows
