"""EyeQ option 2: 3-class head on frozen tokens + map-consistency term."""
import csv
import json
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from efiqa_jax import checkpoints
from efiqa_jax import cli
from efiqa_jax.models import adapters
from efiqa_jax.student import eyeq_head


def test_loss_by_hand():
  il = jnp.array([[0.0, 0.0, 0.0]])
  ll = jnp.zeros((1, 1, 2, 3))
  q = jnp.array([[[1 / 3, 1.0]]])
  loss, ce = eyeq_head.head_loss(il, ll, jnp.array([2]), q, lam=2.0)
  # CE of uniform logits = ln 3; local not-good = 2/3 everywhere:
  # MSE = ((2/3 - 1/3)^2 + (2/3 - 1)^2) / 2 = 1/9
  assert float(ce) == pytest.approx(math.log(3), rel=1e-6)
  assert float(loss) == pytest.approx(math.log(3) + 2 / 9, rel=1e-6)


def test_head_learns_and_follows_the_map(tmp_path):
  rng = np.random.default_rng(0)
  n, g, d = 96, 3, 8
  y = rng.integers(0, 3, n)
  centres = rng.normal(size=(3, d)) * 2
  x = (centres[y][:, None, None] + rng.normal(size=(n, g, g, d))).astype(
      np.float32)
  fd = tmp_path / "f"
  fd.mkdir()
  rows = []
  for i in range(n):
    np.save(fd / f"e{i}.npy", x[i])
    rows.append({"id": f"e{i}", "label": ("good", "usable", "reject")[y[i]]})
  with open(tmp_path / "labels.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["id", "label"])
    w.writeheader()
    w.writerows(rows + [{"id": "absent", "label": "good"}])
  checkpoints.save_model(tmp_path / "ada",
                         adapters.build_adapter("linear", d, seed=0))
  assert cli.main(["train-eyeq-head", "--features", str(fd), "--adapter",
                   str(tmp_path / "ada"), "--labels",
                   str(tmp_path / "labels.csv"), "--out",
                   str(tmp_path / "head"), "--epochs", "60", "--lr",
                   "0.05", "--lam", "0.1"]) == 0
  head, meta = checkpoints.load_model(tmp_path / "head")
  assert meta["training"]["labels_without_features"] == ["absent"]
  assert json.loads((tmp_path / "head" / "calibration.json").read_text())[
      "eyeq_head"] == "."
  il, _ = head(jnp.asarray(x))
  acc = float(np.mean(np.argmax(np.asarray(il), 1) == y))
  assert acc > 0.9, acc
  # The consistency term pulls local not-good towards the adapter's map.
  ada, _ = checkpoints.load_model(tmp_path / "ada")
  q = np.asarray(jax.nn.sigmoid(ada(jnp.asarray(x))))
  h_free, _ = eyeq_head.fit_eyeq_head(x, y, q, epochs=40, lr=0.05, lam=0.0)
  h_reg, _ = eyeq_head.fit_eyeq_head(x, y, q, epochs=40, lr=0.05, lam=20.0)

  def mse(h):
    _, ll = h(jnp.asarray(x))
    return float(np.mean((1 - np.asarray(jax.nn.softmax(ll, -1))[..., 0]
                          - q) ** 2))
  assert mse(h_reg) < 0.5 * mse(h_free)
