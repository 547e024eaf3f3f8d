"""Regenerate tests/assets/vit_golden_* (needs the `port` extra).

Tiny random transformers-5 models (DINOv3 with 4 registers; DINOv2 with a 9x9
position grid so the test input resamples it), biases/LayerScale/tokens
re-drawn N(0, 0.5^2), ported with efiqa_jax.port.vit into our model format;
the expected output is the *reference* (PyTorch) last_hidden_state, so
tests/test_vit.py checks parity without torch.

  PYTHONPATH=$PWD python tests/assets/make_vit_golden.py
"""
import json
import pathlib
import shutil
import sys
import tempfile

import numpy as np
import torch
import transformers

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent))

from efiqa_jax.port import vit as port_vit  # noqa: E402
import test_vit_port as T  # noqa: E402


def main():
  cases = {
      "dinov3": (T._dinov3(11), (48, 64)),
      "dinov2": (T._redraw(transformers.Dinov2Model(transformers.Dinov2Config(
          hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
          mlp_ratio=2, patch_size=14, image_size=126)), 12), (42, 56)),
  }
  for name, (ref, (h, w)) in cases.items():
    with tempfile.TemporaryDirectory() as tmp:
      src = T._save_hf(ref, pathlib.Path(tmp) / "hf")
      out = HERE / f"vit_golden_{name}"
      if out.exists():
        shutil.rmtree(out)
      port_vit.port(name, src, out)
    # The snapshot was a temp folder: say where the weights came from.
    side = json.loads((out / "efiqa.json").read_text())
    side["source"]["path"] = "tests/assets/make_vit_golden.py (temp snapshot)"
    (out / "efiqa.json").write_text(json.dumps(side, indent=2,
                                               sort_keys=True) + "\n")
    x = np.random.default_rng(0).normal(size=(2, h, w, 3)).astype(np.float32)
    expected = T._ref(ref, x)
    np.savez_compressed(HERE / f"vit_golden_{name}.npz", x=x,
                        expected=expected)
    print(name, expected.shape)


if __name__ == "__main__":
  main()
