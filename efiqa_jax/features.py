"""Patch features of a frozen ViT encoder for many photographs (`efiqa extract`).

Input chain for one photograph (crop mode, the default):
  1. `fundus.prepare_fundus(path, work_size)`: decode, find the FOV, take the
     square crop around it (crop_x0, crop_y0, crop_size in original pixels;
     zero padding outside the image), area-resample it to
     work_size x work_size (512) and zero everything outside the FOV;
  2. EFIQA's feature preprocessing on that uint8 crop
     (`encoders.preprocess.preprocess(mode='efiqa')`): PIL bicubic resize to
     size x size (224), /255, ImageNet mean/std;
  3. the encoder's `patch_features`: normalised patch tokens (gh, gw, D).
With `crop=False` step 1 is just `fundus.decode_image` and step 2 resizes the
whole photograph to size x size (aspect not kept), as the reference
extractor does.

Outputs in `out_dir`:
  <id>.npy        (gh, gw, D) float32/float16 per image (format "npy"), or
  features-*.array_record  (format "arrayrecord"): one record per image, the
                  bytes of `np.savez(id=<str>, index=<int64>, features=...)`;
                  read them with `iter_arrayrecord`;
  manifest.csv    one row per input, in input order: image, id, status,
                  message, crop_x0, crop_y0, crop_size, orig_h, orig_w, file;
  metadata.json   encoder, source (checkpoint sidecar), size, dtypes, the
                  preprocessing chain, grid, versions.
  .rows/p<k>.jsonl  the per-process journal the manifest is built from.

Exactly once, multi-host: inputs are split by `input_pipeline.
inference_batches` (strided, padded), each jitted step runs on the global
batch (data-parallel over the mesh's 'data' axis, parameters replicated or
sharded by rules), and each process writes only the valid rows it fed
(`sharding.to_host_local`).

Resumable: a unit of output (one .npy, or one ArrayRecord shard) is written
to a temporary name and renamed; its journal rows are appended after the
rename. On restart, an id counts as done when its journal row says ok for
the same path and its file is present (and, for .npy, has the expected
shape and dtype); everything else is recomputed.
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import glob as glob_lib
import io
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from efiqa_jax import sources

MANIFEST = "manifest.csv"
METADATA = "metadata.json"
ROWS_DIR = ".rows"
MANIFEST_FIELDS = ("image", "id", "status", "message", "crop_x0", "crop_y0",
                   "crop_size", "orig_h", "orig_w", "file")
FORMATS = ("npy", "arrayrecord")
# metadata keys that must agree when resuming into an existing folder.
_RESUME_KEYS = ("encoder_sha", "size", "work_size", "crop", "dtype",
                "save_dtype", "format", "grid")


# ------------------------------------------------------------ input transform


class PrepareEncoderInput(sources.PrepareFundus):
  """Raw record -> row with `pixels` (size, size, 3) float32, normalised.

  crop=True: FOV crop at `work_size` (PrepareFundus) then EFIQA
  preprocessing; crop=False: whole decoded photograph, EFIQA preprocessing.
  Rows keep the pipeline schema except the uint8 `image`/`fov_mask`, which
  are dropped (the encoder does not need them).
  """

  def __init__(self, size: int = 224, *, work_size: int = 512,
               crop: bool = True, mode: str = "efiqa", **load_opts):
    super().__init__(work_size, **load_opts)
    self.enc_size = int(size)
    self.crop = bool(crop)
    self.mode = mode

  def blank(self, status: str, message: str = "", path: str = "") -> dict:
    row = sources.blank_row(1, status, message, path)
    del row["image"], row["fov_mask"]
    row["pixels"] = np.zeros((self.enc_size, self.enc_size, 3), np.float32)
    return row

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    from efiqa_jax.encoders import preprocess as pp
    if self.crop:
      full = super().map(element)  # never raises for prepare_fundus
      row = self.blank(full["status"], full["message"], full["path"])
      row["crop"], row["fov"] = full["crop"], full["fov"]
      if bool(full["ok"]):
        row["pixels"] = pp.preprocess(full["image"], self.enc_size, self.mode)
        row["ok"] = np.bool_(True)
      return row
    from efiqa_jax import fundus
    src = element[self.source_key]
    path = element.get("path", src if isinstance(src, str) else "")
    opts = {k: v for k, v in self.load_opts.items() if k == "max_pixels"}
    dec = fundus.decode_image(src, **opts)
    row = self.blank(dec.status, dec.message or "", path)
    if dec.image is not None and dec.status == "ok":
      h, w = dec.image.shape[:2]
      row["crop"] = np.array([-1, -1, -1, h, w], np.int32)
      row["pixels"] = pp.preprocess(dec.image, self.enc_size, self.mode)
      row["ok"] = np.bool_(True)
    return row


# ------------------------------------------------------- parameter sharding


def parse_param_rules(rules: Sequence[Any] | None
                      ) -> list[tuple[str, tuple]]:
  """Rules as (regex, partition spec tuple); strings are Python literals.

  e.g. "('.*mlp.*kernel', (None, 'model'))". A spec entry is None, an axis
  name or a tuple of axis names."""
  out = []
  for r in rules or ():
    val = ast.literal_eval(r) if isinstance(r, str) else r
    if (not isinstance(val, (tuple, list)) or len(val) != 2
        or not isinstance(val[0], str)
        or not isinstance(val[1], (tuple, list))):
      raise ValueError(f"parameter sharding rule {r!r} is not "
                       "(regex, (axis|None, ...))")
    re.compile(val[0])
    out.append((val[0], tuple(tuple(a) if isinstance(a, list) else a
                              for a in val[1])))
  return out


def param_specs(state_dict: dict, rules: Sequence[tuple[str, tuple]],
                mesh) -> dict:
  """Pure param dict -> same-shaped dict of PartitionSpecs (first rule whose
  regex matches the '/'-joined path with re.search wins; else replicated).
  Errors name the parameter when a rule does not fit its shape."""
  import jax
  from jax.sharding import PartitionSpec as P

  def spec(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    for pat, sp in rules:
      if re.search(pat, name):
        shape = np.shape(leaf)
        if len(sp) > len(shape):
          raise ValueError(f"rule {pat!r} spec {sp} has more entries than "
                           f"{name} has dimensions {shape}")
        for dim, ax in zip(shape, sp):
          if ax is None:
            continue
          axes = ax if isinstance(ax, tuple) else (ax,)
          for a in axes:
            if a not in mesh.axis_names:
              raise ValueError(f"rule {pat!r}: axis {a!r} not in mesh "
                               f"{mesh.axis_names}")
          n = int(np.prod([mesh.shape[a] for a in axes]))
          if dim % n:
            raise ValueError(f"rule {pat!r}: {name} dim {dim} of {shape} "
                             f"is not divisible by {axes} ({n})")
        return P(*sp)
    return P()

  return jax.tree_util.tree_map_with_path(spec, state_dict)


def shard_model(model, mesh, rules: Sequence[tuple[str, tuple]] = ()):
  """(graphdef, state) with every array placed on `mesh` by `rules`.

  Uses `make_array_from_callback`, which works when the mesh spans other
  processes (every process holds the full host copy of the weights)."""
  import jax
  from flax import nnx
  from jax.sharding import NamedSharding

  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  specs = param_specs(pure, rules, mesh)

  def place(x, sp):
    host = np.asarray(jax.device_get(x))
    sh = NamedSharding(mesh, sp)
    return jax.make_array_from_callback(host.shape, sh, lambda i: host[i])

  placed = jax.tree.map(place, pure, specs,
                        is_leaf=lambda x: not isinstance(x, dict))
  nnx.replace_by_pure_dict(state, placed)
  return graphdef, state


def place_frozen_encoder(model, mesh, rules: Sequence[tuple[str, tuple]] = ()):
  """`shard_model` for a frozen encoder that is only run.

  Replicated (no rules), a ViT runs in its inference form
  (`kernels.vit_inference.inference_model`: q/k/v fused, kernels held
  (out, in); the same outputs, faster). With rules it keeps the checkpoint's
  parameter tree, which the rules name."""
  if not rules and getattr(model, "ARCH", None) == "vit":
    from efiqa_jax.kernels import vit_inference  # pylint: disable=g-import-not-at-top
    model = vit_inference.inference_model(model)
  return shard_model(model, mesh, rules)


# ------------------------------------------------------------------- outputs


def _atomic_save_npy(path: str, arr: np.ndarray) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    np.save(f, arr)
  os.replace(tmp, path)


def _npy_ok(path: str, shape: tuple, dtype: np.dtype) -> bool:
  try:
    a = np.load(path, mmap_mode="r")
    return tuple(a.shape) == tuple(shape) and a.dtype == dtype
  except Exception:  # pylint: disable=broad-except
    return False


def encode_record(id_: str, index: int, features: np.ndarray) -> bytes:
  """One ArrayRecord record: the bytes of an .npz with id, index, features."""
  buf = io.BytesIO()
  np.savez(buf, id=np.str_(id_), index=np.int64(index), features=features)
  return buf.getvalue()


def decode_record(data: bytes) -> tuple[str, int, np.ndarray]:
  with np.load(io.BytesIO(data)) as z:
    return str(z["id"]), int(z["index"]), np.array(z["features"])


def iter_arrayrecord(out_dir: str | os.PathLike
                     ) -> Iterator[tuple[str, int, np.ndarray]]:
  """(id, input index, features) of every image, once.

  Only records that the journal attributes to their shard are yielded: an
  image recomputed after a kill (its first shard renamed but not yet
  journaled) can sit in two shards, and the journal says which one counts."""
  from array_record.python.array_record_module import ArrayRecordReader
  out_dir = os.fspath(out_dir)
  journal = _read_journal(out_dir)
  for path in sorted(glob_lib.glob(os.path.join(out_dir,
                                                "features-*.array_record"))):
    name = os.path.basename(path)
    reader = ArrayRecordReader(path)
    try:
      for i in range(reader.num_records()):
        id_, index, feats = decode_record(reader.read([i])[0])
        r = journal.get(id_)
        if r is not None and r.get("status") == "ok" and r.get("file") == name:
          yield id_, index, feats
    finally:
      reader.close()


class _ShardWriter:
  """ArrayRecord shards of at most `shard_size` records, tmp-then-rename;
  journal rows of a shard are released only after its rename."""

  def __init__(self, out_dir: str, tag: str, shard_size: int, journal):
    self.out_dir, self.tag, self.shard_size = out_dir, tag, shard_size
    self.journal = journal
    self.k = 0
    self.writer = None
    self.pending: list[dict] = []

  def add(self, id_: str, index: int, feats: np.ndarray, row: dict):
    from array_record.python.array_record_module import ArrayRecordWriter
    if self.writer is None:
      self.name = f"features-{self.tag}-{self.k:05d}.array_record"
      self.tmp = os.path.join(self.out_dir, self.name + ".tmp")
      self.writer = ArrayRecordWriter(self.tmp, "group_size:1")
    self.writer.write(encode_record(id_, index, feats))
    self.pending.append(dict(row, file=self.name))
    if len(self.pending) >= self.shard_size:
      self.close()

  def close(self):
    if self.writer is None:
      return
    self.writer.close()
    os.replace(self.tmp, os.path.join(self.out_dir, self.name))
    for r in self.pending:
      self.journal(r)
    self.writer, self.pending = None, []
    self.k += 1


def _read_journal(out_dir: str) -> dict[str, dict]:
  """Latest journal row per id over every process and run."""
  rows: dict[str, dict] = {}
  for f in sorted(glob_lib.glob(os.path.join(out_dir, ROWS_DIR, "*.jsonl"))):
    with open(f) as fh:
      for line in fh:
        line = line.strip()
        if not line:
          continue
        try:
          r = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by a kill
        old = rows.get(r["id"])
        if old is None or r["t"] >= old["t"]:
          rows[r["id"]] = r
  return rows


def _versions() -> dict:
  import flax
  import jax
  import efiqa_jax
  return {"jax": jax.__version__, "flax": flax.__version__,
          "numpy": np.__version__, "efiqa_jax": efiqa_jax.__version__}


def chain_description(size: int, work_size: int, crop: bool) -> str:
  if crop:
    return (f"prepare_fundus(work_size={work_size}): square FOV crop "
            f"(zero-padded, zero outside the FOV, area resampled to "
            f"{work_size}) -> PIL bicubic resize to {size}x{size} -> /255 -> "
            "ImageNet mean/std")
  return (f"decode_image -> whole photograph, PIL bicubic resize to "
          f"{size}x{size} (aspect not kept) -> /255 -> ImageNet mean/std")


@dataclasses.dataclass
class ExtractResult:
  n: int
  written: int        # feature files/records written in this run (this process)
  skipped: int        # already done before this run (all processes)
  failed: int         # status rows other than ok (this process, this run)
  manifest: str
  metadata: dict


def recorded_input_size(meta: dict, default: int = 224) -> int:
  """The input side an encoder's sidecar records: what `efiqa
  pretrain-encoder` trained it at, or what `efiqa port` says EFIQA feeds it;
  else `default` (224, the paper's)."""
  for pre in (meta.get("pretraining", {}).get("preprocessing", {}),
              meta.get("preprocessing", {}).get("efiqa", {})):
    if isinstance(pre, dict) and pre.get("size"):
      return int(pre["size"])
  return int(default)


def extract_features(inputs: Sequence[str] | str, encoder: str | os.PathLike,
                     out_dir: str | os.PathLike, *, size: int | None = None,
                     work_size: int = 512, crop: bool = True,
                     dtype: str = "float32", save_dtype: str = "float32",
                     batch_size: int = 32, fmt: str = "npy",
                     mesh_axes: Sequence[tuple[str, int]] | None = None,
                     param_sharding: Sequence[Any] | None = None,
                     shard_size: int = 4096, read_threads: int = 4,
                     num_workers: int = 0,
                     matmul_precision: str | None = None,
                     max_steps: int | None = None,
                     progress: bool = False) -> ExtractResult:
  """Patch features of every input with the encoder checkpoint `encoder`.

  Args:
    inputs: files, folders, globs, CSVs with a `path` column
      (`sources.list_inputs`); ids are `sources.unique_ids` of the paths.
    encoder: an efiqa model directory holding a `vit` (`efiqa port ...`).
    size: encoder input side (multiple of the patch size); None: the size
      the encoder records (`recorded_input_size`), else 224.
    work_size: side of the FOV crop before the encoder resize (crop mode).
    crop: FOV crop (default) or the whole photograph.
    dtype: compute dtype (float32 | bfloat16); with bfloat16 the frozen
      kernels are held in bfloat16 (`checkpoints.cast_frozen_kernels`).
    save_dtype: float32 | float16 on disk.
    batch_size: global batch; rounded up to a multiple of the data shards
      and processes.
    fmt: "npy" (one file per image) or "arrayrecord" (shards).
    mesh_axes: e.g. [("data", -1), ("model", 2)]; default all devices on
      'data'. The batch is split over 'data' only.
    param_sharding: rules "(regex, spec)" for parameters over the mesh
      (ViT-7B); unmatched parameters are replicated.
    matmul_precision: jax matmul precision; default "float32" for float32
      compute (no TF32 on GPU), "default" for bfloat16.
    max_steps: stop after this many steps (tests simulate a kill with it).
  Returns ExtractResult. The manifest is rebuilt (process 0) at the end.
  """
  import hashlib
  import math

  import jax
  import jax.numpy as jnp
  from jax.experimental import multihost_utils

  from efiqa_jax import checkpoints
  from efiqa_jax import input_pipeline as ip
  from efiqa_jax import sharding as sh

  if fmt not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
  if save_dtype not in ("float32", "float16"):
    raise ValueError(f"save_dtype must be float32 or float16, got "
                     f"{save_dtype!r}")
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
  out_dir = os.path.abspath(os.fspath(out_dir))
  encoder = os.path.abspath(os.fspath(encoder))
  paths = sources.list_inputs(inputs)
  if not paths:
    raise ValueError("no inputs")
  ids = sources.unique_ids(paths)

  model, enc_meta = checkpoints.load_model(encoder, dtype=dtype,
                                          frozen=True, kind="encoder")
  if getattr(model, "ARCH", None) != "vit":
    raise ValueError(f"{encoder} holds a {enc_meta['architecture']!r} model; "
                     "extract needs a ViT encoder (efiqa port dinov3 ...)")
  p = model.cfg["patch_size"]
  if size is None:
    size = recorded_input_size(enc_meta)
  if size % p:
    raise ValueError(f"size {size} is not a multiple of the patch size {p}")
  gh = gw = size // p
  grid = [gh, gw, model.cfg["hidden_size"]]
  sdt = np.dtype(save_dtype)

  mesh = sh.make_mesh(mesh_axes)
  dsh = sh.data_sharding(mesh)
  pc, pi = jax.process_count(), jax.process_index()
  unit = math.lcm(sh.batch_shards(dsh), pc)
  gbatch = -(-int(batch_size) // unit) * unit

  side = os.path.join(encoder, checkpoints.SIDECAR)
  with open(side, "rb") as f:
    enc_sha = hashlib.sha256(f.read()).hexdigest()
  meta = {
      "encoder": encoder, "encoder_sha": enc_sha,
      "architecture": enc_meta["architecture"], "kwargs": enc_meta["kwargs"],
      "source": enc_meta.get("source"), "size": size, "work_size": work_size,
      "crop": crop, "preprocessing": chain_description(size, work_size, crop),
      "dtype": dtype, "save_dtype": save_dtype, "format": fmt, "grid": grid,
      "token_order": "patch tokens after the final norm, row-major (gh, gw, D)",
      "batch_size": gbatch, "mesh": dict(mesh.shape),
      "matmul_precision": matmul_precision or (
          "float32" if dtype == "float32" else "default"),
      "param_sharding": [list(r) for r in parse_param_rules(param_sharding)],
      "versions": _versions(),
  }
  os.makedirs(os.path.join(out_dir, ROWS_DIR), exist_ok=True)
  meta_path = os.path.join(out_dir, METADATA)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      old = json.load(f)
    bad = {k: (old.get(k), meta[k]) for k in _RESUME_KEYS
           if json.dumps(old.get(k)) != json.dumps(meta[k])}
    if bad:
      raise ValueError(f"{out_dir} holds features made with other settings "
                       f"(stored, requested): {bad}; use another --out")

  # Done ids: journal says ok for the same path and the file is there.
  journal = _read_journal(out_dir)
  done = set()
  for i, (pth, id_) in enumerate(zip(paths, ids)):
    r = journal.get(id_)
    if not r or r["status"] != "ok" or r["image"] != pth:
      continue
    f = os.path.join(out_dir, r["file"])
    if fmt == "npy" and _npy_ok(f, grid, sdt):
      done.add(i)
    elif fmt == "arrayrecord" and os.path.isfile(f):
      done.add(i)
  if pi == 0:  # temporaries of a killed run (nobody writes before the barrier)
    for f in (glob_lib.glob(os.path.join(out_dir, "*.npy.tmp-*"))
              + glob_lib.glob(os.path.join(out_dir, "*.array_record.tmp"))):
      os.remove(f)
  # Every process must see the same `done` before anyone writes.
  multihost_utils.sync_global_devices("efiqa_extract_scan")
  if pi == 0:
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, meta_path)

  todo = [i for i in range(len(paths)) if i not in done]
  rows_file = open(os.path.join(out_dir, ROWS_DIR, f"p{pi}.jsonl"), "a")

  def log_row(r: dict):
    rows_file.write(json.dumps(r) + "\n")
    rows_file.flush()

  written = failed = 0
  shards = (_ShardWriter(out_dir, f"{int(time.time() * 1e3)}-p{pi}",
                         shard_size, log_row) if fmt == "arrayrecord" else None)
  try:
    if todo:
      rules = parse_param_rules(param_sharding)
      graphdef, state = place_frozen_encoder(model, mesh, rules)
      from flax import nnx

      def fwd(state, x):
        m = nnx.merge(graphdef, state)
        return m.patch_features(x).astype(jnp.dtype(save_dtype))

      step = jax.jit(fwd, out_shardings=dsh)
      # float32 means float32: GPUs would otherwise use TF32 matmuls (the
      # PyTorch references do not), costing ~1e-3 of parity.
      prec = matmul_precision or ("float32" if dtype == "float32"
                                  else "default")
      prep = PrepareEncoderInput(size, work_size=work_size, crop=crop)
      batches = ip.inference_batches(
          [paths[i] for i in todo], gbatch, prepare=prep, sharding=dsh,
          read_threads=read_threads, num_workers=num_workers)
      it = batches
      if progress and pi == 0:
        from tqdm import tqdm
        it = tqdm(batches, total=batches.steps, desc="extract")
      for k, host in enumerate(it):
        if max_steps is not None and k >= max_steps:
          break
        g = sh.to_global(host, dsh, keys=["pixels"])
        with jax.default_matmul_precision(prec):
          feats = sh.to_host_local(step(state, g["pixels"]))
        for j in range(len(host["valid"])):
          if not host["valid"][j]:
            continue
          i = todo[int(host["index"][j])]
          c = host["crop"][j]
          row = {"image": paths[i], "id": ids[i], "index": i,
                 "status": str(host["status"][j]),
                 "message": str(host["message"][j]),
                 "crop_x0": int(c[0]), "crop_y0": int(c[1]),
                 "crop_size": int(c[2]), "orig_h": int(c[3]),
                 "orig_w": int(c[4]), "file": "", "t": time.time()}
          if not crop:
            row.update(crop_x0="", crop_y0="", crop_size="")
          if not host["ok"][j]:
            # No crop for a failed photograph; keep the size if it was read.
            row.update(crop_x0="", crop_y0="", crop_size="")
            if row["orig_h"] <= 0:
              row.update(orig_h="", orig_w="")
            failed += 1
            log_row(row)
            continue
          f = np.asarray(feats[j], sdt)
          if fmt == "npy":
            name = f"{ids[i]}.npy"
            _atomic_save_npy(os.path.join(out_dir, name), f)
            log_row(dict(row, file=name))
          else:
            shards.add(ids[i], i, f, row)
          written += 1
    if shards is not None:
      shards.close()
  finally:
    rows_file.close()

  multihost_utils.sync_global_devices("efiqa_extract_done")
  manifest = os.path.join(out_dir, MANIFEST)
  if pi == 0:
    write_manifest(out_dir, paths, ids)
  multihost_utils.sync_global_devices("efiqa_extract_manifest")
  return ExtractResult(n=len(paths), written=written, skipped=len(done),
                       failed=failed, manifest=manifest, metadata=meta)


def write_manifest(out_dir: str, paths: Sequence[str], ids: Sequence[str]
                   ) -> str:
  """manifest.csv in input order from the journal; inputs without a row
  (a run stopped early) get status 'pending'."""
  journal = _read_journal(out_dir)
  path = os.path.join(out_dir, MANIFEST)
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
    w.writeheader()
    for pth, id_ in zip(paths, ids):
      r = journal.get(id_)
      if r is None or r["image"] != pth:
        r = {"image": pth, "id": id_, "status": "pending",
             "message": "not processed yet (run extract again)"}
      w.writerow({k: r.get(k, "") for k in MANIFEST_FIELDS})
  os.replace(tmp, path)
  return path


def read_manifest(out_dir: str | os.PathLike) -> list[dict]:
  with open(os.path.join(os.fspath(out_dir), MANIFEST), newline="") as f:
    return list(csv.DictReader(f))
