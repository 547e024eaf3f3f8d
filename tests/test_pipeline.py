"""Inference / training pipelines and the host->global boundary on 8 CPU devices."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from efiqa_jax import input_pipeline as ip
from efiqa_jax import sharding as sh
from efiqa_jax import sources
from tests import pipeline_fakes as fakes

SIZE = 8


def _prep():
  return sources.PrepareFundus(SIZE, load_fn=fakes.fake_prepare)


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  return sh.make_mesh()


# -------------------------------------------------------------------- sharding


def test_make_mesh_shapes_and_types(mesh):
  assert mesh.axis_names == ("data",) and mesh.shape["data"] == 8
  assert mesh.axis_types == (AxisType.Auto,)
  m2 = sh.make_mesh([("data", -1), ("model", 2)])
  assert dict(m2.shape) == {"data": 4, "model": 2}
  m3 = sh.make_mesh({"data": 2, "model": 4})
  assert dict(m3.shape) == {"data": 2, "model": 4}
  with pytest.raises(ValueError):
    sh.make_mesh([("data", 3)])
  with pytest.raises(ValueError):
    sh.make_mesh([("data", -1), ("model", -1)])
  with pytest.raises(ValueError):
    sh.make_mesh([("data", -1), ("model", 3)])


def test_process_slice_and_steps():
  for n in (0, 1, 11, 37):
    for pc in (1, 2, 3, 4):
      parts = [list(range(n))[sh.process_slice(n, p, pc)] for p in range(pc)]
      assert sorted(sum(parts, [])) == list(range(n))
      assert max(map(len, parts)) - min(map(len, parts)) <= 1
  assert sh.inference_steps(37, 8) == 5
  assert sh.inference_steps(40, 8) == 5
  assert sh.inference_steps(0, 8) == 0
  with pytest.raises(ValueError):
    sh.process_slice(5, 2, 2)
  with pytest.raises(ValueError):
    sh.inference_steps(5, 0)


def test_local_batch_size_checks(mesh):
  ds = sh.data_sharding(mesh)
  assert sh.local_batch_size(16, ds, 2) == 8
  with pytest.raises(ValueError, match="batch shards"):
    sh.local_batch_size(12, ds, 1)
  with pytest.raises(ValueError, match="process count"):
    sh.local_batch_size(8, ds, 3)


# ------------------------------------------------------------------- inference


def _collect(batches):
  out = list(batches)
  cat = lambda k, dt: np.concatenate([b[k] for b in out] + [np.zeros(0, dt)])
  return out, cat("index", np.int64), cat("valid", bool)


@pytest.mark.parametrize("n", [37, 8, 1, 0])
def test_inference_every_record_once_single_process(n):
  paths = fakes.fake_paths(n)
  b = ip.inference_batches(paths, 8, prepare=_prep(), process_index=0,
                           process_count=1)
  out, idx, valid = _collect(b)
  assert len(out) == b.steps == -(-n // 8) == len(b)
  assert all(x["image"].shape == (8, SIZE, SIZE, 3) for x in out)
  assert int(valid.sum()) == n
  np.testing.assert_array_equal(idx[valid], np.arange(n))  # in order
  assert (idx[~valid] == -1).all()
  status = [s for x in out for s in x["status"]]
  assert all(s == "padding" for s, v in zip(status, valid) if not v)
  for x in out:  # pixels come from the record named by `index`
    for i, v, img in zip(x["index"], x["valid"], x["image"]):
      assert (img == (i % 251 if v else 0)).all()


@pytest.mark.parametrize("n,pc", [(37, 2), (37, 4), (11, 2), (3, 4), (5, 8)])
def test_inference_uneven_process_shards(n, pc):
  """Simulated processes: disjoint, complete, same steps, global batch k = [8k, 8k+8)."""
  per = [ip.inference_batches(fakes.fake_paths(n), 8, prepare=_prep(),
                              process_index=p, process_count=pc)
         for p in range(pc)]
  steps = {b.steps for b in per}
  assert steps == {-(-n // 8)}
  assert sum(b.local_count for b in per) == n
  outs = [list(b) for b in per]
  assert {len(o) for o in outs} == steps
  seen = []
  for k in range(steps.pop()):
    idx = np.concatenate([o[k]["index"] for o in outs])
    valid = np.concatenate([o[k]["valid"] for o in outs])
    assert all(o[k]["index"].shape == (8 // pc,) for o in outs)
    want = np.arange(8 * k, min(8 * k + 8, n))
    np.testing.assert_array_equal(np.sort(idx[valid]), want)
    seen.extend(idx[valid].tolist())
  assert sorted(seen) == list(range(n))
  for p, (b, o) in enumerate(zip(per, outs)):
    got = np.concatenate([x["index"][x["valid"]] for x in o]) if o else []
    np.testing.assert_array_equal(got, np.arange(n)[p::pc])
    assert len(got) == b.local_count


def test_failed_records_keep_their_slot():
  paths = fakes.fake_paths(10)
  paths[2] = "/d/img2_bad.png"
  paths[7] = "/d/img7_raise.png"
  out, idx, valid = _collect(
      ip.inference_batches(paths, 4, prepare=_prep(), process_count=1,
                           process_index=0))
  status = np.concatenate([x["status"] for x in out])
  ok = np.concatenate([x["ok"] for x in out])
  assert valid.sum() == 10 and list(idx[:10]) == list(range(10))
  assert status[2] == "unreadable" and status[7] == "error"
  assert list(np.flatnonzero(valid & ~ok)) == [2, 7]
  assert list(status[10:]) == ["padding", "padding"]


def test_global_arrays_and_jit(mesh):
  n = 37
  dsh = sh.data_sharding(mesh)
  b = ip.inference_batches(fakes.fake_paths(n), 8, prepare=_prep(),
                           sharding=dsh)

  @functools.partial(jax.jit, out_shardings=sh.replicated(mesh))
  def step(x):
    v = x["valid"]
    # Every pixel of a valid image equals index % 251: checks rows stay
    # aligned across image/index/valid after sharding.
    img = x["image"].astype(jnp.int32)
    want = (x["index"] % 251).astype(jnp.int32)
    err = jnp.where(v, jnp.abs(img.max(axis=(1, 2, 3)) - want)
                    + jnp.abs(img.min(axis=(1, 2, 3)) - want), 0).max()
    return (jnp.sum(jnp.where(v, x["index"], 0)), v.sum(), err,
            x["index"])

  total = count = 0
  gathered = []
  for host, g in ip.global_batches(b, dsh):
    assert set(g) == {"image", "fov_mask", "valid", "ok", "index", "crop",
                      "fov"}
    assert "status" in host and "status" not in g
    assert g["image"].sharding.is_equivalent_to(dsh, 4)
    assert g["image"].addressable_shards[0].data.shape == (1, SIZE, SIZE, 3)
    s, c, err, idx = step(g)
    assert idx.sharding.is_fully_replicated
    assert int(err) == 0
    # Per-row outputs come back to this host in host-batch order.
    np.testing.assert_array_equal(sh.to_host_local(g["index"]), host["index"])
    np.testing.assert_array_equal(sh.to_host_local(g["image"]), host["image"])
    total += int(s)
    count += int(c)
    gathered.append(np.asarray(idx))
  assert count == n and total == n * (n - 1) // 2
  allidx = np.concatenate(gathered)
  np.testing.assert_array_equal(np.sort(allidx[allidx >= 0]), np.arange(n))


def test_to_global_errors_and_keys(mesh):
  dsh = sh.data_sharding(mesh)
  batch = {"x": np.arange(8, dtype=np.float32), "s": np.array(["a"] * 8)}
  g = sh.to_global(batch, dsh)
  assert set(g) == {"x"}
  with pytest.raises(TypeError, match="dtype"):
    sh.to_global(batch, dsh, keys=["s"])
  with pytest.raises(ValueError, match="not divisible"):
    sh.to_global({"x": np.zeros((6, 2))}, dsh)
  rep = sh.to_global({"w": np.ones((3, 3))}, sh.replicated(mesh))
  assert rep["w"].shape == (3, 3) and rep["w"].sharding.is_fully_replicated
  x = np.arange(8.0).reshape(4, 2)
  g2 = sh.to_global({"x": x}, {"x": NamedSharding(sh.make_mesh(
      [("data", 4), ("model", 2)]), P("data"))})
  assert g2["x"].shape == (4, 2)
  np.testing.assert_array_equal(sh.to_host_local(g2["x"]), x)
  np.testing.assert_array_equal(sh.to_host_local(rep["w"]), np.ones((3, 3)))


def test_inference_with_worker_process():
  """mp_prefetch workers give the same batches as in-process reading."""
  paths = fakes.fake_paths(13)
  kw = dict(prepare=_prep(), process_index=0, process_count=1)
  ref = list(ip.inference_batches(paths, 4, **kw))
  it = iter(ip.inference_batches(paths, 4, num_workers=2, read_threads=1,
                                 **kw))
  got = list(it)
  it.close()
  assert len(got) == len(ref) == 4
  for a, b in zip(ref, got):
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


# -------------------------------------------------------------------- training


def _train(n=21, pc=1, p=0, **kw):
  kw.setdefault("prepare", _prep())
  kw.setdefault("augment", [ip.RandomFlipRotate()])
  return ip.training_batches(fakes.fake_paths(n), 8, seed=7,
                             process_index=p, process_count=pc, **kw)


def _take(it, k):
  return [next(it) for _ in range(k)]


def _eq(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_training_epochs_shuffle_and_drop_remainder():
  out = list(_train(n=21, num_epochs=3))
  assert len(out) == (21 * 3) // 8
  idx = np.concatenate([b["index"] for b in out])
  first = idx[:21]
  assert sorted(first) == list(range(21))       # epoch 1 is a permutation
  assert list(first) != list(range(21))         # and it is shuffled
  assert list(idx[21:42]) != list(first)        # reshuffled per epoch
  assert all(b["valid"].all() for b in out)


def test_training_padded_epochs():
  """pad_epochs: every epoch is a permutation of the records followed by
  padding rows (valid=False, ok=False) up to a whole global batch; the same
  order as the unpadded stream within each epoch; 2 processes' contiguous
  shares stack to the 1-process batches."""
  out = list(_train(n=21, num_epochs=3, pad_epochs=True))
  assert len(out) == 3 * 3  # ceil(21 / 8) per epoch
  plain = np.concatenate([b["index"] for b in _train(n=21, num_epochs=3)])
  for e in range(3):
    ep = out[3 * e:3 * e + 3]
    idx = np.concatenate([b["index"] for b in ep])
    valid = np.concatenate([b["valid"] for b in ep])
    assert valid[:21].all() and not valid[21:].any()
    assert not np.concatenate([b["ok"] for b in ep])[21:].any()
    assert list(idx[21:]) == [-1] * 3
    assert sorted(idx[:21]) == list(range(21))
    if e < 2:  # the unpadded stream drops the last 63 % 8 rows
      assert list(idx[:21]) == list(plain[21 * e:21 * (e + 1)])
  two = [list(_train(n=21, num_epochs=3, pad_epochs=True, pc=2, p=p,
                     contiguous=True)) for p in range(2)]
  for b, a0, a1 in zip(out, *two):
    np.testing.assert_array_equal(
        np.concatenate([a0["index"], a1["index"]]), b["index"])
  with pytest.raises(ValueError, match="num_epochs"):
    _train(n=21, pad_epochs=True)


def test_training_deterministic_and_independent_of_process_count():
  one = _take(iter(_train(n=21)), 4)
  _eq(one, _take(iter(_train(n=21, read_threads=1, prefetch_batches=0)), 4))
  two = [_take(iter(_train(n=21, pc=2, p=p)), 4) for p in range(2)]
  for k in range(4):
    a = np.sort(one[k]["index"])
    b = np.sort(np.concatenate([two[0][k]["index"], two[1][k]["index"]]))
    np.testing.assert_array_equal(a, b)
    # Same record at same stream position -> same augmentation.
    merged = {int(i): img for t in (two[0][k], two[1][k])
              for i, img in zip(t["index"], t["fov_mask"])}
    for i, m in zip(one[k]["index"], one[k]["fov_mask"]):
      np.testing.assert_array_equal(m, merged[int(i)])


def test_training_augmentation_is_per_record():
  mask = fakes.fake_prepare("img0.png", SIZE).fov_mask
  mask = mask.copy()
  mask[1, 1:5] = False  # asymmetric, so flips/rotations are visible
  out = _take(iter(_train(n=32, prepare=sources.PrepareFundus(
      SIZE, load_fn=_AsymLoad(mask)))), 4)
  masks = np.concatenate([b["fov_mask"] for b in out])
  variants = {m.tobytes() for m in masks}
  assert len(variants) > 2  # different records got different transforms


class _AsymLoad:

  def __init__(self, mask):
    self.mask = mask

  def __call__(self, source, size):
    return _with_mask(fakes.fake_prepare(source, size), self.mask)


def _with_mask(prep, mask):
  prep.fov_mask = mask
  return prep


@pytest.mark.parametrize("workers", [0, 1])
def test_training_state_round_trip(workers, tmp_path):
  ds = _train(n=21, num_workers=workers)
  it = iter(ds)
  _take(it, 3)
  state = it.get_state()
  cont = _take(it, 5)
  # A fresh iterator restored from the state continues identically.
  it2 = iter(_train(n=21, num_workers=workers))
  it2.set_state(json.loads(json.dumps(state)))
  _eq(cont, _take(it2, 5))
  # JSON file helpers.
  it3 = iter(_train(n=21, num_workers=workers))
  ip.save_iterator_state(it, tmp_path / "it.json")
  after = _take(it, 2)
  ip.restore_iterator_state(it3, tmp_path / "it.json")
  _eq(after, _take(it3, 2))
  for i in (it, it2, it3):
    if hasattr(i, "close"):
      i.close()


def test_training_iterator_orbax_checkpoint(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  it = iter(_train(n=21))
  _take(it, 2)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(2, args=ocp.args.Composite(
        data_iter=ip.iterator_checkpoint_args(it)))
    mngr.wait_until_finished()
  cont = _take(it, 3)
  it2 = iter(_train(n=21))
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    assert mngr.latest_step() == 2
    mngr.restore(2, args=ocp.args.Composite(
        data_iter=ip.iterator_checkpoint_args(it2, restore=True)))
  _eq(cont, _take(it2, 3))


def test_training_errors():
  with pytest.raises(ValueError, match="less than one"):
    list(_train(n=3, num_epochs=2))
  with pytest.raises(ValueError, match="empty"):
    _train(n=0)


def test_synthetic_source_through_both_pipelines():
  src = sources.SyntheticSource(10, seed=1, size=SIZE,
                                generate_fn=fakes.fake_generate)
  prep = sources.PrepareSynthetic(SIZE)
  out, idx, valid = _collect(ip.inference_batches(
      src, 4, prepare=prep, process_index=0, process_count=1))
  assert valid.sum() == 10 and list(idx[:10]) == list(range(10))
  last = out[-1]
  assert last["vessels"].shape == (4, SIZE, SIZE)
  assert last["degradation"].dtype == np.float32
  assert not last["vessels"][~last["valid"]].any()
  for b in out:
    for i, v, img in zip(b["index"], b["valid"], b["image"]):
      if v:
        np.testing.assert_array_equal(img, src[int(i)]["sample"].image)
  tr = _take(iter(ip.training_batches(src, 4, seed=0, prepare=prep)), 3)
  assert all(b["ok"].all() and "vessels" in b for b in tr)
