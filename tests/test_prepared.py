"""`efiqa prepare` and prepared folders as inputs (issue 14 §1, §2 for
inference): the records hold what `sources.PrepareFundus` gives; assess,
extract, pseudo-label --from-photos and vessels give the same outputs from a
prepared folder as from the photographs (synthetic and real); failures keep
their status rows; resumable; 2 processes exactly once; size mismatches and
commands that need photographs refuse with one line."""
import csv
import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from efiqa_jax import cli
from efiqa_jax import prepared
from efiqa_jax import sources
from tests import multihost
from tests.assess_fixtures import tiny_teacher

N = 5
SIZE = 128  # the tiny teacher's work size


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """Synthetic photographs (as `efiqa synth` draws them, 160 px), one broken
  file; the input list adds a missing path."""
  from efiqa_jax import synth
  d = tmp_path_factory.mktemp("photos")
  for i in range(N):
    Image.fromarray(synth.generate(i, 160).image).save(d / f"eye{i}.png")
  (d / "zz_broken.png").write_bytes(b"not an image")
  return [str(d), str(d / "missing.png")]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  return tiny_teacher(tmp_path_factory.mktemp("t") / "teacher",
                      work_size=SIZE)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
  """A tiny random ViT (tests.test_extract's, without its torch imports)."""
  from flax import nnx
  from efiqa_jax import checkpoints
  from efiqa_jax.models import vit
  m = vit.VisionTransformer(
      patch_size=16, hidden_size=32, depth=2, num_heads=2, mlp_hidden=64,
      num_registers=4, layerscale=True, qkv_bias="qv", ln_eps=1e-5,
      pos="rope", rngs=nnx.Rngs(0))
  path = tmp_path_factory.mktemp("enc") / "tiny"
  checkpoints.save_model(path, m, {"source": {"kind": "random", "seed": 0}})
  return str(path)


@pytest.fixture(scope="module")
def prep(photos, tmp_path_factory):
  out = tmp_path_factory.mktemp("prepared") / "p"
  assert cli.main(["prepare", *photos, "--out", str(out), "--size",
                   str(SIZE), "--vessels", "--records-per-shard", "3",
                   "--quiet"]) == 3  # the broken and the missing input
  return str(out)


def _csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _one_line(err, *words):
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err
  for w in words:
    assert w in lines[0], lines[0]


def test_records_hold_what_assess_computes(photos, prep):
  from efiqa_jax import vessels
  paths = sources.list_inputs(photos)
  meta = json.loads(open(os.path.join(prep, prepared.METADATA)).read())
  assert meta["format"] == prepared.FORMAT
  assert meta["preprocessing"]["size"] == SIZE
  assert meta["counts"]["total"] == N + 2 and meta["counts"]["ok"] == N
  assert meta["counts"]["by_status"] == {"ok": N, "unreadable": 1,
                                         "not_found": 1}
  # 7 records, 3 per shard: 3 shards, every one listed.
  shards = sorted(os.path.basename(f) for f in glob.glob(
      os.path.join(prep, prepared.SHARD_GLOB)))
  assert shards == sorted(s["name"] for s in meta["shards"]) and len(
      shards) == 3
  rows = _csv(os.path.join(prep, prepared.MANIFEST))
  assert [r["image"] for r in rows] == paths
  assert [r["id"] for r in rows] == sources.unique_ids(paths)
  src = prepared.PreparedSource(prep)
  direct = sources.PrepareFundus(SIZE)
  for i, p in enumerate(paths):
    rec = src[i]
    assert rec["path"] == p and rec["prepared"]["id"] == rows[i]["id"]
    want = direct.map({"path": p})
    got = direct.map(rec)
    assert got["status"] == want["status"] and got["message"] == \
        want["message"]
    for k in ("image", "fov_mask", "crop", "fov", "ok"):
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{p} {k}")
    if want["ok"]:
      v = np.asarray(vessels.vessel_probability(want["image"][None],
                                                want["fov_mask"][None]))[0]
      np.testing.assert_allclose(rec["prepared"]["vessels"], v, atol=1e-6)
    else:
      assert "image" not in rec["prepared"]


def _command(cmd, inputs, out, teacher, encoder):
  return {
      "assess": ["assess", *inputs, "--out", out, "--model", teacher,
                 "--batch-size", "4", "--quiet"],
      "extract": ["extract", *inputs, "--out", out, "--encoder", encoder,
                  "--size", "64", "--work-size", str(SIZE), "--batch-size",
                  "4", "--quiet"],
      "pseudo-label": ["pseudo-label", *inputs, "--out", out, "--teacher",
                       teacher, "--from-photos", "--work-size", str(SIZE),
                       "--batch-size", "4", "--quiet"],
      "vessels": ["vessels", *inputs, "--out", out, "--size", str(SIZE),
                  "--batch-size", "4", "--quiet"],
  }[cmd]


_TABLE = {"assess": "scores.csv", "extract": "manifest.csv",
          "pseudo-label": "manifest.csv", "vessels": "manifest.csv"}
_ARRAYS = {"assess": ("maps/*.npy", "overlays/*.png", "report/*"),
           "extract": ("*.npy",), "pseudo-label": ("anomaly/*.npy",
                                                   "labels/*.png"),
           "vessels": ("*.png",)}


def _same_outputs(cmd, a, b, ignore=()):
  """Equal tables (every column but `ignore`, failures' status rows
  included; in input order, or by id when `ignore` names the image column,
  since a TFDS build holds its records in its own order) and arrays (within
  1e-6)."""
  ta, tb = _csv(os.path.join(a, _TABLE[cmd])), _csv(os.path.join(b,
                                                                 _TABLE[cmd]))

  def table(rows):
    rows = [{k: v for k, v in r.items() if k not in ignore} for r in rows]
    return sorted(rows, key=lambda r: r["id"]) if ignore else rows
  assert table(ta) == table(tb)
  for pat in _ARRAYS[cmd]:
    names = sorted(os.path.relpath(f, a) for f in glob.glob(os.path.join(
        a, pat)))
    assert names and names == sorted(os.path.relpath(f, b) for f in
                                     glob.glob(os.path.join(b, pat)))
    for n in names:
      if n.endswith(".npy"):
        np.testing.assert_allclose(np.load(os.path.join(b, n)),
                                   np.load(os.path.join(a, n)), atol=1e-6,
                                   rtol=0, err_msg=n)
      else:
        x = np.asarray(Image.open(os.path.join(a, n)))
        np.testing.assert_array_equal(np.asarray(Image.open(
            os.path.join(b, n))), x, err_msg=n)
  return ta


@pytest.mark.parametrize("cmd", ["assess", "extract", "pseudo-label",
                                 "vessels"])
def test_outputs_from_a_prepared_folder_equal_the_photographs(
    cmd, photos, prep, teacher, encoder, tmp_path):
  a, b = str(tmp_path / "photos"), str(tmp_path / "prepared")
  assert cli.main(_command(cmd, photos, a, teacher, encoder)) == 3
  assert cli.main(_command(cmd, [prep], b, teacher, encoder)) == 3
  rows = _same_outputs(cmd, a, b)
  status = {r["id"]: r["status"] for r in rows}
  assert status["zz_broken"] == "unreadable" and \
      status["missing"] == "not_found"
  # The prepared run records what prepared its inputs.
  fp = json.loads(open(os.path.join(b, "run.json")).read())
  assert fp["settings"]["prepared_inputs"][0]["size"] == SIZE


def test_real_photographs_from_a_prepared_folder(fundus_dir, teacher,
                                                 encoder, tmp_path):
  """../shared/data/fundus (evaluation photographs: only compared, nothing
  tuned): assess, extract and pseudo-label from the photographs and from
  their prepared records."""
  inputs = [str(fundus_dir)]
  prep = str(tmp_path / "prep")
  code = cli.main(["prepare", *inputs, "--out", prep, "--size", str(SIZE),
                   "--quiet"])
  assert code in (0, 3)
  for cmd in ("assess", "extract", "pseudo-label"):
    a, b = str(tmp_path / cmd / "a"), str(tmp_path / cmd / "b")
    assert cli.main(_command(cmd, inputs, a, teacher, encoder)) == code
    assert cli.main(_command(cmd, [prep], b, teacher, encoder)) == code
    rows = _same_outputs(cmd, a, b)
    assert sum(r["status"] == "ok" for r in rows) >= 10, cmd


def test_a_stopped_prepare_resumes_and_assess_from_it_resumes(
    photos, teacher, prep, tmp_path):
  out = str(tmp_path / "p")
  res = prepared.prepare(photos, out, size=SIZE, records_per_shard=3,
                         batch_size=2, max_steps=1)
  assert res.written == 2 and res.total == N + 2
  # The inputs not reached are 'pending' records, never dropped.
  src = prepared.PreparedSource(out)
  assert len(src) == N + 2
  assert sources.PrepareFundus(SIZE).map(src[N + 1])["status"] == "pending"
  # A folder whose prepare never got to its end is refused, not read as
  # photographs.
  os.remove(os.path.join(out, prepared.METADATA))
  with pytest.raises(ValueError, match="unfinished"):
    sources.resolve_inputs([out])
  res = prepared.prepare(photos, out, size=SIZE, records_per_shard=2,
                         batch_size=2)
  assert res.skipped == 2 and res.total == N + 2 and res.failed == 2
  # Every record readable as in the uninterrupted folder; no stray shard.
  meta = json.loads(open(os.path.join(out, prepared.METADATA)).read())
  assert sorted(s["name"] for s in meta["shards"]) == sorted(
      os.path.basename(f) for f in glob.glob(os.path.join(
          out, prepared.SHARD_GLOB)))
  a, b = prepared.PreparedSource(out), prepared.PreparedSource(prep)
  assert a.paths == b.paths
  for i in range(len(a)):
    ra, rb = a[i]["prepared"], b[i]["prepared"]
    assert sorted(ra) == sorted(k for k in rb if k != "vessels")
    assert ra["status"] == rb["status"] and ra["message"] == rb["message"]
    for k in ("image", "fov_mask", "crop", "fov"):
      if k in rb:
        np.testing.assert_array_equal(ra[k], rb[k])
  # assess from the prepared folder, stopped after one step, then resumed.
  from efiqa_jax import assess
  ref, got = str(tmp_path / "ref"), str(tmp_path / "got")
  assess.assess([out], ref, model=teacher, batch_size=2, progress=False)
  assess.assess([out], got, model=teacher, batch_size=2, progress=False,
                max_steps=1)
  r = assess.assess([out], got, model=teacher, batch_size=2, progress=False)
  assert r.skipped_done == 2
  _same_outputs("assess", ref, got)


def test_mismatches_and_photograph_only_commands_refuse_with_one_line(
    photos, prep, teacher, tmp_path, capsys):
  capsys.readouterr()
  # Another crop size than the prepared one.
  assert cli.main(["vessels", prep, "--out", str(tmp_path / "v"), "--size",
                   "96", "--quiet"]) == 2
  _one_line(capsys.readouterr().err, f"prepared at {SIZE} px", "96")
  assert cli.main(["assess", prep, "--out", str(tmp_path / "a"),
                   "--model", tiny_teacher(tmp_path / "t96", work_size=96),
                   "--quiet"]) == 2
  _one_line(capsys.readouterr().err, f"prepared at {SIZE} px")
  # Vessel-map inputs are images, not prepared crops.
  assert cli.main(["pseudo-label", prep, "--out", str(tmp_path / "pl"),
                   "--teacher", teacher, "--quiet"]) == 2
  _one_line(capsys.readouterr().err, "--from-photos")
  # Commands that read only photographs name the prepared folder.
  with pytest.raises(sources.NoInputsError, match="is a prepared folder"):
    sources.list_inputs([prep])
  assert cli.main(["prepare", prep, "--out", str(tmp_path / "pp"),
                   "--quiet"]) == sources.EXIT_NO_INPUTS
  _one_line(capsys.readouterr().err, "no image", "is a prepared folder",
            "benchmark, distill")
  # Another size into the same prepared folder: refused unless --overwrite.
  assert cli.main(["prepare", *photos, "--out", prep, "--size", "96",
                   "--quiet"]) == 2
  _one_line(capsys.readouterr().err, "size")


def test_results_of_photographs_are_not_reused_for_a_prepared_folder(
    photos, prep, teacher, tmp_path, capsys):
  out = str(tmp_path / "v")
  assert cli.main(_command("vessels", photos, out, None, None)) == 3
  capsys.readouterr()
  # Same ids and paths, but the records come from a preparation: refused.
  assert cli.main(_command("vessels", [prep], out, None, None)) == 2
  _one_line(capsys.readouterr().err, "prepared_inputs")


@pytest.mark.multiprocess
def test_two_processes_prepare_and_read_exactly_once(photos, tmp_path):
  """One 2-process run of `prepare`, then one of `vessels` from its folder:
  each record prepared by one process, the maps equal to a 1-process run
  from the photographs."""
  prep, out = str(tmp_path / "prep"), str(tmp_path / "mp")
  multihost.run_efiqa(
      lambda i: ["prepare", *photos, "--out", prep, "--size", "96",
                 "--records-per-shard", "2", "--batch-size", "2", "--quiet"],
      2, devices=1, timeout=900, what="2-process prepare",
      kill_when=lambda: False)
  rows = _csv(os.path.join(prep, prepared.MANIFEST))
  assert [r["image"] for r in rows] == sources.list_inputs(photos)
  assert {r["shard"].split("-")[2] for r in rows} == {"p0", "p1"}
  where = [(r["shard"], r["record"]) for r in rows]
  assert len(set(where)) == len(where) == N + 2  # each record once
  res, _ = multihost.run_efiqa(
      lambda i: ["vessels", prep, "--out", out, "--size", "96",
                 "--batch-size", "2", "--quiet"],
      2, devices=1, timeout=900, what="2-process vessels from records",
      kill_when=lambda: False)
  assert [c for c, _ in res] == [3, 3]
  ref = str(tmp_path / "ref")
  assert cli.main(["--num-processes", "1", "vessels", *photos, "--out", ref,
                   "--size", "96", "--quiet"]) == 3
  assert _csv(os.path.join(out, "manifest.csv")) == _csv(
      os.path.join(ref, "manifest.csv"))
  for f in glob.glob(os.path.join(ref, "*.png")):
    a = np.asarray(Image.open(f), np.int16)
    b = np.asarray(Image.open(os.path.join(out, os.path.basename(f))),
                   np.int16)
    assert np.abs(a - b).max() <= 1, f  # XLA options differ in the workers


# ------------------------------------------------- tfds:NAME[:SPLIT] inputs




@pytest.mark.parametrize("cmd", ["assess", "extract", "pseudo-label",
                                 "vessels"])
def test_outputs_from_a_tfds_dataset_equal_the_photographs(
    cmd, synth_tfds, teacher, encoder, tmp_path, monkeypatch):
  """`tfds:efiqa_synth:train` (a data/ builder's ArrayRecord build, found
  through TFDS_DATA_DIR): the same rows and arrays as the photographs, ids
  being the photographs' file stems; only the image column names the
  dataset record."""
  images, data_dir = synth_tfds
  monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
  a, b = str(tmp_path / "photos"), str(tmp_path / "tfds")
  assert cli.main(_command(cmd, [images], a, teacher, encoder)) == 0
  assert cli.main(_command(cmd, ["tfds:efiqa_synth:train"], b, teacher,
                           encoder)) == 0
  rows = _same_outputs(cmd, a, b, ignore=("image",))
  got = _csv(os.path.join(b, _TABLE[cmd]))
  assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
  assert sorted(r["image"] for r in got) == sorted(
      f"tfds:efiqa_synth:train/{os.path.basename(r['image'])}" for r in rows)


def test_prepare_a_tfds_dataset_then_assess_it(synth_tfds, teacher, tmp_path,
                                               monkeypatch, capsys):
  """Decode once from a TFDS build: `prepare tfds:...`, then assess from the
  prepared folder equals assess from the photographs. A dataset that is not
  built, and a command that reads only files, refuse in one line (exit 4)."""
  images, data_dir = synth_tfds
  monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
  prep = str(tmp_path / "prep")
  assert cli.main(["prepare", "tfds:efiqa_synth", "--out", prep, "--size",
                   str(SIZE), "--quiet"]) == 0
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  assert cli.main(_command("assess", [images], a, teacher, None)) == 0
  assert cli.main(_command("assess", [prep], b, teacher, None)) == 0
  _same_outputs("assess", a, b, ignore=("image",))
  capsys.readouterr()
  assert cli.main(["assess", "tfds:no_such_dataset:test", "--out",
                   str(tmp_path / "c"), "--model", teacher,
                   "--quiet"]) == sources.EXIT_NO_INPUTS
  _one_line(capsys.readouterr().err, "tfds:no_such_dataset:test",
            "TFDS_DATA_DIR")
  # A command that reads only files names those that read tfds:.
  with pytest.raises(sources.NoInputsError,
                     match="tfds:efiqa_synth: .* benchmark, distill, .*read "
                     "tfds:"):
    sources.list_inputs(["tfds:efiqa_synth"])
