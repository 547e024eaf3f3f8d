"""PyTorch ViT checkpoints -> efiqa `VisionTransformer` model directories.

Families (`efiqa port FAMILY SRC --out DST`):
  dinov3     HF snapshot (config.json + *.safetensors, `layer.{i}.*` keys) or
             the original `.pth` (`blocks.{i}.attn.qkv` fused, `storage_tokens`,
             `bias_mask`, `rope_embed.periods`).
  dinov2     HF Dinov2Model snapshot (`encoder.layer.{i}.*`) or an original hub
  dinov2reg  / timm `.pth` (`blocks.{i}.*`, optionally `blocks.{chunk}.{i}`,
             `backbone.` prefix); `dinov2reg` requires the 4 registers.
  retfound   RETFound-MAE `.pth` (`{'model': state dict}` in timm's layout, MAE
             decoder keys present and ignored).
  timm-vit   plain timm / augreg ViT state dict (`.pth`/`.safetensors`).

Strict (efiqa_jax.port.common.apply_mapping): every parameter filled, every
tensor consumed, shapes checked. Tensors that carry nothing at inference are
dropped only from an explicit per-family list, and the sidecar records them:
mask tokens, RoPE periods (checked against the recomputed frequencies first),
k-bias masks (folded into the bias first), local CLS norms, MAE decoder,
classifier heads.

Shapes (width, depth, FFN, registers, patch, position grid) come from the
tensors; heads and LayerNorm eps from config.json when there is one, else from
`num_heads`/`ln_eps` overrides, a preset, or head_dim 64 (true for every
released DINOv2/DINOv3/RETFound/augreg model).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any, Callable

import numpy as np

from efiqa_jax.port import common
from efiqa_jax.port.common import PortError, Rule

FAMILIES = ("dinov3", "dinov2", "dinov2reg", "retfound", "timm-vit")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _t(w):  # torch Linear (out, in) -> flax kernel (in, out)
  return np.ascontiguousarray(np.asarray(w).T)


def _rows(lo, hi, transpose=True):
  def hook(w):
    w = np.asarray(w)[lo:hi]
    return _t(w) if transpose else np.ascontiguousarray(w)
  return hook


def _reshape(shape):
  return lambda w: np.asarray(w).reshape(shape)


# ---------------------------------------------------------------------------
# Reading sources.

def read_source(src: str | os.PathLike
                ) -> tuple[dict[str, np.ndarray], dict | None, dict]:
  """(state dict, HF config.json or None, source record for the sidecar)."""
  src = pathlib.Path(src)
  if src.is_dir():
    cfg_file = src / "config.json"
    index = src / "model.safetensors.index.json"
    if index.is_file():
      files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
      files = sorted(p.name for p in src.glob("*.safetensors"))
    if not files:
      raise FileNotFoundError(f"{src}: no *.safetensors in the snapshot "
                              "folder (expected model.safetensors)")
    from safetensors.numpy import load_file
    sd: dict[str, np.ndarray] = {}
    for name in files:
      part = load_file(str(src / name))
      dup = set(part) & set(sd)
      if dup:
        raise PortError(f"{src}: keys in several shards: {sorted(dup)[:5]}")
      sd.update(part)
    sd = {k: (v.astype(np.float32) if v.dtype != np.float32 else v)
          for k, v in sd.items()}
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
    record = {"path": str(src.absolute()), "format": "huggingface snapshot",
              "sha256": {n: common.sha256_file(src / n)
                         for n in files + (["config.json"] if cfg else [])}}
    return sd, cfg, record
  if not src.is_file():
    raise FileNotFoundError(f"checkpoint not found: {src}")
  if src.suffix == ".safetensors":
    sd, notes = common.load_state_dict(src)
    fmt = "safetensors state dict"
  else:
    sd, notes, fmt = _load_pth(src)
  record = {"path": str(src.absolute()), "format": fmt,
            "sha256": common.sha256_file(src), **notes}
  return sd, None, record


def _load_pth(path) -> tuple[dict, dict, str]:
  """torch.load(weights_only=True) once; unwrap {'model'|'state_dict'|...}
  like common.load_state_dict, and DINOv2 training checkpoints
  ({'teacher': {'backbone.*', heads}}, e.g. RETFound_dinov2): the backbone
  tensors are kept, the heads listed in the notes as ignored."""
  import torch
  obj = torch.load(str(path), map_location="cpu", weights_only=True)
  if not isinstance(obj, dict):
    raise PortError(f"{path}: expected a state dict, got "
                    f"{type(obj).__name__}")
  notes: dict[str, Any] = {}
  fmt = "torch state dict"
  if isinstance(obj.get("teacher"), dict):
    t = obj["teacher"]
    notes = {"unwrapped": "teacher",
             "ignored_top_level_keys": sorted(str(k) for k in obj
                                              if k != "teacher"),
             "ignored_teacher_heads": sorted(
                 k for k in t if not k.startswith("backbone."))}
    obj = {k: v for k, v in t.items() if k.startswith("backbone.")}
    if not obj:
      raise PortError(f"{path}: 'teacher' holds no backbone.* tensors; "
                      f"keys: {sorted(t)[:12]}")
    fmt = "DINOv2 training checkpoint (teacher)"
  elif not all(isinstance(v, torch.Tensor) for v in obj.values()):
    wrapped = [k for k in common._WRAPPER_KEYS
               if isinstance(obj.get(k), dict)]
    if not wrapped:
      raise PortError(f"{path}: not a flat state dict and none of "
                      f"{common._WRAPPER_KEYS + ('teacher',)} holds one; "
                      f"top-level keys: {sorted(map(str, obj))[:20]}")
    notes = {"unwrapped": wrapped[0], "ignored_top_level_keys": sorted(
        str(k) for k in obj if k != wrapped[0])}
    obj = obj[wrapped[0]]
  bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise PortError(f"{path}: non-tensor entries in the state dict: "
                    f"{sorted(map(str, bad))[:10]}")
  sd = {str(k): common._to_numpy(v) for k, v in obj.items()}
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
    notes["stripped_prefix"] = "module."
  return sd, notes, fmt


def _strip_prefixes(sd: dict[str, np.ndarray], notes: dict):
  for prefix in ("teacher.backbone.", "backbone.", "encoder.model.",
                 "model."):
    if sd and all(k.startswith(prefix) for k in sd):
      notes["stripped_prefix"] = prefix
      return {k[len(prefix):]: v for k, v in sd.items()}
  return sd


def _unchunk_blocks(sd: dict[str, np.ndarray], notes: dict):
  """`blocks.{chunk}.{i}.x` (DINOv2 block_chunks) -> `blocks.{i}.x`."""
  pat = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.*)$")
  if not any(pat.match(k) for k in sd):
    return sd
  out = {}
  for k, v in sd.items():
    m = pat.match(k)
    out[f"blocks.{m.group(2)}.{m.group(3)}" if m else k] = v
  notes["unchunked_blocks"] = True
  return out


def _depth(sd, pat: str) -> int:
  idx = {int(m.group(1)) for k in sd if (m := re.match(pat, k))}
  if not idx:
    raise PortError("no transformer blocks found", absent=[pat])
  if idx != set(range(len(idx))):
    raise PortError(f"block indices not contiguous: {sorted(idx)}")
  return len(idx)


def _need(sd, *keys):
  absent = [k for k in keys if k not in sd]
  if absent:
    raise PortError("cannot infer the architecture", absent=absent)


# ---------------------------------------------------------------------------
# Mapping tables. `blk(i)` gives the source prefix of block i.

def _block_rules(i: int, d: int, hidden: int, ffn: str, qkv_bias: str,
                 layerscale: bool, names: dict[str, str]) -> list[Rule]:
  """Rules for block i. `names` maps roles to source key templates."""
  t = ("blocks", str(i))
  r = [Rule(t + ("norm1", "scale"), (names["norm1"] + ".weight",)),
       Rule(t + ("norm1", "bias"), (names["norm1"] + ".bias",)),
       Rule(t + ("norm2", "scale"), (names["norm2"] + ".weight",)),
       Rule(t + ("norm2", "bias"), (names["norm2"] + ".bias",)),
       Rule(t + ("attn", "out", "kernel"), (names["out"] + ".weight",), _t),
       Rule(t + ("attn", "out", "bias"), (names["out"] + ".bias",))]
  biased = {"q": qkv_bias != "none", "k": qkv_bias == "qkv",
            "v": qkv_bias != "none"}
  if "qkv" in names:  # fused (3D, D): rows [q; k; v]
    for j, p in enumerate("qkv"):
      r.append(Rule(t + ("attn", p, "kernel"), (names["qkv"] + ".weight",),
                    _rows(j * d, (j + 1) * d)))
      if biased[p]:
        r.append(Rule(t + ("attn", p, "bias"), (names["qkv"] + ".bias",),
                      _rows(j * d, (j + 1) * d, transpose=False)))
  else:
    for p in "qkv":
      r.append(Rule(t + ("attn", p, "kernel"), (names[p] + ".weight",), _t))
      if biased[p]:
        r.append(Rule(t + ("attn", p, "bias"), (names[p] + ".bias",)))
  if layerscale:
    r += [Rule(t + ("ls1", "gamma"), (names["ls1"],)),
          Rule(t + ("ls2", "gamma"), (names["ls2"],))]
  if ffn == "mlp":
    for tgt in ("fc1", "fc2"):
      r += [Rule(t + ("mlp", tgt, "kernel"), (names[tgt] + ".weight",), _t),
            Rule(t + ("mlp", tgt, "bias"), (names[tgt] + ".bias",))]
  elif "w12" in names:  # packed gate-first (2H, D)
    for j, tgt in enumerate(("gate", "up")):
      r += [Rule(t + ("mlp", tgt, "kernel"), (names["w12"] + ".weight",),
                 _rows(j * hidden, (j + 1) * hidden)),
            Rule(t + ("mlp", tgt, "bias"), (names["w12"] + ".bias",),
                 _rows(j * hidden, (j + 1) * hidden, transpose=False))]
    r += [Rule(t + ("mlp", "down", "kernel"), (names["w3"] + ".weight",), _t),
          Rule(t + ("mlp", "down", "bias"), (names["w3"] + ".bias",))]
  else:
    for tgt in ("gate", "up", "down"):
      r += [Rule(t + ("mlp", tgt, "kernel"), (names[tgt] + ".weight",), _t),
            Rule(t + ("mlp", tgt, "bias"), (names[tgt] + ".bias",))]
  return r


def _stem_rules(cfg: dict, names: dict[str, str]) -> list[Rule]:
  d = cfg["hidden_size"]
  r = [Rule(("patch_embed", "kernel"), (names["patch"] + ".weight",),
            common.conv_kernel),
       Rule(("patch_embed", "bias"), (names["patch"] + ".bias",)),
       Rule(("cls_token",), (names["cls"],), _reshape((1, 1, d))),
       Rule(("norm", "scale"), (names["norm"] + ".weight",)),
       Rule(("norm", "bias"), (names["norm"] + ".bias",))]
  if cfg["num_registers"]:
    r.append(Rule(("register_tokens",), (names["reg"],)))
  if cfg["pos"] in ("learned", "sincos"):
    r.append(Rule(("pos_embed",), (names["pos"],)))
  return r


# ---------------------------------------------------------------------------
# Per-layout analysis: (model kwargs from tensors, rules, ignored keys).

def _ffn_from(sd, up_key, down_key, gate_key=None, packed_key=None):
  """(ffn kind, hidden) from the FFN tensors of block 0."""
  if gate_key and gate_key in sd:
    return "swiglu", int(sd[gate_key].shape[0])
  if packed_key and packed_key in sd:
    return "swiglu", int(sd[packed_key].shape[0]) // 2
  _need(sd, up_key, down_key)
  up, down = sd[up_key].shape[0], sd[down_key].shape[1]
  if up == 2 * down and up != down:  # timm SwiGLUPacked under fc1/fc2 names
    return "swiglu_packed", int(down)
  return "mlp", int(up)


def _analyse_hf_dinov3(sd, cfg_json):
  _need(sd, "embeddings.cls_token", "embeddings.patch_embeddings.weight")
  w = sd["embeddings.patch_embeddings.weight"]
  d, depth = int(w.shape[0]), _depth(sd, r"^layer\.(\d+)\.")
  ffn, hidden = _ffn_from(sd, "layer.0.mlp.up_proj.weight",
                          "layer.0.mlp.down_proj.weight",
                          gate_key="layer.0.mlp.gate_proj.weight")
  regs = (int(sd["embeddings.register_tokens"].shape[1])
          if "embeddings.register_tokens" in sd else 0)
  qkv_bias = ("qkv" if "layer.0.attention.k_proj.bias" in sd else
              "qv" if "layer.0.attention.q_proj.bias" in sd else "none")
  kw = dict(patch_size=int(w.shape[-1]), hidden_size=d, depth=depth,
            mlp_hidden=hidden, ffn=ffn, num_registers=regs,
            layerscale="layer.0.layer_scale1.lambda1" in sd,
            qkv_bias=qkv_bias, ln_eps=1e-5, pos="rope", rope_base=100.0)
  if cfg_json:
    kw["num_heads"] = int(cfg_json["num_attention_heads"])
    kw["ln_eps"] = float(cfg_json.get("layer_norm_eps", 1e-5))
    kw["rope_base"] = float(cfg_json.get("rope_theta", 100.0))
    _check_act(cfg_json, ffn)
  names = dict(patch="embeddings.patch_embeddings", cls="embeddings.cls_token",
               reg="embeddings.register_tokens", norm="norm")
  rules_fn = lambda c: _stem_rules(c, names) + [
      rr for i in range(depth) for rr in _block_rules(
          i, d, hidden, ffn, c["qkv_bias"], c["layerscale"], dict(
              norm1=f"layer.{i}.norm1", norm2=f"layer.{i}.norm2",
              q=f"layer.{i}.attention.q_proj", k=f"layer.{i}.attention.k_proj",
              v=f"layer.{i}.attention.v_proj",
              out=f"layer.{i}.attention.o_proj",
              ls1=f"layer.{i}.layer_scale1.lambda1",
              ls2=f"layer.{i}.layer_scale2.lambda1",
              fc1=f"layer.{i}.mlp.up_proj", fc2=f"layer.{i}.mlp.down_proj",
              gate=f"layer.{i}.mlp.gate_proj", up=f"layer.{i}.mlp.up_proj",
              down=f"layer.{i}.mlp.down_proj"))]
  ignored = {"embeddings.mask_token": "mask token (masked pretraining only)"}
  return kw, rules_fn, ignored, {}


def _analyse_orig_dinov3(sd, cfg_json):
  _need(sd, "cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")
  w = sd["patch_embed.proj.weight"]
  d, depth = int(w.shape[0]), _depth(sd, r"^blocks\.(\d+)\.")
  ffn, hidden = _ffn_from(sd, "blocks.0.mlp.fc1.weight",
                          "blocks.0.mlp.fc2.weight",
                          gate_key="blocks.0.mlp.w1.weight")
  regs = (int(sd["storage_tokens"].shape[1]) if "storage_tokens" in sd else 0)
  # The original k-bias is masked out (bias_mask zero on the k third) and
  # cannot change softmax attention anyway: map q and v biases only.
  qkv_bias = "qv" if "blocks.0.attn.qkv.bias" in sd else "none"
  kw = dict(patch_size=int(w.shape[-1]), hidden_size=d, depth=depth,
            mlp_hidden=hidden, ffn=ffn, num_registers=regs,
            layerscale="blocks.0.ls1.gamma" in sd, qkv_bias=qkv_bias,
            ln_eps=1e-5, pos="rope", rope_base=100.0)
  names = dict(patch="patch_embed.proj", cls="cls_token",
               reg="storage_tokens", norm="norm")
  rules_fn = lambda c: _stem_rules(c, names) + [
      rr for i in range(depth) for rr in _block_rules(
          i, d, hidden, ffn, c["qkv_bias"], c["layerscale"], dict(
              norm1=f"blocks.{i}.norm1", norm2=f"blocks.{i}.norm2",
              qkv=f"blocks.{i}.attn.qkv", out=f"blocks.{i}.attn.proj",
              ls1=f"blocks.{i}.ls1.gamma", ls2=f"blocks.{i}.ls2.gamma",
              fc1=f"blocks.{i}.mlp.fc1", fc2=f"blocks.{i}.mlp.fc2",
              gate=f"blocks.{i}.mlp.w1", up=f"blocks.{i}.mlp.w2",
              down=f"blocks.{i}.mlp.w3"))]
  ignored = {"mask_token": "mask token (masked pretraining only)",
             "rope_embed.periods": "RoPE periods (checked, then recomputed)"}
  for k in sd:
    if k.endswith("attn.qkv.bias_mask"):
      ignored[k] = "k-bias mask (folded into qkv.bias)"
    elif k.startswith("local_cls_norm."):
      ignored[k] = "local CLS norm (training only)"
  return kw, rules_fn, ignored, {"fold_bias_mask": True, "check_periods": True}


def _analyse_hf_dinov2(sd, cfg_json):
  _need(sd, "embeddings.cls_token", "embeddings.position_embeddings",
        "embeddings.patch_embeddings.projection.weight")
  w = sd["embeddings.patch_embeddings.projection.weight"]
  d = int(w.shape[0])
  depth = _depth(sd, r"^encoder\.layer\.(\d+)\.")
  pfx = "encoder.layer.0.mlp."
  ffn, hidden = _ffn_from(sd, pfx + "fc1.weight", pfx + "fc2.weight",
                          gate_key=pfx + "gate_proj.weight",
                          packed_key=pfx + "weights_in.weight")
  regs = (int(sd["embeddings.register_tokens"].shape[1])
          if "embeddings.register_tokens" in sd else 0)
  pos_grid, pos_cls = _pos_grid(sd["embeddings.position_embeddings"])
  kw = dict(patch_size=int(w.shape[-1]), hidden_size=d, depth=depth,
            mlp_hidden=hidden, ffn="swiglu" if ffn != "mlp" else "mlp",
            num_registers=regs,
            layerscale="encoder.layer.0.layer_scale1.lambda1" in sd,
            qkv_bias=("qkv" if "encoder.layer.0.attention.attention.query.bias"
                      in sd else "none"),
            ln_eps=1e-6, pos="learned", pos_grid=pos_grid, pos_cls=pos_cls,
            interp="bicubic_aa" if regs else "bicubic")
  if cfg_json:
    kw["num_heads"] = int(cfg_json["num_attention_heads"])
    kw["ln_eps"] = float(cfg_json.get("layer_norm_eps", 1e-6))
    _check_act(cfg_json, kw["ffn"])
  packed = pfx + "weights_in.weight" in sd

  def rules_fn(c):
    rules = _stem_rules(c, dict(
        patch="embeddings.patch_embeddings.projection",
        cls="embeddings.cls_token", reg="embeddings.register_tokens",
        pos="embeddings.position_embeddings", norm="layernorm"))
    for i in range(depth):
      b = f"encoder.layer.{i}."
      names = dict(norm1=b + "norm1", norm2=b + "norm2",
                   q=b + "attention.attention.query",
                   k=b + "attention.attention.key",
                   v=b + "attention.attention.value",
                   out=b + "attention.output.dense",
                   ls1=b + "layer_scale1.lambda1",
                   ls2=b + "layer_scale2.lambda1",
                   fc1=b + "mlp.fc1", fc2=b + "mlp.fc2",
                   gate=b + "mlp.gate_proj", up=b + "mlp.up_proj",
                   down=b + "mlp.down_proj")
      if packed:
        names.update(w12=b + "mlp.weights_in", w3=b + "mlp.weights_out")
      rules += _block_rules(i, d, hidden, c["ffn"], c["qkv_bias"],
                            c["layerscale"], names)
    return rules

  ignored = {"embeddings.mask_token": "mask token (masked pretraining only)"}
  return kw, rules_fn, ignored, {}


def _pos_grid(pos: np.ndarray) -> tuple[int, bool]:
  n = int(pos.shape[1])
  m = math.isqrt(n)
  if m * m == n:
    return m, False  # timm no_embed_class: no CLS slot
  m = math.isqrt(n - 1)
  if m * m != n - 1:
    raise PortError(f"position table of {n} entries is neither M^2 nor "
                    "1 + M^2")
  return m, True


def _analyse_timm(sd, cfg_json, *, family: str):
  """timm / original-hub layout (DINOv2 hub & timm, RETFound, augreg)."""
  _need(sd, "cls_token", "patch_embed.proj.weight", "pos_embed",
        "blocks.0.attn.qkv.weight")
  w = sd["patch_embed.proj.weight"]
  d, depth = int(w.shape[0]), _depth(sd, r"^blocks\.(\d+)\.")
  ffn, hidden = _ffn_from(sd, "blocks.0.mlp.fc1.weight",
                          "blocks.0.mlp.fc2.weight",
                          packed_key="blocks.0.mlp.w12.weight")
  reg_key = next((k for k in ("register_tokens", "reg_token") if k in sd),
                 None)
  regs = int(sd[reg_key].shape[1]) if reg_key else 0
  pos_grid, pos_cls = _pos_grid(sd["pos_embed"])
  kw = dict(patch_size=int(w.shape[-1]), hidden_size=d, depth=depth,
            mlp_hidden=hidden, ffn="mlp" if ffn == "mlp" else "swiglu",
            num_registers=regs, layerscale="blocks.0.ls1.gamma" in sd,
            qkv_bias="qkv" if "blocks.0.attn.qkv.bias" in sd else "none",
            ln_eps=1e-6, pos="sincos" if family == "retfound" else "learned",
            pos_grid=pos_grid, pos_cls=pos_cls)
  if family == "retfound":
    kw["interp"] = "bicubic"        # RETFound interpolate_pos_embed
  elif family.startswith("dinov2"):
    # Original hub: non-reg models use the +0.1 offset, reg models antialias.
    kw["interp"] = "bicubic_aa" if regs else "bicubic_offset"
  else:
    kw["interp"] = "bicubic_aa"     # timm resample_abs_pos_embed
  packed_w12 = "blocks.0.mlp.w12.weight" in sd

  def rules_fn(c):
    rules = _stem_rules(c, dict(patch="patch_embed.proj", cls="cls_token",
                                reg=reg_key or "register_tokens",
                                pos="pos_embed", norm="norm"))
    for i in range(depth):
      b = f"blocks.{i}."
      names = dict(norm1=b + "norm1", norm2=b + "norm2", qkv=b + "attn.qkv",
                   out=b + "attn.proj", ls1=b + "ls1.gamma",
                   ls2=b + "ls2.gamma", fc1=b + "mlp.fc1", fc2=b + "mlp.fc2")
      if c["ffn"] == "swiglu":
        names.update(w12=b + ("mlp.w12" if packed_w12 else "mlp.fc1"),
                     w3=b + ("mlp.w3" if packed_w12 else "mlp.fc2"))
      rules += _block_rules(i, d, hidden, c["ffn"], c["qkv_bias"],
                            c["layerscale"], names)
    return rules

  ignored = {}
  for k in sd:
    if k == "mask_token":
      ignored[k] = "mask token (masked pretraining only)"
    elif k.startswith("decoder_") and family == "retfound":
      ignored[k] = "MAE decoder (pretraining only)"
    elif k.startswith("head.") and family in ("timm-vit", "retfound"):
      ignored[k] = "classifier head (features only)"
  return kw, rules_fn, ignored, {}


def _check_act(cfg_json, ffn):
  act = cfg_json.get("hidden_act", "gelu")
  want = "gelu" if ffn == "mlp" else None
  if want and act != want:
    raise PortError(f"hidden_act {act!r} is not supported (exact 'gelu' "
                    "only)")


# ---------------------------------------------------------------------------
# Conversion.

def _layout(family: str, sd: dict, cfg_json: dict | None):
  if family == "dinov3":
    if "embeddings.patch_embeddings.weight" in sd:
      return "hf", _analyse_hf_dinov3(sd, cfg_json)
    if "storage_tokens" in sd or "rope_embed.periods" in sd or (
        "blocks.0.attn.qkv.weight" in sd and "pos_embed" not in sd):
      return "original", _analyse_orig_dinov3(sd, cfg_json)
  elif family in ("dinov2", "dinov2reg"):
    if "embeddings.position_embeddings" in sd:
      return "hf", _analyse_hf_dinov2(sd, cfg_json)
    if "blocks.0.attn.qkv.weight" in sd:
      return "hub/timm", _analyse_timm(sd, cfg_json, family=family)
  elif family in ("retfound", "timm-vit"):
    if "blocks.0.attn.qkv.weight" in sd:
      return "timm", _analyse_timm(sd, cfg_json, family=family)
  else:
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
  raise PortError(f"not a {family} checkpoint layout; first keys: "
                  f"{sorted(sd)[:12]}")


def preprocessing_for(family: str, size: int = 224) -> dict:
  """What the features should be fed (EFIQA) and what the reference used."""
  efiqa = {"resize": "PIL bicubic to (size, size)", "size": size,
           "scale": 1 / 255, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
           "function": "efiqa_jax.encoders.preprocess.preprocess(mode='efiqa')"}
  ref = {
      "dinov3": {"hf_processor": "rescale 1/255, bilinear antialias resize to "
                                 "224x224, ImageNet mean/std",
                 "mode": "hf_dinov3"},
      "dinov2": {"hf_processor": "bicubic shortest edge 256, center crop 224, "
                                 "ImageNet mean/std", "mode": "hf_dinov2"},
      "retfound": {"reference": "Resize(256, bicubic), CenterCrop(224), "
                                "ImageNet mean/std", "mode": "hf_dinov2"},
      "timm-vit": {"reference": "bicubic shortest edge 248, center crop 224, "
                                "mean=std=0.5", "mode": "timm_augreg"},
  }
  key = "dinov2" if family == "dinov2reg" else family
  return {"efiqa": efiqa, "reference": ref[key]}


def convert(family: str, src: str | os.PathLike, *,
            overrides: dict | None = None, preset: str | None = None):
  """Read `src` and return (filled VisionTransformer, sidecar meta)."""
  import jax.numpy as jnp
  from flax import nnx
  from efiqa_jax.models import vit

  if family not in FAMILIES:
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
  sd, cfg_json, record = read_source(src)
  notes: dict[str, Any] = {}
  sd = _strip_prefixes(sd, notes)
  sd = _unchunk_blocks(sd, notes)
  layout, (kw, rules_fn, ignored, extra) = _layout(family, sd, cfg_json)
  if family == "dinov2reg" and not kw["num_registers"]:
    raise PortError(f"{src}: dinov2reg expects register tokens, found none "
                    "(use `dinov2`)")
  if family == "dinov2" and kw["num_registers"]:
    raise PortError(f"{src}: has {kw['num_registers']} register tokens; use "
                    "`dinov2reg`")
  # Shapes, position scheme and resampling variant come from the layout; a
  # preset supplies only what tensors cannot say (heads, eps, RoPE base)
  # unless config.json said it, and must agree with the tensors.
  cfg = dict(kw)
  shape_keys = ("patch_size", "hidden_size", "depth", "mlp_hidden", "ffn",
                "num_registers", "layerscale", "qkv_bias", "pos_grid",
                "pos_cls", "pos")
  if preset:
    pre = vit.vit_config(preset)
    for k in ("num_heads", "ln_eps", "rope_base"):
      if k in pre and not (cfg_json and k in kw):
        cfg[k] = pre[k]
    bad = [f"{k}: preset {pre[k]!r} != checkpoint {kw[k]!r}"
           for k in shape_keys if k in kw and k in pre and pre[k] != kw[k]]
    if bad:
      raise PortError(f"{src} does not match preset {preset!r}", shape=bad)
  cfg.update(overrides or {})
  if "num_heads" not in cfg:
    if cfg["hidden_size"] % 64:
      raise PortError("cannot infer num_heads (no config.json and width "
                      f"{cfg['hidden_size']} is not a multiple of 64); pass "
                      "num_heads")
    cfg["num_heads"] = cfg["hidden_size"] // 64
    notes["num_heads"] = "inferred as hidden_size // 64"

  sd = dict(sd)
  if extra.get("fold_bias_mask"):
    for k in [k for k in sd if k.endswith("attn.qkv.bias_mask")]:
      bk = k[:-len("_mask")]
      if bk in sd:
        sd[bk] = sd[bk] * sd[k]
  if extra.get("check_periods") and "rope_embed.periods" in sd:
    hd = cfg["hidden_size"] // cfg["num_heads"]
    inv = 1.0 / cfg["rope_base"] ** np.arange(0, 1, 4 / hd)
    per = sd["rope_embed.periods"]
    if per.shape != inv.shape or not np.allclose(1.0 / per, inv, rtol=1e-5):
      raise PortError(f"{src}: rope_embed.periods {per.shape} do not match "
                      f"base {cfg['rope_base']} with head_dim {hd} "
                      "(wrong num_heads or rope_base?)")
  for k in ignored:
    sd.pop(k, None)

  model = nnx.eval_shape(lambda: vit.VisionTransformer(
      **cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
  common.apply_mapping(model, sd, rules_fn(model.cfg), what=str(src))
  meta = {
      "source": {**record, "family": family, "layout": layout,
                 "tensors": len(sd) + len(ignored), **notes},
      "ignored_tensors": dict(sorted(ignored.items())),
      "preset": preset,
      "preprocessing": preprocessing_for(family),
  }
  return model, meta


def port(family: str, src: str | os.PathLike, out: str | os.PathLike, *,
         overrides: dict | None = None, preset: str | None = None,
         overwrite: bool = False):
  """Convert `src` and save an efiqa model directory at `out`.

  Returns (model, meta)."""
  from efiqa_jax import checkpoints
  model, meta = convert(family, src, overrides=overrides, preset=preset)
  checkpoints.save_model(out, model, meta, overwrite=overwrite)
  return model, meta


_HELP = {
    "dinov3": "DINOv3 ViT: HF snapshot folder or original .pth",
    "dinov2": "DINOv2 ViT (no registers): HF snapshot folder or hub/timm .pth",
    "dinov2reg": "DINOv2 ViT with 4 registers: HF snapshot or hub/timm .pth",
    "retfound": "RETFound-MAE .pth (timm layout, MAE decoder ignored)",
    "timm-vit": "plain timm/augreg ViT state dict (.pth / .safetensors)",
}


# models.vit's PRESETS and INTERP, spelled out so that `efiqa --help` does
# not import jax (tests/test_cli.py checks they agree).
PRESET_NAMES = (
    "dinov2_vitb14", "dinov2_vitb14_reg", "dinov2_vitg14",
    "dinov2_vitg14_reg", "dinov2_vitl14", "dinov2_vitl14_reg",
    "dinov2_vits14", "dinov2_vits14_reg", "dinov3_vit7b16", "dinov3_vitb16",
    "dinov3_vith16plus", "dinov3_vitl16", "dinov3_vits16",
    "dinov3_vits16plus", "retfound_mae", "tiny", "vit_b16", "vit_l16",
    "vit_s16")
INTERP_NAMES = ("bicubic", "bicubic_offset", "bicubic_aa", "fixed")


def add_cli_arguments(p) -> None:
  """Options shared by the `efiqa port {dinov3,...}` subcommands."""
  p.add_argument("--preset", choices=PRESET_NAMES, default=None,
                 help="check the checkpoint against a named architecture and "
                      "take heads/eps/interpolation from it (default: read "
                      "them from config.json or the tensors)")
  p.add_argument("--num-heads", type=int, default=None,
                 help="attention heads when there is no config.json "
                      "(default: width // 64)")
  p.add_argument("--interp", choices=INTERP_NAMES, default=None,
                 help="position-table resampling for other input sizes "
                      "(default: what the source family's reference does)")
  p.add_argument("--ln-eps", type=float, default=None,
                 help="LayerNorm epsilon override (default: the source's "
                      "config.json, else the family's)")


def cli_run(family: str):
  """`run(args) -> (model, meta)` for the `efiqa port` registry."""
  def run(args):
    overrides = {k: v for k, v in (("num_heads", args.num_heads),
                                   ("interp", args.interp),
                                   ("ln_eps", args.ln_eps)) if v is not None}
    return port(family, args.src, args.out, overrides=overrides,
                preset=args.preset, overwrite=args.overwrite)
  return run


def register(register_converter: Callable[..., Any]) -> None:
  """Register every family with `efiqa_jax.commands.port.register_converter`
  (kind, help, add_arguments, run)."""
  for fam in FAMILIES:
    register_converter(fam, _HELP[fam], add_cli_arguments, cli_run(fam))
