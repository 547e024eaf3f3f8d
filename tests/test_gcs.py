"""Cloud storage: every command on `gs://` paths, against a real GCS JSON API on
127.0.0.1 (`gcp-storage-emulator`, started once per session by `gcs` below).

Inputs, outputs, models, workdirs and configs go through `efiqa_jax.files`
(etils.epath -> gcsfs); orbax writes checkpoint arrays through tensorstore's
own GCS client, pointed at the same emulator (`TENSORSTORE_GCS_HTTP_URL`).
What the emulator cannot do is written in the README ("Cloud storage") and in
tests/gcs_emulator.py.
"""
import io
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

import jax

from efiqa_jax import files
from tests import multihost

BUCKET = "efiqa-test"  # tensorstore wants a valid GCS bucket name (>= 3 chars)


def _env_for_emulator(host: str) -> dict:
  return {
      "STORAGE_EMULATOR_HOST": host,
      # tensorstore (orbax's arrays): the same emulator, a fixed token.
      "TENSORSTORE_GCS_HTTP_URL": host,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      # Without these every client call first waits on metadata-server and
      # gRPC (zonal/HNS bucket) probes that cannot answer here.
      "NO_GCE_CHECK": "true",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "EPATH_USE_TF": "false",
  }


@pytest.fixture(scope="session")
def gcs():
  """gs://efiqa-test on a local emulator; its env is set in this process
  (and so in every subprocess the tests start)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  # Not imported here: gcsfs reads its environment (below) when imported.
  missing = [m for m in ("gcp_storage_emulator", "gcsfs")
             if importlib.util.find_spec(m) is None]
  if missing:
    if os.environ.get("CI") == "true":
      pytest.fail(f"CI=true but the GCS test packages are missing: {missing}")
    pytest.skip("gcp-storage-emulator and gcsfs are not installed "
                "(pip install -e .[test] -c constraints.txt)")
  port = multihost.free_port()
  host = f"http://127.0.0.1:{port}"
  log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"),
                          f"gcs_emulator_{port}.log"), "w")
  proc = subprocess.Popen(
      [sys.executable, os.path.join(multihost.HERE, "gcs_emulator.py"),
       str(port), BUCKET], stdout=log, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 60
  while True:
    try:
      urllib.request.urlopen(host + "/", timeout=2)
      break
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        pytest.fail(f"the GCS emulator did not start (see {log.name})")
      time.sleep(0.1)
  env = _env_for_emulator(host)
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield f"gs://{BUCKET}"
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  proc.terminate()
  proc.wait(10)
  log.close()


def _png(seed: int, size: int = 256) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from efiqa_jax import synth  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(synth.generate(seed, size, degrade=False).image).save(
      buf, "PNG")
  return buf.getvalue()


def _no_local_gs(*dirs):
  for d in dirs:
    assert not os.path.exists(os.path.join(d, "gs:")), d


# ------------------------------------------------------------ files helpers


def test_listing_csv_and_atomic_writes_on_gcs(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  root = f"{gcs}/files"
  for name in ("b.png", "sub/a.JPG", ".hidden/c.png", "sub/.d.png"):
    files.atomic_write_bytes(f"{root}/in/{name}", b"x")
  files.atomic_write_text(f"{root}/in/notes.txt", "not an image")
  from efiqa_jax import sources
  want = [f"{root}/in/b.png", f"{root}/in/sub/a.JPG"]
  assert sources.list_inputs(f"{root}/in") == want
  assert sources.list_inputs(f"{root}/in/") == want
  assert sources.list_inputs(f"{root}/in/**/*.JPG") == want[1:]
  assert sources.list_inputs(f"{root}/in/*") == want  # the folder expands
  # A CSV in the bucket: relative rows against its prefix, others as given.
  files.atomic_write_csv(f"{root}/list.csv", ["path"],
                         [{"path": "in/b.png"}, {"path": f"{root}/in/sub/a.JPG"},
                          {"path": "in/missing.png"}])
  assert sources.list_inputs(f"{root}/list.csv") == want + [
      f"{root}/in/missing.png"]
  with pytest.raises(sources.NoInputsError):
    sources.list_inputs(f"{root}/in/*.tif")
  assert sources.list_inputs(f"{root}/nothing.png") == [
      f"{root}/nothing.png"]  # kept for a not_found row
  # The decoder reads objects; a missing one is a not_found status.
  from efiqa_jax.fundus import io as fio
  files.atomic_write_bytes(f"{root}/p.png", _png(0, 64))
  assert fio.decode_image(f"{root}/p.png").ok
  assert fio.decode_image(f"{root}/nope.png").status == "not_found"
  # Whole objects: npy, json; no temporary object is left behind.
  files.atomic_write_npy(f"{root}/out/x.npy", np.arange(6).reshape(2, 3))
  np.testing.assert_array_equal(files.load_npy(f"{root}/out/x.npy"),
                                np.arange(6).reshape(2, 3))
  files.atomic_write_json(f"{root}/out/x.json", {"a": 1})
  files.atomic_write_json(f"{root}/out/x.json", {"a": 2})
  assert files.read_json(f"{root}/out/x.json") == {"a": 2}
  assert files.glob(f"{root}/out/*") == [f"{root}/out/x.json",
                                          f"{root}/out/x.npy"]
  assert files.output_dir(f"{root}/o/") == f"{root}/o"
  _no_local_gs(tmp_path)


def test_config_file_in_a_bucket(gcs, repo_root):
  from efiqa_jax import config_util
  src = (repo_root / "configs" / "teacher.py").read_text()
  files.atomic_write_text(f"{gcs}/configs/teacher.py", src)
  cfg = config_util.load_config(f"{gcs}/configs/teacher.py:tiny",
                                ["--config.seed=5"])
  want = config_util.load_config("teacher:tiny", ["--config.seed=5"])
  assert cfg.to_dict() == want.to_dict()
  with pytest.raises(config_util.ConfigError, match="not found"):
    config_util.load_config(f"{gcs}/configs/nope.py")


# ------------------------------------------------------------ train-teacher


def _committed_steps(workdir: str) -> list[int]:
  """orbax on GCS marks a finished checkpoint with commit_success.txt."""
  return sorted(int(p.rstrip("/").split("/")[-2]) for p in files.glob(
      f"{workdir}/checkpoints/*/commit_success.txt"))


@pytest.mark.slow
def test_train_teacher_gs_workdir_killed_and_resumed(gcs, tmp_path):
  """`efiqa train-teacher --workdir gs://...` is SIGKILLed once a checkpoint
  is committed in the bucket; the same command resumes there and ends with
  the parameters of an uninterrupted run in a local workdir; every workdir
  file (run.json, metrics.jsonl, hparams.json, events, export) is in the
  bucket and nothing local is named `gs:`."""
  from efiqa_jax import checkpoints, metric_writers
  from flax import nnx
  over = ["--config.num_epochs=20", "--config.checkpoint_every=5",
          "--config.log_every=5", "--config.image_every=0",
          "--config.progress_bar=False"]

  # The killed, resumed and reference runs are the same command in fresh
  # processes compiled alike (fully optimised, no persistent cache): runs
  # compiled under other settings differ in the last bits.
  def run(workdir):
    return multihost.start_efiqa(
        ["train-teacher", "--config", "teacher:tiny", *over, "--workdir",
         str(workdir)], fast_compile=False, compile_cache=False)
  wd = f"{gcs}/teacher_wd"
  p = run(wd)
  multihost.wait_for(lambda: _committed_steps(wd), p, 900, "train-teacher")
  p.send_signal(signal.SIGKILL)
  p.wait(60)
  killed_at = _committed_steps(wd)[-1]
  assert 5 <= killed_at < 40, multihost.log(p)[-3000:]
  assert not files.exists(f"{wd}/export")
  resumed, reference = run(wd), run(tmp_path / "ref")
  for proc, what in ((resumed, "resumed"), (reference, "reference")):
    rc, log = multihost.finish(proc, 900, f"train-teacher {what}")
    assert rc == 0, log[-3000:]
  assert f"resumed at step {killed_at}/40" in multihost.log(resumed)
  _no_local_gs(tmp_path, multihost.REPO)
  model, meta = checkpoints.load_unet_checkpoint(f"{wd}/export")
  ref, _ = checkpoints.load_unet_checkpoint(tmp_path / "ref" / "export")
  assert meta["steps"] == 40
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(nnx.state(ref, nnx.Param))):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  names = {p.rsplit("/", 1)[-1] for p in files.glob(f"{wd}/*")}
  assert {"run.json", "metrics.jsonl", "hparams.json", "checkpoints",
          "export"} <= names, names
  assert any(n.startswith("events.out.tfevents") for n in names), names
  # Each logged step once, across the kill: the rows up to the restored
  # checkpoint were flushed with it, later ones were redone.
  steps = [r["step"] for r in metric_writers.read_metrics(wd)]
  assert steps == list(range(5, 41, 5)), steps


# ------------------------------------------- assess, extract, pseudo-label


@pytest.fixture(scope="module")
def bucket_photos(gcs):
  """Three clean synthetic photographs in gs://.../photos/ (one in a
  sub-folder)."""
  root = f"{gcs}/photos"
  for i, name in enumerate(("p0.png", "p1.png", "sub/p2.png")):
    files.atomic_write_bytes(f"{root}/{name}", _png(i))
  return root


def test_assess_gs_in_gs_out_and_resume(gcs, bucket_photos, tmp_path,
                                        monkeypatch):
  """`efiqa assess gs://b/photos --out gs://b/out --model gs://b/teacher`:
  scores.csv, maps, overlays, report and journal land in the bucket; a
  rerun finds everything done; nothing local is named `gs:`."""
  from efiqa_jax import cli
  from tests.assess_fixtures import tiny_teacher
  monkeypatch.chdir(tmp_path)
  teacher = tiny_teacher(f"{gcs}/models/teacher")  # saved by orbax to GCS
  out = f"{gcs}/assess_out"
  argv = ["assess", bucket_photos, "--out", out, "--model", teacher,
          "--batch-size", "2", "--quiet"]
  assert cli.main(argv) == 0
  _, rows = files.read_csv(f"{out}/scores.csv")
  assert [r["image"] for r in rows] == [f"{bucket_photos}/p0.png",
                                        f"{bucket_photos}/p1.png",
                                        f"{bucket_photos}/sub/p2.png"]
  assert [r["status"] for r in rows] == ["ok"] * 3, rows
  for r in rows:
    m = files.load_npy(f"{out}/maps/{r['id']}.npy")
    assert m.ndim == 2 and np.isfinite(m).all()
    assert files.isfile(f"{out}/overlays/{r['id']}.png")
    assert files.isfile(f"{out}/report/{r['id']}.jpg")
  html = files.read_text(f"{out}/report.html")
  assert "report/p0.jpg" in html
  assert files.glob(f"{out}/*.tmp-*") == []
  before = files.read_bytes(f"{out}/maps/p0.npy")
  assert cli.main(argv) == 0  # all done: nothing redone, same files
  assert files.read_bytes(f"{out}/maps/p0.npy") == before
  _no_local_gs(tmp_path, multihost.REPO)


def test_extract_and_pseudo_label_on_gcs(gcs, bucket_photos, tmp_path,
                                         monkeypatch):
  """`efiqa extract` (npy and ArrayRecord) and `efiqa pseudo-label` with
  inputs, models and outputs in the bucket."""
  from efiqa_jax import cli
  from efiqa_jax.encoders import extract
  from tests.assess_fixtures import tiny_teacher
  from tests.test_extract import _tiny_encoder
  monkeypatch.chdir(tmp_path)
  enc = f"{gcs}/models/encoder"
  _tiny_encoder(enc)
  for fmt in ("npy", "arrayrecord"):
    out = f"{gcs}/feats_{fmt}"
    assert cli.main(["extract", bucket_photos, "--encoder", enc, "--out", out,
                     "--size", "64", "--batch-size", "2", "--format", fmt,
                     "--quiet"]) == 0
    rows = extract.read_manifest(out)
    assert [r["status"] for r in rows] == ["ok"] * 3, rows
    assert files.isfile(f"{out}/{extract.METADATA}")
    if fmt == "npy":
      got = {r["id"]: files.load_npy(f"{out}/{r['file']}") for r in rows}
    else:
      got2 = {i: f for i, _, f in extract.iter_arrayrecord(out)}
  assert sorted(got) == sorted(got2) == ["p0", "p1", "p2"]
  for k in got:
    assert got[k].shape[-1] == got2[k].shape[-1] and got[k].ndim == 3
    np.testing.assert_array_equal(got[k], got2[k])

  teacher = tiny_teacher(f"{gcs}/models/pl_teacher")
  out = f"{gcs}/pseudo"
  assert cli.main(["pseudo-label", bucket_photos, "--from-photos",
                   "--teacher", teacher, "--out", out, "--grid", "4",
                   "--quiet"]) == 0
  _, rows = files.read_csv(f"{out}/manifest.csv")
  assert [r["status"] for r in rows] == ["ok"] * 3, rows
  from PIL import Image
  from efiqa_jax import pseudo_labels as pl
  for r in rows:
    a = files.load_npy(f"{out}/anomaly/{r['id']}.npy")
    lab = np.asarray(Image.open(io.BytesIO(
        files.read_bytes(f"{out}/labels/{r['id']}.png"))))
    np.testing.assert_array_equal(lab, pl.patch_labels(a, pl.LabelSpec(
        grid=4)))
  assert files.read_json(f"{out}/spec.json")["teacher"] == teacher
  _no_local_gs(tmp_path, multihost.REPO)


def test_prepare_into_a_bucket_and_read_it(gcs, bucket_photos, tmp_path,
                                           monkeypatch):
  """`efiqa prepare gs://b/photos --out gs://b/prepared`: shards, manifest
  and prepared.json in the bucket; `efiqa vessels gs://b/prepared` gives
  the manifest and maps of `efiqa vessels gs://b/photos`."""
  from efiqa_jax import cli, prepared
  monkeypatch.chdir(tmp_path)
  prep = f"{gcs}/prepared"
  assert cli.main(["prepare", bucket_photos, "--out", prep, "--size", "96",
                   "--records-per-shard", "2", "--quiet"]) == 0
  meta = files.read_json(f"{prep}/{prepared.METADATA}")
  assert meta["counts"]["ok"] == 3 and len(meta["shards"]) == 2
  assert files.glob(f"{prep}/*.tmp*") == []
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  for inp, out in ((bucket_photos, a), (prep, b)):
    assert cli.main(["vessels", inp, "--out", out, "--size", "96",
                     "--quiet"]) == 0
  assert files.read_text(f"{a}/manifest.csv") == files.read_text(
      f"{b}/manifest.csv")
  for n in ("p0.png", "p1.png", "p2.png"):
    assert files.read_bytes(f"{a}/{n}") == files.read_bytes(f"{b}/{n}")
  _no_local_gs(tmp_path, multihost.REPO)


# ------------------------- synth, benchmark, calibrate-teacher, port


def test_more_commands_read_and_write_gcs(gcs, bucket_photos, tmp_path,
                                          monkeypatch):
  """`synth --out gs://`, `benchmark gs://... --model gs://... --json gs://`,
  `calibrate-teacher gs://teacher --photos gs://... --out gs://` and `port
  adapter ... --out gs://` (with torch): their files land in the bucket,
  nothing local is named `gs:`."""
  import importlib.util
  from efiqa_jax import checkpoints, cli
  from tests.assess_fixtures import tiny_teacher
  monkeypatch.chdir(tmp_path)
  syn = f"{gcs}/synth"
  assert cli.main(["synth", "--out", syn, "--n", "2", "--size", "96",
                   "--seed", "3", "--quiet"]) == 0
  _, rows = files.read_csv(f"{syn}/labels.csv")
  assert len(rows) == 2
  for r in rows:
    assert files.isfile(f"{syn}/{r['image']}")
    assert files.isfile(f"{syn}/vessels/{r['id']}.png")
    assert files.isfile(f"{syn}/degradation/{r['id']}.png")

  teacher = tiny_teacher(f"{gcs}/models/bench_teacher")
  assert cli.main(["benchmark", f"{syn}/images", "--model", teacher,
                   "--kinds", "blur", "--severities", "0.6", "--json",
                   f"{gcs}/bench/result.json", "--quiet"]) == 0
  res = files.read_json(f"{gcs}/bench/result.json")
  assert res["n_photos"] == 2 and res["n_variants"] == 2

  cal = f"{gcs}/models/calibrated"
  one = f"{bucket_photos}/p0.png"
  assert cli.main(["calibrate-teacher", teacher, "--out", cal, "--photos",
                   one, "--split", "all", "--label-grid", "8",
                   "--quiet"]) == 0
  meta = checkpoints.read_meta(cal)
  assert meta["calibration"]["n_images"] == 1 + 6 * 3 + 2
  assert meta["calibration"]["data"]["source"] == [one]
  assert files.read_json(f"{cal}/calibration.json") == meta["calibration"]

  if importlib.util.find_spec("torch") is not None:
    import torch
    torch.save({"model.weight": torch.ones((1, 8)),
                "model.bias": torch.zeros(1)}, tmp_path / "sc_linear.pth")
    ada = f"{gcs}/models/adapter"
    assert cli.main(["port", "adapter", str(tmp_path / "sc_linear.pth"),
                     "--out", ada]) == 0
    m, _ = checkpoints.load_model(ada, kind="adapter")
    np.testing.assert_array_equal(np.asarray(m.linear.kernel[...]),
                                  np.ones((8, 1), np.float32))
  _no_local_gs(tmp_path, multihost.REPO)
