"""Image preprocessing for the ViT encoders (host side, numpy + PIL).

Modes (all return float32 NHWC, channels RGB):
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


def preprocess_batch(images: Sequence, size: int = 224, mode: str = "efiqa",
                     **kw) -> np.ndarray:
  """Stack `preprocess` over images -> (B, size, size, 3) float32."""
  return np.stack([preprocess(im, size, mode, **kw) for im in images])
