"""`train-teacher` streamed from a prepared folder (`efiqa prepare --vessels`)
and from a TFDS build (`data.path=tfds:NAME`): the maps equal those the
trainer computes from the photographs, each process reads its own contiguous
share of every global batch through grain, a run is reproducible and resumes
bit-exactly, 2 processes match 1."""
import os

import numpy as np
import pytest
from PIL import Image

import jax

from efiqa_jax import cli
from efiqa_jax import config_util
from efiqa_jax.teacher import data as data_lib
from efiqa_jax.teacher import train
from tests import multihost

N = 16
WORK = 64  # prepare --size = data.work_size = data.load_size = image_size


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """Clean synthetic photographs (as `efiqa synth` draws them, 96 px)."""
  from efiqa_jax import synth
  d = tmp_path_factory.mktemp("photos")
  for i in range(N):
    Image.fromarray(synth.generate(i, 96, degrade=False).image).save(
        d / f"eye{i:02d}.png")
  return str(d)


@pytest.fixture(scope="module")
def prep(photos, tmp_path_factory):
  out = tmp_path_factory.mktemp("prepared") / "p"
  assert cli.main(["prepare", photos, "--out", str(out), "--size", str(WORK),
                   "--vessels", "--records-per-shard", "5", "--quiet"]) == 0
  return str(out)


@pytest.fixture(scope="module")
def synth_tfds(tmp_path_factory):
  """`efiqa synth` photographs (96 px) built as the data/efiqa_synth TFDS
  dataset (ArrayRecord): (images folder, data_dir)."""
  from data import build as data_build
  from efiqa_jax.synth import dataset
  manual = tmp_path_factory.mktemp("synth")
  dataset.write_dataset(manual, n=N, seed=0, size=96)
  data_dir = tmp_path_factory.mktemp("tfds")
  data_build.build("efiqa_synth", str(manual), str(data_dir))
  return str(manual / "images"), str(data_dir)


TFDS = "tfds:efiqa_synth:train"


@pytest.fixture(params=["prepared", "tfds"])
def streamed(request, monkeypatch):
  """data.path of a streamed teacher run: the prepared folder, or the TFDS
  build (source='folder', path='tfds:...')."""
  if request.param == "prepared":
    return request.getfixturevalue("prep")
  monkeypatch.setenv("TFDS_DATA_DIR", request.getfixturevalue("synth_tfds")[1])
  return TFDS


def _source(path):
  return "folder" if path.startswith("tfds:") else "prepared"


def _cfg(prep, *extra):
  return config_util.load_config("configs/teacher.py:tiny", [
      f"--config.data.source={_source(prep)}", f"--config.data.path={prep}",
      "--config.data.vessels=label_free", f"--config.data.work_size={WORK}",
      "--config.progress_bar=False",
      "--config.augment.fov_min_diameter_px=28", *extra])


def _cli_args(prep, workdir, *extra):
  return ["train-teacher", "--config", "configs/teacher.py:tiny",
          f"--config.data.source={_source(str(prep))}",
          f"--config.data.path={prep}",
          "--config.data.vessels=label_free",
          f"--config.data.work_size={WORK}", "--config.progress_bar=False",
          "--config.augment.fov_min_diameter_px=28", *extra,
          "--workdir", str(workdir)]


def test_prepared_maps_equal_those_computed_from_the_photographs(photos,
                                                                 prep):
  """Same FOV crop, same resize, same threshold: the float maps agree within
  1e-6 and the uint8 training maps are identical."""
  from efiqa_jax import fundus
  cfg = config_util.load_config("configs/teacher.py:tiny", [
      "--config.data.source=folder", f"--config.data.path={photos}",
      "--config.data.vessels=label_free", f"--config.data.work_size={WORK}"])
  dc = cfg.data
  want, diam, _ = data_lib._folder_maps(dc)  # pylint: disable=protected-access
  files = data_lib._folder_inputs(dc)  # pylint: disable=protected-access
  pm = data_lib.PreparedMaps(_cfg(prep).data)
  assert pm.n == N == len(want)
  rows = {}
  for i in range(pm.n):
    el = pm.source[i]
    rows[el["path"]] = (el, pm.prepare.map(el))
  assert sorted(rows) == sorted(files)
  for f, w, d in zip(files, want, diam):
    el, row = rows[f]
    assert row["ok"] and row["vmap"].dtype == np.uint8
    np.testing.assert_array_equal(row["vmap"], w, err_msg=f)
    assert float(row["diam"]) == d
    p = fundus.prepare_fundus(f, size=WORK)
    ref = data_lib._label_free(p.image[None], p.fov_mask[None], WORK)[0]  # pylint: disable=protected-access
    got = data_lib.prepared_float_map(el["prepared"], WORK)
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0, err_msg=f)
  assert sum(int(w.astype(bool).sum()) for w in want) > 0  # maps not empty


def test_tfds_maps_equal_those_computed_from_the_photographs(synth_tfds,
                                                            monkeypatch):
  """`tfds:` records go through the folder's code (`photograph_map`): the
  uint8 training maps and FOV diameters are those of the same photographs
  as files, identical; no record is held up front."""
  images, data_dir = synth_tfds
  monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
  cfg = config_util.load_config("configs/teacher.py:tiny", [
      "--config.data.source=folder", f"--config.data.path={images}",
      "--config.data.vessels=label_free", f"--config.data.work_size={WORK}"])
  want, diam, skipped = data_lib._folder_maps(cfg.data)  # pylint: disable=protected-access
  files = data_lib._folder_inputs(cfg.data)  # pylint: disable=protected-access
  assert not skipped and len(want) == N
  by_name = {os.path.basename(f): (w, d) for f, w, d in zip(files, want, diam)}
  tm = data_lib.streamed_maps(_cfg(TFDS).data)
  assert isinstance(tm, data_lib.TFDSMaps) and tm.n == N
  names = []
  for i in range(tm.n):
    el = tm.source[i]
    assert el["path"].startswith(TFDS + "/")
    names.append(os.path.basename(el["path"]))
    row = tm.prepare.map(el)
    w, d = by_name[names[-1]]
    assert row["ok"] and row["vmap"].dtype == np.uint8
    np.testing.assert_array_equal(row["vmap"], w, err_msg=names[-1])
    assert float(row["diam"]) == d
  assert sorted(names) == sorted(by_name)
  assert sum(int(w.astype(bool).sum()) for w in want) > 0  # maps not empty


def test_tfds_trains_as_its_prepared_folder(synth_tfds, tmp_path,
                                            monkeypatch):
  """Training straight from `tfds:` equals training from `efiqa prepare
  tfds:... --vessels` of the same build, bit for bit: same record order,
  identical uint8 maps (prepared maps equal the photographs', above), one
  pipeline. A tfds: run with data.vessels other than label_free, or a
  dataset that is not built, is refused in one line."""
  monkeypatch.setenv("TFDS_DATA_DIR", synth_tfds[1])
  prep = str(tmp_path / "prep")
  assert cli.main(["prepare", TFDS, "--out", prep, "--size", str(WORK),
                   "--vessels", "--quiet"]) == 0
  a = train.train_and_evaluate(_cfg(TFDS), str(tmp_path / "tfds"))
  b = train.train_and_evaluate(_cfg(prep), str(tmp_path / "prep_run"))
  assert a.step == b.step == a.total_steps == 8
  assert "tfds:efiqa_synth" in a.data_description["description"]
  got, want = jax.tree.leaves(a.params), jax.tree.leaves(b.params)
  assert len(got) == len(want)
  for x, y in zip(got, want):
    assert np.array_equal(np.asarray(x), np.asarray(y))


def test_tfds_refusals_are_one_line(synth_tfds, tmp_path, monkeypatch,
                                    capsys):
  monkeypatch.setenv("TFDS_DATA_DIR", synth_tfds[1])
  for extra, words in ((["--config.data.vessels=precomputed"], "label_free"),
                       (["--config.data.split=train"], "tfds:NAME:SPLIT")):
    capsys.readouterr()
    rc = cli.main(_cli_args(TFDS, tmp_path / "wd", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and words in err[0], err
  args = _cli_args(TFDS, tmp_path / "wd3")
  args[args.index("--config.data.source=folder")] = \
      "--config.data.source=prepared"
  assert cli.main(args) == 2  # runtime.EXIT_USAGE
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "data.source=folder" in err[0], err
  args = _cli_args("tfds:no_such_dataset:train", tmp_path / "wd2")
  assert cli.main(args) == 4  # sources.EXIT_NO_INPUTS
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "TFDS_DATA_DIR" in err[0], err


def test_a_rebuilt_tfds_dataset_is_not_resumed(synth_tfds, tmp_path,
                                              monkeypatch, capsys):
  """A `tfds:` dataset rebuilt from other photographs under the same name,
  version, split and record names is another training set: its data key
  differs (the split's stored bytes are in it), so a run trained on the old
  build refuses to resume on it in one line (exit 2)."""
  from data import build as data_build
  from efiqa_jax.synth import dataset
  _, data_dir = synth_tfds
  manual = tmp_path / "synth_other"
  # The same photographs drawn at another size: same names, other bytes.
  dataset.write_dataset(manual, n=N, seed=0, size=128)
  other = tmp_path / "tfds_other"
  data_build.build("efiqa_synth", str(manual), str(other))
  keys = {}
  for name, d in (("old", data_dir), ("new", str(other))):
    monkeypatch.setenv("TFDS_DATA_DIR", d)
    tm = data_lib.streamed_maps(_cfg(TFDS).data)
    keys[name] = tm.desc["data_key"]
    names = sorted(os.path.basename(tm.source[i]["path"])
                   for i in range(tm.n))
    keys[name + "_names"] = names
  assert keys["old_names"] == keys["new_names"]
  assert keys["old"] != keys["new"]
  wd = tmp_path / "wd"
  monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
  assert cli.main(_cli_args(TFDS, wd)) == 0
  monkeypatch.setenv("TFDS_DATA_DIR", str(other))
  capsys.readouterr()
  rc = cli.main(_cli_args(TFDS, wd))
  err = [l for l in capsys.readouterr().err.strip().splitlines()
         if l.startswith("efiqa")]  # the refusal, beside the log lines
  assert rc == 2 and len(err) == 1 and "data_key" in err[0], err


def test_each_process_reads_a_disjoint_contiguous_share(streamed):
  """Process p of 2 reads rows [p*L, (p+1)*L) of each global batch, records
  disjoint between processes; the two shares, stacked in process order (as
  `to_global` does), are the 1-process batches row for row."""
  prep = streamed
  pm = data_lib.streamed_maps(_cfg(prep).data)
  kw = dict(seed=3, global_batch=8, num_epochs=2, aug_cfg=train._aug_config(  # pylint: disable=protected-access
      _cfg(prep)), fov_p_max=0.5, fov_start=0, fov_end=1)
  one = list(pm.batches(process_index=0, process_count=1, **kw))
  two = [list(pm.batches(process_index=p, process_count=2, **kw))
         for p in range(2)]
  assert len(one) == len(two[0]) == len(two[1]) == 2 * N // 8
  for k, b in enumerate(one):
    a0, a1 = two[0][k], two[1][k]
    assert not set(a0["position"]) & set(a1["position"])
    assert not set(a0["index"]) & set(a1["index"])  # within an epoch batch
    for key in ("vmap", "index", "position", "fov_crop"):
      np.testing.assert_array_equal(
          np.concatenate([a0[key], a1[key]]), b[key], err_msg=key)
  pos = np.concatenate([b["position"] for b in one])
  assert list(pos) == list(range(2 * N))
  idx = np.concatenate([b["index"] for b in one])
  assert sorted(idx[:N]) == sorted(idx[N:]) == list(range(N))
  assert list(idx[:N]) != list(idx[N:])  # reshuffled per epoch


def test_same_seed_same_params_and_resume_is_bit_exact(streamed, tmp_path):
  """A full run; a second run from scratch with grain worker processes,
  killed after step 5 (checkpoint 3) and resumed through the CLI: the
  same parameters bit for bit."""
  prep = streamed
  full = train.train_and_evaluate(_cfg(prep), str(tmp_path / "full"))
  assert full.step == full.total_steps == 8  # 4 epochs x 16 / batch 8
  assert full.data_description["num_maps"] == N
  losses = [l for _, l in full.history]
  assert np.isfinite(losses).all()
  wd = tmp_path / "resumed"
  part = train.train_and_evaluate(_cfg(prep, "--config.data.num_workers=1"),
                                  str(wd), _stop_after_steps=5)
  assert part.step == 5 and part.export_dir is None
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["3"]
  assert cli.main(_cli_args(prep, wd, "--config.data.num_workers=1")) == 0
  from efiqa_jax import checkpoints
  from flax import nnx
  model, meta = checkpoints.load_unet_checkpoint(str(wd / "export"))
  assert meta["steps"] == 8
  got = jax.tree.leaves(nnx.state(model, nnx.Param))
  want = jax.tree.leaves(full.params)
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_folder_without_vessel_maps_is_refused_in_one_line(photos, tmp_path,
                                                           capsys):
  out = tmp_path / "novessels"
  assert cli.main(["prepare", photos, "--out", str(out), "--size", str(WORK),
                   "--quiet"]) == 0
  with pytest.raises(ValueError, match="--vessels"):
    data_lib.PreparedMaps(_cfg(str(out)).data)
  capsys.readouterr()
  rc = cli.main(_cli_args(str(out), tmp_path / "wd"))
  err = capsys.readouterr().err.strip().splitlines()
  assert rc != 0 and len(err) == 1 and "--vessels" in err[0], err
  # A photograph folder given as data.path of source=prepared: one line too.
  rc = cli.main(_cli_args(photos, tmp_path / "wd2"))
  err = capsys.readouterr().err.strip().splitlines()
  assert rc != 0 and len(err) == 1, err


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_match_one_on_the_same_mesh(streamed, tmp_path):
  """`efiqa train-teacher` on 2 processes x 1 device from the prepared
  folder / the TFDS build: the parameters of 1 process on a 2-device mesh
  (gloo may sum in another order: atol 1e-5)."""
  prep = streamed
  from efiqa_jax import checkpoints
  from flax import nnx
  wd = tmp_path / "mp"
  res, _ = multihost.run_efiqa(lambda i: _cli_args(prep, wd), 2, devices=1,
                               timeout=900, what="2-process train-teacher")
  assert "trained 8/8 steps" in res[0][1]
  model, meta = checkpoints.load_unet_checkpoint(str(wd / "export"))
  assert meta["steps"] == 8
  one = train.train_and_evaluate(_cfg(prep, "--config.mesh.data=2"),
                                 str(tmp_path / "one"))
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(one.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                               rtol=0)
