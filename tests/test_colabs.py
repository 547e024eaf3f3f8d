"""Every notebook in colabs/ runs top to bottom in a fresh virtualenv after
its own install cell (efiqa-jax from the wheel of the checkout; no network
beyond the package index, tiny sizes). See tests/notebooks.py."""
import os

import pytest

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
  assert pngs and len(pngs[-1]) > 1000
  assert (tmp_path / "distill_work" / "assess" / "logits").is_dir()
