"""VUAD unet_res port: parity with the torch reference and strict errors."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from efiqa_jax import checkpoints, cli  # noqa: E402
from efiqa_jax.port import common, vuad  # noqa: E402
from efiqa_jax.reference.unet import RefUNetRes  # noqa: E402

pytestmark = pytest.mark.port
BASE = 8
# README: <= 1.2e-7, one float32 ulp of outputs in [1, 2) (x + f(x), x in
# [0, 1]); measured 6e-8 here (1.2e-7 at base 64), f(x) alone <= 3e-8.
TOL = 1.2e-7


@pytest.fixture(scope="module")
def ref():
  torch.manual_seed(0)
  return RefUNetRes(3, 3, BASE).eval()


@pytest.fixture(scope="module")
def ref_sd(ref):
  return {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}


def _torch(ref, x, res=False):
  with torch.no_grad():
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    y = ref.forward_res(t) if res else ref(t)
  return y.permute(0, 2, 3, 1).numpy()


def test_state_dict_has_duplicated_keys(ref):
  sd = ref.state_dict()
  assert "conv1.conv1.weight" in sd and "conv1.conv_block.0.weight" in sd
  assert "upconv1.conv.weight" in sd and "upconv1.conv_block.0.weight" in sd
  assert sd["conv3.conv2.bias"].data_ptr() == \
      sd["conv3.conv_block.2.bias"].data_ptr()
  # 9 blocks x 2 convs x 2 tensors x 2 copies + 4 upconvs x 2 x 2 + outconv 2
  assert len(sd) == 72 + 16 + 2


def test_cli_port_parity_and_sidecar(ref, tmp_path):
  src = tmp_path / "model_epoch_100.pth"
  torch.save(ref.state_dict(), src)
  out = tmp_path / "vuad"
  assert cli.main(["port", "vuad", str(src), "--out", str(out)]) == 0
  model, meta = checkpoints.load_unet_checkpoint(out)
  assert meta["architecture"] == "unet"
  assert meta["kwargs"] == dict(in_channels=3, out_channels=3,
                                base_channels=BASE, residual=True,
                                dtype="float32")
  assert meta["source"]["sha256"] == common.sha256_file(src)
  assert meta["source"]["tensors"] == 90
  assert json.loads((out / "efiqa.json").read_text()) == meta
  x = np.random.RandomState(0).rand(2, 64, 64, 3).astype(np.float32)
  y, f = nnx.jit(lambda m, x: (m(x), m.body(x)))(model, jnp.asarray(x))
  err_y = float(np.abs(np.asarray(y) - _torch(ref, x)).max())
  err_f = float(np.abs(np.asarray(f) - _torch(ref, x, res=True)).max())
  print(f"VUAD parity max|diff|: output {err_y:.2e}, residual {err_f:.2e}")
  assert err_y <= TOL and err_f <= TOL
  # The output is not trivially the input: the check above has teeth.
  assert float(np.abs(_torch(ref, x, res=True)).max()) > 1e-2
  # Refuses to overwrite; a second port with --overwrite works.
  assert cli.main(["port", "vuad", str(src), "--out", str(out)]) == 1
  assert cli.main(["port", "vuad", str(src), "--out", str(out),
                   "--overwrite"]) == 0


def test_safetensors_source(ref, ref_sd, tmp_path):
  from safetensors.numpy import save_file
  src = tmp_path / "w.safetensors"
  save_file(ref_sd, str(src))
  model, _ = vuad.port_vuad(src, tmp_path / "out")
  x = np.random.RandomState(1).rand(1, 32, 32, 3).astype(np.float32)
  y = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x))
  assert float(np.abs(np.asarray(y) - _torch(ref, x)).max()) <= TOL


def _port(sd):
  return vuad.port_unet_state_dict(sd)


def test_missing_key(ref_sd):
  sd = dict(ref_sd)
  del sd["conv4.conv_block.2.weight"]
  with pytest.raises(common.PortError, match="conv4.conv_block.2.weight") as e:
    _port(sd)
  assert e.value.absent == ["conv4.conv_block.2.weight"]
  assert not e.value.extra


def test_extra_key(ref_sd):
  sd = dict(ref_sd, **{"head.weight": np.zeros((3,), np.float32)})
  with pytest.raises(common.PortError, match="unexpected") as e:
    _port(sd)
  assert e.value.extra == ["head.weight"]


def test_wrong_shape(ref_sd):
  sd = dict(ref_sd)
  sd["outconv.bias"] = np.zeros((4,), np.float32)
  with pytest.raises(common.PortError, match="shape mismatches") as e:
    _port(sd)
  assert len(e.value.shape) == 1 and "outconv/bias" in e.value.shape[0]


def test_unequal_duplicate_pair(ref_sd):
  sd = dict(ref_sd)
  sd["upconv2.conv_block.0.bias"] = sd["upconv2.conv.bias"] + 1e-3
  with pytest.raises(common.PortError, match="differ") as e:
    _port(sd)
  assert e.value.unequal == ["upconv2.conv.bias != upconv2.conv_block.0.bias"]


def test_cli_reports_strict_error(ref_sd, tmp_path, capsys):
  sd = {k: torch.from_numpy(v) for k, v in ref_sd.items()
        if k != "outconv.weight"}
  src = tmp_path / "broken.pth"
  torch.save(sd, src)
  assert cli.main(["port", "vuad", str(src), "--out",
                   str(tmp_path / "o")]) == 1
  assert "outconv.weight" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_wrapped_state_dict_and_nonweights_refused(ref, tmp_path):
  src = tmp_path / "wrapped.pth"
  torch.save({"state_dict": ref.state_dict(), "epoch": 3}, src)
  sd, notes = common.load_state_dict(src)
  assert notes["unwrapped"] == "state_dict" and len(sd) == 90
  bad = tmp_path / "obj.pth"
  torch.save({"epoch": 3}, bad)
  with pytest.raises(common.PortError, match="not a flat state dict"):
    common.load_state_dict(bad)


def test_param_count_equals_torch_reference():
  from efiqa_jax.models.unet import UNet, num_params
  t = RefUNetRes(3, 3, 64)
  n_torch = sum(p.numel() for p in t.parameters())  # duplicates counted once
  m = nnx.eval_shape(lambda: UNet(3, 3, 64, rngs=nnx.Rngs(0)))
  assert num_params(m) == n_torch == 31_031_875


@pytest.mark.parametrize("mode", ["kernels", "deep_winograd", "plain"])
def test_gradient_parity_with_torch(ref, ref_sd, monkeypatch, mode):
  """Forward and gradients against torch's autograd, every parameter and the
  input, with the U-Net's kernels (custom conv weight gradients, max-pool,
  upconv as matmul), with `deep_winograd` (the channel threshold scaled to
  base 8, 256 / 8, so that as at base 64 the deep 3x3 convs run forward and
  backward by Winograd; every path of conv2d_same_cpu is also tested alone
  in test_winograd) and in plain XLA (kernels off)."""
  import contextlib

  import jax

  from efiqa_jax import kernels
  from efiqa_jax.kernels import conv
  if mode == "deep_winograd":
    monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS",
                        conv.WINOGRAD_MIN_CHANNELS * BASE // 64)

  rng = np.random.RandomState(1)
  x = rng.rand(2, 32, 32, 3).astype(np.float32)
  y = rng.rand(2, 32, 32, 3).astype(np.float32)
  # Ties in a max-pool window must go to one element, as in torch.
  x[0, 0:2, 0:2, :] = 0.5
  model = vuad.port_unet_state_dict(ref_sd)

  def loss(m, x):
    out = m(x)
    return jnp.mean((out - y) ** 2), out

  with (kernels.disabled() if mode == "plain" else contextlib.nullcontext()):
    (gm, gx), out = nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))(
        model, jnp.asarray(x))
  assert float(np.abs(np.asarray(out) - _torch(ref, x)).max()) <= TOL
  tref = RefUNetRes(3, 3, BASE)
  tref.load_state_dict(ref.state_dict())
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
  yt = torch.from_numpy(y).permute(0, 3, 1, 2)
  torch.nn.functional.mse_loss(tref(xt), yt).backward()
  # Every state-dict name (the reference registers each block twice).
  tgrads = {k: p.grad.numpy().copy()
            for k, p in tref.named_parameters(remove_duplicate=False)}
  assert set(tgrads) == set(ref_sd)
  ported = nnx.state(vuad.port_unet_state_dict(tgrads), nnx.Param)
  ours = nnx.state(gm, nnx.Param)
  worst = 0.0
  for (path, a), (_, b) in zip(
      jax.tree_util.tree_leaves_with_path(ours),
      jax.tree_util.tree_leaves_with_path(ported)):
    scale = float(np.abs(b).max()) + 1e-12
    worst = max(worst, float(np.abs(np.asarray(a) - b).max()) / scale)
    assert worst < 1e-5, path
  gxt = xt.grad.permute(0, 2, 3, 1).numpy()
  err_x = np.abs(np.asarray(gx) - gxt).max() / np.abs(gxt).max()
  print(f"gradient parity ({mode}): params {worst:.1e}, input {err_x:.1e}")
  assert err_x < 1e-5
