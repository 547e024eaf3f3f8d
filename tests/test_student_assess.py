"""Done-when: a ported (tiny) HF DINOv3 + an official-format sc_linear state
dict -> `efiqa assess --model student --save-logits` == the PyTorch
reference's patch logits on the same EFIQA-preprocessed FOV crop (<= 1e-4)."""
import csv
import os

import numpy as np
import pytest
from PIL import Image

from efiqa_jax import cli
from efiqa_jax.reference.dinov3 import tiny_hf_dinov3
from efiqa_jax import fundus
from efiqa_jax.encoders import preprocess as pp


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


def _reference_logits(ref, lin, path):
  import torch
  prep = fundus.prepare_fundus(path, 512)
  assert prep.status == "ok"
  x = pp.preprocess(prep.image, 224, "efiqa")
  with torch.no_grad():
    h = ref(pixel_values=torch.from_numpy(x.transpose(2, 0, 1)[None])
            ).last_hidden_state[0, 5:]  # [CLS, 4 registers, patches]
    return (lin(h)[:, 0]).numpy().reshape(14, 14), prep


def _run(tmp_path, photos, capsys, map_filter=None):
  ref, lin = _hf_and_adapter(tmp_path)
  out = tmp_path / "out"
  code = cli.main(["assess", *photos, "--out", str(out), "--model",
                   "student", "--encoder", str(tmp_path / "enc"),
                   "--adapter", str(tmp_path / "ada"), "--save-logits",
                   "--quiet"] + (["--map-filter", map_filter] if map_filter
                                 else []))
  err = capsys.readouterr().err
  assert os.path.exists(out / "scores.csv"), err
  rows = list(csv.DictReader(open(out / "scores.csv")))
  worst = 0.0
  for p, row in zip(photos, rows):
    if not os.path.exists(p):
      assert row["status"] == "not_found"
      continue
    assert row["status"] == "ok", row
    want, prep = _reference_logits(ref, lin, p)
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
    np.testing.assert_allclose(m[cover > 0], sig[cover > 0], atol=1e-4)
    assert np.all(m[cover <= 0] == 0)
  return code, worst


def test_student_logits_match_torch_synthetic(tmp_path, capsys):
  from efiqa_jax import synth
  photos = []
  for s in (1, 2):
    im = synth.generate(s, 320).image
    photos.append(str(tmp_path / f"syn{s}.png"))
    Image.fromarray(im).save(photos[-1])
  photos.append(str(tmp_path / "missing.png"))
  code, worst = _run(tmp_path, photos, capsys)
  assert code == 3  # one failure row (not_found), none dropped
  print(f"\nstudent logits vs torch (synthetic): max |diff| {worst:.2e}")
  assert worst <= 1e-4


def test_student_logits_match_torch_real(fundus_dir, tmp_path, capsys):
  photos = [str(fundus_dir / f) for f in ("drive/01_image.png",
                                          "eyepacs/605_left.jpg")]
  code, worst = _run(tmp_path, photos, capsys, map_filter="none")
  assert code == 0
  print(f"\nstudent logits vs torch (real): max |diff| {worst:.2e}")
  assert worst <= 1e-4


def test_save_logits_needs_student(tmp_path, capsys):
  from efiqa_jax import synth
  Image.fromarray(synth.generate(0, 128).image).save(tmp_path / "a.png")
  code = cli.main(["assess", str(tmp_path / "a.png"), "--out",
                   str(tmp_path / "o"), "--model", "student", "--quiet"])
  assert code == 2
  assert "--encoder" in capsys.readouterr().err
