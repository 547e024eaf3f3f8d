"""Training data for the adapter: (features | photographs) x pseudo-labels.

Matching follows the reference `SIFDataset`: feature file, patch-label PNG
(and photograph) are paired by id (file stem); labels are binarised with
> 0. Ids present on one side only are reported (`DataReport`), never
silently dropped.

Streamed, never loaded whole: `input_pipeline.training_batches` over the
matched ids (sorted), each process reading only its rows [p*L, (p+1)*L) of
every global batch (epochs reshuffled by grain from the seed; the stream
is cut to whole global batches; the iterator state is checkpointed), labels
read per record. Cached features (`FeatureStore`: .npy files, or ArrayRecord
shards indexed by id) give one record per image ('image' batching) or per
token ('patch': the reference's pool of patches); end to end
(`encoder_inputs`: photographs or a prepared folder) one record per
photograph (`EncoderRows`: the encoder's input pixels). Only ids and paths
are held.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import grain
import numpy as np
from PIL import Image

from efiqa_jax import files as files_lib


@dataclasses.dataclass
class DataReport:
  matched: list[str]
  features_without_label: list[str]
  labels_without_features: list[str]
  not_ok: list[tuple[str, str]]   # (id, status) rows of the manifest

  def as_dict(self) -> dict:
    return dict(matched=len(self.matched),
                features_without_label=self.features_without_label,
                labels_without_features=self.labels_without_features,
                not_ok=[list(x) for x in self.not_ok])


def label_files(labels_dir: str) -> dict[str, str]:
  """id -> PNG path; `labels_dir` is a pseudo-label output dir (with a
  labels/ subfolder) or a folder of grid PNGs."""
  d = os.fspath(labels_dir)
  if files_lib.isdir(files_lib.join(d, "labels")):
    d = files_lib.join(d, "labels")
  if not files_lib.isdir(d):
    raise FileNotFoundError(f"label folder not found: {labels_dir}")
  names = sorted(p.name for p in files_lib.as_path(d).iterdir())
  return {os.path.splitext(f)[0]: files_lib.join(d, f)
          for f in names if f.lower().endswith(".png")}


def read_label(path: str) -> np.ndarray:
  """Grid PNG -> (gh, gw) float32 in {0, 1} (> 0 is positive = degraded)."""
  a = np.asarray(Image.open(io.BytesIO(files_lib.read_bytes(path))))
  if a.ndim == 3:
    a = a[..., 0]
  return (a > 0).astype(np.float32)


def resize_nearest(y: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """torch F.interpolate(mode='nearest'): source index floor(i * in / out)
  (what the reference trainer does when label and output grids differ)."""
  h, w = y.shape
  ri = np.floor(np.arange(shape[0]) * (h / shape[0])).astype(int)
  ci = np.floor(np.arange(shape[1]) * (w / shape[1])).astype(int)
  return y[np.minimum(ri, h - 1)][:, np.minimum(ci, w - 1)]


def read_label_at(path: str, grid, label_resize: str) -> np.ndarray:
  """`read_label` on the adapter's output grid: resized nearest (the
  reference's rule) when label_resize is 'nearest', else a label of another
  shape is one clear ValueError."""
  y = read_label(path)
  if tuple(y.shape) != tuple(grid) and label_resize == "nearest":
    y = resize_nearest(y, tuple(grid))
  if tuple(y.shape) != tuple(grid):
    raise ValueError(f"label {path} is {y.shape[0]}x{y.shape[1]}, the "
                     f"adapter outputs {grid[0]}x{grid[1]}")
  return y


def feature_files(features_dir: str) -> tuple[dict[str, str], list, dict]:
  """(id -> .npy path (or, for ArrayRecord output, the array), not-ok
  manifest rows, metadata) of `efiqa extract` output."""
  from efiqa_jax.encoders import extract
  features_dir = os.fspath(features_dir)
  meta_path = files_lib.join(features_dir, extract.METADATA)
  meta = {}
  if files_lib.exists(meta_path):
    meta = files_lib.read_json(meta_path)
  out, bad = {}, []
  if meta.get("format", "npy") == "arrayrecord":
    # Shards are read into memory once (id -> (gh, gw, D) array).
    for id_, _, arr in extract.iter_arrayrecord(features_dir):
      out[id_] = arr
    for r in extract.read_manifest(features_dir):
      if r["status"] != "ok":
        bad.append((r["id"], r["status"]))
    if not out:
      raise ValueError(f"no features in {features_dir}")
    return out, bad, meta
  if meta.get("format", "npy") != "npy":
    raise ValueError(f"{features_dir}: unknown format {meta.get('format')!r}")
  if files_lib.exists(files_lib.join(features_dir, extract.MANIFEST)):
    for r in extract.read_manifest(features_dir):
      if r["status"] == "ok" and r.get("file"):
        out[r["id"]] = files_lib.join(features_dir, r["file"])
      else:
        bad.append((r["id"], r["status"]))
  else:  # a plain folder of <id>.npy (e.g. the reference extractor's)
    for f in sorted(p.name for p in
                    files_lib.as_path(features_dir).iterdir()):
      if f.endswith(".npy"):
        out[f[:-4]] = files_lib.join(features_dir, f)
  if not out:
    raise ValueError(f"no feature files in {features_dir}")
  return out, bad, meta


def match(left: dict[str, str], labels: dict[str, str], not_ok=()
          ) -> DataReport:
  # Sorted: the data order does not depend on how the features are stored.
  ids = sorted(i for i in left if i in labels)
  # A label whose input is listed as not ok is reported there, once.
  bad = {i for i, _ in not_ok}
  return DataReport(ids, sorted(set(left) - set(labels)),
                    sorted(set(labels) - set(left) - bad), list(not_ok))


def load_features(f) -> np.ndarray:
  """A feature entry (path of an .npy or an in-memory array) as float32."""
  return (files_lib.load_npy(f) if isinstance(f, str)
          else np.asarray(f)).astype(np.float32)


# ------------------------------------------------- end to end, streamed

@dataclasses.dataclass
class EncoderInputs:
  """The photographs of an end-to-end run, as a random-access source.

  by_id: id -> position in `source` of every usable record; not_ok: (id,
  'status: message') of the records that cannot be used; source: record i =
  {'path'} (a photograph) or a `prepared.PreparedSource` record; prepared:
  the prepared folder (None for photographs); fingerprint: what prepared
  its crops (None for photographs).
  """
  by_id: dict[str, int]
  not_ok: list[tuple[str, str]]
  source: Any
  paths: list[str]
  prepared: str | None = None
  fingerprint: Any = None

  @property
  def failed(self) -> list[tuple[str, str]]:
    """(path, 'status: message') of the records that cannot be used."""
    where = dict(zip(self.ids, self.paths))
    return [(where.get(i, i), m) for i, m in self.not_ok]

  @property
  def ids(self) -> list[str]:
    from efiqa_jax import sources
    return sources.unique_ids(self.paths)


def encoder_inputs(images, *, size: int, work_size: int, preprocess: str,
                   wanted=None, progress: bool = False) -> EncoderInputs:
  """`images` (photographs: files, folders, globs, CSVs, tfds:NAME[:SPLIT];
  or a folder of `efiqa prepare`) -> `EncoderInputs`.

  A prepared folder is not read: its manifest says which records are ok
  (its crops were made at `work_size`: another size, or preprocess 'efiqa'
  (the whole photograph), is refused in one line). Photographs are
  prepared once here (`extract.PrepareEncoderInput`, nothing kept) so that
  training never stops on a bad file mid-run; only those whose id is in
  `wanted` (all when None) are checked.
  """
  from efiqa_jax import prepared as prepared_lib
  from efiqa_jax import sources
  from efiqa_jax.encoders import extract
  if not isinstance(images, (str, os.PathLike)) and len(images) == 1:
    images = images[0]
  folder = os.fspath(images) if isinstance(images, (str, os.PathLike)) \
      else None
  if folder is not None and prepared_lib.is_prepared(folder):
    src = prepared_lib.PreparedSource(folder)
    if preprocess != "fov":
      raise ValueError(f"{folder} is a prepared folder (FOV crops): "
                       f"preprocess {preprocess!r} needs the whole "
                       "photographs; give them instead, or use preprocess "
                       "fov")
    if src.size != int(work_size):
      raise ValueError(f"{folder} was prepared at {src.size} px, this run "
                       f"works at {int(work_size)} px (work_size): prepare "
                       f"the photographs again with --size {int(work_size)}")
    import csv
    by_id, not_ok = {}, []
    with files_lib.as_path(files_lib.join(folder, prepared_lib.MANIFEST)
                           ).open("r") as f:
      rows = csv.DictReader(f)  # row by row: no list of every row
      for i, r in enumerate(rows):
        if r.get("status") == "ok":
          by_id[r["id"]] = i
        else:
          not_ok.append((r["id"], f"{r.get('status') or 'pending'}: "
                         f"{r.get('message', '')}".rstrip(": ")))
    return EncoderInputs(by_id, not_ok, src, src.paths, folder,
                         src.fingerprint)
  resolved = sources.resolve_inputs([images] if folder is not None
                                    else images, prepared_ok=False)
  paths, ids = resolved.paths, resolved.ids
  prep = extract.PrepareEncoderInput(size, work_size=work_size,
                                     preprocess=preprocess)
  by_id, not_ok = {}, []
  todo = enumerate(zip(ids, paths))
  if progress:
    import sys
    from tqdm.auto import tqdm
    todo = tqdm(todo, total=len(paths), desc="check photographs", unit="img",
                file=sys.stderr)
  for i, (id_, _) in todo:
    if wanted is not None and id_ not in wanted:
      by_id[id_] = i  # unchecked: it has no label and is never read
      continue
    row = prep.map(resolved.source[i])
    if bool(row["ok"]):
      by_id[id_] = i
    else:
      not_ok.append((id_, f"{row['status']}: {row['message']}"))
  return EncoderInputs(by_id, not_ok, resolved.source, paths)


class Labelled(grain.sources.RandomAccessDataSource):
  """Records `indices` of `source`, each with its label file under
  'label' (None: no label, e.g. self-supervised pretraining)."""

  def __init__(self, source, indices, labels=None):
    self.source, self.indices = source, list(indices)
    self.labels = None if labels is None else list(labels)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int):
    rec = dict(self.source[self.indices[int(index)]])
    if self.labels is not None:
      rec["label"] = self.labels[int(index)]
    return rec


class EncoderRows(grain.transforms.Map):
  """Record -> row: `pixels` (size, size, 3) float32, the encoder input
  (`extract.PrepareEncoderInput`: the photograph's or the prepared record's
  FOV crop, or the whole photograph), and with `label_grid` its label `y`
  and `mask` (ones; zeros on a row that failed)."""

  def __init__(self, size: int, work_size: int, preprocess: str = "fov",
               label_grid: tuple[int, int] | None = None,
               label_resize: str = "error"):
    from efiqa_jax.encoders import extract
    self.prep = extract.PrepareEncoderInput(size, work_size=work_size,
                                            preprocess=preprocess)
    self.grid = None if label_grid is None else tuple(label_grid)
    self.label_resize = label_resize

  def blank(self, status: str, message: str = "", path: str = "") -> dict:
    row = self.prep.blank(status, message, path)
    if self.grid is not None:
      row["y"] = np.zeros(self.grid, np.float32)
      row["mask"] = np.zeros(self.grid, np.float32)
    return row

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    row = self.prep.map(element)
    if self.grid is None:
      return row
    y = read_label_at(element["label"], self.grid, self.label_resize)
    ok = np.float32(bool(row["ok"]))
    row["y"] = y * ok
    row["mask"] = np.full(self.grid, ok, np.float32)
    return row


class RequireOk(grain.transforms.Map):
  """A record that could not be read stops training with its path and
  reason (usable records were checked before training); padding rows
  (valid=False, mask 0) pass."""

  def map(self, row):
    if bool(row["valid"]) and not bool(row["ok"]):
      raise ValueError(f"{row['path']!r} is unusable: {row['status']} "
                       f"{row['message']}".strip())
    return row


def _contiguous_batches(source, rows, augment, *, seed: int,
                        global_batch: int, num_epochs: int,
                        num_workers: int = 0, read_threads: int = 2,
                        prefetch_batches: int = 2,
                        process_index: int | None = None,
                        process_count: int | None = None,
                        pad_epochs: bool = False):
  """This process's rows [p*L, (p+1)*L) of every global batch
  (`input_pipeline.training_batches`, contiguous): records read and
  prepared by `rows` in the pipeline, `augment` drawn per record from
  (seed, position); the iterator state is checkpointable."""
  from efiqa_jax import input_pipeline
  return input_pipeline.training_batches(
      source, global_batch, seed=seed, prepare=rows, augment=augment,
      num_epochs=num_epochs, num_workers=num_workers,
      read_threads=read_threads, prefetch_batches=prefetch_batches,
      process_index=process_index, process_count=process_count,
      contiguous=True, pad_epochs=pad_epochs)


def encoder_batches(source, rows: EncoderRows, *, flip: bool = False,
                    flip_vertical: bool = False, **pipeline):
  """Photographs or prepared crops for the encoder, streamed as
  `_contiguous_batches` (seed, global_batch, num_epochs, workers, threads,
  process share, pad_epochs); the photograph and its label grid flip
  together."""
  from efiqa_jax import input_pipeline
  aug = [RequireOk()]
  keys = ("pixels", "y", "mask") if rows.grid is not None else ("pixels",)
  if flip:
    aug.append(input_pipeline.RandomFlipRotate(keys, rotate=False))
  if flip_vertical:
    aug.append(VerticalFlip(keys))
  return _contiguous_batches(source, rows, aug, **pipeline)


class VerticalFlip(grain.transforms.RandomMap):
  """Flips the rows of every `keys` array of a row with probability 1/2."""

  def __init__(self, keys=("pixels",)):
    self.keys = tuple(keys)

  def random_map(self, row, rng: np.random.Generator):
    if not rng.integers(2):
      return row
    return dict(row, **{k: np.ascontiguousarray(row[k][::-1])
                        for k in self.keys if k in row})


# --------------------------------------------- cached features, streamed


class FeatureStore:
  """`efiqa extract` output, read per image: never loaded whole.

  ids: the ok ids (manifest / folder of .npy / the journal of ArrayRecord
  shards); not_ok: (id, status) manifest rows; meta: metadata.json.
  `read(id)` -> (gh, gw, D) float32; `row(id, t)` -> token t's (D,)
  features (a memory map of the .npy; a whole ArrayRecord record).
  ArrayRecord shards are indexed once (each record's id; nothing kept but
  the shard and position) and read through `grain.sources.
  ArrayRecordDataSource` (shards of a cloud folder are copied to a local
  temporary folder first). Picklable: worker processes reopen the shards.
  """

  def __init__(self, features_dir):
    from efiqa_jax.encoders import extract
    self.dir = os.fspath(features_dir)
    meta_path = files_lib.join(self.dir, extract.METADATA)
    self.meta = (files_lib.read_json(meta_path)
                 if files_lib.exists(meta_path) else {})
    self.format = self.meta.get("format", "npy")
    self.not_ok: list = []
    self._where: dict = {}
    self._shards: list[str] = []
    self._ds = None
    self._headers: dict = {}  # .npy header bytes -> (shape, dtype, offset)
    self.scanned = False  # ArrayRecord ids read from the records
    if self.format == "arrayrecord":
      self._index_arrayrecord()
    elif self.format == "npy":
      files, self.not_ok, _ = feature_files(self.dir)
      self._where = dict(files)
    else:
      raise ValueError(f"{self.dir}: unknown format {self.format!r}")
    if not self._where:
      raise ValueError(f"no features in {self.dir}")

  def _index_arrayrecord(self):
    """id -> global record position over the shards; only records the
    journal attributes to their shard count (`extract.iter_arrayrecord`).
    The journal's record positions are used where it has them (extract
    writes them); otherwise each record's id is read once."""
    from array_record.python.array_record_module import ArrayRecordReader
    from efiqa_jax.encoders import extract
    journal = files_lib.Journal.read(self.dir)
    ok = {i: r for i, r in journal.items() if r.get("status") == "ok"}
    journaled = all(str(r.get("record", "")).isdigit() for r in ok.values())
    by_shard: dict = {}
    if journaled:
      for i, r in ok.items():
        by_shard.setdefault(r.get("file"), []).append((i, int(r["record"])))
    self.scanned = not journaled
    offset = 0
    for path in files_lib.glob(files_lib.join(self.dir,
                                              "features-*.array_record")):
      name = path.rsplit("/", 1)[-1]
      with files_lib.local_copy(path) as local:
        reader = ArrayRecordReader(local)
        try:
          n = reader.num_records()
          if journaled:
            for id_, k in by_shard.get(name, ()):
              self._where[id_] = offset + k
          else:
            for k in range(n):
              with np.load(io.BytesIO(reader.read([k])[0])) as z:
                id_ = str(z["id"])  # the features are not read
              r = ok.get(id_)
              if r is not None and r.get("file") == name:
                self._where[id_] = offset + k
        finally:
          reader.close()
      self._shards.append(path)
      offset += n
    for r in extract.read_manifest(self.dir):
      if r["status"] != "ok":
        self.not_ok.append((r["id"], r["status"]))

  def __getstate__(self):
    return dict(self.__dict__, _ds=None, _headers={})

  @property
  def ids(self) -> list[str]:
    return list(self._where)

  def _open(self):
    if self._ds is None:
      paths = files_lib.local_copies(self._shards, "efiqa-features-")
      self._ds = grain.sources.ArrayRecordDataSource(paths)
    return self._ds

  def read(self, id_: str) -> np.ndarray:
    w = self._where[id_]
    if self.format == "arrayrecord":
      from efiqa_jax.encoders import extract
      data = self._open()[int(w)]
      return extract.decode_record(data)[2].astype(np.float32)
    if files_lib.is_remote(w):
      return load_features(w)  # files.load_npy holds NPY_LOCK
    return self._npy(w)

  def row(self, id_: str, t: int) -> np.ndarray:
    w = self._where[id_]
    if self.format == "npy" and not files_lib.is_remote(w):
      return self._npy(w, int(t))
    a = self.read(id_)
    return a.reshape(-1, a.shape[-1])[int(t)]

  def _npy(self, path: str, token: int | None = None) -> np.ndarray:
    """A local .npy (or its row `token` of the (-1, D) view) as float32,
    reading only those bytes; each distinct header is parsed once."""
    with open(path, "rb") as f:
      head = f.read(12)
      major = head[6] if len(head) >= 8 else 0
      n = 10 + (int.from_bytes(head[8:10], "little") if major == 1 else
                int.from_bytes(head[8:12], "little") + 2)
      f.seek(0)
      key = f.read(n)
      info = self._headers.get(key)
      if info is None:
        with files_lib.NPY_LOCK:
          f.seek(0)
          version = np.lib.format.read_magic(f)
          shape, fortran, dtype = (
              np.lib.format.read_array_header_1_0(f) if version == (1, 0)
              else np.lib.format.read_array_header_2_0(f))
        info = (tuple(shape), np.dtype(dtype), f.tell(), bool(fortran))
        self._headers[key] = info
      shape, dtype, offset, fortran = info
      if fortran or dtype.hasobject:
        with files_lib.NPY_LOCK:
          a = np.load(path)
        a = a.astype(np.float32)
        return a if token is None else a.reshape(-1, a.shape[-1])[token]
      if token is None:
        f.seek(offset)
        count = int(np.prod(shape))
        a = np.frombuffer(f.read(count * dtype.itemsize), dtype, count)
        return a.reshape(shape).astype(np.float32)
      d = int(shape[-1])
      f.seek(offset + token * d * dtype.itemsize)
      return np.frombuffer(f.read(d * dtype.itemsize), dtype,
                           d).astype(np.float32)


class FeatureRecords(grain.sources.RandomAccessDataSource):
  """Training records over cached features, in `ids` order: per image
  (tokens=None: record k = image k) or per token (record k = token k % T
  of image k // T, the reference's pool of patches)."""

  def __init__(self, ids, labels, tokens: int | None = None):
    self.ids, self.labels, self.tokens = list(ids), list(labels), tokens

  def __len__(self) -> int:
    return len(self.ids) * (self.tokens or 1)

  def __getitem__(self, k: int) -> dict[str, Any]:
    i, t = divmod(int(k), self.tokens) if self.tokens else (int(k), -1)
    return {"id": self.ids[i], "path": self.ids[i], "token": t,
            "label": self.labels[i]}


class FeatureRows(grain.transforms.Map):
  """Feature record -> row {x, y, mask}: (gh, gw, D) features with the
  (oh, ow) label grid, or one token's (D,) features with its label cell."""

  def __init__(self, store: FeatureStore, grid, label_grid,
               label_resize: str = "error", per_token: bool = False):
    self.store, self.grid = store, tuple(grid)
    self.label_grid, self.label_resize = tuple(label_grid), label_resize
    self.per_token = per_token

  def _label(self, path):
    return read_label_at(path, self.label_grid, self.label_resize)

  def blank(self, status: str, message: str = "", path: str = "") -> dict:
    d = self.grid[-1]
    x = (np.zeros((d,), np.float32) if self.per_token
         else np.zeros(self.grid, np.float32))
    y = (np.float32(0) if self.per_token
         else np.zeros(self.label_grid, np.float32))
    return {"x": x, "y": y, "mask": np.zeros_like(y), "ok": np.bool_(False),
            "valid": np.bool_(False), "index": np.int64(-1),
            "status": status, "message": message, "path": path}

  def map(self, el: dict[str, Any]) -> dict[str, Any]:
    row = self.blank("ok", "", el["path"])
    y = self._label(el["label"])
    if self.per_token:
      x = self.store.row(el["id"], el["token"])
      y = np.float32(y.reshape(-1)[el["token"]])
    else:
      x = self.store.read(el["id"])
      if x.shape != self.grid:
        raise ValueError(f"features of {el['id']} are {x.shape}, expected "
                         f"{self.grid}")
    row.update(x=x, y=y, mask=np.ones_like(y), ok=np.bool_(True))
    return row


def feature_batches(source, rows: FeatureRows, *, flip: bool = False,
                    **pipeline):
  """Cached features streamed as `_contiguous_batches`; flips (image
  records only: the token grid and its label grid together) per record."""
  from efiqa_jax import input_pipeline
  aug = [RequireOk()]
  if flip and not rows.per_token:
    aug.append(input_pipeline.RandomFlipRotate(("x", "y", "mask"),
                                               rotate=False))
  return _contiguous_batches(source, rows, aug, **pipeline)
