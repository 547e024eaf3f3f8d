"""RRWNet (Morano et al. 2024) and R2-V2 input preparation, Flax NNX, NHWC.

Model (j-morano/rrwnet `model.py`, also used by j-morano/R2-V2):
  first_u   U-Net in_channels -> 3 logits (artery, vein, vessel);
  second_u  U-Net 3 -> 2 logits (artery, vein), applied to sigmoid(first_u),
            then `iterations` more times to [sigmoid(a, v), sigmoid(bv_1)]
            (bv is fixed from the first stage: recursive refinement of a/v).
Every stage's output is [a, v, bv] logits; the prediction is the last one.

R2-V2 ("bv" and "av" models, GAVE 2025): input = enhanced image (3 ch), and
for the bv model additionally the raw colour image in [0, 1] (6 ch). The
enhancement (`r2v2_enhance`) follows R2-V2's `preprocessing.py`: a 1.15x
bicubic zoom fills the border outside the eroded FOV mask (disk 5), the image
minus its Gaussian blur (sigma 10) is divided by its std, min-max scaled to
[0, 1] and stored as uint8, then CLAHE (skimage, clip_limit 0.01). Inference
(`infer.py`) resizes to width 1408 and pads to a multiple of 32; outputs are
sigmoid(logits), zeroed outside the mask.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efiqa_jax.models.unet import UNet

R2V2_WIDTH = 1408  # R2-V2 infer.py resizes every image to this width
R2V2_PAD_MULTIPLE = 32  # pad_images_unet(n_down=5)


class RRWNet(nnx.Module):
  """Two U-Nets with recursive refinement; outputs [a, v, bv] logits."""
  ARCH = "rrwnet"

  def __init__(self, in_channels: int = 3, out_channels: int = 3,
               base_channels: int = 64, iterations: int = 5,
               dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
    if out_channels != 3:
      # The refinement loop feeds [a, v] + bv back: exactly 3 channels.
      raise ValueError(f"RRWNet needs out_channels=3 (a, v, bv), got "
                       f"{out_channels}")
    if iterations < 0:
      raise ValueError(f"iterations must be >= 0, got {iterations}")
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.base_channels = base_channels
    self.iterations = iterations
    self.dtype = dtype
    self.first_u = UNet(in_channels, out_channels, base_channels,
                        residual=False, dtype=dtype, rngs=rngs)
    self.second_u = UNet(out_channels, 2, base_channels, residual=False,
                         dtype=dtype, rngs=rngs)

  def config(self) -> dict:
    return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                base_channels=self.base_channels, iterations=self.iterations,
                dtype=jnp.dtype(self.dtype).name)

  def stages(self, x: jax.Array) -> list[jax.Array]:
    """Logits of every stage (iterations + 2 entries), each (B, H, W, 3)."""
    p1 = self.first_u(x).astype(jnp.float32)
    bv_logits = p1[..., 2:3]
    s1 = jax.nn.sigmoid(p1)
    bv = s1[..., 2:3]
    p2 = self.second_u(s1).astype(jnp.float32)
    out = [p1, jnp.concatenate([p2, bv_logits], -1)]
    for _ in range(self.iterations):
      p2 = self.second_u(jnp.concatenate([jax.nn.sigmoid(p2), bv], -1))
      p2 = p2.astype(jnp.float32)
      out.append(jnp.concatenate([p2, bv_logits], -1))
    return out

  def __call__(self, x: jax.Array) -> jax.Array:
    """Final [a, v, bv] logits (B, H, W, 3), float32."""
    return self.stages(x)[-1]

  def probabilities(self, x: jax.Array) -> jax.Array:
    """sigmoid of the final logits: artery, vein, vessel probabilities."""
    return jax.nn.sigmoid(self(x))


# ---------------------------------------------------------------------------
# R2-V2 preprocessing (host side, numpy / scipy / scikit-image).


def _crop_center(img: np.ndarray, w: int, h: int) -> np.ndarray:
  y, x = img.shape[0], img.shape[1]
  x0, y0 = x // 2 - w // 2, y // 2 - h // 2
  return img[y0:y0 + h, x0:x0 + w]


def r2v2_enhance(image: np.ndarray, mask: np.ndarray, *, disk_size: int = 5
                 ) -> tuple[np.ndarray, np.ndarray]:
  """R2-V2 `enhance_image(..., int_format=True)`.

  Args:
    image: (H, W, 3). Divided by 255 as upstream does, so pass uint8 (0..255)
      for the documented pipeline (a float [0, 1] image reproduces R2-V2's
      on-the-fly path, which then sees a 1/255-scaled image).
    mask: (H, W) or (H, W, C) field-of-view mask (> 0.5 is inside; channels
      summed).
  Returns:
    (enhanced uint8 (H, W, 3), eroded mask uint8 0/255 (H, W)).
  """
  import scipy.ndimage as ndi
  from PIL import Image
  from skimage.morphology import disk

  img = np.asarray(image)
  if img.ndim != 3 or img.shape[2] < 3:
    raise ValueError(f"expected an (H, W, 3) image, got {img.shape}")
  img = img[..., :3] / 255.0
  mask = np.asarray(mask)
  if mask.ndim == 3:
    mask = mask[..., :3].sum(axis=2)
  if mask.shape != img.shape[:2]:
    raise ValueError(f"mask {mask.shape} does not match image {img.shape}")
  mask = mask > 0.5
  h, w = img.shape[:2]
  zoomed = Image.fromarray(np.uint8(img * 255)).resize(
      (int(w * 1.15), int(h * 1.15)), Image.BICUBIC)
  zoomed = _crop_center(np.asarray(zoomed), w, h) / 255.0
  m = ndi.binary_erosion(mask, disk(disk_size)).astype(np.float64)
  m3 = np.repeat(m[..., None], 3, axis=2)
  inside = m3 == 1.0
  composed = np.where(inside, img, zoomed)
  blurred = ndi.gaussian_filter(composed, sigma=(10, 10, 0))
  sub = composed - blurred
  sub[~inside] = 0.0
  std = np.std(sub)
  if not std > 0:
    raise ValueError("image has no contrast inside the mask; cannot enhance")
  enh = sub / std
  lo, hi = enh.min(), enh.max()
  enh = (enh - lo) / (hi - lo)  # == interp1d([min, max], [0, 1])
  enh[~inside] = 0.0
  return (enh * 255).astype(np.uint8), (m * 255).astype(np.uint8)


def r2v2_preprocess(image: np.ndarray, mask: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
  """R2-V2 `preprocess_img`: enhancement then CLAHE (clip_limit=0.01).

  Returns (preprocessed float64 (H, W, 3) in [0, 1], mask uint8 0/255).
  """
  from skimage.exposure import equalize_adapthist
  enh, m = r2v2_enhance(image, mask)
  return equalize_adapthist(enh, clip_limit=0.01), m


def r2v2_unet_padding(h: int, w: int, multiple: int = R2V2_PAD_MULTIPLE):
  """((top, bottom), (left, right)) as R2-V2's get_unet_padding_np.

  Upstream always adds padding, a full `multiple` when already divisible.
  """
  hp, wp = multiple - h % multiple, multiple - w % multiple
  return (hp // 2, hp - hp // 2), (wp // 2, wp - wp // 2)


def r2v2_inputs(image: np.ndarray, mask: np.ndarray | None = None, *,
                model_type: str = "bv", width: int | None = R2V2_WIDTH):
  """Network input for R2-V2 from an RGB image, in R2-V2 infer.py's order.

  Steps: scale to [0, 1]; resize to `width` (anti-aliased, as upstream);
  mask = given FOV mask or, as upstream, sum of RGB > 0.01; enhancement +
  CLAHE on the resized image quantised to uint8 (the documented
  preprocessing.py pipeline; upstream's on-the-fly fallback would pass the
  [0, 1] float and so enhance a 1/255-scaled image); the mask becomes the
  eroded mask, as in upstream's on-the-fly path; pad to a multiple of 32.

  Args:
    image: (H, W, 3) uint8 RGB colour fundus photograph.
    mask: optional FOV mask (H, W), nonzero inside.
    model_type: "bv" (6 channels: preprocessed + raw RGB) or "av" (3).
    width: target width (R2-V2: 1408); None keeps the size.
  Returns:
    dict(x=(H', W', C) float32 padded input, mask=(H', W') float32 0/1,
         padding=((t, b), (l, r)), size=(h, w) before padding,
         orig_size=(H, W)).
  """
  from skimage.transform import resize

  if model_type not in ("bv", "av"):
    raise ValueError(f"model_type must be 'bv' or 'av', got {model_type!r}")
  img = np.asarray(image)
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
    raise ValueError(f"expected (H, W, 3) uint8 RGB, got {img.shape} "
                     f"{img.dtype}")
  orig = img.shape[:2]
  cfp = img.astype(np.float32) / 255.0
  m = None if mask is None else (np.asarray(mask) > 0).astype(np.float32)
  if width is not None and orig[1] != width:
    nh = int(orig[0] * (width / orig[1]))
    rs = lambda a: resize(a, (nh, width), anti_aliasing=True,
                          preserve_range=True).astype(np.float32)
    cfp = np.clip(rs(cfp), 0.0, 1.0)
    m = None if m is None else rs(m)
  if m is None:
    m = (cfp.sum(axis=2) > 0.01).astype(np.float32)
  pre, m_eroded = r2v2_preprocess(np.round(cfp * 255).astype(np.uint8), m)
  x = np.concatenate([pre, cfp], -1) if model_type == "bv" else pre
  x = x.astype(np.float32)
  h, w = x.shape[:2]
  pad = r2v2_unet_padding(h, w)
  return dict(x=np.pad(x, pad + ((0, 0),)),
              mask=np.pad((m_eroded > 127).astype(np.float32), pad),
              padding=pad, size=(h, w), orig_size=orig)


def r2v2_postprocess(logits: np.ndarray, prep: dict) -> np.ndarray:
  """sigmoid, zero outside the mask, unpad, resize back: (H, W, 3) [a, v, bv].

  `logits` is the network output (H', W', 3) for `prep = r2v2_inputs(...)`.
  """
  from skimage.transform import resize
  p = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
  p = p * (prep["mask"][..., None] >= 0.5)
  (t, b), (l, r) = prep["padding"]
  h, w = prep["size"]
  p = p[t:t + h, l:l + w]
  if (h, w) != tuple(prep["orig_size"]):
    # upstream: F.interpolate(bilinear, align_corners=False), no antialias.
    p = resize(p, tuple(prep["orig_size"]) + (3,), order=1,
               anti_aliasing=False, preserve_range=True)
  return p.astype(np.float32)


def r2v2_segment(model: RRWNet, image: np.ndarray,
                 mask: np.ndarray | None = None, *, model_type: str | None = None,
                 width: int | None = R2V2_WIDTH) -> np.ndarray:
  """R2-V2 inference on one RGB uint8 image (no test-time augmentation, the
  upstream default): (H, W, 3) float32 probabilities [artery, vein, vessel].

  model_type defaults to "bv" for a 6-channel model, else "av".
  """
  if model_type is None:
    model_type = "bv" if model.in_channels == 6 else "av"
  prep = r2v2_inputs(image, mask, model_type=model_type, width=width)
  if prep["x"].shape[-1] != model.in_channels:
    raise ValueError(f"{model_type} input has {prep['x'].shape[-1]} channels,"
                     f" the model takes {model.in_channels}")
  logits = _forward(model, jnp.asarray(prep["x"][None]))
  return r2v2_postprocess(np.asarray(logits[0]), prep)


@nnx.jit
def _forward(model: RRWNet, x: jax.Array) -> jax.Array:
  return model(x)
