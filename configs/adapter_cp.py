"""EFIQA-CP (FunPiQ, efiqa-method.md §4.2): frozen DINOv3 ViT-L/16 at 1024
(64x64 tokens), `ModernHead64to16` (mid 512, mlp_ratio 1, drop-path 0.1) ->
16x16 logits, pixel-level nnPU (pi 0.05, beta 0), batch 16 images, 100
epochs, AdamW 1e-3, seed 504. Pseudo-labels on a 16x16 grid.

`configs/adapter_cp.py:tiny`: small head, few steps.
"""
import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location(
    "efiqa_config_adapter_base",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "adapter.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

VARIANTS = ("", "tiny")
check = base.check


def get_config(arg=None):
  c = base.get_config()
  c.adapter.name = "modern_head_64to16"
  c.adapter.kwargs = ml_collections.ConfigDict(dict(
      mid_channels=512, mlp_ratio=1.0, drop_path=0.1))
  c.batching = "image"
  c.batch_size = 16
  c.epochs = 100
  c.size = 1024
  c.loss.name = "nnpu"
  c.loss.pi = 0.05
  c.loss.beta = 0.0
  c.loss.pos_weight = 1.0
  c.checkpoint_every = 50
  if arg == "tiny":
    c.adapter.kwargs.mid_channels = 16
    c.batch_size = 8
    c.epochs = 2
    c.checkpoint_every = 1
    c.log_every = 1
    c.progress = False
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r} (known: tiny)")
  return c
