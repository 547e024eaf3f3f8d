"""Shared fixtures for the assess tests: a tiny teacher and mixed inputs."""
import io
import os

import numpy as np
from PIL import Image


def tiny_teacher(path, *, base=4, image_size=64, work_size=128, seed=0):
  from flax import nnx
  from efiqa_jax import checkpoints
  from efiqa_jax.models.unet import UNet
  model = UNet(3, 3, base_channels=base, residual=True, rngs=nnx.Rngs(seed))
  checkpoints.save_model(path, model, {
      "name": "tiny-test-teacher", "image_size": image_size,
      "work_size": work_size, "anomaly_threshold": 0.02})
  return str(path)


def distill_models(tmp_path):
  """TMP/teacher (tiny U-Net, 64 px) and TMP/enc (tiny random ViT, patch
  16, registers, RoPE): the models the distill tests chain."""
  from flax import nnx
  from efiqa_jax import checkpoints
  from efiqa_jax.models import unet
  from efiqa_jax.models import vit
  checkpoints.save_model(tmp_path / "teacher", unet.UNet(
      base_channels=4, rngs=nnx.Rngs(0)), {"image_size": 64})
  checkpoints.save_model(tmp_path / "enc", vit.VisionTransformer(
      patch_size=16, hidden_size=16, depth=1, num_heads=2, mlp_hidden=32,
      num_registers=4, layerscale=True, qkv_bias="qv", pos="rope",
      rngs=nnx.Rngs(0)))


def fundus_like(size=300, seed=0, offset=(0, 0)):
  """A bright orange disc with dark lines on black: enough to find a FOV."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :int(size * 1.3)]
  cx, cy = xx.shape[1] / 2 + offset[0], size / 2 + offset[1]
  r = size * 0.45
  d = np.hypot(xx - cx, yy - cy)
  img = np.zeros(xx.shape + (3,), np.float32)
  inside = d < r
  img[inside] = (190, 90, 40)
  for k in range(6):
    ang = rng.uniform(0, np.pi)
    line = np.abs((xx - cx) * np.sin(ang) - (yy - cy) * np.cos(ang)) < 2
    img[line & inside] *= 0.6
  img += rng.normal(0, 3, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def write_inputs(folder):
  """Good-looking, bad and non-fundus inputs; returns the ordered paths."""
  from skimage import data
  os.makedirs(folder, exist_ok=True)
  p = lambda n: os.path.join(folder, n)
  Image.fromarray(fundus_like(seed=1)).save(p("a_fundus.png"))
  Image.fromarray(data.retina()).resize((400, 400)).save(p("b_retina.jpg"))
  Image.fromarray(fundus_like(seed=2, offset=(20, 0))).save(p("c_fundus.jpg"))
  open(p("d_empty.jpg"), "wb").close()
  with open(p("e_text.png"), "w") as f:
    f.write("not an image")
  Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(p("f_tiny.png"))
  Image.fromarray(np.zeros((200, 260, 3), np.uint8)).save(p("g_black.png"))
  Image.fromarray(data.astronaut()).save(p("h_astronaut.png"))
  buf = io.BytesIO()
  Image.fromarray(fundus_like(seed=3)).save(buf, "JPEG")
  with open(p("i_truncated.jpg"), "wb") as f:
    f.write(buf.getvalue()[: len(buf.getvalue()) // 3])
  base = fundus_like(seed=5)
  # 16-bit grey PNG (12-bit data), plain grey, RGBA, CMYK, EXIF-rotated.
  g16 = (base[..., 0].astype(np.uint16) * 16)
  Image.fromarray(g16).save(p("j_grey16.png"))
  Image.fromarray(base[..., 0]).save(p("k_grey.png"))
  Image.fromarray(np.dstack([base, np.full(base.shape[:2], 255, np.uint8)]),
                  "RGBA").save(p("l_rgba.png"))
  Image.fromarray(base).convert("CMYK").save(p("m_cmyk.jpg"))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees on display
  Image.fromarray(base).save(p("n_exif.jpg"), exif=exif)
  with open(p("o_bomb.png"), "wb") as f:
    f.write(_png_header(40000, 40000))
  return sorted(os.path.join(folder, n) for n in os.listdir(folder))


def _png_header(w, h):
  """A PNG whose header announces w x h RGB pixels (no real pixel data)."""
  import struct
  import zlib

  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
          chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
