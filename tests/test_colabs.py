"""The notebooks in colabs/ run end to end (no network, tiny sizes)."""
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def _run(repo_root, name, tmp_path, env=None, timeout=600):
  nb = nbformat.read(os.path.join(repo_root, "colabs", name), as_version=4)
  old = dict(os.environ)
  os.environ.update(env or {})
  try:
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
  finally:
    os.environ.clear()
    os.environ.update(old)
  errors = [o for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors, errors
  return nb


@pytest.mark.slow
def test_quickstart_notebook(repo_root, tmp_path):
  shared = repo_root.parent / "shared" / "data" / "fundus"
  env = {"PYTHONPATH": str(repo_root) + os.pathsep +
         os.environ.get("PYTHONPATH", ""),
         "EFIQA_SHARED_FUNDUS": str(shared)}
  nb = _run(repo_root, "quickstart.ipynb", tmp_path, env)
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))
  assert "retina_blur" in text and "AssessResult" in text
  # The maps figure was rendered.
  assert any(o.get("output_type") == "display_data" and "image/png" in
             o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
