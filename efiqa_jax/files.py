"""Files: every path through `etils.epath` (local, gs://, ...)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
from typing import Any, Iterable

from etils import epath


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
  """Temporary name, then rename (readers never see half a file)."""
  tmp = path.parent / f"{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.write_text(data)
  tmp.replace(path)


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
  listing = []
  for root, _, names in p.walk():
    for name in names:
      f = epath.Path(root) / name
      listing.append(f"{f.relative_to(p)}:{f.stat().length}")
  h.update("\n".join(sorted(listing)).encode())
  return {"path": os.fspath(p), "sha256": h.hexdigest()}
