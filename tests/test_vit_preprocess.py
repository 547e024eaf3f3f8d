"""ViT input preprocessing against PIL + numpy / the HF processors, and the
student's efiqa path bit for bit against the reference chain in torch."""
import dataclasses

import numpy as np
import pytest
from PIL import Image

from efiqa_jax import fundus
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


def _torch_reference_chain(img: Image.Image, size: int) -> np.ndarray:
  """EFIQA extract_dino.py in torch: torchvision Resize((S, S), BICUBIC) on
  a PIL image is PIL's resize; ToTensor is a float32 /255; Normalize is
  (x - mean) / std in float32."""
  torch = pytest.importorskip("torch")
  x = torch.from_numpy(np.array(img.resize((size, size), Image.BICUBIC),
                                np.uint8)).permute(2, 0, 1).float().div(255)
  m = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
  s = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
  return ((x - m) / s).permute(1, 2, 0).numpy()


def _bit_exact(photos, size=224):
  for path in photos:
    want = _torch_reference_chain(Image.open(path).convert("RGB"), size)
    np.testing.assert_array_equal(pp.preprocess(path, size, "efiqa"), want)
    # The student's efiqa path: the full-resolution resize in the loader,
    # then only the normalisation.
    prep, enc = pp.prepare_photograph(str(path), size, 512)
    assert prep.ok and enc.shape == (size, size, 3) and enc.dtype == np.uint8
    np.testing.assert_array_equal(pp.preprocess(enc, size, "efiqa"), want)
    assert prep.image.shape == (512, 512, 3) and prep.crop_size == -1
    assert (prep.orig_h, prep.orig_w) == Image.open(path).size[::-1]


@pytest.mark.port
def test_efiqa_chain_bit_exact_synthetic(tmp_path):
  from efiqa_jax import synth
  photos = []
  for s, pad in ((0, (0, 60)), (1, (30, 0)), (2, (0, 0))):
    im = np.pad(synth.generate(s, 300).image, ((pad[0],) * 2, (pad[1],) * 2,
                                                (0, 0)))
    photos.append(tmp_path / f"p{s}.png")
    Image.fromarray(im).save(photos[-1])
  _bit_exact(photos)


@pytest.mark.port
def test_efiqa_chain_bit_exact_real(fundus_dir):
  _bit_exact(sorted(fundus_dir.glob("*/*.jpg"))
             + sorted(fundus_dir.glob("drive/*_image.png")))


def test_photograph_fov_mask_and_failures(tmp_path):
  from efiqa_jax.fundus import fov as ffov
  # A disc centred in a 100 x 200 photograph, radius 40 (pixel centres).
  f = ffov.FOV(cx=99.5, cy=49.5, r=40.0, circular=True, status="ok",
               message="")
  m = pp.photograph_fov_mask(f, 100, 200, 50)
  # Sample (i, j) sits at ((j + .5) * 4 - .5, (i + .5) * 2 - .5).
  ys, xs = np.mgrid[0:50, 0:50]
  want = ((xs + .5) * 4 - .5 - 99.5) ** 2 + ((ys + .5) * 2 - .5 - 49.5) ** 2
  np.testing.assert_array_equal(m, want <= 1600.0)
  assert m[25, 25] and not m[0, 0] and m.sum() > 0
  assert pp.photograph_fov_mask(dataclasses.replace(f, circular=False),
                                100, 200, 8).all()
  # A straight cut of the frame (y <= 60, a black band) bounds it too.
  cut = pp.photograph_fov_mask(dataclasses.replace(f, cuts=((0., 1., 60.),)),
                               100, 200, 50)
  np.testing.assert_array_equal(cut, m & ((ys + .5) * 2 - .5 <= 60)[:, :1])
  assert cut.sum() < m.sum()
  prep, enc = pp.prepare_photograph(str(tmp_path / "missing.png"), 224)
  assert prep.status == "not_found" and enc is None
  Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(tmp_path / "b.png")
  prep, enc = pp.prepare_photograph(str(tmp_path / "b.png"), 224)
  assert prep.status == "no_fov" and enc is None
  # The fundus gate, as on the FOV path: a grey disc is no colour fundus.
  yy, xx = np.mgrid[0:300, 0:300]
  grey = np.where(((yy - 150) ** 2 + (xx - 150) ** 2 < 120 ** 2)[..., None],
                  np.uint8(140), np.uint8(0)).repeat(3, -1)
  Image.fromarray(grey).save(tmp_path / "g.png")
  assert fundus.prepare_fundus(str(tmp_path / "g.png")).status == "not_fundus"
  prep, enc = pp.prepare_photograph(str(tmp_path / "g.png"), 224)
  assert prep.status == "not_fundus" and enc is None
  assert "not a colour fundus photograph" in prep.message


def test_recorded_preprocess():
  rec = pp.record("efiqa", 224)
  assert rec["preprocess"] == "efiqa" and "work_size" not in rec
  assert pp.record("fov", 224, 512)["work_size"] == 512
  assert pp.recorded_preprocess({"features": rec}) == "efiqa"
  # Written before the setting existed.
  assert pp.recorded_preprocess({"features": {"crop": True}}) == "fov"
  assert pp.recorded_preprocess({"crop": False}) == "efiqa"  # extract meta
  assert pp.recorded_preprocess(
      {"source": {"format": "torch state dict (badish sc_linear)"}}) == "efiqa"
  assert pp.recorded_preprocess({"model_id": "facebook/dinov3-vitl16",
                                 "image_size": 224}) == "efiqa"
  assert pp.recorded_preprocess({"features": {"grid": [14, 14, 8]}}) is None
  with pytest.raises(ValueError, match="preprocess must be one of"):
    pp.record("crop", 224)
