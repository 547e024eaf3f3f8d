"""bench/gpu.py stays runnable and compares like with like: its --quick mode
on CPU (tiny shapes), the same code path a GPU run takes, run as a user runs
it. A speed ratio means something only if both sides computed the same
function from the same weights, so the forward rows' agreement with the
reference is checked at fp32 and bf16 precision."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_gpu_bench_quick_runs_on_cpu(repo_root):
  env = dict(os.environ, PYTHONPATH=str(repo_root))
  out = subprocess.run([sys.executable, str(repo_root / "bench" / "gpu.py"),
                        "--quick"], cwd=repo_root, env=env, text=True,
                       capture_output=True, timeout=600, check=True).stdout
  rows = [json.loads(l) for l in out.splitlines()]
  assert [r["name"] for r in rows] == [
      "unet_forward_fp32", "unet_train_step_fp32", "unet_forward_bf16",
      "unet_train_step_bf16", "vit_l16_fp32_224", "vit_l16_bf16_224",
      "vit_l16_bf16_1024"]
  for r in rows:
    assert r["ours"] > 0 and r["reference"] > 0 and r["unit"] == "img/s"
  diff = {r["name"]: r["max_abs_diff_vs_reference"] for r in rows
          if "max_abs_diff_vs_reference" in r}
  assert set(diff) == {r["name"] for r in rows if "train" not in r["name"]}
  # fp32: summation order only. bf16: both sides round to bf16, so the
  # outputs (of order 1) differ by a few bf16 ulps (measured 0.006-0.024).
  # Weights ported wrongly would give differences of order 1.
  assert all(diff[n] < 1e-4 for n in diff if "fp32" in n), diff
  assert all(diff[n] < 0.1 for n in diff if "bf16" in n), diff
