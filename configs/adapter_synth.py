"""Adapter for the synthetic distillation experiment (experiments/distill_synthetic.py).

configs/adapter.py (patch batching, class-weighted BCE, AdamW 1e-3, seed 504,
14x14 tokens) with the changes a tiny self-supervised encoder
(D = 64) and ~30k training patches need: a per-token MLP (D -> 128 -> 1)
instead of the 1x1 linear head, batches of 1024 patches, 30 epochs, and
448 px input (configs/encoder_mim.py's 32-px patches: 14x14 tokens).

`configs/adapter_synth.py:linear`: the paper's linear head on the same data.
`configs/adapter_synth.py:wide`: for configs/encoder_mim.py:wide (512 px, MLP 256,
12 epochs).
`configs/adapter_synth.py:tiny`: a few steps for tests.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "efiqa_config_adapter",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "adapter.py"))
_adapter = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_adapter)

VARIANTS = ("", "linear", "wide", "tiny")
check = _adapter.check


def get_config(arg=None):
  c = _adapter.get_config(None)
  c.size = 448                   # the encoder's input (configs/encoder_mim.py)
  c.adapter.name = "mlp"
  c.adapter.kwargs.hidden = 128
  c.batch_size = 1024
  c.epochs = 30
  c.checkpoint_every = 500
  c.log_every = 50
  if arg == "linear":
    c.adapter.name = "linear"
    del c.adapter.kwargs["hidden"]
  elif arg == "wide":
    # For configs/encoder_mim.py:wide (512 px, 32x32 tokens of D 384): more
    # patches per photograph, so fewer epochs for a similar step count.
    c.size = 512
    c.adapter.kwargs.hidden = 256
    c.epochs = 12
  elif arg == "tiny":
    c.batch_size = 64
    c.epochs = 2
    c.checkpoint_every = 2
    c.log_every = 1
    c.adapter.kwargs.hidden = 8
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r} (known: linear, wide, tiny)")
  c.progress = False
  return c
