"""`efiqa extract`: exactly-once on 8 fake devices and 2 processes, status
rows, resume after a kill, ArrayRecord, parameter sharding, bf16 accuracy,
and parity with the Hugging Face reference on real photographs."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import jax
import jax.numpy as jnp
from flax import nnx

from efiqa_jax import checkpoints
from efiqa_jax import sharding
from efiqa_jax.encoders import extract
from efiqa_jax.encoders import preprocess as pp
from efiqa_jax.models import vit
from tests import multihost
from efiqa_jax.reference.dinov3 import tiny_hf_dinov3

TINY = dict(patch_size=16, hidden_size=32, depth=2, num_heads=2,
            mlp_hidden=64, num_registers=4, layerscale=True, qkv_bias="qv",
            ln_eps=1e-5, pos="rope")


def _tiny_encoder(path, seed=0):
  """Tiny DINOv3-like ViT with non-trivial LayerScale and biases."""
  m = vit.VisionTransformer(**TINY, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  state = nnx.state(m, nnx.Param)
  pure = nnx.to_pure_dict(state)
  pure = jax.tree.map(
      lambda a: jnp.asarray(np.asarray(a) + 0.3 * rng.normal(
          size=a.shape).astype(np.float32)), pure)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(m, state)
  checkpoints.save_model(path, m, {"source": {"kind": "random", "seed": seed}})
  return path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
  return str(_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """11 random RGB images of different sizes, a corrupt file, a missing one."""
  d = tmp_path_factory.mktemp("photos")
  rng = np.random.default_rng(0)
  paths = []
  for i in range(11):
    a = rng.integers(0, 256, size=(40 + 3 * i, 50 + 2 * i, 3), dtype=np.uint8)
    p = d / f"img{i:02d}.png"
    Image.fromarray(a).save(p)
    paths.append(str(p))
  bad = d / "corrupt.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  paths.insert(5, str(bad))
  paths.append(str(d / "missing.png"))
  return paths


def _expected(encoder, paths, size=64):
  """Direct model output on EFIQA preprocessing of the whole photograph."""
  model, _ = checkpoints.load_model(encoder)
  out = {}
  for p in paths:
    if not os.path.exists(p) or "corrupt" in p:
      continue
    x = pp.preprocess(p, size, "efiqa")[None]
    out[os.path.splitext(os.path.basename(p))[0]] = np.asarray(
        model.patch_features(jnp.asarray(x)))[0]
  return out


def _files(out):
  return {f: (out / f).read_bytes() for f in sorted(os.listdir(out))
          if f.endswith(".npy")}


@pytest.fixture(scope="module")
def full_run(encoder, photos, tmp_path_factory):
  out = tmp_path_factory.mktemp("full")
  res = extract.extract_features(photos, encoder, out, size=64,
                                 preprocess="efiqa",
                                 batch_size=8, read_threads=2)
  return out, res


def test_exactly_once_8_devices_with_failures(encoder, photos, full_run):
  assert len(jax.devices()) == 8
  out, res = full_run
  # 13 inputs, batch 8: the second batch is partial (5 real rows + padding).
  assert res.n == 13 and res.written == 11 and res.failed == 2
  rows = extract.read_manifest(out)
  assert [r["image"] for r in rows] == photos  # input order
  status = {r["id"]: r["status"] for r in rows}
  assert status["corrupt"] == "unreadable" and status["missing"] == "not_found"
  assert all(v == "ok" for k, v in status.items()
             if k not in ("corrupt", "missing"))
  assert all(r["message"] for r in rows if r["status"] != "ok")
  # Each ok image written once (one journal row), with its own features.
  journal = [json.loads(l) for f in (out / ".journal").glob("*.jsonl")
             for l in f.read_text().splitlines()]
  ok_ids = [r["id"] for r in journal if r["status"] == "ok"]
  assert sorted(ok_ids) == sorted(set(ok_ids)) and len(ok_ids) == 11
  exp = _expected(encoder, photos)
  assert set(exp) == {f[:-4] for f in _files(out)}
  for k, v in exp.items():
    got = np.load(out / f"{k}.npy")
    assert got.shape == (4, 4, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, v, atol=1e-5, rtol=0)
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["grid"] == [4, 4, 32] and meta["source"]["kind"] == "random"
  assert meta["size"] == 64 and meta["preprocess"] == "efiqa"
  assert meta["work_size"] is None
  assert set(meta["versions"]) >= {"jax", "flax", "efiqa_jax"}


def test_resume_after_kill_identical(encoder, photos, full_run, tmp_path):
  ref_out, _ = full_run
  out = tmp_path / "resumed"
  r1 = extract.extract_features(photos, encoder, out, size=64,
                                preprocess="efiqa",
                                batch_size=8, read_threads=2, max_steps=1)
  first = _files(out)
  assert 0 < len(first) < 11
  pending = [r for r in extract.read_manifest(out)
             if r["status"] == "pending" and r["id"].startswith("img")]
  assert pending  # the manifest says what is left
  # A torn write of a pending image and a stray tmp file left by the kill.
  (out / f"{pending[-1]['id']}.npy").write_bytes(b"\x93NUMPY garbage")
  (out / "img00.npy.tmp-1").write_bytes(b"partial")
  r2 = extract.extract_features(photos, encoder, out, size=64,
                                preprocess="efiqa",
                                batch_size=8, read_threads=2)
  assert r2.skipped == r1.written and r2.written == 11 - r1.written
  assert _files(out) == _files(ref_out)  # byte-identical
  assert not list(out.glob("*.tmp-*"))  # the kill's leftovers are gone
  assert extract.read_manifest(out) == extract.read_manifest(ref_out)
  # Other settings into the same folder are refused.
  with pytest.raises(ValueError, match="other settings"):
    extract.extract_features(photos, encoder, out, size=64, preprocess="efiqa",
                             save_dtype="float16")


def test_arrayrecord_matches_npy_and_resumes(encoder, photos, full_run,
                                             tmp_path):
  ref_out, _ = full_run
  out = tmp_path / "ar"
  extract.extract_features(photos, encoder, out, size=64, preprocess="efiqa",
                           batch_size=8, fmt="arrayrecord", shard_size=4,
                           max_steps=1)
  n1 = len(list(extract.iter_arrayrecord(out)))
  # A kill between a shard's rename and its journal rows: the shard's ids
  # are redone, and the stale copy must not be yielded twice.
  stale = sorted(out.glob("features-*.array_record"))[0]
  (journal,) = (out / ".journal").glob("p0-*.jsonl")
  kept = [l for l in journal.read_text().splitlines()
          if json.loads(l)["file"] != stale.name]
  journal.write_text("".join(l + "\n" for l in kept))
  n1 = len(list(extract.iter_arrayrecord(out)))
  extract.extract_features(photos, encoder, out, size=64, preprocess="efiqa",
                           batch_size=8, fmt="arrayrecord", shard_size=4)
  recs = list(extract.iter_arrayrecord(out))
  ids = [r[0] for r in recs]
  assert 0 < n1 < 11 and sorted(ids) == sorted(set(ids)) and len(ids) == 11
  for id_, idx, f in recs:
    assert photos[idx].endswith(id_ + ".png")
    np.testing.assert_array_equal(f, np.load(ref_out / f"{id_}.npy"))
  rows = extract.read_manifest(out)
  assert sum(r["status"] == "ok" for r in rows) == 11
  assert all(r["file"].endswith(".array_record") for r in rows
             if r["status"] == "ok")


def test_param_sharding_2d_mesh(encoder, photos, full_run, tmp_path):
  ref_out, _ = full_run
  rules = ["('.*mlp.*kernel', (None, 'model'))",
           (".*attn/(q|k|v)/kernel", (None, "model"))]
  model, _ = checkpoints.load_model(encoder)
  mesh = sharding.make_mesh([("data", 4), ("model", 2)])
  _, state = sharding.shard_model(model, mesh,
                                  sharding.parse_param_rules(rules))
  pure = nnx.to_pure_dict(state)
  k = pure["blocks"]["0"]["mlp"]["fc1"]["kernel"]
  assert k.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  assert pure["blocks"]["0"]["norm1"]["scale"].sharding.is_fully_replicated
  out = tmp_path / "tp"
  from efiqa_jax import cli  # the command line, rules as literals
  argv = ["extract", *photos, "--encoder", encoder, "--out", str(out),
          "--size", "64", "--preprocess", "efiqa", "--batch-size", "8",
          "--mesh", "data:4,model:2", "--param-sharding", rules[0],
          "--param-sharding", repr(rules[1])]
  assert cli.main(argv) == 3  # done; the corrupt and the missing input failed
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["mesh"] == {"data": 4, "model": 2}
  # The two rules, then the catch-all ('.*', 'replicate').
  assert [r[0] for r in meta["param_sharding"]] == [
      ".*mlp.*kernel", ".*attn/(q|k|v)/kernel", ".*"]
  for f in _files(ref_out):
    np.testing.assert_allclose(np.load(out / f), np.load(ref_out / f),
                               atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.param_specs({"w": np.zeros((3, 5))}, [("w", (None, "model"))],
                         mesh)


def test_bf16_cosine(encoder, photos, full_run, tmp_path):
  ref_out, _ = full_run
  out = tmp_path / "bf16"
  extract.extract_features(photos, encoder, out, size=64, preprocess="efiqa",
                           batch_size=8, dtype="bfloat16",
                           save_dtype="float16")
  cos = []
  for f in _files(ref_out):
    a = np.load(ref_out / f).reshape(-1, 32).astype(np.float64)
    b = np.load(out / f)
    assert b.dtype == np.float16
    b = b.reshape(-1, 32).astype(np.float64)
    cos.append((a * b).sum(-1) / np.linalg.norm(a, axis=-1)
               / np.linalg.norm(b, axis=-1))
  cmin = float(np.concatenate(cos).min())
  print(f"\nbf16 compute + float16 storage vs float32: min per-token cosine "
        f"{cmin:.6f}")
  assert cmin >= 0.999


@pytest.mark.multiprocess
def test_two_processes_exactly_once(encoder, photos, full_run, tmp_path):
  ref_out, _ = full_run
  nproc = 2
  out = tmp_path / "mp"
  multihost.run_workers("extract_worker.py",
                        lambda i: [encoder, out, 4, *photos], nproc,
                        timeout=900, what="2-process extraction")
  reps = [json.loads((out / f"report{i}.json").read_text())
          for i in range(nproc)]
  assert sum(r["written"] for r in reps) == 11
  assert sum(r["failed"] for r in reps) == 2
  assert all(r["written"] > 0 for r in reps)  # both processes wrote
  # Journal: every image by exactly one process.
  ids = []
  for i in range(nproc):
    (f,) = (out / ".journal").glob(f"p{i}-*.jsonl")
    ids += [json.loads(l)["id"] for l in f.read_text().splitlines()]
  assert sorted(ids) == sorted(set(ids)) and len(ids) == 13
  assert extract.read_manifest(out) == extract.read_manifest(ref_out)
  for f in _files(ref_out):
    np.testing.assert_allclose(np.load(out / f), np.load(ref_out / f),
                               atol=1e-5, rtol=0)


def test_hf_dinov3_parity_on_real_photographs(fundus_dir, tmp_path, capsys):
  """Done-when: transformers DINOv3 saved to disk -> `efiqa port dinov3` ->
  `efiqa extract` == the HF model's patch tokens on the same EFIQA-
  preprocessed FOV crop (<= 1e-4)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from efiqa_jax import cli
  from efiqa_jax import fundus

  g = torch.Generator().manual_seed(0)
  ref = tiny_hf_dinov3(g)
  ref.eval().save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
  enc, out = tmp_path / "enc", tmp_path / "feats"
  assert cli.main(["port", "dinov3", str(tmp_path / "hf"), "--out",
                   str(enc)]) == 0
  photos = [str(fundus_dir / f) for f in (
      "drive/01_image.png", "eyepacs/605_left.jpg", "eyepacs/116_right.jpg",
      "automorph/1.jpg")]
  assert cli.main(["extract", *photos, "--encoder", str(enc), "--out",
                   str(out), "--batch-size", "8"]) == 0
  capsys.readouterr()
  worst = 0.0
  for p in photos:
    # The documented chain, written out independently of the pipeline.
    prep = fundus.prepare_fundus(p, 512)
    assert prep.status == "ok"
    x = pp.preprocess(prep.image, 224, "efiqa")
    with torch.no_grad():
      h = ref(pixel_values=torch.from_numpy(x.transpose(2, 0, 1)[None])
              ).last_hidden_state.numpy()[0]
    want = h[5:].reshape(14, 14, 32)  # [CLS, 4 registers, patches]
    got = np.load(out / (os.path.splitext(os.path.basename(p))[0] + ".npy"))
    worst = max(worst, float(np.abs(got - want).max()))
  row = {r["id"]: r for r in extract.read_manifest(out)}
  assert all(int(r["crop_size"]) > 0 for r in row.values())
  print(f"\nHF DINOv3 vs efiqa extract on {len(photos)} real photographs: "
        f"max |diff| {worst:.2e}")
  assert worst <= 1e-4
