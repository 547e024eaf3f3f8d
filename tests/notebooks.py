"""Runs a notebook in colabs/ top to bottom, as the tests do for every one."""
import base64
import os

import pytest


def run_notebook(repo_root, name, tmp_path, monkeypatch, *, env=None,
                 timeout=300):
  """Executes colabs/<name> in a python3 kernel with cwd=tmp_path.

  Returns (text of all stream outputs, list of PNG byte strings). Fails on
  any cell error. The repo goes first on the kernel's PYTHONPATH; the
  environment is restored by monkeypatch afterwards.
  """
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(str(repo_root / "colabs" / name), as_version=4)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(repo_root)] + [p for p in os.environ.get("PYTHONPATH", "").split(
          os.pathsep) if p]))
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the inline backend
  for k, v in (env or {}).items():
    if v is None:
      monkeypatch.delenv(k, raising=False)
    else:
      monkeypatch.setenv(k, v)
  client = nbclient.NotebookClient(
      nb, kernel_name="python3", timeout=timeout,
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", [])]
  errors = [o for o in outputs if o.get("output_type") == "error"]
  assert not errors, errors
  text = "".join(o.get("text", "") for o in outputs)
  pngs = [base64.b64decode(o["data"]["image/png"]) for o in outputs
          if "image/png" in o.get("data", {})]
  return text, pngs
