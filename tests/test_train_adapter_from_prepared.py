"""`train-adapter` end to end and `pretrain-encoder` streamed from a prepared
folder (`efiqa prepare`) and from a TFDS build (`tfds:messidor2`): the same
parameters as from the photographs, each process reads its own contiguous
share of every global batch through grain, a killed run resumes
bit-exactly, 2 processes match 1."""
import json

import numpy as np
import pytest
from PIL import Image

import jax

from efiqa_jax import cli
from efiqa_jax import config_util
from efiqa_jax import synth
from efiqa_jax.student import data as data_lib
from efiqa_jax.student import train
from tests import multihost
from tests.test_train_adapter import _tiny_encoder

N = 8
WORK = 64  # prepare --size = config.work_size


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """8 synthetic photographs (96 px) + 4x4 labels, one broken file (with a
  label), their prepared folder and a tiny ViT encoder."""
  root = tmp_path_factory.mktemp("adapter_prepared")
  imgs, ld = root / "imgs", root / "pl" / "labels"
  imgs.mkdir()
  ld.mkdir(parents=True)
  rng = np.random.default_rng(3)
  for i in range(N):
    Image.fromarray(synth.generate(i, 96, degrade=False).image).save(
        imgs / f"p{i}.png")
    Image.fromarray((rng.random((4, 4)) < 0.3).astype(np.uint8) * 255).save(
        ld / f"p{i}.png")
  (imgs / "broken.png").write_bytes(b"not a png")
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(ld / "broken.png")
  prep = root / "prepared"
  assert cli.main(["prepare", str(imgs), "--out", str(prep), "--size",
                   str(WORK), "--records-per-shard", "3", "--quiet"]) == 3  # 1 failed
  return dict(imgs=str(imgs), labels=str(root / "pl"), prep=str(prep),
              enc=_tiny_encoder(root / "enc"))


@pytest.fixture(scope="module")
def tfds_dir(data, tmp_path_factory):
  """The 8 good photographs built as the data/messidor2 TFDS dataset
  (ArrayRecord): its data_dir."""
  import shutil
  from data import build as data_build
  root = tmp_path_factory.mktemp("messidor2")
  manual = root / "manual"
  (manual / "IMAGES").mkdir(parents=True)
  for i in range(N):
    shutil.copy(f"{data['imgs']}/p{i}.png", manual / "IMAGES")
  data_build.build("messidor2", str(manual), str(root / "tfds"))
  return str(root / "tfds")


TFDS = "tfds:messidor2"


@pytest.fixture(params=["prepared", "tfds"])
def streamed(request, data, monkeypatch):
  """The input of a streamed run: the prepared folder (8 photographs, 1
  broken file) or the TFDS build (the 8 photographs)."""
  if request.param == "prepared":
    return data["prep"]
  monkeypatch.setenv("TFDS_DATA_DIR", request.getfixturevalue("tfds_dir"))
  return TFDS


def _over(data, images, **kw):
  o = {"mode": "end_to_end", "images": images, "labels_dir": data["labels"],
       "encoder": data["enc"], "size": 64, "work_size": WORK,
       "batching": "image", "batch_size": 4, "epochs": 2,
       "augment_flip": True, "checkpoint_every": 2, "mesh.data": 4}
  o.update(kw)
  return [f"--config.{k}={v}" for k, v in o.items()]


def _cfg(data, images, **kw):
  return config_util.load_config("configs/adapter.py:tiny",
                                 _over(data, images, **kw))


def _same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_same_seed_same_params_from_prepared_and_photographs(data, tmp_path):
  """The prepared crop is the photograph's (lossless), so the encoder inputs
  are equal bit for bit, and so are the batches and the parameters. The
  broken file is listed as not ok either way, never trained."""
  from_photos = train.train_and_evaluate(_cfg(data, data["imgs"]),
                                         str(tmp_path / "photos"))
  from_prep = train.train_and_evaluate(_cfg(data, data["prep"]),
                                       str(tmp_path / "prep"))
  assert from_prep.step == from_photos.step == 4  # 8 x 2 epochs / 4
  _same(from_prep.params, from_photos.params)
  _same(from_prep.opt_state, from_photos.opt_state)
  assert from_prep.final_loss == from_photos.final_loss
  for wd in ("photos", "prep"):
    rep = json.load(open(tmp_path / wd / "data.json"))
    assert rep["items"] == N and rep["matched"] == N
    assert [x[0] for x in rep["not_ok"]] == ["broken"], rep
    assert rep["labels_without_features"] == []


def test_each_process_reads_a_disjoint_contiguous_share(data, streamed):
  """Process p of 2 reads rows [p*L, (p+1)*L) of each global batch, records
  disjoint between processes; the two shares stacked in process order are
  the 1-process batches row for row."""
  inputs = data_lib.encoder_inputs(streamed, size=64, work_size=WORK,
                                   preprocess="fov")
  ids = sorted(inputs.by_id)
  src = data_lib.Labelled(inputs.source, [inputs.by_id[i] for i in ids],
                          [f"{data['labels']}/labels/{i}.png" for i in ids])
  rows = data_lib.EncoderRows(64, WORK, "fov", (4, 4))
  kw = dict(seed=5, global_batch=4, num_epochs=2, flip=True,
            prefetch_batches=0)
  one = list(data_lib.encoder_batches(src, rows, process_index=0,
                                      process_count=1, **kw))
  two = [list(data_lib.encoder_batches(src, rows, process_index=p,
                                       process_count=2, **kw))
         for p in range(2)]
  assert len(one) == len(two[0]) == len(two[1]) == 2 * N // 4
  for b, a0, a1 in zip(one, *two):
    assert not set(a0["index"]) & set(a1["index"])
    for key in ("pixels", "y", "mask", "index"):
      np.testing.assert_array_equal(np.concatenate([a0[key], a1[key]]),
                                    b[key], err_msg=key)
  idx = np.concatenate([b["index"] for b in one])
  assert sorted(idx[:N]) == sorted(idx[N:]) == list(range(N))
  assert list(idx[:N]) != list(idx[N:])  # reshuffled per epoch


def test_resume_after_kill_is_bit_exact(data, tmp_path):
  """Stopped after step 2 (grain worker processes), resumed through the
  CLI: the parameters and optimizer state of the uninterrupted run."""
  full = train.train_and_evaluate(_cfg(data, data["prep"]),
                                  str(tmp_path / "full"))
  wd = tmp_path / "resumed"
  part = train.train_and_evaluate(
      _cfg(data, data["prep"], data_workers=1, max_steps=2), str(wd))
  assert part.step == 2 and part.adapter_dir is None
  assert cli.main(["train-adapter", "--config", "configs/adapter.py:tiny",
                   "--workdir", str(wd),
                   *_over(data, data["prep"], data_workers=1)]) == 0
  from efiqa_jax import checkpoints
  from flax import nnx
  ada, meta = checkpoints.load_model(str(wd / "adapter"))
  assert meta["training"]["steps"] == 4
  _same(nnx.to_pure_dict(nnx.state(ada, nnx.Param)), full.params)


def test_refused_in_one_line(data, tmp_path, capsys):
  """A folder prepared at another size than work_size, or with 'efiqa'
  inputs (the whole photograph, which a prepared folder does not hold)."""
  base = ["train-adapter", "--config", "configs/adapter.py:tiny"]
  for extra, what in (([f"--config.work_size={WORK * 2}"], "prepared at"),
                      (["--preprocess", "efiqa"], "whole photographs")):
    capsys.readouterr()
    rc = cli.main(base + ["--workdir", str(tmp_path / "wd")]
                  + _over(data, data["prep"]) + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and what in err[0], err


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_match_one_on_the_same_mesh(data, streamed, tmp_path):
  """`efiqa train-adapter` end to end on 2 processes x 1 device from the
  prepared folder / the TFDS build: the adapter of 1 process on a 2-device
  mesh (gloo may sum in another order: atol 1e-6)."""
  from efiqa_jax import checkpoints
  from flax import nnx
  wd = tmp_path / "mp"
  args = ["train-adapter", "--config", "configs/adapter.py:tiny",
          "--workdir", str(wd), *_over(data, streamed, **{"mesh.data": 2})]
  res, _ = multihost.run_efiqa(lambda i: args, 2, devices=1, timeout=900,
                               what="2-process train-adapter")
  assert "step 4/4" in res[0][1], res[0][1][-2000:]
  ada, meta = checkpoints.load_model(str(wd / "adapter"))
  assert meta["training"]["steps"] == 4
  one = train.train_and_evaluate(
      _cfg(data, streamed, **{"mesh.data": 2}), str(tmp_path / "one"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6,
                                                       rtol=0),
               nnx.to_pure_dict(nnx.state(ada, nnx.Param)), one.params)


def test_pretrain_encoder_from_prepared_equals_photographs_and_resumes(
    data, tmp_path):
  """MIM pretraining streams the prepared crops: the encoder trained from
  the photographs bit for bit, the broken file left out either way; a run
  stopped at step 2 resumes to the same encoder."""
  from efiqa_jax import checkpoints
  from efiqa_jax.encoders import pretrain
  from flax import nnx

  def cfg(*extra):
    return config_util.load_config("configs/encoder_mim.py:tiny", [
        f"--config.work_size={WORK}", "--config.steps=4", *extra])

  def params(out):
    return nnx.state(checkpoints.load_model(out)[0], nnx.Param)

  a = pretrain.pretrain_mim([data["imgs"]], str(tmp_path / "photos"), cfg(),
                            progress=False)
  b = pretrain.pretrain_mim([data["prep"]], str(tmp_path / "prep"), cfg(),
                            progress=False)
  assert a.n_images == b.n_images == N and a.steps == b.steps == 4
  assert [f[0].rsplit("/", 1)[-1] for f in a.failed] == \
      [f[0].rsplit("/", 1)[-1] for f in b.failed] == ["broken.png"]
  assert a.final_loss == b.final_loss
  _same(params(tmp_path / "photos"), params(tmp_path / "prep"))
  out = tmp_path / "part"
  part = pretrain.pretrain_mim([data["prep"]], str(out),
                               cfg("--config.max_steps=2"), progress=False)
  assert part.steps == 2
  pretrain.pretrain_mim([data["prep"]], str(out), cfg(), progress=False)
  _same(params(out), params(tmp_path / "prep"))


@pytest.fixture(scope="module")
def features(data, tmp_path_factory):
  """`extract` of the prepared folder, as ArrayRecord shards and as .npy."""
  from efiqa_jax.encoders import extract
  root = tmp_path_factory.mktemp("features")
  for fmt in ("arrayrecord", "npy"):
    extract.extract_features([data["prep"]], data["enc"], root / fmt,
                             size=64, work_size=WORK, batch_size=4, fmt=fmt,
                             shard_size=3)
  return {fmt: str(root / fmt) for fmt in ("arrayrecord", "npy")}


def test_cached_features_are_indexed_and_streamed_per_process(data,
                                                              features):
  """Cached features are indexed (ids -> shard positions), not loaded; the
  per-token pool streams: each process reads only its contiguous rows of
  every global batch (padded epochs), the same rows from ArrayRecord as
  from .npy."""
  labels = data_lib.label_files(data["labels"])
  got = {}
  for fmt, d in features.items():
    store = data_lib.FeatureStore(d)
    assert sorted(store.ids) == [f"p{i}" for i in range(N)]
    assert [x[0] for x in store.not_ok] == ["broken"]
    if fmt == "arrayrecord":  # an index from the journal, no arrays
      assert all(isinstance(v, int) for v in store._where.values())  # pylint: disable=protected-access
      assert not store.scanned
    ids = sorted(store.ids)
    src = data_lib.FeatureRecords(ids, [labels[i] for i in ids], 16)
    rows = data_lib.FeatureRows(store, (4, 4, 16), (4, 4), per_token=True)
    kw = dict(seed=1, global_batch=48, num_epochs=2, prefetch_batches=0,
              pad_epochs=True)
    one = list(data_lib.feature_batches(src, rows, process_index=0,
                                        process_count=1, **kw))
    two = [list(data_lib.feature_batches(src, rows, process_index=p,
                                         process_count=2, **kw))
           for p in range(2)]
    assert len(one) == 2 * 3  # 128 tokens: ceil(128 / 48) per epoch
    for b, a0, a1 in zip(one, *two):
      real = [set(a["index"][a["valid"]]) for a in (a0, a1)]
      assert not real[0] & real[1]
      for key in ("x", "y", "mask", "index"):
        np.testing.assert_array_equal(np.concatenate([a0[key], a1[key]]),
                                      b[key], err_msg=key)
    idx = np.concatenate([b["index"] for b in one])
    mask = np.concatenate([b["mask"] for b in one])
    assert sorted(idx[:128]) == list(range(128)) and mask[128:144].sum() == 0
    k = int(idx[0])  # token k % 16 of image k // 16
    np.testing.assert_array_equal(
        one[0]["x"][0], store.read(ids[k // 16]).reshape(-1, 16)[k % 16])
    got[fmt] = one
  for a, b in zip(got["arrayrecord"], got["npy"]):
    for key in ("x", "y", "mask", "index"):
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_arrayrecord_index_without_journaled_positions(features, tmp_path):
  """Features written before extract journaled record positions: each
  record's id is read once, giving the same index."""
  import shutil
  d = tmp_path / "old"
  shutil.copytree(features["arrayrecord"], d)
  for f in (d / ".journal").iterdir():
    rows = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
    f.write_text("".join(json.dumps({k: v for k, v in r.items()
                                     if k != "record"}) + "\n" for r in rows))
  old = data_lib.FeatureStore(str(d))
  new = data_lib.FeatureStore(features["arrayrecord"])
  assert old.scanned and not new.scanned
  assert old._where == new._where  # pylint: disable=protected-access
  for i in new.ids:
    np.testing.assert_array_equal(old.read(i), new.read(i))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_npy_features_read_by_offset(tmp_path, dtype):
  """FeatureStore reads a token's bytes at its offset (the header parsed
  once, under the lock numpy's ast-based parser needs in threads): the
  values np.load gives, whole and per token, C or Fortran order."""
  rng = np.random.default_rng(0)
  d = tmp_path / "f"
  d.mkdir()
  want = {}
  for k, shape in enumerate([(4, 4, 16), (4, 4, 16), (3, 5, 7)]):
    a = rng.normal(size=shape).astype(dtype)
    if k == 2:
      a = np.asfortranarray(a)
    np.save(d / f"i{k}.npy", a)
    want[f"i{k}"] = a.astype(np.float32)
  store = data_lib.FeatureStore(str(d))
  for i, a in want.items():
    np.testing.assert_array_equal(store.read(i), a)
    flat = a.reshape(-1, a.shape[-1])
    for t in (0, 5, len(flat) - 1):
      np.testing.assert_array_equal(store.row(i, t), flat[t])
  assert len(store._headers) == 2  # pylint: disable=protected-access


@pytest.mark.multiprocess
@pytest.mark.slow
def test_pretrain_encoder_two_processes_match_one(data, streamed, tmp_path):
  """`efiqa pretrain-encoder PREPARED|tfds:NAME` on 2 processes x 1 device:
  each reads its rows of every global batch; the encoder of 1 process on a
  2-device mesh (gloo may sum in another order: atol 1e-5)."""
  from efiqa_jax import checkpoints
  from efiqa_jax.encoders import pretrain
  from flax import nnx
  prep = streamed
  if prep != TFDS:
    prep = tmp_path / "prepared_ok"  # no failed record: exit 0 (3 otherwise)
    assert cli.main(["prepare", f"{data['imgs']}/p*.png", "--out", str(prep),
                     "--size", str(WORK), "--quiet"]) == 0
  over = ["--config", "configs/encoder_mim.py:tiny", "--set",
          f"config.work_size={WORK}", "--set", "config.steps=4", "--set",
          "config.mesh.data=2"]
  out = tmp_path / "mp"
  res, _ = multihost.run_efiqa(
      lambda i: ["pretrain-encoder", str(prep), "--out", str(out),
                 "--quiet", *over], 2, devices=1, timeout=900,
      what="2-process pretrain-encoder")
  assert f"{N} photographs, 4 steps" in res[0][1], res[0][1][-2000:]
  cfg = config_util.load_config("configs/encoder_mim.py:tiny", [
      f"--config.work_size={WORK}", "--config.steps=4",
      "--config.mesh.data=2"])
  pretrain.pretrain_mim([str(prep)], str(tmp_path / "one"), cfg,
                        progress=False)
  a = nnx.state(checkpoints.load_model(out)[0], nnx.Param)
  b = nnx.state(checkpoints.load_model(tmp_path / "one")[0], nnx.Param)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), atol=1e-5, rtol=0), a, b)


def test_adapter_and_mim_from_a_tfds_build_equal_the_photographs(
    data, tfds_dir, tmp_path, monkeypatch):
  """`tfds:messidor2` (the data/ builder over the 8 good photographs,
  found through TFDS_DATA_DIR) trains the adapter end to end and the MIM
  encoder to the parameters the same photographs give, listed in the
  dataset's record order (a TFDS build keeps its own order)."""
  from efiqa_jax import checkpoints, sources
  from efiqa_jax.encoders import pretrain
  from flax import nnx
  monkeypatch.setenv("TFDS_DATA_DIR", tfds_dir)
  spec = TFDS
  order = [p.rsplit("/", 1)[-1] for p in sources.TFDSInputs(spec).paths]
  assert sorted(order) == sorted(f"p{i}.png" for i in range(N))
  listing = tmp_path / "photos.csv"
  listing.write_text("path\n" + "".join(f"{data['imgs']}/{f}\n"
                                        for f in order))
  a = train.train_and_evaluate(_cfg(data, str(listing)),
                               str(tmp_path / "photos"))
  b = train.train_and_evaluate(_cfg(data, spec), str(tmp_path / "tfds_run"))
  assert a.step == b.step == 4
  _same(a.params, b.params)

  cfg = config_util.load_config("configs/encoder_mim.py:tiny", [
      f"--config.work_size={WORK}", "--config.steps=2"])
  for src, out in ((str(listing), "mim_photos"), (spec, "mim_tfds")):
    res = pretrain.pretrain_mim([src], str(tmp_path / out), cfg,
                                progress=False)
    assert res.n_images == N and not res.failed
  _same(*(nnx.state(checkpoints.load_model(tmp_path / o)[0], nnx.Param)
          for o in ("mim_photos", "mim_tfds")))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_read_disjoint_shares_of_a_tfds_build(
    tfds_dir, tmp_path, monkeypatch):
  """2 real JAX processes on `tfds:messidor2`: the record ids each one
  reads in the teacher's stream and in the adapter's / MIM's stream
  (`tests/tfds_shares.py`) are disjoint at every step, and process 0's rows
  then process 1's are the 1-process global batch, id for id."""
  from tests import tfds_shares
  monkeypatch.setenv("TFDS_DATA_DIR", tfds_dir)
  outs = [tmp_path / f"ids{i}.json" for i in range(2)]
  multihost.run_workers("tfds_share_worker.py",
                        lambda i: [TFDS, WORK, outs[i]], 2, timeout=600,
                        what="2-process tfds: shares")
  seen = [json.loads(o.read_text()) for o in outs]
  for kind, fn in (("teacher", tfds_shares.teacher_ids),
                   ("encoder", tfds_shares.encoder_ids)):
    one = fn(TFDS, WORK, process_index=0, process_count=1)
    a, b = seen[0][kind], seen[1][kind]
    assert len(one) == len(a) == len(b) == 2 * N // 4, kind
    for k, want in enumerate(one):
      assert not set(a[k]) & set(b[k]), (kind, k)
      assert len(a[k]) == len(b[k]) == 2
      assert a[k] + b[k] == want, (kind, k)
    assert all(p.startswith(TFDS + ":train/") for s in one for p in s)
    assert sorted(p for s in one[:2] for p in s) == sorted(
        f"{TFDS}:train/p{i}.png" for i in range(N))
