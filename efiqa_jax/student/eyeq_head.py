"""The paper's option 2 (efiqa-method.md §1.6): an EyeQ 3-class linear head
on the frozen encoder's patch tokens, kept explainable by a map-consistency
regulariser.

  local logits  l_hw = z_hw V + c          (per token, 3 classes)
  image logits  mean_hw l_hw
  loss          CE(image logits, class)
                + lam * mean_hw (1 - softmax(l_hw)_good - Q_hw)^2
where Q = sigmoid(adapter(z)) is the frozen adapter's degradation map. The
paper says "MSE between its local predictions and the frozen adapter's score
map"; which local quantity is compared is not stated -- we use the local
probability of not-good (usable + reject), the quantity Q estimates.
Paper training: 120 epochs, batch 32, AdamW lr 1e-3.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efiqa_jax import checkpoints

CLASSES = ("good", "usable", "reject")
CALIBRATION = "calibration.json"


class EyeQHead(nnx.Module):
  ARCH = "eyeq_head"

  def __init__(self, in_dim: int = 1024, n_classes: int = 3, *,
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.in_dim, self.n_classes = int(in_dim), int(n_classes)
    self.dtype = jnp.dtype(dtype)
    self.linear = nnx.Linear(in_dim, n_classes, dtype=dtype,
                             param_dtype=jnp.float32, rngs=rngs)

  def config(self) -> dict:
    return dict(in_dim=self.in_dim, n_classes=self.n_classes,
                dtype=self.dtype.name)

  def __call__(self, z):
    """(B, gh, gw, D) -> (image logits (B, C), local logits (B, gh, gw, C))."""
    local = self.linear(z.astype(self.dtype)).astype(jnp.float32)
    return local.mean(axis=(1, 2)), local


def head_loss(image_logits, local_logits, y, score_map, lam: float):
  import optax
  ce = optax.softmax_cross_entropy_with_integer_labels(image_logits, y).mean()
  not_good = 1.0 - jax.nn.softmax(local_logits, -1)[..., 0]
  return ce + lam * jnp.mean((not_good - score_map) ** 2), ce


def fit_eyeq_head(features: np.ndarray, labels: np.ndarray,
                  score_maps: np.ndarray, *, epochs: int = 120,
                  batch: int = 32, lr: float = 1e-3, lam: float = 1.0,
                  weight_decay: float = 0.01, seed: int = 0):
  """-> (EyeQHead, history of per-epoch mean loss)."""
  import optax
  n, gh, gw, d = features.shape
  if score_maps.shape != (n, gh, gw):
    raise ValueError(f"score maps {score_maps.shape} do not match the token "
                     f"grid {(n, gh, gw)}")
  head = EyeQHead(d, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(head, nnx.Param)
  params = nnx.to_pure_dict(params)
  tx = optax.adamw(lr, weight_decay=weight_decay)
  opt = tx.init(params)
  x, y, q = (jnp.asarray(features, jnp.float32), jnp.asarray(labels),
             jnp.asarray(score_maps, jnp.float32))

  @jax.jit
  def step(params, opt, idx):
    def loss_fn(p):
      il, ll = nnx.merge(graphdef, p)(x[idx])
      return head_loss(il, ll, y[idx], q[idx], lam)[0]
    loss, g = jax.value_and_grad(loss_fn)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, loss

  rng = np.random.default_rng(seed)
  history = []
  b = min(batch, n)
  for _ in range(epochs):
    perm = rng.permutation(n)
    losses = []
    for s in range(0, n - b + 1, b):  # drop the ragged tail (static shapes)
      params, opt, loss = step(params, opt, jnp.asarray(perm[s:s + b]))
      losses.append(float(loss))
    history.append(float(np.mean(losses)))
  return nnx.merge(graphdef, params), history


def train_eyeq_head(features_dir: str, adapter_dir: str, labels_csv: str,
                    out_dir: str, *, label_column: str = "label",
                    epochs: int = 120, batch: int = 32, lr: float = 1e-3,
                    lam: float = 1.0, seed: int = 0) -> dict:
  """efiqa extract features + frozen adapter + EyeQ labels -> head model."""
  from efiqa_jax import evaluate as ev
  from efiqa_jax.student import data as data_lib
  files, _, fmeta = data_lib.feature_files(features_dir)
  adapter, ameta = checkpoints.load_model(adapter_dir, kind="adapter")
  feats, ys, missing = [], [], []
  for r in ev.read_csv(labels_csv):
    key = r.get("id") or os.path.splitext(os.path.basename(
        r.get("image") or r.get("path") or ""))[0]
    v = str(r[label_column]).strip().lower()
    if v not in ev.EYEQ_CLASSES:
      raise ValueError(f"label {v!r} of {key} is not one of "
                       f"{sorted(ev.EYEQ_CLASSES)}")
    if key not in files:
      missing.append(key)
      continue
    feats.append(np.load(files[key]).astype(np.float32))
    ys.append(ev.EYEQ_CLASSES[v])
  if not feats:
    raise ValueError("no labelled image has features")
  x = np.stack(feats)
  q = np.asarray(jax.nn.sigmoid(adapter(jnp.asarray(x))))
  head, hist = fit_eyeq_head(x, np.asarray(ys), q, epochs=epochs,
                             batch=batch, lr=lr, lam=lam, seed=seed)
  meta = {"training": {"n": len(ys), "labels_without_features": missing,
                       "epochs": epochs, "batch": batch, "lr": lr,
                       "lambda": lam, "final_loss": hist[-1],
                       "adapter": os.path.abspath(adapter_dir),
                       "features": {k: fmeta.get(k) for k in (
                           "size", "work_size", "grid") if k in fmeta}},
          "classes": list(CLASSES)}
  checkpoints.save_model(out_dir, head, meta, overwrite=True)
  # The file `efiqa assess --model student --calibration` reads: the grade
  # becomes the head's class (path relative to this file).
  from efiqa_jax import calibrate
  with open(os.path.join(out_dir, CALIBRATION), "w") as f:
    json.dump({"format": calibrate.FORMAT, "version": 1, "eyeq_head": "."},
              f, indent=1)
  return meta
