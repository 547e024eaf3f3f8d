"""Done-when (issue 12 §6): a transformers DINOv3 (tiny, random) ported with
`efiqa port dinov3` + an official-format `sc_linear` state dict ported with
`efiqa port adapter` -> `efiqa assess --model student --preprocess efiqa
--save-logits` == PyTorch's logits on the reference chain (EFIQA
extract_dino.py / the HF demo: the whole photograph, PIL bicubic to 224,
ToTensor, ImageNet Normalize, model, tokens after CLS + registers, linear)
within PARITY, on real and synthetic photographs; and the FOV-crop path
(`--preprocess fov`) against the same reference on the FOV crop."""
import csv
import os

import numpy as np
import pytest
from PIL import Image

from efiqa_jax import cli
from efiqa_jax import fundus
from efiqa_jax.encoders import preprocess as pp
from efiqa_jax.reference.dinov3 import tiny_hf_dinov3

PARITY = 1e-4  # README: "max |diff| <= 1e-4" for both paths
REAL = ("drive/01_image.png", "drive/02_image.png", "eyepacs/116_right.jpg",
        "eyepacs/373_left.jpg", "eyepacs/605_left.jpg",
        "eyepacs/6834_left.jpg", "eyepacs/9575_left.jpg", "automorph/1.jpg",
        "automorph/100.jpg", "automorph/11.jpg")


def _hf_and_adapter(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  g = torch.Generator().manual_seed(0)
  ref = tiny_hf_dinov3(g)
  ref.eval().save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
  lin = torch.nn.Linear(32, 1)
  with torch.no_grad():
    lin.weight.copy_(torch.randn((1, 32), generator=g))
    lin.bias.copy_(torch.tensor([-0.3]))
  # badish's sc_linear: self.model = nn.Linear(D, 1)
  torch.save({"model.weight": lin.weight.detach().clone(),
              "model.bias": lin.bias.detach().clone()},
             tmp_path / "sc_linear.pth")
  assert cli.main(["port", "dinov3", str(tmp_path / "hf"), "--out",
                   str(tmp_path / "enc")]) == 0
  assert cli.main(["port", "adapter", str(tmp_path / "sc_linear.pth"),
                   "--out", str(tmp_path / "ada")]) == 0
  return ref, lin


def _tokens_to_logits(ref, lin, x, grid):
  import torch
  with torch.no_grad():
    h = ref(pixel_values=x[None]).last_hidden_state[0]
    h = h[1 + ref.config.num_register_tokens:]  # drop CLS and registers
    return lin(h)[:, 0].numpy().reshape(grid, grid)


def _torch_efiqa_logits(ref, lin, path, size=224):
  """The reference chain, in PIL and torch only (torchvision is not a
  dependency; its Resize on a PIL image is PIL's resize, ToTensor is a
  float32 /255, Normalize is (x - mean) / std)."""
  import torch
  img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
  x = torch.from_numpy(np.array(img, np.uint8)).permute(2, 0, 1).float()
  x = x.div(255)
  mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
  return _tokens_to_logits(ref, lin, (x - mean) / std, size // 16)


def _torch_fov_logits(ref, lin, path):
  import torch
  prep = fundus.prepare_fundus(path, 512)
  assert prep.status == "ok"
  x = pp.preprocess(prep.image, 224, "efiqa")
  return _tokens_to_logits(ref, lin, torch.from_numpy(x.transpose(2, 0, 1)),
                           14), prep


def _assess(tmp_path, photos, capsys, *flags):
  out = tmp_path / "out"
  code = cli.main(["assess", *photos, "--out", str(out), "--model",
                   "student", "--encoder", str(tmp_path / "enc"),
                   "--adapter", str(tmp_path / "ada"), "--save-logits",
                   "--quiet", *flags])
  err = capsys.readouterr().err
  assert os.path.exists(out / "scores.csv"), err
  return code, out, list(csv.DictReader(open(out / "scores.csv"))), err


def _run_efiqa(tmp_path, photos, capsys, *flags):
  """-> (exit code, {photo: max |diff|}, stderr), checking every row."""
  ref, lin = _hf_and_adapter(tmp_path)
  code, out, rows, err = _assess(tmp_path, photos, capsys, *flags)
  diffs = {}
  for p, row in zip(photos, rows):
    if not os.path.exists(p):
      assert row["status"] == "not_found"
      continue
    assert row["status"] == "ok", row
    want = _torch_efiqa_logits(ref, lin, p)
    got = np.load(out / "logits" / f"{row['id']}.npy")
    assert got.shape == (14, 14) and got.dtype == np.float32
    diffs[p] = float(np.abs(got - want).max())
    # The map covers the whole photograph: no crop square; the FOV is found.
    assert row["crop_x0"] == row["crop_y0"] == row["crop_size"] == ""
    assert float(row["fov_r"]) > 0
    m = np.load(out / "maps" / f"{row['id']}.npy")
    assert m.shape == (14, 14)
    # Cells outside the FOV are 0; the centre is inside.
    assert m[7, 7] > 0
    if "--map-filter" in flags:  # none: the raw sigmoid inside the FOV
      sig = 1 / (1 + np.exp(-want))
      inside = m > 0
      np.testing.assert_allclose(m[inside], sig[inside], atol=PARITY)
    ov = np.asarray(Image.open(out / "overlays" / f"{row['id']}.png"))
    assert ov.shape == (512, 512, 3)
  return code, diffs, err


@pytest.mark.port
def test_efiqa_path_matches_torch_synthetic(tmp_path, capsys):
  """Non-square photographs (black side bands): the whole photograph is
  squeezed to 224 x 224, as the reference does; the FOV mask follows."""
  from efiqa_jax import synth
  photos = []
  for s in (1, 2):
    im = np.pad(synth.generate(s, 320).image, ((0, 0), (48, 48), (0, 0)))
    photos.append(str(tmp_path / f"syn{s}.png"))
    Image.fromarray(im).save(photos[-1])
  photos.append(str(tmp_path / "missing.png"))
  code, diffs, err = _run_efiqa(tmp_path, photos, capsys, "--map-filter",
                                "none")
  assert code == 3  # one failure row (not_found), none dropped
  # No --preprocess: the ported official adapter's record decides.
  assert "student preprocessing efiqa (the adapter's record)" in err
  worst = max(diffs.values())
  print(f"\nstudent efiqa path vs torch (synthetic): max |diff| {worst:.2e}")
  assert worst <= PARITY


@pytest.mark.port
def test_efiqa_path_matches_torch_real(fundus_dir, tmp_path, capsys):
  photos = [str(fundus_dir / f) for f in REAL]
  code, diffs, err = _run_efiqa(tmp_path, photos, capsys, "--preprocess",
                                "efiqa")
  assert code == 0
  assert "warning" not in err
  print("\nstudent --preprocess efiqa vs torch, max |diff| per photograph:")
  for p, d in diffs.items():
    print(f"  {os.path.relpath(p, fundus_dir):24s} {d:.2e}")
  assert max(diffs.values()) <= PARITY


def _run_fov(tmp_path, photos, capsys, map_filter=None):
  ref, lin = _hf_and_adapter(tmp_path)
  code, out, rows, err = _assess(
      tmp_path, photos, capsys, "--preprocess", "fov",
      *(["--map-filter", map_filter] if map_filter else []))
  # The ported adapter records efiqa: another choice is allowed, and said.
  assert ("warning: student preprocessing fov, but the adapter was trained "
          "on efiqa inputs") in err
  worst = 0.0
  for p, row in zip(photos, rows):
    if not os.path.exists(p):
      assert row["status"] == "not_found"
      continue
    assert row["status"] == "ok", row
    want, prep = _torch_fov_logits(ref, lin, p)
    got = np.load(out / "logits" / f"{row['id']}.npy")
    assert got.shape == (14, 14) and got.dtype == np.float32
    assert (int(row["crop_x0"]), int(row["crop_y0"]), int(row["crop_size"])
            ) == (prep.crop_x0, prep.crop_y0, prep.crop_size)
    worst = max(worst, float(np.abs(got - want).max()))
    m = np.load(out / "maps" / f"{row['id']}.npy")
    sig = 1 / (1 + np.exp(-want))
    cover = np.asarray(Image.fromarray(prep.fov_mask.astype(np.float32),
                                       mode="F").resize((14, 14), Image.BOX))
    sig[cover <= 0] = 0
    if map_filter != "none":  # the paper's map post-processing (default)
      from efiqa_jax import quality
      sig = quality.efiqa_map_filter(sig, prep.fov_mask)
    np.testing.assert_allclose(m[cover > 0], sig[cover > 0], atol=PARITY)
    assert np.all(m[cover <= 0] == 0)
  return code, worst


@pytest.mark.port
def test_fov_path_matches_torch_synthetic(tmp_path, capsys):
  from efiqa_jax import synth
  photos = []
  for s in (1, 2):
    im = synth.generate(s, 320).image
    photos.append(str(tmp_path / f"syn{s}.png"))
    Image.fromarray(im).save(photos[-1])
  photos.append(str(tmp_path / "missing.png"))
  code, worst = _run_fov(tmp_path, photos, capsys)
  assert code == 3
  print(f"\nstudent fov path vs torch (synthetic): max |diff| {worst:.2e}")
  assert worst <= PARITY


@pytest.mark.port
def test_fov_path_matches_torch_real(fundus_dir, tmp_path, capsys):
  photos = [str(fundus_dir / f) for f in ("drive/01_image.png",
                                          "eyepacs/605_left.jpg")]
  code, worst = _run_fov(tmp_path, photos, capsys, map_filter="none")
  assert code == 0
  print(f"\nstudent fov path vs torch (real): max |diff| {worst:.2e}")
  assert worst <= PARITY


@pytest.mark.port
def test_adapter_record_decides_the_default(tmp_path, capsys):
  """An adapter recording fov (what train-adapter writes for FOV-crop
  features) is run on the FOV crop when --preprocess is not given; an
  explicit --preprocess efiqa overrides it, with a warning."""
  import json
  import shutil
  from efiqa_jax import synth
  ref, lin = _hf_and_adapter(tmp_path)
  sidecar = tmp_path / "ada" / "efiqa.json"
  meta = json.loads(sidecar.read_text())
  meta["features"] = pp.record("fov", 224, 512)
  sidecar.write_text(json.dumps(meta))
  photo = str(tmp_path / "syn.png")
  Image.fromarray(synth.generate(3, 320).image).save(photo)
  code, out, rows, err = _assess(tmp_path, [photo], capsys)
  assert code == 0 and rows[0]["status"] == "ok", err
  assert "student preprocessing fov (the adapter's record)" in err
  want, prep = _torch_fov_logits(ref, lin, photo)
  assert int(rows[0]["crop_size"]) == prep.crop_size
  got = np.load(out / "logits" / f"{rows[0]['id']}.npy")
  assert float(np.abs(got - want).max()) <= PARITY
  shutil.rmtree(out)
  code, out, rows, err = _assess(tmp_path, [photo], capsys, "--preprocess",
                                 "efiqa")
  assert code == 0 and rows[0]["crop_size"] == "", err
  assert ("warning: student preprocessing efiqa, but the adapter was "
          "trained on fov inputs") in err
  got = np.load(out / "logits" / f"{rows[0]['id']}.npy")
  assert float(np.abs(got - _torch_efiqa_logits(ref, lin, photo)).max()
               ) <= PARITY


def test_student_is_a_quality_model(tmp_path):
  """The student implements `quality_model.QualityModel` (what assess calls),
  with logits."""
  from efiqa_jax import quality_model as qm
  _hf_and_adapter(tmp_path)
  model = qm.load_quality_model("student", encoder=str(tmp_path / "enc"),
                                adapter=str(tmp_path / "ada"))
  assert isinstance(model, qm.QualityModel) and model.has_logits
  assert "student preprocessing" in model.preprocess_note()


def test_save_logits_needs_student(tmp_path, capsys):
  from efiqa_jax import synth
  Image.fromarray(synth.generate(0, 128).image).save(tmp_path / "a.png")
  code = cli.main(["assess", str(tmp_path / "a.png"), "--out",
                   str(tmp_path / "o"), "--model", "student", "--quiet"])
  assert code == 2
  assert "--encoder" in capsys.readouterr().err
  code = cli.main(["assess", str(tmp_path / "a.png"), "--out",
                   str(tmp_path / "o"), "--preprocess", "efiqa", "--quiet"])
  assert code == 2
  assert "--preprocess is only for --model student" in (
      capsys.readouterr().err)
