"""Inputs: turning user arguments into an ordered list of records.

Two layers:

* `list_inputs` / `unique_ids` turn command-line style inputs (files, folders,
  globs, CSV manifests) into an ordered list of paths and stable output ids.
  `resolve_inputs` does the same where a folder holding `prepared.json`
  (`efiqa prepare`, `efiqa_jax.prepared`) stands for its records: the
  inference commands read those instead of decoding the photographs
  (`PrepareFundus` takes a `prepared` record as is).
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

import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from efiqa_jax import files

IMAGE_EXTENSIONS = files.IMAGE_EXTENSIONS
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


def _read_csv(csv_path: str) -> list[str]:
  fieldnames, rows = files.read_csv(csv_path)
  col = next((c for c in CSV_PATH_COLUMNS if c in fieldnames), None)
  if col is None:
    raise ValueError(
        f"{csv_path}: a CSV input needs a `path` or `image` column; found "
        f"columns {fieldnames or None}")
  base = (os.fspath(files.as_path(csv_path).parent)
          if files.is_remote(csv_path)
          else os.path.dirname(os.path.abspath(csv_path)))
  out = []
  for line, row in enumerate(rows, start=2):
    p = (row[col] or "").strip()
    if not p:
      raise ValueError(f"{csv_path}:{line}: empty `{col}`")
    if not files.is_remote(p):
      p = os.path.expanduser(p)
      p = p if os.path.isabs(p) else files.join(base, p)
    out.append(p)
  if not out:
    raise NoInputsError(f"{csv_path} has no rows")
  return out


def _prepared_folder(item: str):
  """The PreparedSource of a prepared folder; None for anything else. An
  unfinished or foreign one is one clear ValueError."""
  from efiqa_jax import prepared  # pylint: disable=g-import-not-at-top
  if prepared.is_prepared(item):
    return prepared.PreparedSource(item)
  if prepared.unfinished_prepare(item):
    raise ValueError(f"{item} is an unfinished `efiqa prepare` folder (no "
                     f"{prepared.METADATA} yet): run the same efiqa prepare "
                     "again to finish it")
  return None


def list_inputs(inputs: Sequence[str] | str) -> list[str]:
  """Expands inputs into an ordered list of image paths (local or `gs://`).

  Each input is, in this order of checks:
    * a CSV file (`.csv`): its `path` column (else its `image` column), in
      file order; relative paths are resolved against the CSV's folder (its
      bucket prefix for a `gs://` CSV);
    * a folder (or bucket prefix): every image file below it (recursive;
      extensions in `IMAGE_EXTENSIONS`, case-insensitive), sorted by relative
      path; a folder without images raises NoInputsError;
    * an existing file: taken as is (whatever its extension, so a mistyped
      file still gets a status row from the decoder instead of vanishing);
    * a glob pattern (`*`, `?`, `[`; `**` spans folders): its matches,
      sorted; folders that match are expanded as above, non-image files are
      skipped. A glob matching no image raises NoInputsError.
    * anything else (a path that does not exist): returned AS IS, so the
      caller writes a `not_found` status row for it. Inputs never vanish.

  Inputs keep the order given; expansions are sorted within each input.
  Duplicates are kept (each occurrence is one record). No input at all
  raises NoInputsError. Listing goes through `efiqa_jax.files` (etils.epath).
  """
  if isinstance(inputs, (str, os.PathLike)):
    inputs = [inputs]
  if not inputs:
    raise NoInputsError("no input was given")
  out: list[str] = []
  for raw in inputs:
    item = os.fspath(raw)
    if not files.is_remote(item):
      item = os.path.expanduser(item)
    if item.startswith(TFDS_PREFIX):
      raise NoInputsError(f"{item}: this command reads photograph files; "
                          "assess, extract, pseudo-label, vessels, prepare, "
                          "benchmark, distill, train-teacher, train-adapter "
                          "and pretrain-encoder read tfds: datasets")
    if item.lower().endswith(".csv") and files.isfile(item):
      out.extend(_read_csv(item))
    elif files.isdir(item) and _prepared_folder(item) is not None:
      # A NoInputsError: the folder holds no photograph (exit 4, one line,
      # in every command).
      raise NoInputsError(
          f"{item} is a prepared folder (efiqa prepare): this command reads "
          "photographs; assess, extract, pseudo-label --from-photos, "
          "vessels, benchmark, distill, train-teacher, train-adapter and "
          "pretrain-encoder read prepared folders")
    elif files.isdir(item):
      found = files.list_images(item)
      if not found:
        raise NoInputsError(f"folder {item!r} holds no image files "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
      out.extend(found)
    elif files.isfile(item):
      out.append(item)
    elif files.has_glob(item):
      found = files.glob_images(item)
      if not found:
        raise NoInputsError(f"glob {item!r} matches no image files")
      out.extend(found)
    else:
      out.append(item)  # Missing: kept for a `not_found` row downstream.
  return out


class Inputs:
  """Inputs of a command that also reads prepared folders.

  paths: one per record, in input order (a prepared record is known by its
  source photograph's path, so ids and output rows are those the
  photographs give); source: a random-access source aligned with paths
  (record i = {'path'} for a photograph, the `PreparedSource` record for a
  prepared one); prepared: the prepared folders among the inputs.
  """

  def __init__(self, paths: list[str], source: "InputSource",
               prepared: list):
    self.paths, self.source, self.prepared = paths, source, prepared

  @property
  def ids(self) -> list[str]:
    return unique_ids(self.paths)

  def require_photographs(self, why: str,
                          hint: str = "give the photographs instead") -> None:
    """One clear ValueError when a prepared folder is among the inputs of a
    run that needs the photographs themselves."""
    if self.prepared:
      raise ValueError(f"{self.prepared[0].folder} is a prepared folder (FOV "
                       f"crops): {why}; {hint}")

  def check_size(self, size: int, option: str) -> None:
    """Prepared crops must have the side the run works at (a resize would
    give other results than the photographs)."""
    for p in self.prepared:
      if p.size != int(size):
        raise ValueError(
            f"{p.folder} was prepared at {p.size} px, this run works at "
            f"{int(size)} px ({option}): prepare the photographs again with "
            f"--size {int(size)}")


class InputSource(grain.sources.RandomAccessDataSource):
  """Photographs, prepared records and TFDS records in one input order
  (`Inputs.source`).
  `fingerprint`: what prepared the records (None without any), so that
  results of other preparations are never silently reused."""

  def __init__(self, paths: list[str], refs: list, prepared: list):
    self._paths, self._refs, self._prepared = paths, refs, prepared

  @property
  def fingerprint(self):
    fps = []
    for p in self._prepared:
      fp = getattr(p, "fingerprint", None)  # TFDS records are photographs
      if fp is not None and fp not in fps:
        fps.append(fp)
    return fps or None

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ref = self._refs[int(index)]
    if ref is None:
      return {"path": self._paths[int(index)]}
    k, j = ref
    return self._prepared[k][j]

  def __repr__(self) -> str:
    return (f"InputSource(n={len(self)}, prepared folders="
            f"{len(self._prepared)})")


class _Subset(grain.sources.RandomAccessDataSource):
  """Records `indices` of `source`, in that order."""

  def __init__(self, source, indices: Sequence[int]):
    self._source, self._indices = source, list(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int):
    return self._source[self._indices[int(index)]]


def subset(source, indices: Sequence[int]):
  return _Subset(source, indices)


def resolve_inputs(inputs: Sequence[str] | str, *,
                   prepared_ok: bool = True) -> Inputs:
  """`list_inputs`, where a folder holding `prepared.json` (`efiqa
  prepare`) stands for its records, in its input order, and
  `tfds:NAME[/CONFIG][:SPLIT]` for a built dataset's records (`TFDSInputs`);
  see `Inputs`. prepared_ok=False: a prepared folder is refused as
  `list_inputs` refuses it."""
  if isinstance(inputs, (str, os.PathLike)):
    inputs = [inputs]
  if not inputs:
    raise NoInputsError("no input was given")
  paths: list[str] = []
  refs: list = []
  folders: list = []
  record_sources: list = []  # prepared folders and TFDS datasets
  for raw in inputs:
    item = os.fspath(raw)
    if item.startswith(TFDS_PREFIX):
      rs = TFDSInputs(item)
    else:
      if not files.is_remote(item):
        item = os.path.expanduser(item)
      rs = (_prepared_folder(item) if prepared_ok and files.isdir(item)
            else None)
    if rs is None:
      found = list_inputs([item])
      paths.extend(found)
      refs.extend([None] * len(found))
      continue
    if len(rs) == 0:  # pylint: disable=g-explicit-length-test
      raise NoInputsError(f"{item} holds no record")
    paths.extend(rs.paths)
    refs.extend((len(record_sources), j) for j in range(len(rs)))
    record_sources.append(rs)
    if not isinstance(rs, TFDSInputs):
      folders.append(rs)
  return Inputs(paths, InputSource(paths, refs, record_sources), folders)


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


TFDS_PREFIX = "tfds:"


def _skip_decoding(builder):
  """Decoders leaving every image and tensor feature encoded."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  skip = {k: tfds.decode.SkipDecoding()
          for k, f in builder.info.features.items()
          if isinstance(f, (tfds.features.Image, tfds.features.Tensor))}
  return skip or None


def tfds_data_source(name: str, split: str, data_dir: str | None = None):
  """`tfds.data_source` of a built dataset (ArrayRecord, no TensorFlow, the
  builder code not needed) with every image and tensor feature left
  encoded, to be decoded by our decoder. A dataset that is not built is one
  clear NoInputsError."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    return builder.as_data_source(split=split,
                                  decoders=_skip_decoding(builder))
  except Exception as e:  # pylint: disable=broad-except
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "TFDS's data_dir"
    why = (str(e).splitlines() or [""])[0]
    raise NoInputsError(
        f"tfds:{name}:{split}: no built dataset under {where} "
        f"({type(e).__name__}: {why}); build it with `python -m data.build "
        f"NAME --manual_dir=...` and set TFDS_DATA_DIR") from None


class TFDSSource(grain.sources.RandomAccessDataSource):
  """A TFDS dataset built in ArrayRecord format, read without tf.data.

  `tfds_data_source(name, split, data_dir)`: image and tensor features are
  read as encoded bytes so that decoding happens once, in `PrepareFundus`,
  with the same decoder as files on disk. Record i is
  {'path': f'{name}/{split}/{i}' (or the value of `id_key`), 'image': bytes,
  plus the other features}. Picklable: grain workers reopen it from its
  folder, so the builder class need not be importable there.
  """

  def __init__(self, name: str, split: str = "train", *,
               data_dir: str | None = None, id_key: str | None = None):
    self._name, self._split, self._id_key = name, split, id_key
    self._ds = tfds_data_source(name, split, data_dir)
    self._builder_dir = os.fspath(self._ds.dataset_info.data_dir)

  @property
  def features(self):
    return self._ds.dataset_info.features

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_ds"]
    return state

  def __setstate__(self, state):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.__dict__.update(state)
    builder = tfds.builder_from_directory(self._builder_dir)
    self._ds = builder.as_data_source(split=self._split,
                                      decoders=_skip_decoding(builder))

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


class TFDSInputs:
  """`tfds:NAME[/CONFIG][:SPLIT]` as the input of a command: the records of
  a dataset built by a `data/` builder (TFDS_DATA_DIR, else TFDS's default
  data_dir), each known as `tfds:NAME:SPLIT/<image/filename>` (so ids are
  the file stems, as from the photographs, and `evaluate` joins them with
  the same dataset's labels). Record j = {'path', 'encoded': the stored
  photograph bytes}, decoded by the same decoder as files. The file names
  are read once here (one pass over the records, like `evaluate`'s tfds:
  labels)."""

  def __init__(self, spec: str):
    parts = spec[len(TFDS_PREFIX):].split(":")
    if not parts[0] or len(parts) > 2:
      raise NoInputsError(f"expected tfds:NAME[/CONFIG][:SPLIT], got {spec!r}")
    name = parts[0]
    split = parts[1] if len(parts) == 2 and parts[1] else "train"
    self.split = split
    self._src = TFDSSource(name, split,
                           data_dir=os.environ.get("TFDS_DATA_DIR") or None)
    if "image" not in self._src.features:
      raise NoInputsError(f"{spec}: the dataset has no 'image' feature")
    prefix = f"{TFDS_PREFIX}{name}:{split}/"
    self.paths = []
    for j in range(len(self._src)):
      fn = self._src[j].get("image/filename", f"{j:08d}")
      self.paths.append(prefix + (fn.decode() if isinstance(fn, bytes)
                                  else str(fn)))

  @property
  def dataset_info(self):
    """The build's `tfds.core.DatasetInfo` (name, version, splits)."""
    return self._src._ds.dataset_info  # pylint: disable=protected-access

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"path": self.paths[int(index)],
            "encoded": bytes(self._src[int(index)]["image"])}


def record_source(element: dict[str, Any]):
  """What a decoder reads for a raw record: its stored bytes (a TFDS
  record) or its path."""
  return element["encoded"] if "encoded" in element else element["path"]


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
    if "prepared" in element:  # efiqa prepare did this step already
      return self._from_prepared(element)
    src = (record_source(element) if self.source_key == "path"
           else element[self.source_key])
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


  def _from_prepared(self, element: dict[str, Any]) -> dict[str, Any]:
    """A `prepared.PreparedSource` record -> the row `map` gives for its
    photograph (the record holds what `prepare_fundus` returned)."""
    rec = element["prepared"]
    row = self.blank(rec["status"], rec.get("message") or "",
                     element.get("path", rec.get("path", "")))
    if "crop" in rec:
      row["crop"] = np.asarray(rec["crop"], np.int32)
      row["fov"] = np.asarray(rec["fov"], np.float32)
    if rec["status"] == "ok":
      image = np.asarray(rec["image"], np.uint8)
      if image.shape != (self.size, self.size, 3):
        raise ValueError(f"record prepared at {image.shape[0]} px, this run "
                         f"works at {self.size} px")
      row["image"] = image
      row["fov_mask"] = np.asarray(rec["fov_mask"], bool)
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
