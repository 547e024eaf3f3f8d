"""Inputs: turning user arguments into an ordered list of records.

Two layers:

* `list_inputs` / `unique_ids` turn command-line style inputs (files, folders,
  globs, CSV manifests) into an ordered list of paths and stable output ids.
* Grain random-access data sources (`PathSource`, `SyntheticSource`,
  `TFDSSource`) serve one raw record per index, and picklable per-record
  transforms (`PrepareFundus`, `PrepareSynthetic`) turn a raw record into a
  fixed-schema row. The pipeline (`input_pipeline.py`) wraps both in
  `ReadRecord`, which never raises: a failed record becomes a row with a
  status and a zero image, so it still occupies its slot in the batch.

Row schema (every row, ok, failed or padding, has every key, fixed shapes):
  image (S,S,3) uint8, fov_mask (S,S) bool, valid bool (a real record, not
  padding), ok bool (valid and status == 'ok'), index int64 (position in the
  source; -1 for padding), status str, message str, path str,
  crop int32 [x0, y0, crop_size, orig_h, orig_w], fov float32 [cx, cy, r]
  (original pixels; -1 when unknown).
  `PrepareSynthetic` rows also carry vessels (S,S) uint8 and degradation
  (S,S) float32.
"""
from __future__ import annotations

import csv
import glob as glob_lib
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif",
                    ".dcm")
_GLOB_CHARS = set("*?[")
# CSV inputs: the first of these columns names the image (relative paths are
# relative to the CSV). `image` is what the project's own CSVs use (synth's
# labels.csv, assess's scores.csv).
CSV_PATH_COLUMNS = ("path", "image")

EXIT_NO_INPUTS = 4  # every command taking inputs: the inputs named no image


class NoInputsError(ValueError):
  """The inputs named no image: an empty folder, a glob matching no image
  file, a CSV without rows, or nothing at all. Commands exit with
  EXIT_NO_INPUTS (4) on it."""


def no_inputs_exit(command: str, error: Exception) -> int:
  """Prints the one line for NoInputsError and returns its exit status."""
  import sys  # pylint: disable=g-import-not-at-top
  print(f"efiqa {command}: no image: {error}", file=sys.stderr)
  return EXIT_NO_INPUTS


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(folder: str) -> list[str]:
  """Image files under `folder`, recursively, sorted by relative path.

  Sorting on the relative path (with '/' separators) makes the order the same
  on every OS and file system; hidden files and folders are skipped.
  """
  found = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    for f in files:
      if not f.startswith(".") and _is_image(f):
        found.append(os.path.join(root, f))
  return sorted(found,
                key=lambda p: os.path.relpath(p, folder).replace(os.sep, "/"))


def _read_csv(csv_path: str) -> list[str]:
  with open(csv_path, newline="") as f:
    reader = csv.DictReader(f)
    col = next((c for c in CSV_PATH_COLUMNS
                if c in (reader.fieldnames or ())), None)
    if col is None:
      raise ValueError(
          f"{csv_path}: a CSV input needs a `path` or `image` column; found "
          f"columns {reader.fieldnames}")
    base = os.path.dirname(os.path.abspath(csv_path))
    out = []
    for line, row in enumerate(reader, start=2):
      p = (row[col] or "").strip()
      if not p:
        raise ValueError(f"{csv_path}:{line}: empty `{col}`")
      p = os.path.expanduser(p)
      out.append(p if os.path.isabs(p) else os.path.join(base, p))
    if not out:
      raise NoInputsError(f"{csv_path} has no rows")
    return out


def list_inputs(inputs: Sequence[str] | str) -> list[str]:
  """Expands inputs into an ordered list of image paths.

  Each input is, in this order of checks:
    * a CSV file (`.csv`): its `path` column (else its `image` column), in
      file order; relative paths are resolved against the CSV's folder;
    * a folder: every image file below it (recursive; extensions in
      `IMAGE_EXTENSIONS`, case-insensitive), sorted by relative path; a
      folder without images raises NoInputsError;
    * an existing file: taken as is (whatever its extension, so a mistyped
      file still gets a status row from the decoder instead of vanishing);
    * a glob pattern (`*`, `?`, `[`): its matches, sorted; folders that match
      are expanded as above, non-image files are skipped. A glob matching
      no image raises NoInputsError.
    * anything else (a path that does not exist): returned AS IS, so the
      caller writes a `not_found` status row for it. Inputs never vanish.

  Inputs keep the order given; expansions are sorted within each input.
  Duplicates are kept (each occurrence is one record). No input at all
  raises NoInputsError.
  """
  if isinstance(inputs, (str, os.PathLike)):
    inputs = [inputs]
  if not inputs:
    raise NoInputsError("no input was given")
  out: list[str] = []
  for raw in inputs:
    item = os.path.expanduser(os.fspath(raw))
    if item.lower().endswith(".csv") and os.path.isfile(item):
      out.extend(_read_csv(item))
    elif os.path.isdir(item):
      found = _walk_images(item)
      if not found:
        raise NoInputsError(f"folder {item!r} holds no image files "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
      out.extend(found)
    elif os.path.isfile(item):
      out.append(item)
    elif _GLOB_CHARS & set(item):
      matches = sorted(glob_lib.glob(item, recursive=True))
      found = []
      for m in matches:
        if os.path.isdir(m):
          found.extend(_walk_images(m))
        elif _is_image(m):
          found.append(m)
      if not found:
        raise NoInputsError(f"glob {item!r} matches no image files")
      out.extend(found)
    else:
      out.append(item)  # Missing: kept for a `not_found` row downstream.
  return out


def unique_ids(paths: Sequence[str]) -> list[str]:
  """One output id per path: the file stem, made unique on collision.

  The first occurrence of a stem keeps it; later ones get `__2`, `__3`, ...
  in input order (`a`, `a__2`, `a__3`). A suffixed id that is itself taken
  (a real file named `a__2`) is skipped to the next free number. Comparison
  is case-insensitive (ids become file names on case-insensitive file
  systems), the returned ids keep their case. Deterministic for a given
  input order.
  """
  taken: set[str] = set()
  ids = []
  for p in paths:
    stem = os.path.splitext(os.path.basename(os.fspath(p).rstrip("/\\")))[0]
    stem = stem or "image"
    cand, k = stem, 1
    while cand.lower() in taken:
      k += 1
      cand = f"{stem}__{k}"
    taken.add(cand.lower())
    ids.append(cand)
  return ids


# ---------------------------------------------------------------- data sources


class PathSource(grain.sources.RandomAccessDataSource):
  """Random access over a list of paths: record i = {'path': paths[i]}."""

  def __init__(self, paths: Sequence[str]):
    self._paths = [os.fspath(p) for p in paths]

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"path": self._paths[index]}

  def __repr__(self) -> str:
    return f"PathSource(n={len(self._paths)})"


def synthetic_seed(seed: int, index: int) -> int:
  """Seed of synthetic record `index`: SeedSequence([seed, index]) -> uint32.

  Hashing (instead of seed + index) keeps datasets with nearby base seeds
  from sharing records.
  """
  return int(np.random.SeedSequence([int(seed), int(index)])
             .generate_state(1, dtype=np.uint32)[0])


class SyntheticSource(grain.sources.RandomAccessDataSource):
  """`n` synthetic fundus images: record i = generate(synthetic_seed(seed, i)).

  `generate_fn` defaults to `efiqa_jax.synth.generate` (imported lazily in
  the reading process). Any picklable callable with the same signature
  works; it must return an object with the `SynthSample` fields.
  """

  def __init__(self, n: int, seed: int = 0, size: int = 512, *,
               generate_fn: Callable[..., Any] | None = None,
               **generate_kwargs):
    if n < 0:
      raise ValueError(f"n must be >= 0, got {n}")
    self._n, self._seed, self._size = int(n), int(seed), int(size)
    self._generate_fn = generate_fn
    self._kwargs = generate_kwargs

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._n:
      raise IndexError(f"index {index} out of range for {self._n} records")
    gen = self._generate_fn
    if gen is None:
      from efiqa_jax import synth  # pylint: disable=g-import-not-at-top
      gen = synth.generate
    s = synthetic_seed(self._seed, index)
    sample = gen(seed=s, size=self._size, **self._kwargs)
    return {"path": f"synthetic://{self._seed}/{index}", "sample": sample}

  def __repr__(self) -> str:
    return f"SyntheticSource(n={self._n}, seed={self._seed}, size={self._size})"


class TFDSSource(grain.sources.RandomAccessDataSource):
  """A TFDS dataset built in ArrayRecord format, read without tf.data.

  Wraps `tfds.data_source(name, split=..., data_dir=...)`. The image feature
  is read as encoded bytes (`SkipDecoding`) so that decoding happens once, in
  `PrepareFundus`, with the same decoder as files on disk. Record i is
  {'path': f'{name}/{split}/{i}' (or the value of `id_key`), 'image': bytes,
  plus the other features}.
  """

  def __init__(self, name: str, split: str = "train", *,
               data_dir: str | None = None, image_key: str = "image",
               id_key: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._name, self._split = name, split
    self._image_key, self._id_key = image_key, id_key
    self._ds = tfds.data_source(
        name, split=split, data_dir=data_dir, download=False,
        decoders={image_key: tfds.decode.SkipDecoding()})
    # Workers reopen from the prepared folder, so the builder class need not
    # be importable there (it may live in a notebook or a test).
    self._builder_dir = os.fspath(self._ds.dataset_info.data_dir)

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_ds"]
    return state

  def __setstate__(self, state):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.__dict__.update(state)
    builder = tfds.builder_from_directory(self._builder_dir)
    self._ds = builder.as_data_source(
        split=self._split,
        decoders={self._image_key: tfds.decode.SkipDecoding()})

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict[str, Any]:
    rec = dict(self._ds[index])
    if self._id_key is not None:
      rid = rec[self._id_key]
      path = rid.decode() if isinstance(rid, bytes) else str(rid)
    else:
      path = f"{self._name}/{self._split}/{index}"
    rec["path"] = path
    return rec

  def __repr__(self) -> str:
    return f"TFDSSource({self._name!r}, {self._split!r}, n={len(self)})"


# ------------------------------------------------------- per-record transforms


def blank_row(size: int, status: str, message: str = "", path: str = "",
              *, extra: dict[str, np.ndarray] | None = None) -> dict:
  """A zero row with the full schema (used for failures and padding)."""
  row = {
      "image": np.zeros((size, size, 3), np.uint8),
      "fov_mask": np.zeros((size, size), bool),
      "valid": np.bool_(False),
      "ok": np.bool_(False),
      "index": np.int64(-1),
      "status": status,
      "message": message,
      "path": path,
      "crop": np.full((5,), -1, np.int32),
      "fov": np.full((3,), -1.0, np.float32),
  }
  if extra:
    row.update({k: np.zeros_like(v) for k, v in extra.items()})
  return row


class PrepareFundus(grain.transforms.Map):
  """Raw record -> row: decode + FOV crop via `fundus.prepare_fundus`.

  The record's `source_key` entry (a path, or encoded bytes from TFDS) goes to
  `load_fn(source, size)`, which defaults to
  `efiqa_jax.fundus.prepare_fundus` (imported lazily: workers import it
  themselves). `load_fn` must return a `Prepared`-like object and, like
  `prepare_fundus`, should not raise; `ReadRecord` still catches it if it does.
  """

  def __init__(self, size: int = 512, *, load_fn: Callable | None = None,
               source_key: str = "path", **load_opts):
    self.size = int(size)
    self.load_fn = load_fn
    self.source_key = source_key
    self.load_opts = load_opts

  def blank(self, status: str, message: str = "", path: str = "") -> dict:
    return blank_row(self.size, status, message, path)

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    fn = self.load_fn
    if fn is None:
      from efiqa_jax import fundus  # pylint: disable=g-import-not-at-top
      fn = fundus.prepare_fundus
    src = element[self.source_key]
    path = element.get("path", src if isinstance(src, str) else "")
    p = fn(src, self.size, **self.load_opts)
    row = self.blank(p.status, p.message or "", path)
    row["crop"] = np.array([p.crop_x0, p.crop_y0, p.crop_size, p.orig_h,
                            p.orig_w], np.int32)
    if p.fov is not None:
      row["fov"] = np.array([p.fov.cx, p.fov.cy, p.fov.r], np.float32)
    if p.status == "ok":
      if p.image is None or p.image.shape != (self.size, self.size, 3):
        raise ValueError(
            f"load_fn returned status ok with image shape "
            f"{None if p.image is None else p.image.shape}, expected "
            f"{(self.size, self.size, 3)}")
      row["image"] = np.asarray(p.image, np.uint8)
      row["fov_mask"] = (np.asarray(p.fov_mask, bool) if p.fov_mask is not None
                         else np.ones((self.size, self.size), bool))
      row["ok"] = np.bool_(True)
    return row


class PrepareSynthetic(grain.transforms.Map):
  """`SyntheticSource` record -> row (+ vessels, degradation targets)."""

  def __init__(self, size: int = 512):
    self.size = int(size)

  def _extra(self):
    s = self.size
    return {"vessels": np.zeros((s, s), np.uint8),
            "degradation": np.zeros((s, s), np.float32)}

  def blank(self, status: str, message: str = "", path: str = "") -> dict:
    return blank_row(self.size, status, message, path, extra=self._extra())

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    smp = element["sample"]
    s = self.size
    if smp.image.shape != (s, s, 3):
      raise ValueError(f"synthetic image shape {smp.image.shape} != "
                       f"{(s, s, 3)}")
    row = self.blank("ok", "", element["path"])
    row.update(
        image=np.asarray(smp.image, np.uint8),
        fov_mask=np.asarray(smp.fov_mask, bool),
        vessels=np.asarray(smp.vessels, np.uint8),
        degradation=np.asarray(smp.degradation, np.float32),
        crop=np.array([0, 0, s, s, s], np.int32),
        ok=np.bool_(True))
    return row


class ReadRecord(grain.transforms.Map):
  """Position -> row. Never raises.

  Positions < len(source) read `source[pos]` and run `prepare` on it; the row
  gets valid=True and index=pos. Larger positions are padding rows
  (valid=False, index=-1, status 'padding'). Any exception while reading or
  preparing gives a row with status 'error' and the exception as message
  (valid=True: it is a real record and keeps its slot).
  """

  def __init__(self, source: Any, prepare: Any):
    self.source = source
    self.prepare = prepare
    self.n = len(source)

  def map(self, pos) -> dict[str, Any]:
    pos = int(pos)
    if pos >= self.n:
      return self.prepare.blank("padding")
    path = ""
    try:
      rec = self.source[pos]
      path = str(rec.get("path", "")) if isinstance(rec, dict) else ""
      row = self.prepare.map(rec)
    except Exception as e:  # pylint: disable=broad-except
      row = self.prepare.blank("error", f"{type(e).__name__}: {e}", path)
    row["valid"] = np.bool_(True)
    row["index"] = np.int64(pos)
    row["ok"] = np.bool_(bool(row["ok"]) and row["status"] == "ok")
    return row
