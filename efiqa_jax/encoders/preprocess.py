"""Image preprocessing for the ViT encoders (host side, numpy + PIL).

What the encoder sees of a photograph (`--preprocess` of extract,
train-adapter, distill and assess --model student; `PREPROCESS`):
  efiqa  the official path (EFIQA's extract_dino.py and the HF Space demo):
         the whole decoded photograph, PIL bicubic resize to (size, size)
         (aspect not kept), /255, ImageNet mean/std. Token (i, j) and every
         map cell cover the same fraction of the photograph's rows and
         columns: the "photograph frame".
  fov    the FOV crop: `fundus.prepare_fundus(path, work_size)` (square
         around the field of view, zero outside it, area-resampled to
         work_size) and then the same resize and normalisation: the "crop
         frame" of the teacher and its pseudo-labels.

Resize/normalisation modes (`preprocess(mode=)`, all float32 NHWC, RGB):
  efiqa        EFIQA's feature extraction (penway/EFIQA extract_dino.py):
               PIL RGB -> PIL bicubic resize to (size, size) (aspect not
               kept) -> /255 -> ImageNet mean/std. The default.
  hf_dinov3    HF DINOv3ViTImageProcessor: /255 -> bilinear antialiased
               resize of the float image to (size, size) -> ImageNet mean/std.
  hf_dinov2    HF BitImageProcessor (DINOv2; also RETFound's eval transform):
               PIL bicubic resize of the shortest edge to int(size / 0.875)
               (256 for 224) -> center crop (size, size) -> /255 -> ImageNet.
  timm_augreg  timm augreg ViTs: PIL bicubic shortest edge floor(size / 0.9)
               -> torchvision-style center crop -> /255 -> mean = std = 0.5.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("efiqa", "hf_dinov3", "hf_dinov2", "timm_augreg")
PREPROCESS = ("efiqa", "fov")
# extract / train-adapter / distill: our pseudo-labels are on the FOV crop.
DEFAULT_PREPROCESS = "fov"


def check_preprocess(name: str) -> str:
  if name not in PREPROCESS:
    raise ValueError(f"preprocess must be one of {PREPROCESS}, got {name!r}")
  return name


def describe(preprocess: str, size: int, work_size: int | None = None) -> str:
  """The chain in words (metadata.json, adapter sidecars)."""
  if check_preprocess(preprocess) == "fov":
    return (f"prepare_fundus(work_size={work_size}): square FOV crop "
            f"(zero-padded, zero outside the FOV, area resampled to "
            f"{work_size}) -> PIL bicubic resize to {size}x{size} -> /255 -> "
            "ImageNet mean/std")
  return (f"decode_image (full resolution) -> whole photograph, PIL bicubic "
          f"resize to {size}x{size} (aspect not kept) -> /255 -> ImageNet "
          "mean/std (EFIQA extract_dino.py, the HF demo)")


def record(preprocess: str, size: int, work_size: int | None = None) -> dict:
  """What an adapter (or a feature folder) records about its inputs."""
  out = {"preprocess": check_preprocess(preprocess), "size": int(size),
         "preprocessing": describe(preprocess, size, work_size)}
  if preprocess == "fov" and work_size is not None:
    out["work_size"] = int(work_size)
  return out


def recorded_preprocess(meta: dict) -> str | None:
  """The preprocessing an adapter sidecar (or extract metadata.json)
  records; for files written before the setting existed: `crop` true/false
  (extract, train-adapter), a ported official adapter (`efiqa port
  adapter|sa_cnn`: efiqa), the reference extractor's metadata (`model_id`:
  efiqa). None when nothing says."""
  feats = meta.get("features") if isinstance(meta.get("features"), dict) \
      else meta
  p = feats.get("preprocess")
  if p in PREPROCESS:
    return p
  if isinstance(feats.get("crop"), bool):
    return "fov" if feats["crop"] else "efiqa"
  fmt = str((meta.get("source") or {}).get("format", ""))
  if any(k in fmt for k in ("sc_linear", "demo", "sa_cnn")):
    return "efiqa"
  if "model_id" in feats and "image_size" in feats:
    return "efiqa"
  return None


def _to_pil(image):
  from PIL import Image
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  if isinstance(image, (str, os.PathLike)):
    import io  # pylint: disable=g-import-not-at-top
    from efiqa_jax import files  # pylint: disable=g-import-not-at-top
    with Image.open(io.BytesIO(files.read_bytes(image))) as im:
      return im.convert("RGB")
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    raise TypeError(f"expected a uint8 image, got {arr.dtype} (scale floats "
                    "to 0..255 and cast first)")
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, axis=-1)
  if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
    raise ValueError(f"expected (H, W, 3) RGB, got shape {arr.shape}")
  return Image.fromarray(arr[..., :3])


def _normalize(x: np.ndarray, mean, std) -> np.ndarray:
  return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
          ).astype(np.float32)


def _shortest_edge(img, edge: int):
  from PIL import Image
  w, h = img.size
  if w <= h:
    nw, nh = edge, int(edge * h / w)
  else:
    nw, nh = int(edge * w / h), edge
  return img.resize((nw, nh), Image.BICUBIC)


def _resize_bilinear_aa(x: np.ndarray, size: int) -> np.ndarray:
  """Antialiased bilinear resize of a float (H, W, C) image (torch's
  interpolate(mode='bilinear', antialias=True), which the HF DINOv3
  processor uses through torchvision)."""
  import jax
  import jax.numpy as jnp
  out = jax.image.resize(jnp.asarray(x), (size, size, x.shape[-1]),
                         method="linear", antialias=True)
  return np.asarray(out, np.float32)


def preprocess(image, size: int = 224, mode: str = "efiqa", *,
               mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> np.ndarray:
  """One image (path, PIL image or uint8 (H, W, 3) array) -> (size, size, 3)
  float32 normalised, ready for `VisionTransformer`."""
  from PIL import Image
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if size < 1:
    raise ValueError(f"size must be positive, got {size}")
  img = _to_pil(image)
  mean = IMAGENET_MEAN if mean is None and mode != "timm_augreg" else mean
  std = IMAGENET_STD if std is None and mode != "timm_augreg" else std
  if mode == "efiqa":
    x = np.asarray(img.resize((size, size), Image.BICUBIC), np.float32)
    return _normalize(x / np.float32(255), mean, std)
  if mode == "hf_dinov3":
    x = np.asarray(img, np.float32) * np.float32(1 / 255)
    return _normalize(_resize_bilinear_aa(x, size), mean, std)
  if mode == "hf_dinov2":
    img = _shortest_edge(img, int(size / 0.875))
    w, h = img.size
    top, left = (h - size) // 2, (w - size) // 2  # HF center_crop
    x = np.asarray(img, np.float32)[top:top + size, left:left + size]
    return _normalize(x * np.float32(1 / 255), mean, std)
  # timm_augreg
  img = _shortest_edge(img, math.floor(size / 0.9))
  w, h = img.size
  top = int(round((h - size) / 2.0))  # torchvision CenterCrop
  left = int(round((w - size) / 2.0))
  x = np.asarray(img, np.float32)[top:top + size, left:left + size]
  return _normalize(x / np.float32(255), mean or (0.5,) * 3,
                    std or (0.5,) * 3)


def photograph_fov_mask(fov, h: int, w: int, n: int) -> np.ndarray:
  """(n, n) bool: which samples of an n x n grid over the photograph frame
  (sample (i, j) at original pixel ((j + 0.5) w / n - 0.5, (i + 0.5) h / n -
  0.5)) lie inside the FOV (disc and straight cuts, as
  `fundus.prepare.fov_mask_at`); all True without a circular FOV."""
  if not fov.circular:
    return np.ones((n, n), bool)
  xs = (np.arange(n, dtype=np.float64) + 0.5) * (w / n) - 0.5
  ys = (np.arange(n, dtype=np.float64) + 0.5) * (h / n) - 0.5
  dx, dy = xs[None, :] - fov.cx, ys[:, None] - fov.cy
  m = dx * dx + dy * dy <= fov.r * fov.r
  for a, b, c in fov.cuts:
    m &= a * xs[None, :] + b * ys[:, None] <= c
  return m


def prepare_photograph(source, size: int = 224, work_size: int = 512, *,
                       max_pixels: int | None = None):
  """The `efiqa` input of one photograph. Never raises.

  Returns (prepared, encoder_image): `fundus.Prepared` on the photograph
  frame -- image (work_size, work_size, 3) uint8, the whole photograph area-
  resampled to a square (for maps and overlays), fov_mask on the same grid,
  fov in original pixels, no crop square (crop_x0 = crop_y0 = crop_size =
  -1) -- and the encoder's (size, size, 3) uint8 input: the full-resolution
  photograph, PIL bicubic (the reference's resize; `preprocess(...,
  'efiqa')` of it only normalises). A photograph without a field of view
  (blank, too small) or refused by the fundus gate (not_fundus) fails as in
  the FOV path; encoder_image is then None.
  """
  from PIL import Image
  from efiqa_jax import fundus
  from efiqa_jax.fundus import fov as ffov
  from efiqa_jax.fundus import gate as fgate
  from efiqa_jax.fundus import io as fio
  path = ("<bytes>" if isinstance(source, (bytes, bytearray, memoryview))
          else str(source))
  try:
    dec = fio.decode_image(source, max_pixels=(
        fio.DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels))
    oh = int(dec.meta.get("height", 0) or 0)
    ow = int(dec.meta.get("width", 0) or 0)
    base = dict(path=path, orig_h=oh, orig_w=ow, size=work_size,
                meta=dec.meta, crop_x0=-1, crop_y0=-1, crop_size=-1)
    if not dec.ok:
      return fundus.Prepared(status=dec.status, message=dec.message,
                             **base), None
    img = dec.image
    h, w = img.shape[:2]
    fov = ffov.detect_fov(img)
    if not fov.ok:
      return fundus.Prepared(status=fov.status, message=fov.message, fov=fov,
                             **base), None
    gate = fgate.check(img, fov)  # as prepare_fundus: not_fundus is refused
    if not gate.fundus:
      return fundus.Prepared(status=fundus.NOT_FUNDUS, message="not a colour "
                             f"fundus photograph: {gate.reason}", fov=fov,
                             gate=gate, **base), None
    pil = Image.fromarray(img)
    enc = np.asarray(pil.resize((size, size), Image.BICUBIC))
    shrink = min(h, w) >= work_size
    view = np.asarray(pil.resize(
        (work_size, work_size),
        Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC,
        reducing_gap=2.0 if shrink else None))
    return fundus.Prepared(status="ok", message=fov.message, image=view,
                           fov_mask=photograph_fov_mask(fov, h, w, work_size),
                           fov=fov, gate=gate, **base), enc
  except MemoryError as e:
    return fundus.Prepared(path=path, status="too_large",
                           message=f"out of memory: {e}"), None
  except Exception as e:  # pylint: disable=broad-except
    return fundus.Prepared(path=path, status="error",
                           message=f"unexpected {type(e).__name__}: {e}"), None


def preprocess_batch(images: Sequence, size: int = 224, mode: str = "efiqa",
                     **kw) -> np.ndarray:
  """Stack `preprocess` over images -> (B, size, size, 3) float32."""
  return np.stack([preprocess(im, size, mode, **kw) for im in images])
