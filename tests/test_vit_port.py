"""ViT porting parity: tiny random transformers-5 reference models, saved to
disk (HF snapshot, original `.pth`, timm layout), ported with
efiqa_jax.port.vit, reloaded with efiqa_jax.checkpoints, compared on
last_hidden_state. Needs the `port` extra (torch + transformers)."""
import contextlib
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from efiqa_jax import checkpoints, kernels  # noqa: E402
from efiqa_jax.models import vit  # noqa: E402
from efiqa_jax.port import vit as port_vit  # noqa: E402
from efiqa_jax.port.common import PortError  # noqa: E402

TOL = 6e-6  # README (float32); measured <= 2.4e-6
SIZES = [(224, 224), (256, 256), (224, 320)]
D, HEADS, DEPTH = 32, 2, 2
torch.set_num_threads(1)


def _redraw(model, seed, skip=()):
  """Biases, LayerScale, tokens, norms, position tables -> N(0, 0.5^2)
  (norm scales 1 + N(0, 0.5^2)) so that mapping mistakes show."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if any(s in name for s in skip):
        continue
      leaf = name.split(".")[-1]
      if ("norm" in name or "layernorm" in name) and leaf == "weight":
        p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
      elif (leaf in ("bias", "lambda1", "cls_token", "register_tokens",
                     "mask_token", "position_embeddings")):
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
  return model.eval()


def _save_hf(model, path):
  model.save_pretrained(str(path), safe_serialization=True)
  return path


def _on_disk(path):
  from safetensors.numpy import load_file
  return {k: v.copy() for k, v in load_file(str(path / "model.safetensors")
                                            ).items()}


def _save_pth(sd, path, wrap=None):
  t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
  torch.save({wrap: t} if wrap else t, str(path))
  return path


def _images(h, w, b=2, seed=0):
  return np.random.default_rng(seed).normal(size=(b, h, w, 3)).astype(
      np.float32)


def _ref(model, x, **kw):
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)), **kw)
  return out.last_hidden_state.numpy()


def _ours(path, x):
  model, _ = checkpoints.load_model(path, architecture="vit")
  return np.asarray(jax.jit(lambda m, v: m(v))(model, jnp.asarray(x)))


def _compare(ref_model, out_dir, sizes, record, name, plain=False, **kw):
  """Ours vs the reference at each size; with `plain`, the first size also
  with kernels off (every op in its plain XLA form)."""
  model, _ = checkpoints.load_model(out_dir, architecture="vit")
  f = jax.jit(lambda m, v: m(v))
  runs = [(hw, False) for hw in sizes] + ([(sizes[0], True)] if plain else [])
  for (h, w), off in runs:
    x = _images(h, w)
    ref = _ref(ref_model, x, **kw)
    with kernels.disabled() if off else contextlib.nullcontext():
      ours = np.asarray(f(model, jnp.asarray(x)))
    assert ours.shape == ref.shape, (name, h, w)
    diff = float(np.abs(ours - ref).max())
    key = f"{name} {h}x{w}" + (" kernels off" if off else "")
    record[key] = diff
    assert diff <= TOL, f"{key}: max |diff| {diff:.3g}"


@pytest.fixture(scope="module")
def record():
  rec = {}
  yield rec
  print("\nmax |ours - reference| (float32, batch 2):")
  for k, v in rec.items():
    print(f"  {k:40s} {v:.2e}")


# ---------------------------------------------------------------------------
# DINOv3.

def _dinov3(seed, gated=False):
  cfg = transformers.DINOv3ViTConfig(
      hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
      intermediate_size=64 if not gated else 48, use_gated_mlp=gated,
      hidden_act="gelu" if not gated else "silu",
      num_register_tokens=4, patch_size=16, image_size=224)
  torch.manual_seed(seed)
  return _redraw(transformers.DINOv3ViTModel(cfg), seed)


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_dinov3_hf_snapshot(tmp_path, record, gated):
  ref = _dinov3(1, gated)
  src = _save_hf(ref, tmp_path / "hf")
  out = tmp_path / "ours"
  _, meta = port_vit.port("dinov3", src, out)
  assert meta["source"]["layout"] == "hf"
  side = json.loads((out / "efiqa.json").read_text())
  assert side["architecture"] == "vit"
  assert set(side["source"]["sha256"]) == {"model.safetensors", "config.json"}
  assert side["kwargs"]["ln_eps"] == 1e-5 and side["kwargs"]["pos"] == "rope"
  assert side["kwargs"]["ffn"] == ("swiglu" if gated else "mlp")
  _compare(ref, out, SIZES, record,
           f"dinov3 hf {'swiglu' if gated else 'mlp'}", plain=True)


def _dinov3_to_original(sd, d):
  """HF on-disk DINOv3 keys -> original facebookresearch/dinov3 layout."""
  o = {"cls_token": sd["embeddings.cls_token"],
       "storage_tokens": sd["embeddings.register_tokens"],
       "mask_token": sd["embeddings.mask_token"].reshape(1, d),
       "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
       "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
       "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"],
       "local_cls_norm.weight": np.ones(d, np.float32),
       "local_cls_norm.bias": np.zeros(d, np.float32)}
  hd = D // HEADS
  o["rope_embed.periods"] = (100.0 ** (2 * np.arange(hd // 4) / (hd // 2))
                             ).astype(np.float32)
  i = 0
  while f"layer.{i}.norm1.weight" in sd:
    a, b = f"layer.{i}.", f"blocks.{i}."
    at = a + "attention."
    o[b + "attn.qkv.weight"] = np.concatenate(
        [sd[at + p + "_proj.weight"] for p in "qkv"])
    # A garbage k bias, masked out by bias_mask as in the released files.
    kb = np.full(d, 7.0, np.float32)
    o[b + "attn.qkv.bias"] = np.concatenate(
        [sd[at + "q_proj.bias"], kb, sd[at + "v_proj.bias"]])
    o[b + "attn.qkv.bias_mask"] = np.concatenate(
        [np.ones(d), np.zeros(d), np.ones(d)]).astype(np.float32)
    o[b + "attn.proj.weight"] = sd[at + "o_proj.weight"]
    o[b + "attn.proj.bias"] = sd[at + "o_proj.bias"]
    for n in ("norm1", "norm2"):
      for p in ("weight", "bias"):
        o[b + f"{n}.{p}"] = sd[a + f"{n}.{p}"]
    o[b + "ls1.gamma"] = sd[a + "layer_scale1.lambda1"]
    o[b + "ls2.gamma"] = sd[a + "layer_scale2.lambda1"]
    pairs = ((("gate_proj", "w1"), ("up_proj", "w2"), ("down_proj", "w3"))
             if a + "mlp.gate_proj.weight" in sd else
             (("up_proj", "fc1"), ("down_proj", "fc2")))
    for src, dst in pairs:
      for p in ("weight", "bias"):
        o[b + f"mlp.{dst}.{p}"] = sd[a + f"mlp.{src}.{p}"]
    i += 1
  return o


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_dinov3_original_pth(tmp_path, record, gated):
  ref = _dinov3(2, gated)
  src = _save_hf(ref, tmp_path / "hf")
  pth = _save_pth(_dinov3_to_original(_on_disk(src), D), tmp_path / "d3.pth")
  out = tmp_path / "ours"
  _, meta = port_vit.port("dinov3", pth, out, overrides={"num_heads": HEADS})
  assert meta["source"]["layout"] == "original"
  ign = meta["ignored_tensors"]
  assert "rope_embed.periods" in ign and "mask_token" in ign
  assert "local_cls_norm.weight" in ign
  assert "blocks.0.attn.qkv.bias_mask" in ign
  _compare(ref, out, SIZES[:1] if gated else SIZES[:2], record,
           f"dinov3 original .pth {'swiglu' if gated else 'mlp'}")


def test_dinov3_wrong_heads_caught_by_rope_periods(tmp_path):
  src = _save_hf(_dinov3(2), tmp_path / "hf")
  pth = _save_pth(_dinov3_to_original(_on_disk(src), D), tmp_path / "d3.pth")
  with pytest.raises(PortError, match="periods"):
    port_vit.convert("dinov3", pth, overrides={"num_heads": 1})


# ---------------------------------------------------------------------------
# DINOv2 (HF, with registers, hub/timm layout).

def _dinov2(seed, registers=False, swiglu=False):
  kw = dict(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
            mlp_ratio=2, patch_size=14, image_size=518,
            use_swiglu_ffn=swiglu)
  torch.manual_seed(seed)
  if registers:
    m = transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **kw))
  else:
    m = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
  return _redraw(m, seed)


@pytest.mark.parametrize("registers", [False, True], ids=["plain", "reg4"])
def test_dinov2_hf_snapshot(tmp_path, record, registers):
  ref = _dinov2(3, registers)
  src = _save_hf(ref, tmp_path / "hf")
  out = tmp_path / "ours"
  fam = "dinov2reg" if registers else "dinov2"
  _, meta = port_vit.port(fam, src, out)
  side = json.loads((out / "efiqa.json").read_text())
  assert side["kwargs"]["interp"] == ("bicubic_aa" if registers else "bicubic")
  assert side["kwargs"]["pos_grid"] == 37
  # 518 is the native grid (no resampling); the others resample 37 -> n.
  _compare(ref, out, SIZES + [(518, 518)], record, f"{fam} hf", plain=True)
  other = "dinov2" if registers else "dinov2reg"
  with pytest.raises(PortError, match="register"):
    port_vit.convert(other, src)


def test_dinov2_swiglu_hf_snapshot(tmp_path, record):
  ref = _dinov2(4, swiglu=True)
  src = _save_hf(ref, tmp_path / "hf")
  out = tmp_path / "ours"
  port_vit.port("dinov2", src, out)
  _compare(ref, out, SIZES[:1], record, "dinov2 hf swiglu (giant-style)")


def _dinov2_to_hub(sd):
  """HF on-disk Dinov2 keys -> original hub / timm layout (fused qkv)."""
  o = {"cls_token": sd["embeddings.cls_token"],
       "pos_embed": sd["embeddings.position_embeddings"],
       "mask_token": sd["embeddings.mask_token"],
       "patch_embed.proj.weight":
           sd["embeddings.patch_embeddings.projection.weight"],
       "patch_embed.proj.bias":
           sd["embeddings.patch_embeddings.projection.bias"],
       "norm.weight": sd["layernorm.weight"],
       "norm.bias": sd["layernorm.bias"]}
  if "embeddings.register_tokens" in sd:
    o["register_tokens"] = sd["embeddings.register_tokens"]
  i = 0
  while f"encoder.layer.{i}.norm1.weight" in sd:
    a, b = f"encoder.layer.{i}.", f"blocks.{i}."
    at = a + "attention.attention."
    for p in ("weight", "bias"):
      o[b + f"attn.qkv.{p}"] = np.concatenate(
          [sd[at + n + "." + p] for n in ("query", "key", "value")])
      o[b + f"attn.proj.{p}"] = sd[a + f"attention.output.dense.{p}"]
      for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
        o[b + f"{n}.{p}"] = sd[a + f"{n}.{p}"]
    o[b + "ls1.gamma"] = sd[a + "layer_scale1.lambda1"]
    o[b + "ls2.gamma"] = sd[a + "layer_scale2.lambda1"]
    i += 1
  return o


@pytest.mark.parametrize("registers", [False, True], ids=["plain", "reg4"])
def test_dinov2_hub_pth_chunked(tmp_path, record, registers):
  """Original hub / training layout: fused qkv, `backbone.` prefix and
  `blocks.{chunk}.{i}` block chunks; interpolation set to the HF variant so
  that the HF model is the reference."""
  ref = _dinov2(5, registers)
  hub = _dinov2_to_hub(_on_disk(_save_hf(ref, tmp_path / "hf")))
  hub = {("backbone." + k.replace("blocks.", f"blocks.0.", 1)
          if k.startswith("blocks.") else "backbone." + k): v
         for k, v in hub.items()}
  if registers:  # RETFound_dinov2-style training checkpoint
    hub["dino_head.mlp.0.weight"] = np.zeros((4, D), np.float32)
    torch.save({"teacher": {k: torch.from_numpy(v) for k, v in hub.items()},
                "iteration": torch.tensor(3)}, str(tmp_path / "hub.pth"))
    pth = tmp_path / "hub.pth"
  else:
    pth = _save_pth(hub, tmp_path / "hub.pth")
  fam = "dinov2reg" if registers else "dinov2"
  model, meta = port_vit.convert(fam, pth, overrides={"num_heads": HEADS})
  assert meta["source"]["stripped_prefix"] == "backbone."
  assert meta["source"]["unchunked_blocks"]
  if registers:
    assert meta["source"]["ignored_teacher_heads"] == [
        "dino_head.mlp.0.weight"]
  # Hub defaults: non-reg +0.1 offset, reg antialias.
  assert model.cfg["interp"] == ("bicubic_aa" if registers
                                 else "bicubic_offset")
  out = tmp_path / "ours"
  port_vit.port(fam, pth, out, overrides={
      "num_heads": HEADS, "interp": "bicubic_aa" if registers else "bicubic"})
  _compare(ref, out, SIZES[:1], record, f"{fam} hub .pth")


# ---------------------------------------------------------------------------
# Position-table resampling against torch directly.

@pytest.mark.parametrize("m,out", [(37, (16, 16)), (37, (16, 22)),
                                   (14, (16, 16)), (14, (12, 18))])
def test_resample_variants_match_torch(m, out):
  F = torch.nn.functional
  rng = np.random.default_rng(0)
  table = rng.normal(size=(m, m, 8)).astype(np.float32)
  t = torch.from_numpy(table).permute(2, 0, 1)[None]
  gh, gw = out
  refs = {
      "bicubic": F.interpolate(t, size=out, mode="bicubic",
                               align_corners=False),
      "bicubic_aa": F.interpolate(t, size=out, mode="bicubic",
                                  align_corners=False, antialias=True),
      # original DINOv2 hub (interpolate_offset=0.1, antialias=False)
      "bicubic_offset": F.interpolate(
          t, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic",
          align_corners=False, antialias=False),
  }
  for method, r in refs.items():
    r = r[0].permute(1, 2, 0).numpy()
    ours = np.asarray(vit.resample_grid(jnp.asarray(table), out, method))
    assert r.shape == ours.shape, method
    assert np.abs(ours - r).max() < 1e-5, method
  # The two antialias-off variants really differ (the spec measured 0.31).
  a = np.asarray(vit.resample_grid(jnp.asarray(table), out, "bicubic"))
  b = np.asarray(vit.resample_grid(jnp.asarray(table), out, "bicubic_offset"))
  assert np.abs(a - b).max() > 1e-2
  with pytest.raises(ValueError, match="fixed"):
    vit.resample_grid(jnp.asarray(table), out, "fixed")


# ---------------------------------------------------------------------------
# RETFound-MAE (timm layout) and plain timm ViT, referenced by HF ViT(MAE).

def _hf_vit_to_timm(sd, prefix):
  o = {"cls_token": sd[prefix + "embeddings.cls_token"],
       "pos_embed": sd[prefix + "embeddings.position_embeddings"],
       "patch_embed.proj.weight":
           sd[prefix + "embeddings.patch_embeddings.projection.weight"],
       "patch_embed.proj.bias":
           sd[prefix + "embeddings.patch_embeddings.projection.bias"],
       "norm.weight": sd[prefix + "layernorm.weight"],
       "norm.bias": sd[prefix + "layernorm.bias"]}
  i = 0
  while f"{prefix}encoder.layer.{i}.layernorm_before.weight" in sd:
    a, b = f"{prefix}encoder.layer.{i}.", f"blocks.{i}."
    for p in ("weight", "bias"):
      o[b + f"attn.qkv.{p}"] = np.concatenate(
          [sd[a + f"attention.attention.{n}.{p}"]
           for n in ("query", "key", "value")])
      o[b + f"attn.proj.{p}"] = sd[a + f"attention.output.dense.{p}"]
      o[b + f"norm1.{p}"] = sd[a + f"layernorm_before.{p}"]
      o[b + f"norm2.{p}"] = sd[a + f"layernorm_after.{p}"]
      o[b + f"mlp.fc1.{p}"] = sd[a + f"intermediate.dense.{p}"]
      o[b + f"mlp.fc2.{p}"] = sd[a + f"output.dense.{p}"]
    i += 1
  return o


def _vit_cfg(cls, **kw):
  return cls(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
             intermediate_size=4 * D, patch_size=16, image_size=224,
             layer_norm_eps=1e-6, hidden_act="gelu", **kw)


def test_retfound_mae_timm_layout(tmp_path, record):
  torch.manual_seed(6)
  ref = transformers.ViTMAEModel(_vit_cfg(transformers.ViTMAEConfig,
                                          mask_ratio=0.0))
  # MAE's fixed sin-cos table, built the way HF ViTMAE initialises it (its
  # half swap reproduces the original MAE layout); it must equal ours.
  from transformers.models.vit_mae import modeling_vit_mae as mae
  pos = mae.build_2d_sinusoidal_position_embedding(
      height=14, width=14, embed_dim=D, cls_token=True)
  pos = torch.cat([pos[..., D // 2:], pos[..., :D // 2]], dim=-1)[None]
  np.testing.assert_allclose(vit.mae_sincos_table(D, 14), pos.numpy(),
                             atol=1e-6)
  ref = _redraw(ref, 6, skip=("position_embeddings",))
  with torch.no_grad():
    ref.embeddings.position_embeddings.copy_(pos)
  src = _save_hf(ref, tmp_path / "hf")
  sd = _on_disk(src)
  timm_sd = _hf_vit_to_timm(sd, "")
  rng = np.random.default_rng(0)
  timm_sd.update({  # what an MAE pretraining checkpoint also holds
      "mask_token": rng.normal(size=(1, 1, 16)).astype(np.float32),
      "decoder_embed.weight": rng.normal(size=(16, D)).astype(np.float32),
      "decoder_pos_embed": rng.normal(size=(1, 197, 16)).astype(np.float32),
      "decoder_blocks.0.norm1.weight": np.ones(16, np.float32),
      "decoder_norm.weight": np.ones(16, np.float32),
      "decoder_pred.weight": rng.normal(size=(768, 16)).astype(np.float32)})
  pth = _save_pth(timm_sd, tmp_path / "RETFound_mae_test.pth", wrap="model")
  out = tmp_path / "ours"
  _, meta = port_vit.port("retfound", pth, out,
                          overrides={"num_heads": HEADS})
  assert meta["source"]["unwrapped"] == "model"
  assert "decoder_pred.weight" in meta["ignored_tensors"]
  # noise = arange keeps MAE's (mask_ratio 0) shuffle the identity.
  for h, w in SIZES:
    noise = torch.arange((h // 16) * (w // 16),
                         dtype=torch.float32)[None].repeat(2, 1)
    _compare(ref, out, [(h, w)], record, "retfound-mae timm .pth",
             noise=noise, interpolate_pos_encoding=(h, w) != (224, 224))


def test_timm_vit(tmp_path, record):
  torch.manual_seed(7)
  ref = _redraw(transformers.ViTModel(_vit_cfg(transformers.ViTConfig),
                                      add_pooling_layer=False), 7)
  src = _save_hf(ref, tmp_path / "hf")
  timm_sd = _hf_vit_to_timm(_on_disk(src), "")
  timm_sd["head.weight"] = np.zeros((10, D), np.float32)
  timm_sd["head.bias"] = np.zeros((10,), np.float32)
  from safetensors.numpy import save_file
  st = tmp_path / "vit.safetensors"
  save_file(timm_sd, str(st))
  model, _ = port_vit.convert("timm-vit", st, overrides={"num_heads": HEADS})
  assert model.cfg["interp"] == "bicubic_aa"  # timm's resample default
  out = tmp_path / "ours"
  # HF ViTModel resamples with antialias off: use that variant to compare.
  port_vit.port("timm-vit", st, out,
                overrides={"num_heads": HEADS, "interp": "bicubic"})
  for h, w in SIZES:
    _compare(ref, out, [(h, w)], record, "timm-vit .safetensors",
             interpolate_pos_encoding=(h, w) != (224, 224))


# ---------------------------------------------------------------------------
# Strictness.

@pytest.fixture(scope="module")
def dinov2_snapshot(tmp_path_factory):
  return _save_hf(_dinov2(8), tmp_path_factory.mktemp("d2") / "hf")


def _write_modified(src, dst, fn):
  from safetensors.numpy import save_file
  dst.mkdir()
  sd = fn(_on_disk(src))
  save_file(sd, str(dst / "model.safetensors"))
  (dst / "config.json").write_text((src / "config.json").read_text())
  return dst


def test_strict_missing_key(dinov2_snapshot, tmp_path):
  def drop(sd):
    del sd["encoder.layer.1.mlp.fc2.bias"]
    return sd
  bad = _write_modified(dinov2_snapshot, tmp_path / "bad", drop)
  with pytest.raises(PortError) as e:
    port_vit.convert("dinov2", bad)
  assert "encoder.layer.1.mlp.fc2.bias" in e.value.absent
  assert "encoder.layer.1.mlp.fc2.bias" in str(e.value)


def test_strict_extra_key(dinov2_snapshot, tmp_path):
  def add(sd):
    sd["encoder.layer.0.attention.surprise"] = np.zeros(3, np.float32)
    return sd
  bad = _write_modified(dinov2_snapshot, tmp_path / "bad", add)
  with pytest.raises(PortError) as e:
    port_vit.convert("dinov2", bad)
  assert e.value.extra == ["encoder.layer.0.attention.surprise"]


def test_strict_wrong_shape(dinov2_snapshot, tmp_path):
  def reshape(sd):
    k = "encoder.layer.0.attention.attention.value.weight"
    sd[k] = sd[k][:, :D - 1].copy()
    return sd
  bad = _write_modified(dinov2_snapshot, tmp_path / "bad", reshape)
  with pytest.raises(PortError) as e:
    port_vit.convert("dinov2", bad)
  assert any("value.weight" in s for s in e.value.shape)


def test_wrong_family_layout(dinov2_snapshot):
  with pytest.raises(PortError, match="not a dinov3 checkpoint"):
    port_vit.convert("dinov3", dinov2_snapshot)


def test_cli_port(tmp_path, capsys):
  from efiqa_jax import cli
  src = _save_hf(_dinov3(9), tmp_path / "hf")
  out = tmp_path / "ours"
  assert cli.main(["port", "dinov3", str(src), "--out", str(out)]) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed["architecture"] == "vit"
  assert checkpoints.read_meta(out)["source"]["family"] == "dinov3"
  # Errors come back as exit status 1 with the difference listed.
  rc = cli.main(["port", "dinov2", str(src), "--out", str(tmp_path / "x")])
  assert rc == 1
  assert "not a dinov2 checkpoint" in capsys.readouterr().err


def test_real_photographs_patch_tokens(tmp_path, fundus_dir):
  """EFIQA preprocessing of real photographs, then the ported model's patch
  grid == the HF model's patch tokens (issue 4: <= 1e-4; README 6e-6)."""
  from efiqa_jax.encoders import preprocess as pp
  ref = _dinov3(10)
  out = tmp_path / "ours"
  port_vit.port("dinov3", _save_hf(ref, tmp_path / "hf"), out)
  paths = [fundus_dir / "drive" / "01_image.png",
           fundus_dir / "eyepacs" / "6834_left.jpg"]
  x = pp.preprocess_batch(paths, 224)
  model, _ = checkpoints.load_model(out, architecture="vit")
  grid = np.asarray(jax.jit(lambda m, v: m.patch_features(v))(
      model, jnp.asarray(x)))
  want = _ref(ref, x)[:, 1 + 4:].reshape(2, 14, 14, D)
  assert grid.shape == (2, 14, 14, D)
  assert np.abs(grid - want).max() <= TOL


def test_preset_checked_against_checkpoint(tmp_path):
  src = _save_hf(_dinov3(12), tmp_path / "hf")
  model, meta = port_vit.convert("dinov3", src, preset="tiny")
  assert meta["preset"] == "tiny" and model.cfg["num_heads"] == HEADS
  with pytest.raises(PortError, match="does not match preset") as e:
    port_vit.convert("dinov3", src, preset="dinov3_vitl16")
  assert any(s.startswith("hidden_size") for s in e.value.shape)
