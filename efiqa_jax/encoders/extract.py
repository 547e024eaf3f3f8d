"""Patch features of a frozen ViT encoder for many photographs (`efiqa extract`).

Input chain for one photograph (`preprocess`, `encoders.preprocess.PREPROCESS`):
  fov (the default): 1. `fundus.prepare_fundus(path, work_size)`: decode,
     find the FOV, take the square crop around it (crop_x0, crop_y0,
     crop_size in original pixels; zero padding outside the image),
     area-resample it to work_size x work_size (512) and zero everything
     outside the FOV; 2. EFIQA's resize and normalisation on that uint8
     crop (`encoders.preprocess.preprocess(mode='efiqa')`): PIL bicubic
     resize to size x size (224), /255, ImageNet mean/std;
  efiqa: the reference extractor (EFIQA extract_dino.py) exactly: the whole
     photograph decoded at full resolution, PIL bicubic resize to size x
     size (aspect not kept), /255, ImageNet mean/std; no FOV is looked for
     and the manifest's crop columns are empty;
then the encoder's `patch_features`: normalised patch tokens (gh, gw, D).

Outputs in `out_dir`:
  <id>.npy        (gh, gw, D) float32/float16 per image (format "npy"), or
  features-*.array_record  (format "arrayrecord"): one record per image, the
                  bytes of `np.savez(id=<str>, index=<int64>, features=...)`;
                  read them with `iter_arrayrecord`;
  manifest.csv    one row per input, in input order: image, id, status,
                  message, crop_x0, crop_y0, crop_size, orig_h, orig_w, file;
  metadata.json   encoder, source (checkpoint sidecar), size, dtypes, the
                  preprocessing chain, grid, versions.
  run.json        the settings that change results (fingerprint).
  .journal/       the per-process journals the manifest is built from.

Runs on the inference driver (`efiqa_jax.driver`). Exactly once,
multi-host: the todo list is decided once by process 0, split strided and
padded by `input_pipeline.inference_batches`, each jitted step runs on the
global batch (data-parallel over the mesh's 'data' axis, parameters
replicated or sharded by rules), and each process writes only the valid
rows it fed (`sharding.to_host_local`).

Resumable: a unit of output (one .npy, or one ArrayRecord shard) is written
to a temporary name and renamed; its journal rows are appended after the
rename. On restart, an id counts as done when its journal row says ok for
the same path and its file is present; everything else is recomputed.
Other settings (encoder, size, crop, dtypes, format) are refused with the
difference unless overwrite=True.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from efiqa_jax import files
from efiqa_jax import sources

MANIFEST = "manifest.csv"
METADATA = "metadata.json"
MANIFEST_FIELDS = ("image", "id", "status", "message", "crop_x0", "crop_y0",
                   "crop_size", "orig_h", "orig_w", "file")
FORMATS = ("npy", "arrayrecord")
# metadata keys that must agree when resuming into an existing folder.
_RESUME_KEYS = ("encoder_sha", "size", "work_size", "preprocess", "dtype",
                "save_dtype", "format", "grid")


# ------------------------------------------------------------ input transform


class PrepareEncoderInput(sources.PrepareFundus):
  """Raw record -> row with `pixels` (size, size, 3) float32, normalised.

  preprocess='fov': FOV crop at `work_size` (PrepareFundus) then EFIQA's
  resize and normalisation; 'efiqa': the whole decoded photograph, the same
  resize and normalisation (the reference extractor). Rows keep the
  pipeline schema except the uint8 `image`/`fov_mask`, which are dropped
  (the encoder does not need them).
  """

  def __init__(self, size: int = 224, *, work_size: int = 512,
               preprocess: str = "fov", mode: str = "efiqa", **load_opts):
    from efiqa_jax.encoders import preprocess as pp
    super().__init__(work_size, **load_opts)
    self.enc_size = int(size)
    self.preprocess = pp.check_preprocess(preprocess)
    self.mode = mode

  def blank(self, status: str, message: str = "", path: str = "") -> dict:
    row = sources.blank_row(1, status, message, path)
    del row["image"], row["fov_mask"]
    row["pixels"] = np.zeros((self.enc_size, self.enc_size, 3), np.float32)
    return row

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    from efiqa_jax.encoders import preprocess as pp
    if self.preprocess == "fov":
      full = super().map(element)  # never raises for prepare_fundus
      row = self.blank(full["status"], full["message"], full["path"])
      row["crop"], row["fov"] = full["crop"], full["fov"]
      if bool(full["ok"]):
        row["pixels"] = pp.preprocess(full["image"], self.enc_size, self.mode)
        row["ok"] = np.bool_(True)
      return row
    from efiqa_jax import fundus
    src = (sources.record_source(element) if self.source_key == "path"
           else element[self.source_key])
    path = element.get("path", src if isinstance(src, str) else "")
    opts = {k: v for k, v in self.load_opts.items() if k == "max_pixels"}
    dec = fundus.decode_image(src, **opts)  # full resolution, as the reference
    row = self.blank(dec.status, dec.message or "", path)
    if dec.image is not None and dec.status == "ok":
      h, w = dec.image.shape[:2]
      row["crop"] = np.array([-1, -1, -1, h, w], np.int32)
      row["pixels"] = pp.preprocess(dec.image, self.enc_size, self.mode)
      row["ok"] = np.bool_(True)
    return row


# ------------------------------------------------------------ the encoder


def place_frozen_encoder(model, mesh, rules: Sequence[Any] = ()):
  """`sharding.shard_model` for a frozen encoder that is only run.

  Replicated (the rules shard nothing), a ViT runs in its inference form
  (`kernels.vit_inference.inference_model`: q/k/v fused, kernels held
  (out, in); the same outputs, faster). With rules it keeps the checkpoint's
  parameter tree, which the rules name."""
  from efiqa_jax import sharding
  if getattr(model, "ARCH", None) == "vit" and sharding.replicates_everything(
      model, mesh, rules):
    from efiqa_jax.kernels import vit_inference  # pylint: disable=g-import-not-at-top
    model = vit_inference.inference_model(model)
  return sharding.shard_model(model, mesh, rules)


def load_frozen_encoder(path, *, dtype: str, mesh, rules: Sequence[Any] = ()):
  """(model placed on `mesh`, sidecar meta) of a frozen encoder checkpoint.

  Sharded by rules, the parameters are restored straight into their shards
  (`checkpoints.load_model(mesh=...)`), never whole on one device;
  replicated, the encoder fits a device and takes its inference form
  (`place_frozen_encoder`)."""
  from flax import nnx
  from efiqa_jax import checkpoints
  from efiqa_jax import sharding
  # The kind first (one line naming what `path` holds), before any build.
  meta = checkpoints.check_kind(path, "encoder")
  import jax.numpy as jnp
  abstract = checkpoints.build_abstract(
      meta["architecture"], dict(meta["kwargs"], dtype=jnp.dtype(dtype)))
  if sharding.replicates_everything(abstract, mesh, rules):
    model, meta = checkpoints.load_model(path, dtype=dtype, frozen=True)
    graphdef, state = place_frozen_encoder(model, mesh, rules)
    return nnx.merge(graphdef, state), meta
  return checkpoints.load_model(path, dtype=dtype, frozen=True, mesh=mesh,
                                rules=sharding.parse_param_rules(rules))


# ------------------------------------------------------------------- outputs


def encode_record(id_: str, index: int, features: np.ndarray) -> bytes:
  """One ArrayRecord record: the bytes of an .npz with id, index, features."""
  buf = io.BytesIO()
  np.savez(buf, id=np.str_(id_), index=np.int64(index), features=features)
  return buf.getvalue()


def decode_record(data: bytes) -> tuple[str, int, np.ndarray]:
  with files.NPY_LOCK, np.load(io.BytesIO(data)) as z:
    return str(z["id"]), int(z["index"]), np.array(z["features"])


def iter_arrayrecord(out_dir: str | os.PathLike
                     ) -> Iterator[tuple[str, int, np.ndarray]]:
  """(id, input index, features) of every image, once.

  Only records that the journal attributes to their shard are yielded: an
  image recomputed after a kill (its first shard renamed but not yet
  journaled) can sit in two shards, and the journal says which one counts."""
  from array_record.python.array_record_module import ArrayRecordReader
  out_dir = os.fspath(out_dir)
  from efiqa_jax import files
  journal = files.Journal.read(out_dir)
  for path in files.glob(files.join(out_dir, "features-*.array_record")):
    name = path.rsplit("/", 1)[-1]
    with files.local_copy(path) as local:  # ArrayRecord reads local files
      reader = ArrayRecordReader(local)
      try:
        for i in range(reader.num_records()):
          id_, index, feats = decode_record(reader.read([i])[0])
          r = journal.get(id_)
          if (r is not None and r.get("status") == "ok"
              and r.get("file") == name):
            yield id_, index, feats
      finally:
        reader.close()


def _versions() -> dict:
  import flax
  import jax
  import efiqa_jax
  return {"jax": jax.__version__, "flax": flax.__version__,
          "numpy": np.__version__, "efiqa_jax": efiqa_jax.__version__}


@dataclasses.dataclass
class ExtractResult:
  n: int
  written: int        # feature files/records written in this run (this process)
  skipped: int        # already done before this run (all processes)
  failed: int         # status rows other than ok (this process, this run)
  manifest: str
  metadata: dict
  failed_total: int = 0  # manifest rows other than ok (all processes)


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
                     work_size: int = 512, preprocess: str = "fov",
                     dtype: str = "float32", save_dtype: str = "float32",
                     batch_size: int = 32, fmt: str = "npy",
                     mesh_axes: Sequence[tuple[str, int]] | None = None,
                     param_sharding: Sequence[Any] | None = None,
                     shard_size: int = 4096, read_threads: int = 4,
                     num_workers: int = 0,
                     matmul_precision: str | None = None,
                     max_steps: int | None = None,
                     progress: bool = False,
                     overwrite: bool = False) -> ExtractResult:
  """Patch features of every input with the encoder checkpoint `encoder`.

  Args:
    inputs: files, folders, globs, CSVs with a `path` column
      (`sources.list_inputs`); ids are `sources.unique_ids` of the paths.
    encoder: an efiqa model directory holding a `vit` (`efiqa port ...`).
    size: encoder input side (multiple of the patch size); None: the size
      the encoder records (`recorded_input_size`), else 224.
    work_size: side of the FOV crop before the encoder resize (fov only).
    preprocess: 'fov' (the FOV crop, default) or 'efiqa' (the whole
      photograph: the reference extractor); see the module docstring.
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
  import jax
  import jax.numpy as jnp

  from efiqa_jax import checkpoints
  from efiqa_jax import sharding as sh

  from efiqa_jax.encoders import preprocess as pp
  pp.check_preprocess(preprocess)
  from efiqa_jax import driver

  if fmt not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
  if save_dtype not in ("float32", "float16"):
    raise ValueError(f"save_dtype must be float32 or float16, got "
                     f"{save_dtype!r}")
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
  out_dir = os.fspath(files.abs_path(out_dir))
  encoder = os.fspath(files.abs_path(encoder))
  resolved = sources.resolve_inputs(inputs)  # prepared folders too
  if preprocess == "efiqa":
    resolved.require_photographs("--preprocess efiqa reads whole photographs")
  resolved.check_size(work_size, "--work-size")
  paths, ids = resolved.paths, resolved.ids
  out = driver.output_dir(out_dir)

  mesh = sh.make_mesh(mesh_axes)
  rules = sh.parse_param_rules(param_sharding)
  model, enc_meta = load_frozen_encoder(encoder, dtype=dtype, mesh=mesh,
                                        rules=rules)
  if enc_meta["architecture"] != "vit":
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

  dsh = sh.data_sharding(mesh)
  pi = jax.process_index()
  gbatch = driver.global_batch(batch_size, sh.batch_shards(dsh))

  enc_sha = hashlib.sha256(files.read_bytes(
      files.join(encoder, checkpoints.SIDECAR))).hexdigest()
  prec = matmul_precision or ("float32" if dtype == "float32" else "default")
  meta = {
      "encoder": encoder, "encoder_sha": enc_sha,
      "architecture": enc_meta["architecture"], "kwargs": enc_meta["kwargs"],
      "source": enc_meta.get("source"),
      # size, work_size (fov only), preprocess, preprocessing (the chain).
      **pp.record(preprocess, size, work_size), "work_size": (
          work_size if preprocess == "fov" else None),
      "dtype": dtype, "save_dtype": save_dtype, "format": fmt, "grid": grid,
      "token_order": "patch tokens after the final norm, row-major (gh, gw, D)",
      "batch_size": gbatch, "mesh": dict(mesh.shape),
      "matmul_precision": prec,
      "param_sharding": sh.rules_text(sh.parse_param_rules(param_sharding)),
      "versions": _versions(),
  }

  from flax import nnx
  graphdef, state = nnx.split(model)

  def fwd(state, x):
    m = nnx.merge(graphdef, state)
    return m.patch_features(x).astype(jnp.dtype(save_dtype))

  fwd_jit = jax.jit(fwd, out_shardings=dsh)

  def step(host):
    # Every process calls it on every batch: the mesh may span processes.
    g = sh.to_global(host, dsh, keys=["pixels"])
    # float32 means float32: GPUs would otherwise use TF32 matmuls (the
    # PyTorch references do not), costing ~1e-3 of parity.
    with jax.default_matmul_precision(prec):
      return {"features": sh.to_host_local(fwd_jit(state, g["pixels"]))}

  shards = (files.ShardWriter(out_dir, "features",
                               f"{int(time.time() * 1e3)}-p{pi}", shard_size,
                               name_key="file", record_key="record")
            if fmt == "arrayrecord" else None)

  def write(rec, res):
    c = rec["crop"]
    row = {"status": rec["status"], "message": rec["message"],
           "crop_x0": int(c[0]), "crop_y0": int(c[1]),
           "crop_size": int(c[2]), "orig_h": int(c[3]),
           "orig_w": int(c[4]), "file": ""}
    if preprocess == "efiqa":  # no crop square: the whole photograph
      row.update(crop_x0="", crop_y0="", crop_size="")
    if not rec["ok"]:
      # No crop for a failed photograph; keep the size if it was read.
      row.update(crop_x0="", crop_y0="", crop_size="")
      if row["orig_h"] <= 0:
        row.update(orig_h="", orig_w="")
      return row
    f = np.asarray(res["features"], sdt)
    if fmt == "npy":
      name = f"{rec['id']}.npy"
      driver.write_npy(out / name, f)
      return dict(row, file=name)
    shards.add(encode_record(rec["id"], rec["index"], f),
               dict(row, image=rec["path"], id=rec["id"],
                    index=rec["index"]))
    return None  # journaled when its shard is renamed (`drain`)

  def finish(rows, out):
    write_manifest(out_dir, paths, ids, rows)
    driver.write_atomic(out / METADATA, json.dumps(
        meta, indent=2, sort_keys=True, default=str).encode())

  task = driver.Task(
      command="extract",
      fingerprint={"encoder": files.identity(encoder),
                   **{k: meta[k] for k in _RESUME_KEYS if k != "encoder_sha"}},
      prepare=PrepareEncoderInput(size, work_size=work_size,
                                  preprocess=preprocess),
      step=step, write=write,
      done_files=lambda r: [r.get("file") or "-"],
      clear=("*.npy", "features-*.array_record", MANIFEST, METADATA),
      temporaries=("*.tmp-*", "*.array_record.tmp"),
      finish=finish, drain=None if shards is None else shards.drain,
      unit=sh.batch_shards(dsh), sharding=dsh)
  res = driver.run(task, paths, out, ids=ids, source=resolved.source,
                   batch_size=gbatch,
                   overwrite=overwrite, num_workers=num_workers,
                   read_threads=read_threads, progress=progress,
                   max_steps=max_steps)
  return ExtractResult(n=len(paths), written=res.written - res.failed_here,
                       skipped=res.skipped, failed=res.failed_here,
                       manifest=files.join(out_dir, MANIFEST),
                       metadata=meta, failed_total=res.failed)


def write_manifest(out_dir: str, paths: Sequence[str], ids: Sequence[str],
                   rows: Sequence[dict] | None = None) -> str:
  """manifest.csv in input order from the journal; inputs without a row
  (a run stopped early) get status 'pending'."""
  from efiqa_jax import driver
  from efiqa_jax import files
  if rows is None:
    rows = driver.rows_in_order(out_dir, paths, ids)
  path = files.join(out_dir, MANIFEST)
  driver.write_csv(path, MANIFEST_FIELDS, rows)
  return path


def read_manifest(out_dir: str | os.PathLike) -> list[dict]:
  from efiqa_jax import files
  return files.read_csv(files.join(out_dir, MANIFEST))[1]
