"""`efiqa port adapter`: the reference sc_linear state dict and the demo's
(W, b) arrays give z @ W + b exactly; anything else is refused with the
difference listed."""
import json

import numpy as np
import pytest

from efiqa_jax import checkpoints
from efiqa_jax import cli
from efiqa_jax.port import adapter as port_adapter
from efiqa_jax.port.common import PortError

D = 12


def _ref(seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(1, D)).astype(np.float32), rng.normal(
      size=(1,)).astype(np.float32)


def _check(out, w, b):
  m, meta = checkpoints.load_model(out)
  assert meta["architecture"] == "adapter_linear"
  z = np.random.default_rng(5).normal(size=(2, 3, 3, D)).astype(np.float32)
  want = z @ w.reshape(D) + b.reshape(())
  np.testing.assert_allclose(np.asarray(m(z)), want, atol=1e-5)


def test_torch_state_dict(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  w, b = _ref()
  lin = torch.nn.Linear(D, 1)
  with torch.no_grad():
    lin.weight.copy_(torch.from_numpy(w))
    lin.bias.copy_(torch.from_numpy(b))

  class SC(torch.nn.Module):  # the reference module: self.model = Linear

    def __init__(self):
      super().__init__()
      self.model = lin

  torch.save(SC().state_dict(), tmp_path / "adapter.pth")
  assert cli.main(["port", "adapter", str(tmp_path / "adapter.pth"),
                   "--out", str(tmp_path / "out")]) == 0
  assert json.loads(capsys.readouterr().out)["architecture"] == (
      "adapter_linear")
  _check(tmp_path / "out", w, b)
  # Against torch itself.
  m, _ = checkpoints.load_model(tmp_path / "out")
  z = np.random.default_rng(1).normal(size=(7, D)).astype(np.float32)
  with torch.no_grad():
    ref = lin(torch.from_numpy(z)).numpy()[:, 0]
  np.testing.assert_allclose(np.asarray(m(z)), ref, atol=1e-5)


def test_demo_arrays(tmp_path):
  w, b = _ref(1)
  np.savez(tmp_path / "wb.npz", W=w.reshape(D, 1), b=b)
  port_adapter.port_adapter(tmp_path / "wb.npz", tmp_path / "o1")
  _check(tmp_path / "o1", w, b)
  np.save(tmp_path / "W.npy", w.reshape(D))
  np.save(tmp_path / "b.npy", b)
  assert cli.main(["port", "adapter", str(tmp_path / "W.npy"), "--bias",
                   str(tmp_path / "b.npy"), "--out", str(tmp_path / "o2")]) == 0
  _check(tmp_path / "o2", w, b)


def test_strict(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  w, b = _ref()
  torch.save({"model.weight": torch.from_numpy(w),
              "model.bias": torch.from_numpy(b),
              "extra.weight": torch.zeros(2)}, tmp_path / "x.pth")
  with pytest.raises(PortError, match="extra.weight"):
    port_adapter.port_adapter(tmp_path / "x.pth", tmp_path / "o")
  torch.save({"model.weight": torch.zeros(2, D),
              "model.bias": torch.zeros(1)}, tmp_path / "y.pth")
  with pytest.raises(PortError, match=r"want \(1, D\)"):
    port_adapter.port_adapter(tmp_path / "y.pth", tmp_path / "o")
  torch.save({"model.weight": torch.zeros(1, D)}, tmp_path / "z.pth")
  assert cli.main(["port", "adapter", str(tmp_path / "z.pth"), "--out",
                   str(tmp_path / "o")]) == 1
  assert "model.bias" in capsys.readouterr().err
  np.savez(tmp_path / "c.npz", W=np.zeros(D), b=np.zeros(1), c=np.zeros(1))
  with pytest.raises(PortError, match="unexpected"):
    port_adapter.port_adapter(tmp_path / "c.npz", tmp_path / "o")
  np.save(tmp_path / "W.npy", np.zeros(D))
  with pytest.raises(ValueError, match="--bias"):
    port_adapter.port_adapter(tmp_path / "W.npy", tmp_path / "o")


def test_sa_cnn_matches_torch(tmp_path):
  torch = pytest.importorskip("torch")
  from efiqa_jax.reference.adapters import SpaceAdmiralCNN
  torch.manual_seed(0)
  ref = SpaceAdmiralCNN(12, 8, 1.0).eval()
  with torch.no_grad():  # non-trivial norms, layer scale, biases
    for name, p in ref.named_parameters():
      if name.endswith("gamma") or "norm.weight" in name:
        p.copy_(1 + 0.3 * torch.randn(p.shape))
      elif name.endswith("bias"):
        p.copy_(0.3 * torch.randn(p.shape))
  torch.save(ref.state_dict(), tmp_path / "sa_cnn.pth")
  assert cli.main(["port", "sa_cnn", str(tmp_path / "sa_cnn.pth"), "--out",
                   str(tmp_path / "o")]) == 0
  m, meta = checkpoints.load_model(tmp_path / "o")
  assert meta["architecture"] == "modern_head_64to16"
  z = np.random.default_rng(0).normal(size=(2, 16, 16, 12)).astype(np.float32)
  with torch.no_grad():
    want = ref.model(torch.from_numpy(z.transpose(0, 3, 1, 2))).numpy()[:, 0]
  got = np.asarray(m(z))
  assert got.shape == (2, 4, 4)
  np.testing.assert_allclose(got, want, atol=1e-4)
  sd = ref.state_dict()
  del sd["model.stage3.gamma"]
  torch.save(sd, tmp_path / "bad.pth")
  with pytest.raises(PortError, match="stage3.gamma"):
    port_adapter.port_sa_cnn(tmp_path / "bad.pth", tmp_path / "o2")
