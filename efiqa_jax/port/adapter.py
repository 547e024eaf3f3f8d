"""Official EFIQA adapter weights -> efiqa `adapter_linear` model.

Accepted sources (strict: every tensor consumed, every parameter filled):
  * the reference `sc_linear` state dict (.pth/.pt/.bin/.safetensors):
    exactly `model.weight` (1, D) and `model.bias` (1,) (wrappers such as
    {"state_dict": ...} and a DDP `module.` prefix are unwrapped as for the
    other ports);
  * the HF demo's plain arrays: an .npz holding exactly `W` ((D,) or (D, 1))
    and `b` (scalar, (1,) or (1, 1)); or a .npy of W with `bias=` a .npy or
    a number.
Reference: logits = z @ weight.T + bias (torch) = z @ W + b (demo). Flax's
Linear kernel is (D, 1) = weight.T.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

from efiqa_jax.port import common

TORCH_KEYS = ("model.weight", "model.bias")


def _from_state_dict(sd: dict) -> tuple[np.ndarray, np.ndarray]:
  absent = [k for k in TORCH_KEYS if k not in sd]
  extra = sorted(k for k in sd if k not in TORCH_KEYS)
  if absent or extra:
    raise common.PortError("not an sc_linear state dict", absent=absent,
                           extra=extra)
  w, b = np.asarray(sd["model.weight"]), np.asarray(sd["model.bias"])
  bad = []
  if w.ndim != 2 or w.shape[0] != 1:
    bad.append(f"model.weight: got {w.shape} want (1, D)")
  if b.shape != (1,):
    bad.append(f"model.bias: got {b.shape} want (1,)")
  if bad:
    raise common.PortError("sc_linear shapes", shape=bad)
  return w[0], b


def _from_plain(w: np.ndarray, b) -> tuple[np.ndarray, np.ndarray]:
  w = np.asarray(w)
  b = np.asarray(b)
  bad = []
  if not (w.ndim == 1 or (w.ndim == 2 and w.shape[1] == 1)):
    bad.append(f"W: got {w.shape} want (D,) or (D, 1)")
  if b.size != 1:
    bad.append(f"b: got {b.shape} want a scalar")
  if bad:
    raise common.PortError("demo (W, b) shapes", shape=bad)
  return w.reshape(-1), b.reshape(1)


def read_adapter_weights(src: str | os.PathLike, bias=None
                         ) -> tuple[np.ndarray, np.ndarray, dict]:
  """(w (D,), b (1,), notes) from any accepted source."""
  src = pathlib.Path(src)
  if not src.is_file():
    raise FileNotFoundError(f"adapter weights not found: {src}")
  if src.suffix == ".npz":
    if bias is not None:
      raise ValueError("--bias is only for a .npy W")
    with np.load(src, allow_pickle=False) as z:
      keys = sorted(z.files)
      if keys != ["W", "b"]:
        raise common.PortError(
            f"{src}: the demo format holds exactly W and b",
            absent=[k for k in ("W", "b") if k not in keys],
            extra=[k for k in keys if k not in ("W", "b")])
      w, b = _from_plain(z["W"], z["b"])
    return w, b, {"format": "demo npz (W, b)"}
  if src.suffix == ".npy":
    if bias is None:
      raise ValueError(f"{src} holds only W; give the bias with --bias "
                       "(a .npy file or a number)")
    w = np.load(src, allow_pickle=False)
    if isinstance(bias, str) and os.path.isfile(bias):
      b = np.load(bias, allow_pickle=False)
    else:
      b = np.asarray(float(bias))
    w, b = _from_plain(w, b)
    return w, b, {"format": "demo npy W + bias", "bias": str(bias)}
  sd, notes = common.load_state_dict(src)
  w, b = _from_state_dict(sd)
  return w, b, {"format": "torch state dict (badish sc_linear)", **notes}


def port_adapter(src: str | os.PathLike, out: str | os.PathLike, *,
                 bias=None, overwrite: bool = False):
  """Convert official adapter weights into an efiqa model dir.

  Returns (model, meta)."""
  import jax.numpy as jnp
  from flax import nnx
  from efiqa_jax import checkpoints
  from efiqa_jax.models import adapters

  w, b, notes = read_adapter_weights(src, bias)
  if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
    raise common.PortError(f"{src}: non-finite adapter weights")
  model = adapters.LinearAdapter(int(w.shape[0]), rngs=nnx.Rngs(0))
  model.linear.kernel[...] = jnp.asarray(w.astype(np.float32)[:, None])
  model.linear.bias[...] = jnp.asarray(b.astype(np.float32))
  src = pathlib.Path(src)
  meta = {"source": {"path": str(src.absolute()),
                     "sha256": common.sha256_file(src), **notes},
          "description": "EFIQA sc_linear adapter: logits = z @ W + b per "
                         "patch token; positive = degraded"}
  checkpoints.save_model(out, model, meta, overwrite=overwrite)
  return model, meta


def _conv1x1(w: np.ndarray) -> np.ndarray:
  """Conv2d 1x1 weight (O, I, 1, 1) -> Linear kernel (I, O)."""
  if w.ndim != 4 or w.shape[2:] != (1, 1):
    return w  # the shape check reports it
  return np.ascontiguousarray(w[:, :, 0, 0].T)


def _flat_vec(w: np.ndarray) -> np.ndarray:
  return w.reshape(-1)  # layer scale (1, C, 1, 1) -> (C,)


def sa_cnn_rules(depths=(2, 2, 1), prefix: str = "model."):
  """FunPiQ `sa_cnn` (SpaceAdmiralCNN.model = ModernHead64to16) ->
  efiqa ModernHead64to16."""
  R = common.Rule
  rules = [
      R(("stem_norm", "scale"), (f"{prefix}stem.0.norm.weight",)),
      R(("stem_norm", "bias"), (f"{prefix}stem.0.norm.bias",)),
      R(("stem", "kernel"), (f"{prefix}stem.1.weight",), _conv1x1),
      R(("stem", "bias"), (f"{prefix}stem.1.bias",)),
      R(("head_norm", "scale"), (f"{prefix}head.0.norm.weight",)),
      R(("head_norm", "bias"), (f"{prefix}head.0.norm.bias",)),
      R(("head", "kernel"), (f"{prefix}head.1.weight",), _conv1x1),
      R(("head", "bias"), (f"{prefix}head.1.bias",)),
  ]
  for s, depth in enumerate(depths):
    for j in range(depth):
      # A one-block stage is a bare block in the reference (no Sequential).
      src = (f"{prefix}stage{s + 1}." if depth == 1 and s == len(depths) - 1
             else f"{prefix}stage{s + 1}.{j}.")
      t = ("stages", str(s), str(j))
      rules += [
          R(t + ("dwconv", "kernel"), (src + "dw.weight",),
            common.conv_kernel),
          R(t + ("dwconv", "bias"), (src + "dw.bias",)),
          R(t + ("norm", "scale"), (src + "norm.norm.weight",)),
          R(t + ("norm", "bias"), (src + "norm.norm.bias",)),
          R(t + ("pwconv1", "kernel"), (src + "pw1.weight",), _conv1x1),
          R(t + ("pwconv1", "bias"), (src + "pw1.bias",)),
          R(t + ("pwconv2", "kernel"), (src + "pw2.weight",), _conv1x1),
          R(t + ("pwconv2", "bias"), (src + "pw2.bias",)),
          R(t + ("gamma",), (src + "gamma",), _flat_vec),
      ]
    if s < len(depths) - 1:
      d = f"{prefix}down{s + 1}."
      rules += [
          R(("downs", str(s), "norm", "scale"), (d + "norm.norm.weight",)),
          R(("downs", str(s), "norm", "bias"), (d + "norm.norm.bias",)),
          R(("downs", str(s), "conv", "kernel"), (d + "conv.weight",),
            common.conv_kernel),
          R(("downs", str(s), "conv", "bias"), (d + "conv.bias",)),
      ]
  return rules


def port_sa_cnn(src: str | os.PathLike, out: str | os.PathLike, *,
                drop_path: float = 0.1, overwrite: bool = False):
  """FunPiQ EFIQA-CP head state dict -> efiqa `modern_head_64to16` model
  (sizes read from the tensors). Returns (model, meta)."""
  from flax import nnx
  from efiqa_jax import checkpoints
  from efiqa_jax.models import adapters

  src = pathlib.Path(src)
  sd, notes = common.load_state_dict(src)
  need = ("model.stem.1.weight", "model.stage1.0.pw1.weight")
  absent = [k for k in need if k not in sd]
  if absent:
    raise common.PortError(f"{src}: not an sa_cnn state dict", absent=absent)
  mid, in_dim = sd[need[0]].shape[:2]
  ratio = sd[need[1]].shape[0] / mid
  model = nnx.eval_shape(lambda: adapters.ModernHead64to16(
      int(in_dim), int(mid), float(ratio), drop_path, rngs=nnx.Rngs(0)))
  common.apply_mapping(model, sd, sa_cnn_rules(), what=str(src))
  meta = {"source": {"path": str(src.absolute()),
                     "sha256": common.sha256_file(src),
                     "format": "torch state dict (FunPiQ sa_cnn)",
                     "tensors": len(sd), **notes},
          "description": "EFIQA-CP ModernHead64to16: 64x64 tokens -> 16x16 "
                         "logits; positive = degraded"}
  checkpoints.save_model(out, model, meta, overwrite=overwrite)
  return model, meta


def register(register_converter):
  def add_cnn(p):
    p.add_argument("--drop-path", type=float, default=0.1,
                   help="training-time drop-path rate recorded in the model")

  def run_cnn(args):
    return port_sa_cnn(args.src, args.out, drop_path=args.drop_path,
                       overwrite=args.overwrite)

  register_converter(
      "sa_cnn", "EFIQA-CP head (FunPiQ sa_cnn / ModernHead64to16 .pth) -> "
      "modern_head_64to16", add_cnn, run_cnn)

  def add(p):
    p.add_argument("--bias", default=None,
                   help="for a .npy W: the bias (.npy file or a number; "
                   "default: none, required with a .npy W)")

  def run(args):
    return port_adapter(args.src, args.out, bias=args.bias,
                        overwrite=args.overwrite)

  register_converter(
      "adapter", "EFIQA sc_linear adapter (.pth state dict, or the demo's "
      "W, b .npz/.npy) -> adapter_linear", add, run)
