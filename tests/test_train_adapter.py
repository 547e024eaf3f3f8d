"""`efiqa train-adapter`: learning from cached features, bit-exact resume on
8 fake devices, end to end with a frozen (bit-identical) encoder whose
parameters get no optimizer state, the EFIQA-CP head with nnPU."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import jax
import jax.numpy as jnp
from flax import nnx

from efiqa_jax import checkpoints
from efiqa_jax import config_util
from efiqa_jax import metrics
from efiqa_jax import synth
from efiqa_jax.kernels import vit_inference
from efiqa_jax.models import adapters
from efiqa_jax.models import vit
from efiqa_jax.student import losses
from efiqa_jax.student import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 16


def _feature_data(root, n=12, g=4, seed=0):
  """Random token grids; a token is 'degraded' when its projection on a
  fixed direction is high (so a linear adapter can learn it)."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=D)
  fd, ld = root / "feats", root / "pl" / "labels"
  fd.mkdir(parents=True)
  ld.mkdir(parents=True)
  for i in range(n):
    x = rng.normal(size=(g, g, D)).astype(np.float32)
    y = ((x @ w) > 1.0).astype(np.uint8) * 255
    np.save(fd / f"im{i:02d}.npy", x)
    Image.fromarray(y).save(ld / f"im{i:02d}.png")
  Image.fromarray(np.zeros((g, g), np.uint8)).save(ld / "orphan.png")
  return str(fd), str(root / "pl"), w


def _cfg(spec, **kw):
  c = config_util.load_config(os.path.join(REPO, spec))
  for k, v in kw.items():
    node = c
    parts = k.split("__")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = v
  return c


@pytest.fixture(scope="module")
def fdata(tmp_path_factory):
  return _feature_data(tmp_path_factory.mktemp("fd"))


def test_paper_defaults(fdata, tmp_path):
  """configs/adapter.py trains what the paper trains (efiqa-method.md §1.5),
  checked on what its first step computes: sc_linear (one weight per
  feature and a bias) on every token, seed 504, BCE with pos_weight 20,
  4096-patch batches, 20 epochs, AdamW lr 1e-3 with weight decay 0.01."""
  fd, ld, _ = fdata
  res = train.train_and_evaluate(
      _cfg("configs/adapter.py", features_dir=fd, labels_dir=ld, max_steps=1,
           progress=False), str(tmp_path / "wd"))
  rep = json.load(open(tmp_path / "wd" / "data.json"))
  # 192 patches: one (padded) batch of 4096 per epoch.
  assert (rep["steps_per_epoch"], rep["total_steps"]) == (1, 20)
  init = nnx.to_pure_dict(nnx.state(adapters.build_adapter(
      "linear", D, seed=504), nnx.Param))["linear"]
  assert jax.tree.map(np.shape, res.params) == {
      "linear": {"kernel": (D, 1), "bias": (1,)}}
  ids = [f"im{i:02d}" for i in range(12)]
  x = np.concatenate([np.load(os.path.join(fd, i + ".npy")).reshape(-1, D)
                      for i in ids]).astype(np.float64)
  y = np.concatenate([np.asarray(Image.open(os.path.join(
      ld, "labels", i + ".png"))).reshape(-1) > 0 for i in ids])
  w0 = np.asarray(init["kernel"], np.float64)
  b0 = np.asarray(init["bias"], np.float64)
  z = (x @ w0 + b0)[:, 0]
  sp = lambda v: np.logaddexp(0.0, v)
  want = np.mean(20.0 * y * sp(-z) + (1 - y) * sp(z))
  first = json.loads(open(tmp_path / "wd" / "metrics.jsonl").readline())
  assert first["step"] == 1
  assert first["loss"] == pytest.approx(want, rel=1e-5)
  # AdamW's first step from zero moments: every weight moves by lr against
  # the sign of its gradient, and decays by lr * weight_decay * w.
  dz = (-20.0 * y / (1 + np.exp(z)) + (1 - y) / (1 + np.exp(-z))) / len(z)
  g_w, g_b = x.T @ dz, dz.sum()
  np.testing.assert_allclose(
      res.params["linear"]["kernel"][:, 0],
      w0[:, 0] - 1e-3 * np.sign(g_w) - 1e-3 * 0.01 * w0[:, 0], atol=1e-6)
  np.testing.assert_allclose(res.params["linear"]["bias"],
                             b0 - 1e-3 * np.sign(g_b), atol=1e-6)
  # EFIQA-CP (configs/adapter_cp.py): ModernHead64to16 maps 1024-px input
  # (64x64 tokens) to 16x16 cells; nnPU with pi 0.05 (hand value below).
  cp = config_util.load_config(os.path.join(REPO, "configs/adapter_cp.py"))
  head = nnx.eval_shape(lambda: adapters.build_adapter(
      cp.adapter.name, 1024, **cp.adapter.kwargs))
  assert head.output_grid(cp.size // 16, cp.size // 16) == (16, 16)
  loss, valid = losses.distill_loss(
      cp.loss.name, jnp.array([1.0, -1.0]), jnp.array([1.0, 0.0]),
      pos_weight=cp.loss.pos_weight, pi=cp.loss.pi, beta=cp.loss.beta)
  # pi softplus(-1) + max(0, softplus(-1) - pi softplus(1)), pi = 0.05
  assert float(valid) == 1.0
  assert float(loss) == pytest.approx(
      0.05 * sp(-1.0) + sp(-1.0) - 0.05 * sp(1.0), rel=1e-6)


def test_linear_learns_from_features(fdata, tmp_path):
  fd, ld, w = fdata
  c = _cfg("configs/adapter.py:tiny", features_dir=fd, labels_dir=ld,
           epochs=15, checkpoint_every=1000, loss__pos_weight=3.0,
           optimizer__lr=0.05)
  res = train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert res.step == res.total_steps == 15 * 3  # 192 patches / 64
  rep = json.load(open(tmp_path / "wd" / "data.json"))
  assert rep["matched"] == 12 and rep["labels_without_features"] == [
      "orphan"]
  model, meta = checkpoints.load_model(res.adapter_dir)
  assert meta["architecture"] == "adapter_linear"
  xs = np.stack([np.load(os.path.join(fd, f"im{i:02d}.npy"))
                 for i in range(12)]).reshape(-1, D)
  ys = (xs @ w) > 1.0
  auc = metrics.auroc(ys, np.asarray(model(xs)))
  assert auc > 0.95, auc
  losses_ = [json.loads(l)["loss"] for l in open(tmp_path / "wd" /
                                                  "metrics.jsonl")]
  assert losses_[-1] < 0.5 * losses_[0]


def test_resume_after_kill_bit_exact_8_devices(fdata, tmp_path):
  assert jax.device_count() == 8
  fd, ld, _ = fdata
  kw = dict(features_dir=fd, labels_dir=ld, epochs=3, checkpoint_every=2)
  full = train.train_and_evaluate(_cfg("configs/adapter.py:tiny", **kw),
                                  str(tmp_path / "a"))
  # "Killed" after 5 steps: the last checkpoint is step 4.
  part = train.train_and_evaluate(
      _cfg("configs/adapter.py:tiny", max_steps=5, **kw), str(tmp_path / "b"))
  assert part.step == 5 and part.adapter_dir is None
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints"))[-1] == "4"
  resumed = train.train_and_evaluate(_cfg("configs/adapter.py:tiny", **kw),
                                     str(tmp_path / "b"))
  assert resumed.step == full.step == 9
  jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.opt_state,
               full.opt_state)
  assert not np.array_equal(full.params["linear"]["kernel"],
                            part.params["linear"]["kernel"])
  # Re-running a finished run changes nothing and keeps its final loss.
  again = train.train_and_evaluate(_cfg("configs/adapter.py:tiny", **kw),
                                   str(tmp_path / "b"))
  assert again.step == 9 and again.final_loss == resumed.final_loss
  assert np.isfinite(again.final_loss)
  meta = checkpoints.read_meta(again.adapter_dir)
  assert meta["training"]["final_loss"] == resumed.final_loss
  # A different optimisation cannot resume into that workdir.
  with pytest.raises(ValueError, match="optimizer"):
    train.train_and_evaluate(_cfg("configs/adapter.py:tiny",
                                  optimizer__lr=0.5, **kw),
                             str(tmp_path / "b"))


def _tiny_encoder(path):
  from efiqa_jax.models import vit
  m = vit.VisionTransformer(patch_size=16, hidden_size=D, depth=1,
                            num_heads=2, mlp_hidden=32, num_registers=4,
                            layerscale=True, qkv_bias="qv", ln_eps=1e-5,
                            pos="rope", rngs=nnx.Rngs(0))
  checkpoints.save_model(path, m)
  return str(path)


@pytest.mark.parametrize("dtype,mesh2d", [("float32", False),
                                          ("bfloat16", False),
                                          ("float32", True)])
def test_end_to_end_encoder_frozen(tmp_path, dtype, mesh2d):
  enc = _tiny_encoder(tmp_path / "enc")
  rng = np.random.default_rng(1)
  imgs, ld = tmp_path / "imgs", tmp_path / "pl" / "labels"
  imgs.mkdir()
  ld.mkdir(parents=True)
  for i in range(8):  # photographs the fundus gate accepts
    a = synth.generate(i, 80, degrade=False).image
    Image.fromarray(a).save(imgs / f"p{i}.png")
    Image.fromarray((rng.random((4, 4)) < 0.3).astype(np.uint8) * 255).save(
        ld / f"p{i}.png")
  (imgs / "broken.png").write_bytes(b"not a png")  # listed, not fatal
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(ld / "broken.png")
  c = _cfg("configs/adapter.py:tiny", mode="end_to_end", images=str(imgs),
           labels_dir=str(tmp_path / "pl"), encoder=enc, size=64,
           work_size=64, batching="image", batch_size=8, epochs=2,
           encoder_dtype=dtype, augment_flip=True)
  if mesh2d:  # encoder MLP kernels sharded over a 'model' axis
    c.mesh = (("data", 4), ("model", 2))
    c.param_sharding = ("('.*mlp.*fc1.*kernel', (None, 'model'))",)
  res = train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert res.step == 2 and np.isfinite(res.final_loss)
  rep = json.load(open(tmp_path / "wd" / "data.json"))
  assert rep["items"] == 8 and [x[0] for x in rep["not_ok"]] == ["broken"]
  # The adapter trains in float32 whatever the encoder's compute dtype.
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(res.params))
  before, _ = checkpoints.load_model(enc)
  want = nnx.to_pure_dict(nnx.state(before, nnx.Param))
  # Frozen: the encoder leaves training as it was placed, i.e. the stored
  # weights with bfloat16 compute holding its kernels in bfloat16
  # (checkpoints.cast_frozen_kernels); everything else bit for bit.
  # Replicated, it runs in its inference form (kernels.vit_inference: q/k/v
  # fused, kernels (out, in)); sharded by rules, in the checkpoint's tree,
  # which the rules name.
  placed = (before if mesh2d else
            vit_inference.inference_model(before, dtype))
  flat_got = dict(nnx.traversals.flatten_mapping(res.encoder_state))
  flat_want = dict(nnx.traversals.flatten_mapping(
      nnx.to_pure_dict(nnx.state(placed, nnx.Param))))
  assert flat_got.keys() == flat_want.keys()
  assert any("qkv" in k for k in flat_got) != mesh2d
  for k, w in flat_want.items():
    if k[-1] == "kernel":
      w = np.asarray(jnp.asarray(w).astype(dtype))
    assert np.asarray(flat_got[k]).dtype == w.dtype, k
    np.testing.assert_array_equal(np.asarray(flat_got[k]), w, err_msg=str(k))
  # Optimizer state: Adam moments of the adapter's D + 1 parameters and
  # step counters -- nothing of the encoder's size or shape.
  enc_shapes = {np.shape(a) for a in jax.tree.leaves(want)}
  ad_shapes = {np.shape(a) for a in jax.tree.leaves(res.params)}
  opt_leaves = jax.tree.leaves(res.opt_state)
  assert {np.shape(a) for a in opt_leaves} <= ad_shapes | {()}
  assert not ({np.shape(a) for a in opt_leaves} & (enc_shapes - ad_shapes
                                                    - {()}))
  assert sum(np.size(a) for a in opt_leaves if np.ndim(a)) == 2 * (D + 1)
  assert not np.array_equal(
      res.params["linear"]["kernel"],
      nnx.to_pure_dict(nnx.state(adapters.build_adapter(
          "linear", D, seed=504), nnx.Param))["linear"]["kernel"])


def test_cp_head_nnpu_image_batches(tmp_path):
  fd, ld, _ = _feature_data(tmp_path, n=6, g=16, seed=3)
  # Labels on the head's 4x4 output grid.
  for f in os.listdir(ld + "/labels"):
    y = np.asarray(Image.open(os.path.join(ld, "labels", f)))
    y4 = (y.reshape(4, 4, 4, 4).mean(axis=(1, 3)) > 60).astype(np.uint8)
    Image.fromarray(y4 * 255).save(os.path.join(ld, "labels", f))
  c = _cfg("configs/adapter_cp.py:tiny", features_dir=fd, labels_dir=ld,
           batch_size=8, epochs=3, checkpoint_every=100)
  res = train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert res.step == 3 and np.isfinite(res.final_loss)
  m, meta = checkpoints.load_model(res.adapter_dir)
  assert meta["architecture"] == "modern_head_64to16"
  assert m(np.zeros((1, 16, 16, D), np.float32)).shape == (1, 4, 4)


def test_grid_mismatch_is_an_error(fdata, tmp_path):
  fd, ld, _ = fdata
  c = _cfg("configs/adapter_cp.py:tiny", features_dir=fd, labels_dir=ld)
  with pytest.raises(ValueError, match="label .* adapter outputs 1x1"):
    train.train_and_evaluate(c, str(tmp_path / "wd"))


def test_cli(fdata, tmp_path, capsys):
  from efiqa_jax import cli
  fd, ld, _ = fdata
  wd = str(tmp_path / "wd")
  assert cli.main(["train-adapter", "--config",
                   os.path.join(REPO, "configs/adapter.py:tiny"),
                   "--workdir", wd, f"config.features_dir={fd}",
                   f"config.labels_dir={ld}", "config.epochs=1"]) == 0
  assert "step 3/3" in capsys.readouterr().out
  assert os.path.isdir(os.path.join(wd, "adapter"))
  assert cli.main(["train-adapter", "--config",
                   os.path.join(REPO, "configs/adapter.py:tiny"),
                   "--workdir", wd, "config.labels_dir=/nonexistent"]) == 2


def test_label_resize_nearest_like_torch(fdata, tmp_path):
  torch = pytest.importorskip("torch")
  from efiqa_jax.student import data as data_lib
  y = (np.random.default_rng(0).random((16, 16)) > 0.5).astype(np.float32)
  want = torch.nn.functional.interpolate(
      torch.from_numpy(y)[None, None], size=(14, 14), mode="nearest")[0, 0]
  np.testing.assert_array_equal(data_lib.resize_nearest(y, (14, 14)),
                                want.numpy())
  fd, ld, _ = fdata
  big = tmp_path / "labels8"  # 8x8 labels for 4x4 tokens
  big.mkdir()
  for f in os.listdir(os.path.join(ld, "labels")):
    a = np.asarray(Image.open(os.path.join(ld, "labels", f)))
    Image.fromarray(np.kron(a, np.ones((2, 2), np.uint8))).save(big / f)
  kw = dict(features_dir=fd, labels_dir=str(big), epochs=1,
            batching="image", batch_size=8)
  with pytest.raises(ValueError, match="label_resize"):
    train.train_and_evaluate(_cfg("configs/adapter.py:tiny", **kw),
                             str(tmp_path / "wd0"))
  res = train.train_and_evaluate(
      _cfg("configs/adapter.py:tiny", label_resize="nearest", **kw),
      str(tmp_path / "wd"))
  assert res.step == 2


def test_arrayrecord_features_train_like_npy(tmp_path):
  from efiqa_jax import features
  from efiqa_jax import synth
  enc = _tiny_encoder(tmp_path / "enc")
  imgs = tmp_path / "imgs"
  ld = tmp_path / "pl" / "labels"
  imgs.mkdir()
  ld.mkdir(parents=True)
  rng = np.random.default_rng(2)
  for s in range(5):
    Image.fromarray(synth.generate(s, 96).image).save(imgs / f"g{s}.png")
    Image.fromarray((rng.random((4, 4)) < 0.4).astype(np.uint8) * 255).save(
        ld / f"g{s}.png")
  res = {}
  for fmt in ("npy", "arrayrecord"):
    features.extract_features([str(imgs)], enc, tmp_path / fmt, size=64,
                              work_size=96, batch_size=8, fmt=fmt,
                              shard_size=2)
    c = _cfg("configs/adapter.py:tiny", features_dir=str(tmp_path / fmt),
             labels_dir=str(tmp_path / "pl"), batch_size=16, epochs=2)
    res[fmt] = train.train_and_evaluate(c, str(tmp_path / f"wd_{fmt}"))
  assert res["npy"].step == 10
  jax.tree.map(np.testing.assert_array_equal, res["npy"].params,
               res["arrayrecord"].params)
