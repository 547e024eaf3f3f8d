"""ViT input preprocessing against PIL + numpy / the HF processors."""
import numpy as np
import pytest
from PIL import Image

from efiqa_jax.encoders import preprocess as pp

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _efiqa_reference(path_or_img, size):
  """EFIQA extract_dino.py: PIL RGB -> Resize((S, S), BICUBIC) on the PIL
  image -> ToTensor (/255) -> Normalize(ImageNet)."""
  img = (Image.open(path_or_img) if not isinstance(path_or_img, Image.Image)
         else path_or_img).convert("RGB")
  x = np.asarray(img.resize((size, size), Image.BICUBIC), np.float64) / 255.0
  return (x - MEAN) / STD


def _photos(fundus_dir):
  return [fundus_dir / "drive" / "01_image.png",
          fundus_dir / "eyepacs" / "116_right.jpg",
          fundus_dir / "automorph" / "1.jpg"]


@pytest.mark.parametrize("size", [224, 256])
def test_efiqa_mode_matches_pil_numpy(fundus_dir, size):
  for path in _photos(fundus_dir):
    ref = _efiqa_reference(path, size)
    for src in (path, Image.open(path), np.asarray(
        Image.open(path).convert("RGB"))):
      ours = pp.preprocess(src, size)
      assert ours.dtype == np.float32 and ours.shape == (size, size, 3)
      assert np.abs(ours - ref).max() < 1e-6, path


def test_batch_and_bad_input():
  rng = np.random.default_rng(0)
  ims = [rng.integers(0, 256, (300, 410, 3), dtype=np.uint8) for _ in range(2)]
  b = pp.preprocess_batch(ims, 224)
  assert b.shape == (2, 224, 224, 3)
  np.testing.assert_array_equal(b[1], pp.preprocess(ims[1], 224))
  with pytest.raises(TypeError, match="uint8"):
    pp.preprocess(ims[0].astype(np.float32), 224)
  with pytest.raises(ValueError, match="mode"):
    pp.preprocess(ims[0], 224, mode="bilinear")


def test_hf_dinov2_mode_matches_bit_processor(fundus_dir):
  transformers = pytest.importorskip("transformers")
  proc = transformers.BitImageProcessor(
      size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
      do_center_crop=True, resample=3, image_mean=list(MEAN),
      image_std=list(STD))
  rng = np.random.default_rng(1)
  imgs = [Image.open(p).convert("RGB") for p in _photos(fundus_dir)[:2]]
  imgs.append(Image.fromarray(rng.integers(0, 256, (301, 417, 3),
                                           dtype=np.uint8)))
  for img in imgs:
    ref = proc(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = pp.preprocess(img, 224, mode="hf_dinov2")
    assert np.abs(ours - ref).max() < 1e-5


@pytest.mark.parametrize("hw", [(450, 600), (100, 150)])
def test_hf_dinov3_mode_matches_torch_bilinear_aa(hw):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(2)
  img = rng.integers(0, 256, hw + (3,), dtype=np.uint8)
  x = torch.from_numpy(img.astype(np.float32) / 255).permute(2, 0, 1)[None]
  r = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear",
                                      align_corners=False, antialias=True)
  ref = (r[0].permute(1, 2, 0).numpy() - MEAN) / STD
  ours = pp.preprocess(img, 224, mode="hf_dinov3")
  assert np.abs(ours - ref).max() < 5e-5  # measured 1.5e-5 / 3.1e-5


def test_timm_augreg_mode():
  rng = np.random.default_rng(3)
  img = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
  ours = pp.preprocess(img, 224, mode="timm_augreg")
  big = Image.fromarray(img).resize((330, 248), Image.BICUBIC)  # 248 = 224/.9
  top, left = int(round((248 - 224) / 2)), int(round((330 - 224) / 2))
  ref = (np.asarray(big, np.float64)[top:top + 224, left:left + 224] / 255
         - 0.5) / 0.5
  assert np.abs(ours - ref).max() < 1e-6
