"""Self-supervised encoder pretraining (efiqa_jax.encoders.pretrain)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from efiqa_jax import checkpoints
from efiqa_jax import cli
from efiqa_jax import config_util
from efiqa_jax import synth
from efiqa_jax.encoders import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/encoder_mim.py:tiny")


def test_patchify_matches_loops():
  x = np.arange(2 * 8 * 12 * 3, dtype=np.float32).reshape(2, 8, 12, 3)
  got = np.asarray(pretrain.patchify(jnp.asarray(x), 4))
  assert got.shape == (2, 2, 3, 48)
  for b in range(2):
    for i in range(2):
      for j in range(3):
        want = x[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(-1)
        np.testing.assert_array_equal(got[b, i, j], want)


def test_patch_mask_exact_count_and_varies():
  m = np.asarray(pretrain.random_patch_mask(jax.random.key(0), 3, 4, 5, 0.6))
  assert m.shape == (3, 4, 5)
  np.testing.assert_array_equal(m.reshape(3, -1).sum(1), [12, 12, 12])
  assert not np.array_equal(m[0], m[1])
  with pytest.raises(ValueError, match="masked"):
    pretrain.random_patch_mask(jax.random.key(0), 1, 2, 2, 0.0)


def test_loss_ignores_visible_patches():
  """Changing the pixels of a patch the decoder is not scored on (visible)
  changes the loss only through the encoder, never as a target."""
  from flax import nnx
  cfg = config_util.load_config(TINY)
  enc = pretrain.build_encoder(cfg)
  dec = nnx.Linear(16, 16 * 16 * 3, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
  mask = jnp.zeros((1, 4, 4)).at[0, 0, 0].set(1.0)
  l0 = pretrain.mim_loss(enc, dec, x, mask, 16)
  # The masked patch is blanked before the encoder: its content only enters
  # through the (normalised) target, so a brightness shift leaves the loss.
  x2 = x.at[0, :16, :16].add(5.0)
  l2 = pretrain.mim_loss(enc, dec, x2, mask, 16)
  np.testing.assert_allclose(float(l0), float(l2), rtol=1e-5)


def _photos(d, n=6):
  d.mkdir()
  for s in range(n):
    Image.fromarray(synth.generate(s, 96).image).save(d / f"p{s}.png")
  return d


def test_pretrain_learns_and_saves_a_loadable_encoder(tmp_path):
  imgs = _photos(tmp_path / "imgs")
  (imgs / "broken.png").write_bytes(b"nope")
  cfg = config_util.load_config(TINY, ["--config.steps=24",
                                       "--config.optimizer.lr=0.003",
                                       "--config.log_every=1"])
  res = pretrain.pretrain_mim(str(imgs), str(tmp_path / "enc"), cfg,
                              progress=False)
  assert res.n_images == 6 and [os.path.basename(f[0]) for f in res.failed] \
      == ["broken.png"]
  # Normalised targets: an untrained decoder starts near MSE 1; it learns
  # (single-batch losses are noisy: compare the first and last six steps).
  assert 0.8 < res.first_loss < 1.3
  curve = [l for _, l in json.load(open(tmp_path / "enc" /
                                        "pretrain_loss.json"))]
  assert len(curve) == 24
  # Below both the early steps and the trivial predictor (0 -> MSE 1).
  assert np.mean(curve[-6:]) < np.mean(curve[:6]) - 0.02
  assert np.mean(curve[-6:]) < min(1.0, res.first_loss) - 0.015
  enc, meta = checkpoints.load_model(tmp_path / "enc")
  assert meta["architecture"] == "vit"
  assert meta["pretraining"]["steps"] == 24
  init = pretrain.build_encoder(cfg)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  a, b = np.asarray(enc.patch_features(x)), np.asarray(init.patch_features(x))
  assert a.shape == (2, 4, 4, 16) and np.abs(a - b).max() > 1e-3


def test_pretrain_resumes_bit_exactly(tmp_path):
  """Stopped after 3 of 6 steps (max_steps: checkpoint, no export), the
  same call resumes and ends where an uninterrupted run ends."""
  imgs = _photos(tmp_path / "imgs", 4)
  over = ["--config.steps=6", "--config.checkpoint_every=2"]
  full = pretrain.pretrain_mim(str(imgs), str(tmp_path / "full"),
                               config_util.load_config(TINY, over),
                               progress=False)
  out = tmp_path / "part"
  part = pretrain.pretrain_mim(str(imgs), str(out), config_util.load_config(
      TINY, over + ["--config.max_steps=3"]), progress=False)
  assert part.steps == 3
  with pytest.raises(FileNotFoundError):  # stopped early: no model yet
    checkpoints.read_meta(out)
  assert sorted(os.listdir(out / "train" / "checkpoints"), key=int) == [
      "2", "3"]
  res = pretrain.pretrain_mim(str(imgs), str(out),
                              config_util.load_config(TINY, over),
                              progress=False)
  assert res.steps == full.steps == 6 and res.final_loss == full.final_loss
  a, _ = checkpoints.load_model(out)
  b, _ = checkpoints.load_model(tmp_path / "full")
  from flax import nnx
  jax.tree.map(np.testing.assert_array_equal, nnx.state(a, nnx.Param),
               nnx.state(b, nnx.Param))
  # The loss curve covers every step once, across the two calls.
  curve = json.load(open(out / "pretrain_loss.json"))
  assert [s for s, _ in curve] == list(range(1, 7))
  assert curve == json.load(open(tmp_path / "full" / "pretrain_loss.json"))
  # A changed config is refused with the difference.
  with pytest.raises(ValueError, match=r"mask_ratio 0\.6 -> 0\.5"):
    pretrain.pretrain_mim(str(imgs), str(out), config_util.load_config(
        TINY, over + ["--config.mask_ratio=0.5"]), progress=False)


def test_cli_pretrain_encoder(tmp_path, capsys):
  imgs = _photos(tmp_path / "imgs", 4)
  rc = cli.main(["pretrain-encoder", str(imgs), "--out", str(tmp_path / "e"),
                 "--config", TINY, "--set", "config.steps=2", "--quiet"])
  assert rc == 0
  assert "4 photographs, 2 steps" in capsys.readouterr().out
  assert checkpoints.read_meta(tmp_path / "e")["architecture"] == "vit"
  rc = cli.main(["pretrain-encoder", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "e2"), "--config", TINY, "--quiet"])
  assert rc == 2
