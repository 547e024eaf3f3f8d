"""colabs/port_and_extract.ipynb runs top to bottom (nbclient, python3)."""
import base64
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


@pytest.mark.slow
def test_port_and_extract_notebook(repo_root, tmp_path, monkeypatch):
  path = repo_root / "colabs" / "port_and_extract.ipynb"
  nb = nbformat.read(str(path), as_version=4)
  monkeypatch.setenv("PYTHONPATH", str(repo_root))
  monkeypatch.delenv("MPLBACKEND", raising=False)  # inline figures
  client = nbclient.NotebookClient(
      nb, kernel_name="python3", timeout=120,
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", [])]
  errors = [o for o in outputs if o.get("output_type") == "error"]
  assert not errors, errors
  text = "".join(o.get("text", "") for o in outputs)
  assert "failed 1" in text and "not_found" in text
  pngs = [o["data"]["image/png"] for o in outputs
          if "image/png" in o.get("data", {})]
  assert pngs and len(base64.b64decode(pngs[-1])) > 1000  # the PCA figure
  feats = tmp_path / "port_and_extract_work" / "features"
  assert (feats / "manifest.csv").is_file()
  assert len([f for f in os.listdir(feats) if f.endswith(".npy")]) >= 3
