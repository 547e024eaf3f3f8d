"""RRWNet / R2-V2 port: parity with the torch reference, strict errors, and
the R2-V2 input preparation."""
import contextlib
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from efiqa_jax import checkpoints, cli, kernels  # noqa: E402
from efiqa_jax.models import rrwnet as rr  # noqa: E402
from efiqa_jax.port import common  # noqa: E402
from efiqa_jax.port import rrwnet as port_rr  # noqa: E402
from efiqa_jax.reference.unet import RefRRWNet  # noqa: E402

pytestmark = pytest.mark.port
TOL = 1e-7  # README; measured 3e-8 (logits, all stages, base 8, 64x64)


@pytest.fixture(scope="module")
def ref():
  torch.manual_seed(1)
  return RefRRWNet(6, 3, 8, iterations=2).eval()


def test_cli_port_r2v2_bv_parity(ref, tmp_path):
  src, cfg = tmp_path / "bv.pth", tmp_path / "bv_config.json"
  torch.save(ref.state_dict(), src)
  cfg.write_text(json.dumps(dict(in_channels=6, out_channels=3,
                                 base_channels=8, num_iterations=2)))
  out = tmp_path / "bv"
  assert cli.main(["port", "rrwnet", str(src), "--out", str(out),
                   "--config", str(cfg)]) == 0
  model, meta = checkpoints.load_model(out, architecture="rrwnet")
  assert meta["model_type"] == "bv" and model.iterations == 2
  assert meta["source"]["config_json"]["num_iterations"] == 2
  x = np.random.RandomState(0).rand(1, 64, 64, 6).astype(np.float32)
  with torch.no_grad():
    want = [p.permute(0, 2, 3, 1).numpy()
            for p in ref(torch.from_numpy(x).permute(0, 3, 1, 2))]
  f = jax.jit(lambda m, x: m.stages(x))
  for mode in ("kernels", "plain"):  # plain: every kernel in its XLA form
    with kernels.disabled() if mode == "plain" else contextlib.nullcontext():
      stages = f(model, jnp.asarray(x))
    assert len(stages) == len(want) == 4
    errs = [float(np.abs(np.asarray(a) - b).max())
            for a, b in zip(stages, want)]
    print(f"RRWNet parity max|diff| per stage ({mode}): "
          f"{['%.1e' % e for e in errs]}")
    assert max(errs) <= TOL
  # The refinement U-Net really changes a/v (a random second_u is nearly
  # contractive, so later stages differ only slightly).
  assert np.abs(want[1][..., :2] - want[0][..., :2]).max() > 1e-2
  np.testing.assert_array_equal(want[-1][..., 2], want[0][..., 2])


def test_defaults_without_config(ref, tmp_path):
  src = tmp_path / "rrwnet.pth"
  torch.save(ref.state_dict(), src)
  model, meta = port_rr.port_rrwnet(src, tmp_path / "o")
  assert model.iterations == port_rr.DEFAULT_ITERATIONS
  assert (model.in_channels, model.base_channels) == (6, 8)
  assert meta["model_type"] == "bv"


def test_strict_errors(ref, tmp_path):
  sd = {k: v.numpy().copy() for k, v in ref.state_dict().items()}
  bad = dict(sd)
  bad["second_u.conv2.conv_block.0.weight"] = (
      bad["second_u.conv2.conv1.weight"] * 2)
  del bad["first_u.outconv.bias"]
  with pytest.raises(common.PortError) as e:
    port_rr.port_rrwnet_state_dict(bad)
  assert e.value.absent == ["first_u.outconv.bias"]
  assert e.value.unequal == [
      "second_u.conv2.conv1.weight != second_u.conv2.conv_block.0.weight"]
  with pytest.raises(common.PortError, match="base_channels: config 16"):
    port_rr.port_rrwnet_state_dict(sd, base_channels=16)


def _fake_fundus(h=96, w=128, seed=0):
  rng = np.random.RandomState(seed)
  yy, xx = np.mgrid[:h, :w]
  inside = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.45 * h) ** 2
  img = np.zeros((h, w, 3), np.uint8)
  base = 120 + 40 * np.sin(xx / 5.0) + rng.randint(0, 20, (h, w))
  for c, s in enumerate((1.0, 0.6, 0.3)):
    img[..., c] = np.where(inside, np.clip(base * s, 0, 255), 0)
  return img, inside


def test_r2v2_inputs_shapes_and_mask():
  img, inside = _fake_fundus()
  prep = rr.r2v2_inputs(img, model_type="bv", width=160)
  x, m = prep["x"], prep["mask"]
  assert prep["size"] == (120, 160) and prep["orig_size"] == (96, 128)
  # R2-V2 always pads: 120 -> 128, 160 -> 192 (a full 32 when divisible).
  assert prep["padding"] == ((4, 4), (16, 16))
  assert x.shape == (128, 192, 6) and m.shape == (128, 192)
  assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
  pre = x[..., :3]
  # Enhanced image is 0 outside the (eroded) FOV before CLAHE, which upstream
  # does not re-mask: near zero there.
  assert pre[m == 0].max() < 0.02
  assert pre[m == 1].std() > 0.05
  av = rr.r2v2_inputs(img, model_type="av", width=None)
  assert av["x"].shape[-1] == 3 and av["size"] == (96, 128)
  logits = np.zeros(av["x"].shape, np.float32)
  p = rr.r2v2_postprocess(logits, av)
  assert p.shape == (96, 128, 3)
  assert set(np.unique(p)) <= {0.0, 0.5}
  with pytest.raises(ValueError, match="uint8"):
    rr.r2v2_inputs(img.astype(np.float32))


def test_rrwnet_module_checks():
  with pytest.raises(ValueError, match="out_channels=3"):
    nnx.eval_shape(lambda: rr.RRWNet(3, 2, 8, rngs=nnx.Rngs(0)))


def test_r2v2_segment_end_to_end(ref, tmp_path):
  src = tmp_path / "bv.pth"
  torch.save(ref.state_dict(), src)
  model, _ = port_rr.port_rrwnet(src, tmp_path / "o", iterations=2)
  img, _ = _fake_fundus(48, 64)
  p = rr.r2v2_segment(model, img, width=None)
  assert p.shape == (48, 64, 3) and p.dtype == np.float32
  assert 0 <= p.min() and p.max() <= 1 and p.max() > 0
  prep = rr.r2v2_inputs(img, width=None)
  with torch.no_grad():
    want = ref(torch.from_numpy(prep["x"][None]).permute(0, 3, 1, 2))[-1]
  want = rr.r2v2_postprocess(want.permute(0, 2, 3, 1).numpy()[0], prep)
  assert float(np.abs(p - want).max()) <= TOL


def test_r2v2_inputs_on_real_drive_image(fundus_dir):
  from PIL import Image
  img = np.asarray(Image.open(fundus_dir / "drive" / "01_image.png")
                   .convert("RGB"))
  fov = np.asarray(Image.open(fundus_dir / "drive" / "01_fov_mask.png")
                   .convert("L")) > 127
  ves = np.asarray(Image.open(fundus_dir / "drive" /
                              "01_vessels_av_reference.png").convert("RGB"))
  prep = rr.r2v2_inputs(img, fov, model_type="bv", width=None)
  (t, _), (l, _) = prep["padding"]
  h, w = prep["size"]
  pre = prep["x"][t:t + h, l:l + w, :3]
  m = prep["mask"][t:t + h, l:l + w] > 0
  raw = prep["x"][t:t + h, l:l + w, 3:]
  np.testing.assert_allclose(raw, img / 255.0, atol=1e-6)
  # Eroded FOV: inside the given mask, a bit smaller.
  assert m.sum() < fov.sum() and not (m & ~fov).any()
  # Vessels are dark in the enhanced image: contrast with the background.
  vessel = (ves[..., 2] > 127) & m
  back = (ves[..., 2] < 20) & m
  g = pre[..., 1]
  assert g[vessel].mean() + 0.1 < g[back].mean(), (g[vessel].mean(),
                                                    g[back].mean())
