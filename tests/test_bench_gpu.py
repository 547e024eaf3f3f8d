"""bench/gpu.py stays runnable: its --quick mode on CPU (tiny shapes), the
same code path a GPU run takes, with the same weights on both sides."""
import json
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_gpu_bench_quick_runs_on_cpu(capsys, repo_root):
  sys.path.insert(0, str(repo_root / "bench"))
  try:
    import gpu  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(str(repo_root / "bench"))
  assert gpu.main(["--quick"]) == 0
  rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert [r["name"] for r in rows] == [
      "unet_forward_fp32", "unet_train_step_fp32", "unet_forward_bf16",
      "unet_train_step_bf16", "vit_l16_fp32_224", "vit_l16_bf16_224",
      "vit_l16_bf16_1024"]
  for r in rows:
    assert r["ours"] > 0 and r["reference"] > 0 and r["unit"] == "img/s"
    assert r["ratio"] == pytest.approx(r["ours"] / r["reference"], rel=0.02)
  fp32 = {r["name"]: r["max_abs_diff_vs_reference"] for r in rows
          if r["name"] in ("unet_forward_fp32", "vit_l16_fp32_224")}
  assert all(d < 1e-4 for d in fp32.values()), fp32
