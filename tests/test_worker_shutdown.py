"""`--workers N`: the grain worker processes hand rows over in shared
memory; a run must end without "leaked shared_memory objects" warnings."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

SCRIPT = """
import sys
from efiqa_jax import input_pipeline
def main():
  paths = sys.argv[1:]
  rows = 0
  for batch in input_pipeline.inference_batches(
      paths, 2, size=64, num_workers=2, read_threads=1, process_index=0,
      process_count=1):
    rows += int(batch["valid"].sum())
  print("rows", rows)
if __name__ == "__main__":  # grain's workers are spawned
  main()
"""


@pytest.mark.slow
def test_worker_processes_leave_no_shared_memory(tmp_path, repo_root):
  rng = np.random.default_rng(0)
  paths = []
  for i in range(3):
    p = tmp_path / f"p{i}.png"
    Image.fromarray(rng.integers(0, 255, (80, 96, 3), np.uint8)).save(p)
    paths.append(str(p))
  (tmp_path / "run.py").write_text(SCRIPT)
  env = dict(os.environ, PYTHONPATH=str(repo_root))
  res = subprocess.run([sys.executable, str(tmp_path / "run.py"), *paths],
                       env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "rows 3" in res.stdout
  assert "leaked shared_memory" not in res.stderr, res.stderr[-2000:]
