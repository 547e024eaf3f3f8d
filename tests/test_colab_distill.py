"""colabs/distill.ipynb runs top to bottom (nbclient, python3)."""
import base64

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


@pytest.mark.slow
def test_distill_notebook(repo_root, tmp_path, monkeypatch):
  path = repo_root / "colabs" / "distill.ipynb"
  nb = nbformat.read(str(path), as_version=4)
  monkeypatch.setenv("PYTHONPATH", str(repo_root))
  monkeypatch.delenv("MPLBACKEND", raising=False)
  for k in ("EFIQA_TEACHER", "EFIQA_ENCODER"):
    monkeypatch.delenv(k, raising=False)
  client = nbclient.NotebookClient(
      nb, kernel_name="python3", timeout=300,
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", [])]
  errors = [o for o in outputs if o.get("output_type") == "error"]
  assert not errors, errors
  text = "".join(o.get("text", "") for o in outputs)
  assert "held-out student map AUROC" in text and "adapter:" in text
  pngs = [o["data"]["image/png"] for o in outputs
          if "image/png" in o.get("data", {})]
  assert pngs and len(base64.b64decode(pngs[-1])) > 1000
  assert (tmp_path / "distill_work" / "assess" / "logits").is_dir()
