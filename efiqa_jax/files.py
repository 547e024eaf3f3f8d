"""Files: every path the package reads or writes goes through `etils.epath`.

Local paths, `gs://` (and whatever else `etils.epath` maps: `s3://`, `az://`,
`hf://`, given their fsspec package) are handled alike: `as_path(str)` gives an
`epath.Path`, and the helpers below read, write and list through it.

Backend: `etils.epath` sends `gs://` to `tf.io.gfile` whenever TensorFlow is
importable (the `tf` extra) and to fsspec/`gcsfs` otherwise. Importing
`efiqa_jax` sets `EPATH_USE_TF=false` when `gcsfs` is installed (the `gcs`
extra) and the environment does not set it, so `gcsfs` is what runs: it
honours `STORAGE_EMULATOR_HOST` and the usual Google credentials, and needs no
TensorFlow. (epath decides once per process, at the first remote path.)
Checkpoint arrays go to `gs://` through orbax's tensorstore, which has its own
GCS client: with `STORAGE_EMULATOR_HOST` set, `TENSORSTORE_GCS_HTTP_URL`
defaults to it, so both clients talk to the same emulator.

Atomic writes: a local file is written under a temporary name in its folder and
renamed over the target (a reader never sees half a file; a kill leaves at most
a `.tmp-*` file). A cloud object is written directly: an object upload is atomic
already (the object appears, whole, when the upload finishes), and a GCS
"rename" is a copy plus a delete, which would only double the traffic.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob as glob_lib
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from efiqa_jax import _configure_storage as configure_backends  # noqa: E402

# Repeated here for code that imports this module after changing os.environ.
configure_backends()

import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

PathLike = str | os.PathLike
REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif",
                    ".dcm")
_GLOB_CHARS = set("*?[")


def is_remote(path: PathLike) -> bool:
  """True for a cloud URI (`gs://...`), False for a local path."""
  return os.fspath(path).startswith(REMOTE_PREFIXES)


def as_path(path: PathLike) -> epath.Path:
  """An `epath.Path` for a local path (`~` expanded) or a cloud URI."""
  if isinstance(path, epath.Path):
    return path
  s = os.fspath(path)
  return epath.Path(s if is_remote(s) else os.path.expanduser(s))


def abs_path(path: PathLike) -> epath.Path:
  """`as_path`, made absolute when local (a cloud URI is absolute already)."""
  p = as_path(path)
  return p if is_remote(p) else epath.Path(os.path.abspath(os.fspath(p)))


def join(base: PathLike, *parts: str) -> str:
  """`base/parts...` as a string, for a local path or a cloud URI alike."""
  return os.fspath(as_path(base).joinpath(*parts))


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def isdir(path: PathLike) -> bool:
  return as_path(path).is_dir()


def isfile(path: PathLike) -> bool:
  p = as_path(path)
  return p.exists() and not p.is_dir()


def output_dir(path: PathLike) -> str:
  """An output folder or workdir, created, as a string: an absolute local
  path, or the cloud URI as given (without a trailing '/')."""
  s = os.fspath(path)
  if is_remote(s):
    s = s.rstrip("/")
  else:
    s = os.path.abspath(os.path.expanduser(s))
  makedirs(s)
  return s


def makedirs(path: PathLike) -> epath.Path:
  """Creates `path` and its parents (a no-op for a cloud prefix); returns it."""
  p = as_path(path)
  p.mkdir(parents=True, exist_ok=True)
  return p


def size_mtime(path: PathLike) -> tuple[int, float] | None:
  """(size in bytes, modification time) of a file; None when it is missing."""
  s = os.fspath(as_path(path))
  if not is_remote(s):
    if not os.path.exists(s):
      return None
    return os.path.getsize(s), os.path.getmtime(s)
  p = as_path(s)
  if not p.exists():
    return None
  st = p.stat()
  return int(st.length or 0), float(st.mtime)


def read_bytes(path: PathLike) -> bytes:
  return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
  return as_path(path).read_text()


def read_json(path: PathLike) -> Any:
  return json.loads(read_text(path))


# numpy parses .npy headers with ast.literal_eval, which CPython 3.11 does
# not make thread-safe ("AST constructor recursion depth mismatch" under
# grain's reader threads): every np.load in a reader thread holds this.
NPY_LOCK = threading.Lock()


def load_npy(path: PathLike) -> np.ndarray:
  """`np.load` of a `.npy` file, local or remote (no pickles)."""
  data = read_bytes(path)
  with NPY_LOCK:
    return np.load(io.BytesIO(data), allow_pickle=False)


@contextlib.contextmanager
def local_copy(path: PathLike):
  """A local file path holding `path`'s bytes (for readers that take only
  local files, such as ArrayRecord): the path itself when local, else a
  temporary copy removed on exit."""
  if not is_remote(path):
    yield os.fspath(as_path(path))
    return
  d = tempfile.mkdtemp(prefix="efiqa-copy-")
  try:
    local = os.path.join(d, os.fspath(path).rsplit("/", 1)[-1])
    with open(local, "wb") as f:
      f.write(read_bytes(path))
    yield local
  finally:
    shutil.rmtree(d, ignore_errors=True)


def local_copies(paths: Sequence[PathLike], prefix: str) -> list[str]:
  """Local file paths holding `paths`' bytes (ArrayRecord reads local files
  only): the paths themselves when local, else copies in one temporary
  folder removed when the process ends."""
  if not any(is_remote(p) for p in paths):
    return [os.fspath(as_path(p)) for p in paths]
  import atexit  # pylint: disable=g-import-not-at-top
  cache = tempfile.mkdtemp(prefix=prefix)
  atexit.register(shutil.rmtree, cache, True)
  local = []
  for p in paths:
    dst = os.path.join(cache, os.fspath(p).rsplit("/", 1)[-1])
    with open(dst, "wb") as f:
      f.write(read_bytes(p))
    local.append(dst)
  return local


def _tmp_name(p: epath.Path) -> epath.Path:
  # `NAME.tmp-*`: what the driver's cleanup of a killed run's temporaries
  # matches.
  return p.parent / f"{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write_bytes(path: PathLike, data: bytes) -> epath.Path:
  """Writes `data` to `path` so that a reader sees the old file or the new one.

  Local: a temporary file in the same folder, then `os.replace` (a killed
  writer leaves at most `NAME.tmp-*`, never half a NAME). Cloud:
  one object upload (atomic by itself). Parent folders are created.
  """
  p = as_path(path)
  if is_remote(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("wb") as f:
      f.write(data)
    return p
  parent = os.fspath(p.parent)
  os.makedirs(parent, exist_ok=True)
  tmp = os.fspath(_tmp_name(p))
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, os.fspath(p))
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return p


def atomic_write_text(path: PathLike, text: str) -> epath.Path:
  return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any, **kwargs) -> epath.Path:
  kwargs.setdefault("indent", 2)
  return atomic_write_text(path, json.dumps(obj, **kwargs) + "\n")


def atomic_write_npy(path: PathLike, array: np.ndarray) -> epath.Path:
  buf = io.BytesIO()
  np.save(buf, np.asarray(array), allow_pickle=False)
  return atomic_write_bytes(path, buf.getvalue())


def atomic_write_csv(path: PathLike, fieldnames: Sequence[str],
                     rows: Iterable[dict[str, Any]]) -> epath.Path:
  """A CSV with a header row (`csv.DictWriter`, '\\n' line ends)."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(fieldnames), lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow(r)
  return atomic_write_text(path, buf.getvalue())


def read_csv(path: PathLike) -> tuple[list[str], list[dict[str, str]]]:
  """(fieldnames, rows) of a CSV with a header row; local or remote."""
  reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
  rows = list(reader)
  return list(reader.fieldnames or []), rows


def is_image_name(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _fs(path: str):
  """The fsspec filesystem epath uses for a remote path (listings cache cleared).

  Another process may have written since this one last listed; gcsfs caches
  listings per process, so each listing starts from the bucket.
  """
  fs = epath.backend.fsspec_backend.fs(path)
  fs.invalidate_cache()
  return fs


def _remote_uri(path: str, like: str) -> str:
  scheme = like.split("://", 1)[0]
  return path if "://" in path else f"{scheme}://{path}"


def _relkey(p: str, folder: str) -> str:
  return p[len(folder):].lstrip("/") if p.startswith(folder) else p


def list_images(folder: PathLike) -> list[str]:
  """Image files under `folder`, recursively, sorted by relative path.

  Extensions in `IMAGE_EXTENSIONS` (case-insensitive); hidden files and
  folders (a name starting with '.') are skipped. Sorting on the '/'-separated
  relative path gives the same order on every OS, file system and bucket. A
  remote folder is listed in one recursive listing (`find`), not per level.
  """
  folder = os.fspath(as_path(folder))
  if is_remote(folder):
    base = folder.rstrip("/")
    fs = _fs(base)
    found = []
    for p in fs.find(base):
      uri = _remote_uri(p, base)
      rel = _relkey(uri, base)
      parts = rel.split("/")
      if any(part.startswith(".") for part in parts) or not is_image_name(rel):
        continue
      found.append(uri)
    return sorted(found, key=lambda u: _relkey(u, base))
  found = []
  for root, dirs, names in os.walk(folder):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    for f in names:
      if not f.startswith(".") and is_image_name(f):
        found.append(os.path.join(root, f))
  return sorted(found,
                key=lambda p: os.path.relpath(p, folder).replace(os.sep, "/"))


def file_sizes(folder: PathLike) -> list[tuple[str, int]]:
  """(path relative to `folder` with '/' separators, size in bytes) of every
  file below it, sorted; a remote folder in one recursive listing."""
  folder = os.fspath(as_path(folder))
  if is_remote(folder):
    base = folder.rstrip("/")
    fs = _fs(base)
    out = []
    for p, info in fs.find(base, detail=True).items():
      if info.get("type") != "directory":
        out.append((_relkey(_remote_uri(p, base), base), int(info["size"])))
    return sorted(out)
  out = []
  for root, _, names in os.walk(folder):
    for n in names:
      f = os.path.join(root, n)
      out.append((os.path.relpath(f, folder).replace(os.sep, "/"),
                  os.path.getsize(f)))
  return sorted(out)


def has_glob(path: PathLike) -> bool:
  return bool(_GLOB_CHARS & set(os.fspath(path)))


def glob(pattern: PathLike) -> list[str]:
  """Matches of a glob pattern (`**` recursive), sorted; local or remote."""
  pattern = os.fspath(pattern)
  if is_remote(pattern):
    # As Python's glob: a wildcard does not match a name starting with '.'.
    literal = set(pattern.split("/"))
    return sorted(
        u for u in (_remote_uri(p, pattern) for p in _fs(pattern).glob(pattern))
        if not any(part.startswith(".") and part not in literal
                   for part in u.split("/")))
  return sorted(glob_lib.glob(os.path.expanduser(pattern), recursive=True))


def glob_images(pattern: PathLike) -> list[str]:
  """Image files matching a glob; folders that match are expanded."""
  found = []
  for m in glob(pattern):
    if isdir(m):
      found.extend(list_images(m))
    elif is_image_name(m):
      found.append(m)
  return found


# ------------------------------------------------- journals and fingerprints
#
# `Journal(out_dir, process_index)`: THE journal helper of every command that
# writes per-record outputs. Rows are JSON lines under `out_dir/.journal/`,
# one file per process and run (`p<k>-<run>.jsonl`), appended and fsynced per
# batch on a local filesystem; on object stores (no append) each batch is one
# more small file (`p<k>-<run>-<seq>.jsonl`, written whole). `Journal.read`
# reads every process's rows of every run: the latest row per id wins, and a
# line cut by a kill is ignored (that record is redone).
#
# `RunFingerprint(command, settings)`: the settings that change results
# (model identity, sizes, preprocessing, calibration, rule ...), stored in
# `out_dir/run.json`. A rerun with other settings is refused with the
# difference (`FingerprintMismatch`) unless the caller overwrites.

JOURNAL_DIR = ".journal"
RUN_FILE = "run.json"


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def _write_whole(path: epath.Path, data: str) -> None:
  """Readers never see half a file (see `atomic_write_bytes`)."""
  atomic_write_text(path, data)


class Journal:
  """Append-only record of finished work for one process of one run.

  Rows are dicts with at least `id`; `append` stamps them with `t` (time)
  so that, across runs, the newest row of an id wins. A row must be
  appended only after the files it describes are complete on disk.
  """

  def __init__(self, out_dir, process_index: int, run_id: str | None = None):
    self.dir = epath.Path(out_dir) / JOURNAL_DIR
    self.dir.mkdir(parents=True, exist_ok=True)
    run_id = run_id or f"{int(time.time())}-{uuid.uuid4().hex[:6]}"
    self.stem = f"p{int(process_index)}-{run_id}"
    self._local = _is_local(self.dir)
    self._seq = 0
    self._f = None
    self.count = 0

  def append(self, rows: Iterable[dict]) -> None:
    """Appends rows durably (fsync locally; one whole file per call on an
    object store)."""
    now = time.time()
    text = "".join(json.dumps(dict(r, t=r.get("t", now)), default=str) + "\n"
                   for r in rows)
    if not text:
      return
    if self._local:
      if self._f is None:
        self._f = open(os.fspath(self.dir / f"{self.stem}.jsonl"), "a")
      self._f.write(text)
      self._f.flush()
      os.fsync(self._f.fileno())
    else:
      _write_whole(self.dir / f"{self.stem}-{self._seq:06d}.jsonl", text)
      self._seq += 1
    self.count += text.count("\n")

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None

  def __enter__(self) -> "Journal":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  @staticmethod
  def read(out_dir) -> dict[str, dict]:
    """Latest row per id over every process and run of `out_dir`."""
    d = epath.Path(out_dir) / JOURNAL_DIR
    rows: dict[str, dict] = {}
    if not d.exists():
      return rows
    for f in sorted(d.glob("*.jsonl")):
      for line in f.read_text().splitlines():
        line = line.strip()
        if not line:
          continue
        try:
          r = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by a kill: that record is redone
        if not isinstance(r, dict) or "id" not in r:
          continue
        old = rows.get(r["id"])
        if old is None or r.get("t", 0) >= old.get("t", 0):
          rows[r["id"]] = r
    return rows

  @staticmethod
  def exists(out_dir) -> bool:
    d = epath.Path(out_dir) / JOURNAL_DIR
    return d.exists() and any(True for _ in d.glob("*.jsonl"))

  @staticmethod
  def clear(out_dir) -> None:
    d = epath.Path(out_dir) / JOURNAL_DIR
    if d.exists():
      d.rmtree()


class FingerprintMismatch(ValueError):
  """The output folder holds results made with other settings."""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


@dataclasses.dataclass
class RunFingerprint:
  """What makes a run's results what they are; stored in DIR/run.json."""
  command: str
  settings: dict

  def as_json(self) -> dict:
    # A JSON round trip so that tuples/paths compare like what was stored.
    return json.loads(json.dumps({"command": self.command,
                                  "settings": self.settings}, default=str))

  @classmethod
  def read(cls, out_dir) -> "RunFingerprint | None":
    f = epath.Path(out_dir) / RUN_FILE
    if not f.exists():
      return None
    d = json.loads(f.read_text())
    return cls(d.get("command", "?"), d.get("settings", {}))

  def write(self, out_dir) -> None:
    _write_whole(epath.Path(out_dir) / RUN_FILE,
                 json.dumps(self.as_json(), indent=1, sort_keys=True) + "\n")

  def differences(self, other: "RunFingerprint") -> list[str]:
    """'key: stored -> requested' for every setting that differs."""
    a, b = other.as_json(), self.as_json()
    out = []
    if a["command"] != b["command"]:
      out.append(f"command: {a['command']} -> {b['command']}")
    fa, fb = _flat(a["settings"]), _flat(b["settings"])
    for k in sorted(set(fa) | set(fb)):
      if fa.get(k, "<unset>") != fb.get(k, "<unset>"):
        out.append(f"{k}: {fa.get(k, '<unset>')!r} -> "
                   f"{fb.get(k, '<unset>')!r}")
    return out

  def check(self, out_dir) -> bool:
    """True when out_dir already holds this run's fingerprint, False when it
    holds none; raises FingerprintMismatch naming the differences."""
    old = RunFingerprint.read(out_dir)
    if old is None:
      return False
    diff = self.differences(old)
    if diff:
      raise FingerprintMismatch(
          f"{out_dir} holds results made with other settings ("
          + "; ".join(diff) + "): use --overwrite to redo them, or another "
          "output folder")
    return True


def identity(path) -> dict:
  """What identifies a model directory or a file, cheaply: a file's
  sha256; a directory's sidecar (efiqa.json) sha256 plus the names and
  sizes of its files (weights are not hashed: a ViT-7B would take minutes)."""
  p = epath.Path(path)
  if not p.exists():
    return {"path": os.fspath(path), "missing": True}
  if not p.is_dir():
    return {"path": os.fspath(p), "sha256": hashlib.sha256(
        p.read_bytes()).hexdigest()}
  h = hashlib.sha256()
  side = p / "efiqa.json"
  if side.exists():
    h.update(side.read_bytes())
  listing = [f"{rel}:{size}" for rel, size in file_sizes(p)]
  h.update("\n".join(sorted(listing)).encode())
  return {"path": os.fspath(p), "sha256": h.hexdigest()}


class ShardWriter:
  """ArrayRecord shards `PREFIX-TAG-00000.array_record` of at most
  `records_per_shard` records, written under a temporary name and renamed
  when full; the rows of a shard become journal rows (`drain`) only after
  its rename, so a killed run never journals a record it did not keep.
  Thread-safe (the driver's writer pool calls `add`). ArrayRecord writes
  local files: for a cloud folder a shard is written in a local temporary
  folder and uploaded whole when it closes. Each row gets the shard's name
  under `name_key` and, with `record_key`, its position in the shard."""

  def __init__(self, out_dir: str, prefix: str, tag: str,
               records_per_shard: int, *, options: str = "group_size:1",
               name_key: str = "shard", record_key: str | None = "record"):
    import threading  # pylint: disable=g-import-not-at-top
    self.out_dir, self.prefix, self.tag = out_dir, prefix, tag
    self.records_per_shard = int(records_per_shard)
    self.options, self.name_key, self.record_key = options, name_key, record_key
    self.k = 0
    self.n = 0
    self.writer = None
    self.pending: list[dict] = []
    self.ready: list[dict] = []
    self._lock = threading.Lock()

  def add(self, data: bytes, row: dict) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
    with self._lock:
      if self.writer is None:
        self.name = f"{self.prefix}-{self.tag}-{self.k:05d}.array_record"
        if is_remote(self.out_dir):
          self._local_dir = tempfile.mkdtemp(prefix="efiqa-shard-")
          self.tmp = os.path.join(self._local_dir, self.name + ".tmp")
        else:
          self.tmp = os.path.join(self.out_dir, self.name + ".tmp")
        self.writer = ArrayRecordWriter(self.tmp, self.options)
        self.n = 0
      self.writer.write(data)
      row = dict(row, **{self.name_key: self.name})
      if self.record_key:
        row[self.record_key] = self.n
      self.pending.append(row)
      self.n += 1
      if self.n >= self.records_per_shard:
        self._close()

  def _close(self) -> None:
    if self.writer is None:
      return
    self.writer.close()
    if is_remote(self.out_dir):
      with open(self.tmp, "rb") as f:
        atomic_write_bytes(join(self.out_dir, self.name), f.read())
      shutil.rmtree(self._local_dir, ignore_errors=True)
    else:
      os.replace(self.tmp, os.path.join(self.out_dir, self.name))
    self.ready += self.pending
    self.writer, self.pending = None, []
    self.k += 1

  def drain(self, final: bool) -> list[dict]:
    """Rows of the shards closed so far (and of the open one if final)."""
    with self._lock:
      if final:
        self._close()
      rows, self.ready = self.ready, []
    return rows
