"""Training data for the adapter: (features | photographs) x pseudo-labels.

Matching follows the reference `SIFDataset`: feature file, patch-label PNG
(and photograph) are paired by id (file stem); labels are binarised with
> 0. Ids present on one side only are reported (`DataReport`), never
silently dropped.

Cached features: batches are a grain `MapDataset` indexed by the training
step: batch s is a pure function of (seed, s) -- epoch e = s //
steps_per_epoch uses the permutation `default_rng([seed, e])` -- so a
resumed run reads exactly the batches an uninterrupted run would. The last
batch of an epoch is padded to the fixed batch size with `mask` = 0 rows
(static shapes for jit).

End to end (photographs or a prepared folder, `encoder_inputs`): streamed
through `input_pipeline.training_batches` (`EncoderRows`: one record ->
encoder pixels + its label, read per record), each process reading only its
rows of every global batch; only ids and paths are held.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Sequence

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


def steps_per_epoch(n: int, batch: int) -> int:
  return -(-n // batch)


def epoch_indices(n: int, batch: int, seed: int, step: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(indices (batch,), mask (batch,)) of the items in batch `step`."""
  spe = steps_per_epoch(n, batch)
  epoch, k = divmod(int(step), spe)
  perm = np.random.default_rng([int(seed), epoch]).permutation(n)
  idx = perm[k * batch:(k + 1) * batch]
  mask = np.zeros(batch, np.float32)
  mask[:len(idx)] = 1.0
  full = np.zeros(batch, np.int64)
  full[:len(idx)] = idx
  return full, mask


class PatchBatch:
  """step -> {x (B, D), y (B,), mask (B,)} from in-memory patch arrays."""

  def __init__(self, x: np.ndarray, y: np.ndarray, batch: int, seed: int):
    self.x, self.y, self.batch, self.seed = x, y, batch, seed

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    idx, mask = epoch_indices(len(self.x), self.batch, self.seed, step)
    return {"x": self.x[idx], "y": self.y[idx] * mask, "mask": mask}


class ImageFeatureBatch:
  """step -> {x (B, gh, gw, D), y (B, oh, ow), mask (B, oh, ow)}."""

  def __init__(self, feats: Sequence, labels: Sequence[np.ndarray],
               batch: int, seed: int, flip: bool = False):
    self.feats, self.labels = feats, labels
    self.batch, self.seed, self.flip = batch, seed, flip

  def _feat(self, i):
    return load_features(self.feats[i])

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    idx, mask = epoch_indices(len(self.feats), self.batch, self.seed, step)
    x = np.stack([self._feat(i) for i in idx])
    y = np.stack([self.labels[i] for i in idx])
    if self.flip:
      x, y = _flip(x, y, self.seed, step)
    m = np.broadcast_to(mask[:, None, None], y.shape).astype(np.float32)
    return {"x": x, "y": y * m, "mask": np.ascontiguousarray(m)}


def _flip(x, y, seed, step):
  """Horizontal flip per sample, drawn from (seed, step)."""
  rng = np.random.default_rng([int(seed), int(step), 7])
  f = rng.random(x.shape[0]) < 0.5
  x = np.where(f[:, None, None, None], x[:, :, ::-1], x)
  y = np.where(f[:, None, None], y[:, :, ::-1], y)
  return x, y


def step_dataset(make_batch: Any, start: int, total: int, *,
                 threads: int = 2, prefetch: int = 4):
  """grain pipeline over steps [start, total): batch s = make_batch(s)."""
  import grain
  ds = grain.MapDataset.range(start, total).map(make_batch)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=prefetch))


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
  """`images` (photographs: files, folders, globs, CSVs; or a folder of
  `efiqa prepare`) -> `EncoderInputs`.

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
    _, rows = files_lib.read_csv(files_lib.join(folder, prepared_lib.MANIFEST))
    by_id, not_ok = {}, []
    for i, r in enumerate(rows):
      if r.get("status") == "ok":
        by_id[r["id"]] = i
      else:
        not_ok.append((r["id"], f"{r.get('status') or 'pending'}: "
                       f"{r.get('message', '')}".rstrip(": ")))
    return EncoderInputs(by_id, not_ok, src, src.paths, folder,
                         src.fingerprint)
  paths = sources.list_inputs([images] if folder is not None else images)
  ids = sources.unique_ids(paths)
  prep = extract.PrepareEncoderInput(size, work_size=work_size,
                                     preprocess=preprocess)
  by_id, not_ok = {}, []
  todo = enumerate(zip(ids, paths))
  if progress:
    import sys
    from tqdm.auto import tqdm
    todo = tqdm(todo, total=len(paths), desc="check photographs", unit="img",
                file=sys.stderr)
  for i, (id_, p) in todo:
    if wanted is not None and id_ not in wanted:
      by_id[id_] = i  # unchecked: it has no label and is never read
      continue
    row = prep.map({"path": p})
    if bool(row["ok"]):
      by_id[id_] = i
    else:
      not_ok.append((id_, f"{row['status']}: {row['message']}"))
  return EncoderInputs(by_id, not_ok, sources.PathSource(paths), paths)


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
    y = read_label(element["label"])
    if y.shape != self.grid and self.label_resize == "nearest":
      y = resize_nearest(y, self.grid)
    if y.shape != self.grid:
      raise ValueError(f"label {element['label']} is {y.shape[0]}x"
                       f"{y.shape[1]}, the adapter outputs {self.grid[0]}x"
                       f"{self.grid[1]}")
    ok = np.float32(bool(row["ok"]))
    row["y"] = y * ok
    row["mask"] = np.full(self.grid, ok, np.float32)
    return row


class RequireOk(grain.transforms.Map):
  """A record that could not be read stops training with its path and
  reason (usable records were checked before training)."""

  def map(self, row):
    if not bool(row["ok"]):
      raise ValueError(f"{row['path']!r} is unusable: {row['status']} "
                       f"{row['message']}".strip())
    return row


def encoder_batches(source, rows: EncoderRows, *, seed: int,
                    global_batch: int, num_epochs: int, flip: bool = False,
                    flip_vertical: bool = False, num_workers: int = 0,
                    read_threads: int = 2, prefetch_batches: int = 2,
                    process_index: int | None = None,
                    process_count: int | None = None):
  """This process's rows [p*L, (p+1)*L) of every global batch
  (`input_pipeline.training_batches`, contiguous): records read and prepared
  in the pipeline, flips drawn per record from (seed, position); the
  iterator state is checkpointable."""
  from efiqa_jax import input_pipeline
  aug = [RequireOk()]
  keys = ("pixels", "y", "mask") if rows.grid is not None else ("pixels",)
  if flip:  # the photograph and its label grid flip together
    aug.append(input_pipeline.RandomFlipRotate(keys, rotate=False))
  if flip_vertical:
    aug.append(VerticalFlip(keys))
  return input_pipeline.training_batches(
      source, global_batch, seed=seed, prepare=rows, augment=aug,
      num_epochs=num_epochs, num_workers=num_workers,
      read_threads=read_threads, prefetch_batches=prefetch_batches,
      process_index=process_index, process_count=process_count,
      contiguous=True)


class VerticalFlip(grain.transforms.RandomMap):
  """Flips the rows of every `keys` array of a row with probability 1/2."""

  def __init__(self, keys=("pixels",)):
    self.keys = tuple(keys)

  def random_map(self, row, rng: np.random.Generator):
    if not rng.integers(2):
      return row
    return dict(row, **{k: np.ascontiguousarray(row[k][::-1])
                        for k in self.keys if k in row})
