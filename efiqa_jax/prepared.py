"""Prepared folders (`efiqa prepare`): photographs decoded, FOV-cropped once.

The one home of the format. A prepared folder DIR holds:
  records-<tag>-<k>.array_record  ArrayRecord shards (zstd, one record per
                  chunk: random access); each record is the bytes of an
                  `np.savez` with id, path (the source), index (its position
                  in `prepare`'s inputs), status, message, crop int32
                  [x0, y0, crop_size, orig_h, orig_w], fov float32 [cx, cy,
                  r] (-1 when unknown) and, when status is ok, image
                  (S, S, 3) uint8 (the FOV crop, lossless), fov_mask (S, S)
                  bool and, with `--vessels`, vessels (S, S) float32 (the
                  label-free vessel probability, `vessels.vessel_probability`).
                  Failures are records too (status and message, no arrays).
  manifest.csv    one row per input, in input order: image (source path), id,
                  status, message, shard, record (position in the shard),
                  crop and FOV columns.
  prepared.json   format and version, the preprocessing (size, FOV code,
                  vessel settings), versions, counts and the shard list.
  run.json, .journal/  the inference driver's fingerprint and journals.

The crop is made by `sources.PrepareFundus` (`fundus.prepare_fundus`), the
code `assess` runs, so a command reading a prepared folder skips only the
decode and FOV step and gets the same rows (`PreparedSource` serves them to
`sources.PrepareFundus`, which takes a `prepared` record as is).
"""
from __future__ import annotations

import io
import json
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from efiqa_jax import files

FORMAT = "efiqa-prepared"
FORMAT_VERSION = 1
METADATA = "prepared.json"
MANIFEST = "manifest.csv"
SHARD_GLOB = "records-*.array_record"
MANIFEST_FIELDS = ("image", "id", "status", "message", "shard", "record",
                   "crop_x0", "crop_y0", "crop_size", "orig_h", "orig_w",
                   "fov_cx", "fov_cy", "fov_r")
# One record per chunk (random access); zstd level 1: ~8x smaller than raw
# crops and far cheaper to read than a JPEG is to decode.
WRITER_OPTIONS = "group_size:1,zstd:1"
DEFAULT_RECORDS_PER_SHARD = 1024


# ------------------------------------------------------------------ records


def encode_record(rec: dict) -> bytes:
  """One record's bytes: an uncompressed .npz (the shard compresses)."""
  arrays = {
      "id": np.str_(rec["id"]), "path": np.str_(rec["path"]),
      "index": np.int64(rec["index"]), "status": np.str_(rec["status"]),
      "message": np.str_(rec.get("message") or ""),
      "crop": np.asarray(rec["crop"], np.int32),
      "fov": np.asarray(rec["fov"], np.float32)}
  if rec["status"] == "ok":
    arrays["image"] = np.asarray(rec["image"], np.uint8)
    arrays["fov_mask"] = np.asarray(rec["fov_mask"], bool)
    if rec.get("vessels") is not None:
      arrays["vessels"] = np.asarray(rec["vessels"], np.float32)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def decode_record(data: bytes) -> dict:
  with files.NPY_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as z:
    out = {k: z[k] for k in z.files}
  for k in ("id", "path", "status", "message"):
    out[k] = str(out[k])
  out["index"] = int(out["index"])
  return out


# ------------------------------------------------------------------ reading


class NotPrepared(ValueError):
  """A folder that looks like an unfinished or foreign prepared folder."""


def is_prepared(path) -> bool:
  """True when `path` is a folder holding `prepared.json`."""
  s = os.fspath(path)
  if s.lower().endswith(".csv") or files.has_glob(s):
    return False
  try:
    return files.isdir(s) and files.exists(files.join(s, METADATA))
  except OSError:
    return False


def unfinished_prepare(path) -> bool:
  """A folder `efiqa prepare` wrote into but never finished (no
  prepared.json yet)."""
  try:
    fp = files.join(path, "run.json")
    return (files.isdir(path) and not files.exists(files.join(path, METADATA))
            and files.exists(fp) and files.read_json(fp).get("command")
            == "prepare")
  except (OSError, ValueError):
    return False


def read_metadata(path) -> dict:
  meta = files.read_json(files.join(path, METADATA))
  if meta.get("format") != FORMAT or meta.get("format_version") != \
      FORMAT_VERSION:
    raise NotPrepared(
        f"{path}: {METADATA} is not an {FORMAT} v{FORMAT_VERSION} folder "
        f"(format {meta.get('format')!r} v{meta.get('format_version')!r}): "
        "prepare it again with this version")
  return meta


class PreparedSource(grain.sources.RandomAccessDataSource):
  """A prepared folder, record i = input i of `prepare` (input order).

  Record i is {'path': source path, 'prepared': the decoded record}; an
  input that `prepare` never finished (manifest status 'pending') is
  {'path', 'prepared': {status: 'pending', message}} without a read. Reads
  through `grain.sources.ArrayRecordDataSource` over the shards; shards of a
  cloud folder are copied to a local cache first (ArrayRecord reads local
  files). Picklable: worker processes reopen the shards.
  """

  def __init__(self, folder):
    self.folder = os.fspath(folder)
    self.meta = read_metadata(self.folder)
    self.size = int(self.meta["preprocessing"]["size"])
    _, rows = files.read_csv(files.join(self.folder, MANIFEST))
    shards = [s["name"] for s in self.meta["shards"]]
    offsets, total = {}, 0
    for s in self.meta["shards"]:
      offsets[s["name"]] = total
      total += int(s["records"])
    self.paths = [r["image"] for r in rows]
    self.ids = [r["id"] for r in rows]
    # Global record position in the concatenated shards, -1: no record.
    self._where = np.array(
        [offsets[r["shard"]] + int(r["record"]) if r.get("shard") else -1
         for r in rows], np.int64)
    self._pending = {i: r.get("message", "") for i, r in enumerate(rows)
                     if not r.get("shard")}
    self._shards = shards
    self._ds = None
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_ds"] = None
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _open(self):
    with self._lock:
      if self._ds is None:
        paths = files.local_copies(
            [files.join(self.folder, s) for s in self._shards],
            "efiqa-prepared-")
        self._ds = grain.sources.ArrayRecordDataSource(paths) if paths else []
    return self._ds

  @property
  def fingerprint(self) -> dict:
    """What made the crops: a changed preparation never reuses results."""
    return dict(self.meta["preprocessing"],
                efiqa_jax=self.meta["versions"]["efiqa_jax"])

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    where = int(self._where[index])
    if where < 0:
      return {"path": self.paths[index], "prepared": {
          "status": "pending", "message": self._pending.get(index) or
          "not prepared yet (efiqa prepare stopped early): run it again"}}
    rec = decode_record(self._open()[where])
    return {"path": self.paths[index], "prepared": rec}

  def __repr__(self) -> str:
    return f"PreparedSource({self.folder!r}, n={len(self)})"


# ------------------------------------------------------------------ writing


def _versions() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import efiqa_jax  # pylint: disable=g-import-not-at-top
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    ar = metadata.version("array_record")
  except Exception:  # pylint: disable=broad-except
    ar = "unknown"
  return {"efiqa_jax": efiqa_jax.__version__, "jax": jax.__version__,
          "numpy": np.__version__, "array_record": ar}


def prepare(inputs: Sequence[str] | str, out_dir, *, size: int = 512,
            vessels: bool = False,
            records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
            batch_size: int = 8, overwrite: bool = False,
            num_workers: int = 0, read_threads: int = 4,
            progress: bool = False, max_steps: int | None = None):
  """`efiqa prepare`: every input decoded and FOV-cropped once into DIR.

  Inputs as for every command (`sources.resolve_inputs`: files, folders,
  globs, CSVs, tfds:NAME[:SPLIT]; a prepared folder is refused). Runs on the inference driver
  (`efiqa_jax.driver`): multi-process exactly once (each process writes its
  own shards; the manifest and prepared.json list them all), resumable
  (shards are renamed into place, then journaled; a rerun skips ok
  records), fingerprinted (another size or --vessels is refused unless
  `overwrite`), cloud folders through epath. Returns the driver's Result.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  from efiqa_jax import driver, runtime, sources  # pylint: disable=g-import-not-at-top
  from efiqa_jax import vessels as vessels_lib  # pylint: disable=g-import-not-at-top

  if size < 16:
    raise ValueError(f"size must be >= 16, got {size}")
  if records_per_shard < 1:
    raise ValueError(f"records per shard must be >= 1, got "
                     f"{records_per_shard}")
  if isinstance(inputs, (str, os.PathLike)):
    inputs = [inputs]
  resolved = sources.resolve_inputs([os.fspath(p) for p in inputs],
                                    prepared_ok=False)
  paths, ids = resolved.paths, resolved.ids
  out = driver.output_dir(out_dir)
  out_dir = os.fspath(out)
  config = vessels_lib.DEFAULT_CONFIG
  preprocessing = {
      "size": int(size), "crop": "fundus.prepare_fundus",
      "vessels": ("vessels.vessel_probability" if vessels else None),
      "vessel_config": dataclasses.asdict(config) if vessels else None}

  step = None
  if vessels:
    step = driver.LocalDataParallel(
        lambda im, m: vessels_lib.vessel_probability(im, m, config=config),
        ("image", "fov_mask"))

  def run_step(host):
    if step is None or not np.asarray(host["ok"]).any():
      return None
    return {"vessels": step(host)}

  shards = files.ShardWriter(out_dir, "records", f"{int(time.time() * 1e3)}-"
                             f"p{runtime.process_index()}", records_per_shard,
                             options=WRITER_OPTIONS)

  def write(rec, res):
    crop, fov = rec["crop"], rec["fov"]
    data = encode_record({
        "id": rec["id"], "path": rec["path"], "index": rec["index"],
        "status": rec["status"], "message": rec["message"], "crop": crop,
        "fov": fov, "image": rec["image"], "fov_mask": rec["fov_mask"],
        "vessels": None if res is None or not rec["ok"] else res["vessels"]})
    row = {"status": rec["status"], "message": rec["message"],
           "orig_h": int(crop[3]) if crop[3] > 0 else "",
           "orig_w": int(crop[4]) if crop[4] > 0 else ""}
    if rec["ok"]:
      row.update(crop_x0=int(crop[0]), crop_y0=int(crop[1]),
                 crop_size=int(crop[2]), fov_cx=round(float(fov[0]), 3),
                 fov_cy=round(float(fov[1]), 3), fov_r=round(float(fov[2]), 3))
    shards.add(data, dict(row, image=rec["path"], id=rec["id"],
                          index=rec["index"]))
    return None  # journaled once its shard is renamed (`drain`)

  def finish(rows, out):
    held = sorted({r["shard"] for r in rows if r.get("shard")})
    # Shards no row points at: a killed run renamed them but never
    # journaled their records, which were redone elsewhere.
    for f in out.glob(SHARD_GLOB):
      if f.name not in held:
        f.unlink()
    counts = {"total": len(rows), "ok": 0, "failed": 0, "pending": 0,
              "by_status": {}}
    for r in rows:
      st = r.get("status", "pending")
      counts["by_status"][st] = counts["by_status"].get(st, 0) + 1
      key = "ok" if st == "ok" else "pending" if st == "pending" else "failed"
      counts[key] += 1
    per_shard = {}
    for r in rows:
      if r.get("shard"):
        per_shard[r["shard"]] = per_shard.get(r["shard"], 0) + 1
    shard_list = []
    for name in held:
      from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top
      with files.local_copy(out / name) as local:
        reader = ArrayRecordReader(local)
        n = reader.num_records()
        reader.close()
      shard_list.append({"name": name, "records": int(n),
                         "listed": per_shard[name]})
    driver.write_csv(out / MANIFEST, MANIFEST_FIELDS, rows)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "preprocessing": preprocessing,
            "record_keys": ["id", "path", "index", "status", "message",
                            "crop", "fov", "image", "fov_mask"]
                           + (["vessels"] if vessels else []),
            "writer_options": WRITER_OPTIONS,
            "records_per_shard": int(records_per_shard),
            "counts": counts, "shards": shard_list, "manifest": MANIFEST,
            "versions": _versions()}
    driver.write_atomic(out / METADATA, json.dumps(meta, indent=1).encode())

  task = driver.Task(
      command="prepare",
      fingerprint={"format_version": FORMAT_VERSION, **preprocessing},
      prepare=sources.PrepareFundus(size), step=run_step, write=write,
      done_files=lambda r: [r.get("shard") or "-"],
      clear=(SHARD_GLOB, MANIFEST, METADATA),
      temporaries=("*.tmp-*", "*.array_record.tmp"),
      finish=finish, drain=shards.drain,
      unit=1 if step is None else step.global_unit)
  return driver.run(task, paths, out, ids=ids, source=resolved.source,
                    batch_size=batch_size,
                    overwrite=overwrite, num_workers=num_workers,
                    read_threads=read_threads, progress=progress,
                    max_steps=max_steps)
