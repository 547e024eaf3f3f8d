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
  # Stopped after 5 steps (max_steps saves a checkpoint there, no export).
  part = train.train_and_evaluate(
      _cfg("configs/adapter.py:tiny", max_steps=5, **kw), str(tmp_path / "b"))
  assert part.step == 5 and part.adapter_dir is None
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints"),
                key=int) == ["4", "5"]
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


def _e2e_data(tmp_path):
  """A tiny ViT encoder, 8 photographs + 4x4 labels, one broken file."""
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
  return dict(mode="end_to_end", images=str(imgs),
              labels_dir=str(tmp_path / "pl"), encoder=enc, size=64,
              work_size=64, batching="image", batch_size=8, epochs=2,
              augment_flip=True)


# The encoder's matmul kernels sharded over a 'model' axis of 2.
MODEL_SHARDED = dict(
    mesh=dict(data=4, fsdp=1, model=2),
    sharding__params=[
        "('encoder/.*(mlp/fc1|attn/(q|k|v))/kernel', (None, 'model'))",
        ("encoder/.*(mlp/fc2|attn/out)/kernel", "('model', None)"),
        (".*", "replicate")])


@pytest.mark.parametrize("dtype,mesh2d,preprocess", [
    ("float32", False, "efiqa"), ("bfloat16", False, None),
    ("float32", True, None)])
def test_end_to_end_encoder_frozen(tmp_path, dtype, mesh2d, preprocess):
  kw = _e2e_data(tmp_path)
  enc = kw["encoder"]
  c = _cfg("configs/adapter.py:tiny", encoder_dtype=dtype, **kw,
           preprocess=preprocess, **(MODEL_SHARDED if mesh2d else {}))
  res = train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert res.step == 2 and np.isfinite(res.final_loss)
  rep = json.load(open(tmp_path / "wd" / "data.json"))
  assert rep["items"] == 8 and [x[0] for x in rep["not_ok"]] == ["broken"]
  # The adapter records the encoder's inputs (default: the FOV crop).
  feats = checkpoints.read_meta(res.adapter_dir)["features"]
  assert feats["preprocess"] == (preprocess or "fov") and feats["size"] == 64
  assert feats.get("work_size") == (None if preprocess == "efiqa" else 64)
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


def test_encoder_rows_preprocess(tmp_path):
  """End to end, 'efiqa' feeds the whole photograph (the reference
  extractor's input), 'fov' the FOV crop; the label comes with it."""
  from efiqa_jax import fundus
  from efiqa_jax import synth
  from efiqa_jax.encoders import preprocess as pp
  from efiqa_jax.student import data as data_lib
  p = str(tmp_path / "a.png")
  Image.fromarray(np.pad(synth.generate(0, 96).image,
                         ((0, 0), (20, 20), (0, 0)))).save(p)
  lab = str(tmp_path / "a_label.png")
  y = (np.arange(16).reshape(4, 4) % 3 == 0).astype(np.uint8) * 255
  Image.fromarray(y).save(lab)
  rec = {"path": p, "label": lab}
  whole = data_lib.EncoderRows(64, 96, "efiqa", (4, 4)).map(rec)
  np.testing.assert_array_equal(whole["pixels"],
                                pp.preprocess(p, 64, "efiqa"))
  crop = data_lib.EncoderRows(64, 96, "fov", (4, 4)).map(rec)
  np.testing.assert_array_equal(crop["pixels"], pp.preprocess(
      fundus.prepare_fundus(p, 96).image, 64, "efiqa"))
  np.testing.assert_array_equal(crop["y"], y > 0)
  np.testing.assert_array_equal(crop["mask"], np.ones((4, 4)))


def test_end_to_end_model_sharded_resumes_and_matches_replicated(tmp_path):
  """The tiny ViT sharded over `model` (data 4 x model 2): a run stopped at
  step 3 resumes bit for bit; the replicated run (inference form) agrees
  within float tolerance."""
  kw = dict(_e2e_data(tmp_path), epochs=4, checkpoint_every=2)
  full = train.train_and_evaluate(_cfg("configs/adapter.py:tiny", **kw,
                                       **MODEL_SHARDED), str(tmp_path / "a"))
  part = train.train_and_evaluate(_cfg("configs/adapter.py:tiny", max_steps=3,
                                       **kw, **MODEL_SHARDED),
                                  str(tmp_path / "b"))
  assert part.step == 3 and part.adapter_dir is None
  resumed = train.train_and_evaluate(_cfg("configs/adapter.py:tiny", **kw,
                                          **MODEL_SHARDED),
                                     str(tmp_path / "b"))
  assert resumed.step == full.step == 4
  jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.opt_state,
               full.opt_state)
  # Sharded, the encoder keeps the checkpoint's tree (no fused qkv).
  assert "q" in resumed.encoder_state["blocks"]["0"]["attn"]
  repl = train.train_and_evaluate(_cfg("configs/adapter.py:tiny", **kw),
                                  str(tmp_path / "c"))
  # Stated tolerance: the fused/split encoder and the sharded matmuls
  # reorder float32 sums; loss rtol 1e-5, adapter params atol 1e-6.
  assert repl.final_loss == pytest.approx(full.final_loss, rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6,
                                                       rtol=0),
               repl.params, full.params)


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
  from efiqa_jax.encoders import extract
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
    extract.extract_features([str(imgs)], enc, tmp_path / fmt, size=64,
                             work_size=96, batch_size=8, fmt=fmt,
                             shard_size=2)
    c = _cfg("configs/adapter.py:tiny", features_dir=str(tmp_path / fmt),
             labels_dir=str(tmp_path / "pl"), batch_size=16, epochs=2)
    res[fmt] = train.train_and_evaluate(c, str(tmp_path / f"wd_{fmt}"))
  assert res["npy"].step == 10
  jax.tree.map(np.testing.assert_array_equal, res["npy"].params,
               res["arrayrecord"].params)
  # The adapter records what extract's metadata.json says (fov by default).
  feats = checkpoints.read_meta(res["npy"].adapter_dir)["features"]
  assert (feats["preprocess"], feats["size"], feats["work_size"]) == (
      "fov", 64, 96)


# ------------------------------------------------- stopping and multi-host


def _cli(fd, ld, wd, *extra):
  return ["train-adapter", "--config",
          os.path.join(REPO, "configs/adapter.py:tiny"), "--workdir", str(wd),
          f"config.features_dir={fd}", f"config.labels_dir={ld}", *extra]


def test_sigint_then_sigterm_then_rerun_is_bit_exact(fdata, tmp_path):
  """Ctrl-C (SIGINT) and SIGTERM mid-run: each saves a checkpoint at the
  step reached and exits with its documented code (130, 75) in one line;
  the rerun finishes bit for bit like an uninterrupted run, each logged
  step once."""
  from efiqa_jax import cli
  from efiqa_jax import metric_writers
  from tests import multihost
  import signal
  fd, ld, _ = fdata
  over = ["config.epochs=60", "config.checkpoint_every=5",
          "config.log_every=5"]
  wd = tmp_path / "sig"
  seen = []
  for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 75)):
    p = multihost.start_efiqa(_cli(fd, ld, wd, *over), fast_compile=False)
    multihost.wait_for(lambda: [s for s in multihost.checkpoint_steps(wd)
                                if s not in seen], p, 900, "train-adapter")
    p.send_signal(sig)
    rc, log = multihost.finish(p, 300, f"train-adapter after {sig.name}")
    assert rc == code, log[-3000:]
    stopped = multihost.checkpoint_steps(wd)[-1]
    assert stopped < 180 and stopped not in seen
    seen += multihost.checkpoint_steps(wd)
    assert (f"stopped by {sig.name} after step {stopped}/180; checkpoint "
            f"{stopped} saved") in log, log[-2000:]
    assert "Traceback" not in log and not (wd / "adapter").exists()
  assert cli.main(_cli(fd, ld, wd, *over)) == 0
  ref = train.train_and_evaluate(_cfg(
      "configs/adapter.py:tiny", features_dir=fd, labels_dir=ld, epochs=60,
      checkpoint_every=5, log_every=5), str(tmp_path / "ref"))
  done = train.train_and_evaluate(_cfg(
      "configs/adapter.py:tiny", features_dir=fd, labels_dir=ld, epochs=60,
      checkpoint_every=5, log_every=5), str(wd))  # a finished run: no-op
  jax.tree.map(np.testing.assert_array_equal, done.params, ref.params)
  jax.tree.map(np.testing.assert_array_equal, done.opt_state, ref.opt_state)
  assert [r["step"] for r in metric_writers.read_metrics(wd)] == list(
      range(5, 181, 5))
  assert done.final_loss == ref.final_loss


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_started_by_flags_killed_and_rerun(fdata, tmp_path):
  """`efiqa --coordinator-address ... --num-processes 2 --process-id i
  train-adapter` (2 processes x 2 devices), hard-killed after a checkpoint
  and rerun: one adapter, each logged step once, the parameters of one
  process on the same 4-device mesh."""
  from efiqa_jax import metric_writers
  from tests import multihost
  fd, ld, _ = fdata
  wd = tmp_path / "mp"
  args = _cli(fd, ld, wd, "config.epochs=30", "config.checkpoint_every=10",
              "config.log_every=10")
  res, killed = multihost.run_efiqa(
      lambda i: args, 2, timeout=1800, what="2-process train-adapter",
      kill_when=lambda: 10 in multihost.checkpoint_steps(wd))
  assert killed and not (wd / "adapter").exists(), res[0][1][-2000:]
  res, _ = multihost.run_efiqa(lambda i: args, 2, timeout=1800,
                               what="2-process train-adapter rerun")
  assert "step 90/90" in res[0][1] and "step 90/90" not in res[1][1]
  assert [r["step"] for r in metric_writers.read_metrics(wd)] == list(
      range(10, 91, 10))
  ada, meta = checkpoints.load_model(wd / "adapter")
  assert meta["training"]["steps"] == 90
  one = train.train_and_evaluate(_cfg(
      "configs/adapter.py:tiny", features_dir=fd, labels_dir=ld, epochs=30,
      mesh=dict(data=4, fsdp=1, model=1)), str(tmp_path / "one"))
  got = nnx.to_pure_dict(nnx.state(ada, nnx.Param))
  # Cross-process (gloo) reductions may order sums differently: stated
  # tolerance atol 1e-5 after 90 steps.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5,
                                                       rtol=0),
               got, one.params)
