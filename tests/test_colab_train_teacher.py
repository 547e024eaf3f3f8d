"""Executes colabs/train_teacher.ipynb end to end (tiny, CPU, no network)."""
import os
import time

import pytest


@pytest.mark.slow
def test_train_teacher_colab_runs(repo_root, tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  path = repo_root / "colabs" / "train_teacher.ipynb"
  nb = nbformat.read(str(path), as_version=4)
  env_pp = os.environ.get("PYTHONPATH", "")
  os.environ["PYTHONPATH"] = f"{repo_root}{os.pathsep}{env_pp}"
  os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend
  t0 = time.time()
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": str(repo_root / "colabs")}})
  client.execute()
  elapsed = time.time() - t0
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "exported to" in outputs
  assert "anomaly inside the hole" in outputs
  images = sum(1 for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", [])
               if "image/png" in o.get("data", {}))
  assert images >= 4
  print(f"notebook ran in {elapsed:.1f} s")
  print(outputs[-400:])
