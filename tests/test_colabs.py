"""Every notebook in colabs/ runs end to end (no network, tiny sizes)."""
import os

import pytest

from tests.conftest import shared_data_dir
from tests.notebooks import run_notebook


@pytest.mark.slow
def test_quickstart_notebook(repo_root, tmp_path, monkeypatch):
  # The notebook adds the real photographs when they are there; it is a
  # notebook test, not a real-photograph one, so it needs none.
  shared = shared_data_dir("fundus")
  env = ({"EFIQA_SHARED_FUNDUS": str(shared)} if shared else
         {"EFIQA_QUICKSTART_SHARED": "0"})
  text, pngs = run_notebook(repo_root, "quickstart.ipynb", tmp_path,
                            monkeypatch, env=env, timeout=600)
  assert "retina_blur" in text and "AssessResult" in text
  assert pngs and len(pngs[0]) > 1000  # the maps figure


@pytest.mark.slow
def test_train_teacher_notebook(repo_root, tmp_path, monkeypatch):
  text, pngs = run_notebook(repo_root, "train_teacher.ipynb", tmp_path,
                            monkeypatch)
  assert "exported to" in text and "anomaly inside the hole" in text
  assert len(pngs) >= 4


@pytest.mark.slow
def test_port_and_extract_notebook(repo_root, tmp_path, monkeypatch):
  text, pngs = run_notebook(repo_root, "port_and_extract.ipynb", tmp_path,
                            monkeypatch, timeout=120)
  assert "failed 1" in text and "not_found" in text
  assert pngs and len(pngs[-1]) > 1000  # the PCA figure
  feats = tmp_path / "port_and_extract_work" / "features"
  assert (feats / "manifest.csv").is_file()
  assert len([f for f in os.listdir(feats) if f.endswith(".npy")]) >= 3


@pytest.mark.slow
def test_distill_notebook(repo_root, tmp_path, monkeypatch):
  text, pngs = run_notebook(repo_root, "distill.ipynb", tmp_path, monkeypatch,
                            env={"EFIQA_TEACHER": None,
                                 "EFIQA_ENCODER": None})
  assert "held-out student map AUROC" in text and "adapter:" in text
  assert pngs and len(pngs[-1]) > 1000
  assert (tmp_path / "distill_work" / "assess" / "logits").is_dir()
