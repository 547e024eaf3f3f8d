"""`efiqa distill` chains pseudo-label -> extract -> train-adapter on
synthetic photographs (tiny teacher and encoder), then the student assesses."""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from flax import nnx

from efiqa_jax import checkpoints
from efiqa_jax import cli
from efiqa_jax import synth
from efiqa_jax.models import unet
from efiqa_jax.models import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_distill_chain(tmp_path, capsys):
  checkpoints.save_model(tmp_path / "teacher", unet.UNet(
      base_channels=4, rngs=nnx.Rngs(0)), {"image_size": 64})
  checkpoints.save_model(tmp_path / "enc", vit.VisionTransformer(
      patch_size=16, hidden_size=16, depth=1, num_heads=2, mlp_hidden=32,
      num_registers=4, layerscale=True, qkv_bias="qv", pos="rope",
      rngs=nnx.Rngs(0)))
  imgs = tmp_path / "imgs"
  imgs.mkdir()
  for s in range(4):
    Image.fromarray(synth.generate(s, 96).image).save(imgs / f"s{s}.png")
  (imgs / "broken.png").write_bytes(b"not an image")
  wd = tmp_path / "wd"
  args = ["distill", str(imgs), "--teacher", str(tmp_path / "teacher"),
          "--encoder", str(tmp_path / "enc"), "--workdir", str(wd),
          "--config", os.path.join(REPO, "configs/adapter.py:tiny"),
          "--set", "config.size=64", "--set", "config.work_size=96",
          "--set", "config.batch_size=32", "--quiet"]
  assert cli.main(args) == 0
  assert "adapter:" in capsys.readouterr().out
  labels = sorted(os.listdir(wd / "pseudo" / "labels"))
  assert labels == [f"s{s}.png" for s in range(4)]
  assert np.asarray(Image.open(wd / "pseudo" / "labels" / "s0.png")).shape == (
      4, 4)
  rep = json.load(open(wd / "train" / "data.json"))
  assert rep["matched"] == 4 and rep["token_grid"] == [4, 4, 16]
  assert [x[0] for x in rep["not_ok"]] == ["broken"]
  # 4 images x 16 patches / 32 = 2 steps per epoch, 2 epochs.
  assert rep["total_steps"] == 4
  # Re-running finds everything done.
  assert cli.main(args) == 0
  out = tmp_path / "assess"
  assert cli.main(["assess", str(imgs / "s0.png"), "--out", str(out),
                   "--model", "student", "--encoder", str(tmp_path / "enc"),
                   "--adapter", str(wd / "train" / "adapter"), "--quiet"]) == 0
  row = next(csv.DictReader(open(out / "scores.csv")))
  assert row["status"] == "ok"
