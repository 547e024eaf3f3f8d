"""Every notebook in colabs/ runs top to bottom in a fresh virtualenv after
its own install cell (efiqa-jax from the wheel of the checkout; no network
beyond the package index, tiny sizes). See tests/notebooks.py."""
import fnmatch
import json
import os
import re
from unittest import mock

import pytest

from tests import fresh_install
from tests.notebooks import run_notebook

pytestmark = pytest.mark.slow


def test_quickstart_notebook(tmp_path, monkeypatch, fresh_venv, efiqa_wheel):
  text, pngs, htmls = run_notebook(
      "quickstart.ipynb", tmp_path, monkeypatch, venv=fresh_venv,
      wheel=efiqa_wheel, env={"EFIQA_QUICKSTART_SHARED": "0"})
  assert "efiqa-jax 0." in text
  assert "retina_blur" in text and "AssessResult" in text
  assert pngs and len(pngs[0]) > 1000  # the maps figure
  # The report, self-contained: every picture inside the iframe.
  (page,) = [h for h in htmls if "<iframe srcdoc=" in h]
  assert "data:image/jpeg;base64," in page and "src=&#x27;report/" not in page


def test_train_teacher_notebook(tmp_path, monkeypatch, fresh_venv,
                                efiqa_wheel):
  text, pngs, _ = run_notebook("train_teacher.ipynb", tmp_path, monkeypatch,
                               venv=fresh_venv, wheel=efiqa_wheel)
  assert "exported to" in text and "anomaly inside the hole" in text
  assert len(pngs) >= 4


def test_port_and_extract_notebook(tmp_path, monkeypatch, fresh_venv,
                                   efiqa_wheel):
  text, pngs, _ = run_notebook(
      "port_and_extract.ipynb", tmp_path, monkeypatch, venv=fresh_venv,
      wheel=efiqa_wheel, env={"EFIQA_SHARED_FUNDUS": str(tmp_path / "none")})
  assert "transformers available: True" in text  # the [port] extra came in
  assert "failed 1" in text and "not_found" in text
  assert pngs and len(pngs[-1]) > 1000  # the PCA figure
  feats = tmp_path / "port_and_extract_work" / "features"
  assert (feats / "manifest.csv").is_file()
  assert len([f for f in os.listdir(feats) if f.endswith(".npy")]) >= 3


def test_distill_notebook(tmp_path, monkeypatch, fresh_venv, efiqa_wheel):
  text, pngs, _ = run_notebook("distill.ipynb", tmp_path, monkeypatch,
                               venv=fresh_venv, wheel=efiqa_wheel,
                               env={"EFIQA_TEACHER": None,
                                    "EFIQA_ENCODER": None})
  assert "held-out student map AUROC" in text and "adapter:" in text
  # Both classes among the held-out cells, so the AUROCs are numbers.
  aucs = re.search(r"student map AUROC (\S+) \| teacher pseudo-label AUROC "
                   r"(\S+)", text)
  assert aucs and all(0 <= float(a) <= 1 for a in aucs.groups()), text[-2000:]
  assert pngs and len(pngs[-1]) > 1000
  assert (tmp_path / "distill_work" / "assess" / "logits").is_dir()


def _install_cell(name):
  nb = json.loads((fresh_install.REPO / "colabs" / name).read_text())
  (cell,) = [c for c in nb["cells"]
             if "install" in c["metadata"].get("tags", [])]
  return "".join(cell["source"])


def _pip_args(source, *, dev=(), env=(), which=None, in_colab=True):
  """What the install cell asks pip for on a runtime with device files
  `dev`, environment variables `env` and `nvidia-smi` at `which`."""
  import glob as glob_mod
  import importlib.metadata
  import importlib.util
  import shutil
  import subprocess
  calls = []
  fake_env = {k: "1" for k in env}
  if in_colab:
    fake_env["COLAB_RELEASE_TAG"] = "release"
  with mock.patch.object(importlib.util, "find_spec", lambda m: None), \
      mock.patch.object(importlib.metadata, "version", lambda m: "0"), \
      mock.patch.object(subprocess, "run",
                        lambda args, **k: calls.append(args)), \
      mock.patch.object(shutil, "which",
                        lambda n: which if n == "nvidia-smi" else None), \
      mock.patch.object(glob_mod, "glob", lambda p: [
          d for d in dev if fnmatch.fnmatch(d, p)]), \
      mock.patch.object(os.path, "exists", lambda p: p in dev), \
      mock.patch.dict(os.environ, fake_env, clear=True):
    exec(compile(source, "install-cell", "exec"), {})  # pylint: disable=exec-used
  (args,) = calls
  return args[args.index("install") + 2:]


@pytest.mark.parametrize("name", ["quickstart.ipynb", "train_teacher.ipynb",
                                  "port_and_extract.ipynb", "distill.ipynb"])
def test_install_cell_picks_the_runtimes_jax(name):
  """Colab's CPU runtime keeps its jax (no accelerator build), its GPU one
  gets jax[cuda12], its TPU ones (v2-v4 /dev/accel*, v5e/v6e VFIO groups)
  jax[tpu]; torch (port extra) comes from the CPU index unless on a GPU."""
  src = _install_cell(name)
  port = "[port]" in src.split("EXTRAS = ")[1].split("\n")[0]
  req = "efiqa-jax[port]" if port else "efiqa-jax"
  cpu_torch = ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
  cpu = _pip_args(src)
  assert cpu == [req] + (cpu_torch if port else [])
  gpu = _pip_args(src, dev=("/dev/nvidia0",), which="/usr/bin/nvidia-smi")
  assert gpu == [req, "jax[cuda12]"]
  for dev, env in ((("/dev/accel0",), ()), (("/dev/vfio/0", "/dev/vfio/vfio"),
                   ()), ((), ("TPU_ACCELERATOR_TYPE",))):
    assert _pip_args(src, dev=dev, env=env) == (
        [req, "jax[tpu]"] + (cpu_torch if port else [])), (dev, env)
  # No accelerator build where the VFIO control file is all there is.
  assert _pip_args(src, dev=("/dev/vfio/vfio",)) == cpu
  # Outside Colab: no extra index (pip's own torch choice).
  assert _pip_args(src, in_colab=False) == [req]
