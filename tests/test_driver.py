"""The inference driver (efiqa_jax.driver) under `assess`, `extract`,
`pseudo-label` and `vessels`: exactly once on 2 processes, killed and
resumed; the run fingerprint; bad output folders; Ctrl-C; the vessels
manifest on reruns; processes that do not share the output folder."""
import csv
import glob
import json
import os
import shutil
import signal

import numpy as np
import pytest
from PIL import Image

from efiqa_jax import cli
from efiqa_jax import files
from tests import multihost
from tests.assess_fixtures import tiny_teacher

N_PHOTOS = 14  # synthetic photographs (+ one broken file)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  from efiqa_jax import synth
  d = tmp_path_factory.mktemp("photos")
  for i in range(N_PHOTOS):
    Image.fromarray(synth.generate(i, 160, degrade=False).image).save(
        d / f"eye{i:02d}.png")
  (d / "zz_broken.png").write_bytes(b"not an image")
  return d


@pytest.fixture(scope="module")
def many_photos(photos, tmp_path_factory):
  """Four copies of each photograph: a tiny encoder extracts 15 inputs
  faster than the test can kill the run."""
  d = tmp_path_factory.mktemp("many")
  for f in sorted(photos.iterdir()):
    for k in range(4 if f.name.startswith("eye") else 1):
      shutil.copy(f, d / f"{f.stem}_{k}{f.suffix}")
  return d


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  return tiny_teacher(tmp_path_factory.mktemp("t") / "teacher")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
  from tests.test_extract import _tiny_encoder
  return str(_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny"))


def _csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _one_line_error(err: str, *words):
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err
  for w in words:
    assert w in lines[0], lines[0]


# ------------------------------------------------------------------ journal


def test_journal_newest_row_wins_and_a_cut_line_is_ignored(tmp_path):
  with files.Journal(tmp_path, 0, run_id="a") as j:
    j.append([{"id": "x", "status": "error", "t": 1.0},
              {"id": "y", "status": "ok", "t": 1.0}])
  with files.Journal(tmp_path, 1, run_id="b") as j:
    j.append([{"id": "x", "status": "ok", "t": 2.0}])
  with open(tmp_path / ".journal" / "p1-b.jsonl", "a") as f:
    f.write('{"id": "z", "sta')  # cut by a kill
  rows = files.Journal.read(tmp_path)
  assert set(rows) == {"x", "y"} and rows["x"]["status"] == "ok"
  files.Journal.clear(tmp_path)
  assert files.Journal.read(tmp_path) == {}


# -------------------------------------------------------------- fingerprint


def test_another_model_is_refused_with_the_difference_or_overwritten(
    photos, teacher, tmp_path, capsys):
  other = tiny_teacher(tmp_path / "other", seed=1)
  inputs = [str(photos / f"eye{i:02d}.png") for i in range(3)]
  out = tmp_path / "out"
  args = ["assess", *inputs, "--out", str(out), "--batch-size", "4",
          "--quiet"]
  assert cli.main(args + ["--model", teacher]) == 0
  first = _csv(out / "scores.csv")
  capsys.readouterr()
  # Another model into the same folder: refused, nothing reused or changed.
  assert cli.main(args + ["--model", other]) == 2
  _one_line_error(capsys.readouterr().err, "other settings",
                  "model_files.model", "--overwrite")
  assert _csv(out / "scores.csv") == first
  # The same model again: everything already done.
  assert cli.main(args + ["--model", teacher]) == 0
  assert "(3 already done)" in capsys.readouterr().out
  # --overwrite redoes every image with the other model.
  assert cli.main(args + ["--model", other, "--overwrite"]) == 0
  assert "(0 already done)" in capsys.readouterr().out
  again = _csv(out / "scores.csv")
  assert [r["id"] for r in again] == [r["id"] for r in first]
  assert all(r["status"] == "ok" for r in again)
  fp = json.loads((out / "run.json").read_text())
  assert fp["command"] == "assess"
  assert fp["settings"]["model_files"]["model"]["path"] == other
  # A folder with results but no record of their settings (an older
  # version) is refused too.
  (out / "run.json").unlink()
  assert cli.main(args + ["--model", other]) == 2
  _one_line_error(capsys.readouterr().err, "without a record")


# ------------------------------------------------------------ --out checks


def _read_only_dir(tmp_path):
  d = tmp_path / "ro"
  d.mkdir()
  d.chmod(0o555)
  for cand in (d, "/sys/kernel", "/proc/sys"):
    try:
      open(os.path.join(cand, ".efiqa-w"), "w").close()
      os.remove(os.path.join(cand, ".efiqa-w"))
    except OSError:
      return str(cand)
  pytest.skip("no read-only folder to test with (root on a writable fs)")


@pytest.mark.parametrize("command", ["assess", "vessels", "synth"])
def test_out_a_file_or_read_only_is_one_line(photos, teacher, tmp_path,
                                             capsys, command):
  a_file = tmp_path / "f.txt"
  a_file.write_text("x")
  ro = _read_only_dir(tmp_path)
  extra = {"assess": [str(photos / "eye00.png"), "--model", teacher],
           "vessels": [str(photos / "eye00.png")],
           "synth": ["--n", "1", "--size", "64"]}[command]
  for out, words in ((a_file, ("is a file",)), (ro, ("cannot write",))):
    code = cli.main([command, *extra, "--out", str(out), "--quiet"])
    assert code == 2
    _one_line_error(capsys.readouterr().err, *words)
  assert a_file.read_text() == "x"


# ------------------------------------------------------------------ Ctrl-C


@pytest.mark.slow
def test_ctrl_c_in_assess_is_one_line_130_and_resumes(photos, teacher,
                                                      tmp_path):
  from efiqa_jax import assess as assess_lib
  inputs = sorted(glob.glob(str(photos / "*.png")))
  ref = tmp_path / "ref"
  assess_lib.assess(inputs, str(ref), model=teacher, batch_size=2,
                    progress=False)
  out = tmp_path / "out"
  # Same devices and XLA options as this process, so the rerun here ends
  # with byte-identical scores.
  p = multihost.start_efiqa(["assess", *inputs, "--out", out, "--model",
                             teacher, "--batch-size", "2", "--quiet"],
                            fast_compile=False)
  multihost.wait_for(
      lambda: sum(len(open(f).read().splitlines()) for f in
                  glob.glob(str(out / ".journal" / "*.jsonl"))) >= 2,
      p, 240, "assess before Ctrl-C")
  p.send_signal(signal.SIGINT)
  code, log = multihost.finish(p, 120, "assess after Ctrl-C")
  assert code == 130, log[-3000:]
  assert "Traceback" not in log, log[-3000:]
  lines = [l for l in log.splitlines() if l.startswith("efiqa assess:")]
  assert len(lines) == 1 and "interrupted" in lines[0], log[-3000:]
  assert not (out / "scores.csv").exists()
  res = assess_lib.assess(inputs, str(out), model=teacher, batch_size=2,
                          progress=False)
  assert res.skipped_done >= 2
  assert (out / "scores.csv").read_text() == (ref / "scores.csv").read_text()


# ---------------------------------------------------------- vessels rerun


def test_vessels_rerun_lists_every_map_in_the_manifest(photos, tmp_path,
                                                      capsys):
  src = tmp_path / "in"
  src.mkdir()
  for k, name in enumerate("abcd"):
    shutil.copy(photos / f"eye0{k}.png", src / f"{name}.png")
  (src / "x.png").write_bytes(b"broken")
  out = tmp_path / "out"
  base = ["vessels", "--out", str(out), "--size", "128", "--quiet"]
  assert cli.main(base + [str(src / n) for n in ("a.png", "b.png",
                                                 "c.png")]) == 0
  # b again (already done), d new, x broken; a and c not named this time.
  capsys.readouterr()
  assert cli.main(base + [str(src / n) for n in ("b.png", "d.png",
                                                 "x.png")]) == 3
  cap = capsys.readouterr()
  assert cap.err == "" and "(1 already done)" in cap.out  # --quiet
  rows = _csv(out / "manifest.csv")
  # This run's inputs in order, then the earlier maps still in the folder.
  assert [r["id"] for r in rows] == ["b", "d", "x", "a", "c"]
  by = {r["id"]: r for r in rows}
  assert by["x"]["status"] == "unreadable" and by["x"]["crop_size"] == ""
  pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
  assert pngs == ["a.png", "b.png", "c.png", "d.png"]  # each with its row
  for r in rows:
    if r["status"] == "ok":
      assert r["file"] == r["id"] + ".png"
      assert int(r["crop_size"]) > 0 and int(r["orig_h"]) == 160
      assert r["crop_x0"] != "" and float(r["fov_r"]) > 0
  # Another size is refused; --overwrite starts over.
  assert cli.main(["vessels", str(src / "d.png"), "--out", str(out),
                   "--size", "96", "--quiet"]) == 2
  _one_line_error(capsys.readouterr().err, "size: 128 -> 96")
  assert cli.main(["vessels", str(src / "d.png"), "--out", str(out),
                   "--size", "96", "--quiet", "--overwrite"]) == 0
  assert [r["id"] for r in _csv(out / "manifest.csv")] == ["d"]
  assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["d.png"]


# ------------------------------------------------- 2 processes, killed


def _journal_rows(out):
  rows = []
  for f in glob.glob(os.path.join(out, ".journal", "*.jsonl")):
    for line in open(f).read().splitlines():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return rows


def _command(cmd, inputs, out, teacher, encoder):
  return {
      "assess": ["assess", *inputs, "--out", out, "--model", teacher,
                 "--batch-size", "2", "--quiet", "--no-overlays"],
      "extract": ["extract", *inputs, "--out", out, "--encoder", encoder,
                  "--size", "64", "--work-size", "128", "--batch-size", "2",
                  "--quiet"],
      "pseudo-label": ["pseudo-label", *inputs, "--out", out, "--teacher",
                       teacher, "--from-photos", "--work-size", "128",
                       "--batch-size", "2", "--quiet"],
      "vessels": ["vessels", *inputs, "--out", out, "--size", "128",
                  "--batch-size", "2", "--quiet"],
  }[cmd]


_TABLE = {"assess": "scores.csv", "extract": "manifest.csv",
          "pseudo-label": "manifest.csv", "vessels": "manifest.csv"}
_ARRAYS = {"assess": "maps/*.npy", "extract": "*.npy",
           "pseudo-label": "anomaly/*.npy", "vessels": "*.png"}
# Columns compared exactly; numbers from the maps with a tolerance.
_NUMERIC = {"quality", "degraded_fraction"}


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("cmd", ["assess", "extract", "pseudo-label",
                                 "vessels"])
def test_two_processes_exactly_once_killed_and_resumed(
    cmd, photos, many_photos, teacher, encoder, tmp_path):
  folder = many_photos if cmd == "extract" else photos
  inputs = sorted(glob.glob(str(folder / "*.png")))
  n_ok = len(inputs) - 1  # all but the broken file
  # Reference: one process, here.
  ref = str(tmp_path / "ref")
  assert cli.main(["--num-processes", "1",
                   *_command(cmd, inputs, ref, teacher, encoder)]) == 3
  out = str(tmp_path / "mp")
  args = _command(cmd, inputs, out, teacher, encoder)
  # Killed (SIGKILL, both processes) once the first rows are journaled.
  res, killed = multihost.run_efiqa(
      lambda i: args, 2, devices=1, timeout=600, what=f"2-process {cmd}",
      kill_when=lambda: len(_journal_rows(out)) >= 2)
  assert killed, "finished before the kill: " + res[0][1][-2000:]
  assert not os.path.exists(os.path.join(out, _TABLE[cmd]))
  n_before = len({r["id"] for r in _journal_rows(out)
                  if r["status"] == "ok"})
  assert 0 < n_before < n_ok
  res, _ = multihost.run_efiqa(
      lambda i: args, 2, devices=1, timeout=600, what=f"2-process {cmd} rerun",
      kill_when=lambda: False)
  assert [c for c, _ in res] == [3, 3], res[0][1][-3000:] + res[1][1][-3000:]
  # One table, every input once, in input order, as the 1-process run.
  got, want = _csv(os.path.join(out, _TABLE[cmd])), _csv(
      os.path.join(ref, _TABLE[cmd]))
  assert [r["image"] for r in got] == inputs == [r["image"] for r in want]
  for g, w in zip(got, want):
    for k in w:
      if k in _NUMERIC and w[k]:
        assert abs(float(g[k]) - float(w[k])) < 1e-4, (k, g, w)
      elif k != "version":
        assert g[k] == w[k], (k, g, w)
  assert sum(r["status"] == "ok" for r in got) == n_ok
  # Exactly once: every ok image journaled by one process in one run.
  ok_rows = [r["id"] for r in _journal_rows(out) if r["status"] == "ok"]
  assert sorted(ok_rows) == sorted(set(ok_rows)) and len(ok_rows) == n_ok
  # Both processes worked in the rerun (their journals of that run).
  by_process = {os.path.basename(f).split("-")[0] for f in glob.glob(
      os.path.join(out, ".journal", "*.jsonl"))}
  assert by_process == {"p0", "p1"}
  # The per-image files agree with the 1-process run's.
  names = sorted(os.path.relpath(f, ref)
                 for f in glob.glob(os.path.join(ref, _ARRAYS[cmd])))
  assert names and names == sorted(
      os.path.relpath(f, out) for f in glob.glob(os.path.join(out,
                                                              _ARRAYS[cmd])))
  for n in names:
    if n.endswith(".png"):
      a = np.asarray(Image.open(os.path.join(out, n)), np.int16)
      b = np.asarray(Image.open(os.path.join(ref, n)), np.int16)
      assert np.abs(a - b).max() <= 1, n
    else:
      np.testing.assert_allclose(np.load(os.path.join(out, n)),
                                 np.load(os.path.join(ref, n)), atol=1e-4,
                                 err_msg=n)
  assert not glob.glob(os.path.join(out, "**", "*.tmp-*"), recursive=True)


# --------------------------------------------- no shared filesystem


@pytest.mark.multiprocess
def test_processes_without_a_shared_folder_refuse_with_one_line(photos,
                                                                tmp_path):
  """Two hosts with different local folders behind one --out: faked by
  giving the two processes different --out folders."""
  inputs = [str(photos / "eye00.png"), str(photos / "eye01.png")]
  res, _ = multihost.run_efiqa(
      lambda i: ["vessels", *inputs, "--out", tmp_path / f"host{i}",
                 "--size", "96", "--quiet"], 2, devices=1, timeout=600,
      what="2-process vessels without a shared folder",
      kill_when=lambda: False)
  for code, log in res:
    assert code == 2, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    err = [l for l in log.splitlines() if l.startswith("efiqa vessels:")]
    assert len(err) == 1 and "does not see process 0's files" in err[0], log
  assert not (tmp_path / "host0" / "manifest.csv").exists()
  assert not list((tmp_path / "host1").glob("*.png"))
