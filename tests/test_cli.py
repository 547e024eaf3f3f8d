"""The `efiqa` command line as a newcomer meets it: `--help` without jax,
every option explained with its default, documented exit codes."""
import argparse
import os
import subprocess
import sys

import pytest

from efiqa_jax import cli
from efiqa_jax import sources


def _subcommands(parser):
  for a in parser._actions:  # pylint: disable=protected-access
    if isinstance(a, argparse._SubParsersAction):  # pylint: disable=protected-access
      for name, sub in a.choices.items():
        yield name, sub
        for n2, s2 in _subcommands(sub):
          yield f"{name} {n2}", s2


def test_help_imports_no_jax_flax_or_tensorflow(repo_root):
  """Building the parser and printing every command's help must not import
  the heavy libraries (it took 3-5 s when it did); not a timing test."""
  code = """
import argparse, contextlib, io, sys
from efiqa_jax import cli
def walk(parser):
  for a in parser._actions:
    if isinstance(a, argparse._SubParsersAction):
      for sub in a.choices.values():
        yield sub
        yield from walk(sub)
p = cli.build_parser()
with contextlib.redirect_stdout(io.StringIO()) as out:
  p.print_help()
  for sub in walk(p):
    sub.print_help()
heavy = [m for m in ("jax", "jaxlib", "flax", "tensorflow", "torch", "orbax",
                     "optax", "grain", "scipy", "skimage") if m in sys.modules]
print(len(out.getvalue()), heavy)
"""
  env = dict(os.environ, PYTHONPATH=str(repo_root))
  res = subprocess.run([sys.executable, "-c", code], env=env, cwd=repo_root,
                       capture_output=True, text=True, check=True)
  size, heavy = res.stdout.split(" ", 1)
  assert int(size) > 10000 and heavy.strip() == "[]", res.stdout


def test_every_option_has_help_and_shows_its_default():
  parser = cli.build_parser()
  problems = []
  for name, sub in _subcommands(parser):
    text = sub.format_help()
    for a in sub._actions:  # pylint: disable=protected-access
      if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):  # pylint: disable=protected-access
        continue
      opt = a.option_strings[0] if a.option_strings else a.dest
      if not (a.help or "").strip():
        problems.append(f"{name} {opt}: no help")
      elif (a.option_strings and not a.required
            and not isinstance(a, argparse._StoreTrueAction)):  # pylint: disable=protected-access
        if a.default is None:
          if "default" not in a.help.lower():
            problems.append(f"{name} {opt}: default None not explained")
        elif "default" not in a.help.lower() and (
            f"(default: {a.default})" not in " ".join(text.split())):
          problems.append(f"{name} {opt}: default {a.default!r} not shown")
  assert not problems, "\n".join(problems)


def test_port_choices_match_the_model_module():
  from efiqa_jax.models import vit
  from efiqa_jax.port import vit as port_vit
  assert port_vit.PRESET_NAMES == tuple(sorted(vit.PRESETS))
  assert port_vit.INTERP_NAMES == vit.INTERP


def _input_commands(tmp_path):
  out = str(tmp_path / "out")
  return {
      "assess": ["assess", "{}", "--out", out, "--quiet"],
      "benchmark": ["benchmark", "{}", "--quiet"],
      "vessels": ["vessels", "{}", "--out", out],
      "prepare": ["prepare", "{}", "--out", out, "--quiet"],
      "pseudo-label": ["pseudo-label", "{}", "--teacher", "default",
                       "--out", out, "--quiet"],
      "extract": ["extract", "{}", "--encoder", str(tmp_path / "enc"),
                  "--out", out],
      "pretrain-encoder": ["pretrain-encoder", "{}", "--out", out,
                           "--config", "encoder_mim:tiny", "--quiet"],
      "distill": ["distill", "{}", "--teacher", "default", "--encoder",
                  str(tmp_path / "enc"), "--workdir", out, "--quiet"],
  }


@pytest.mark.parametrize("command", sorted(_input_commands(
    __import__("pathlib").Path("/x"))))
def test_inputs_naming_no_image_exit_4(command, tmp_path, capsys):
  """README, exit status: 4 = the inputs named no image (an empty folder, a
  glob matching nothing or a CSV without rows), for every command."""
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "notes.txt").write_text("not an image")
  header_only = tmp_path / "list.csv"
  header_only.write_text("image\n")
  for given in (str(empty), str(tmp_path / "none*.jpg"), str(header_only)):
    argv = [a.replace("{}", given) for a in _input_commands(tmp_path)[command]]
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == sources.EXIT_NO_INPUTS == 4, (given, err)
    assert len(err) == 1 and "no image" in err[0], err
  assert not (tmp_path / "out" / "scores.csv").exists()


def test_csv_inputs_take_path_or_image_column(tmp_path):
  (tmp_path / "images").mkdir()
  for n in ("a.png", "b.png"):
    (tmp_path / "images" / n).write_bytes(b"")
  (tmp_path / "labels.csv").write_text("id,image,grade\na,images/a.png,good\n"
                                       "b,images/b.png,reject\n")
  (tmp_path / "list.csv").write_text("path\nimages/b.png\n")
  assert sources.list_inputs([str(tmp_path / "labels.csv"),
                              str(tmp_path / "list.csv")]) == [
                                  str(tmp_path / "images" / "a.png"),
                                  str(tmp_path / "images" / "b.png"),
                                  str(tmp_path / "images" / "b.png")]
  (tmp_path / "bad.csv").write_text("file\nx.png\n")
  with pytest.raises(ValueError, match="`path` or `image` column"):
    sources.list_inputs(str(tmp_path / "bad.csv"))


def test_port_without_the_extra_names_it(tmp_path, capsys, monkeypatch):
  for mod in ("torch", "safetensors", "transformers"):
    monkeypatch.setitem(sys.modules, mod, None)  # `import torch` fails
  src = tmp_path / "w.pth"
  src.write_bytes(b"\0" * 16)
  rc = cli.main(["port", "vuad", str(src), "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert "pip install 'efiqa-jax[port]'" in err


def test_defaults_agree_with_the_configs():
  """pseudo-label's grid is the token grid configs/adapter.py trains on;
  extract's size is the one the encoder records."""
  from efiqa_jax import config_util
  from efiqa_jax.encoders import extract
  parser = cli.build_parser()
  subs = dict(_subcommands(parser))
  grid = subs["pseudo-label"].get_default("grid")
  assert grid == config_util.load_config("adapter").size // 16 == 14
  assert subs["extract"].get_default("size") is None
  assert extract.recorded_input_size(
      {"pretraining": {"preprocessing": {"size": 448}}}) == 448
  assert extract.recorded_input_size(
      {"preprocessing": {"efiqa": {"size": 256}}}) == 256
  assert extract.recorded_input_size({"architecture": "vit"}) == 224


def test_training_commands_report_errors_in_one_line(capsys):
  """`commands.run_training`, the error handling of train-teacher,
  train-adapter and pretrain-encoder: one line and the documented code."""
  from efiqa_jax import commands, runtime, trainer

  def fails(e):
    def fn():
      raise e
    return fn

  assert commands.run_training("x", lambda: 7) == (7, None)
  for err, code in ((trainer.NonFiniteLossError("loss nan at step 3"),
                     runtime.EXIT_FAILED),
                    (FileNotFoundError("no such folder"), runtime.EXIT_USAGE),
                    (ValueError("bad value"), runtime.EXIT_USAGE),
                    (sources.NoInputsError("empty/"), sources.EXIT_NO_INPUTS)):
    assert commands.run_training("x", fails(err)) == (None, code), err
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("efiqa x: "), lines
    assert str(err) in lines[0]
