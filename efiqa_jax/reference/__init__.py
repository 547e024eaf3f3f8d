"""PyTorch reference implementations that efiqa_jax is checked and timed
against (the `port` extra: torch, transformers).

Parity tests (`tests/`) and speed harnesses (`bench/`) import the same
modules, so a speed ratio is always against the model a test holds equal:

  unet      VUAD's `unet` / `unet_res` and RRWNet, with their state-dict keys
  adapters  EFIQA-CP's ModernHead64to16 (SpaceAdmiralCNN), NCHW
  dinov3    tiny randomly initialised transformers DINOv3 models
  assess    `efiqa assess --model default`'s per-image chain in eager torch

Importing this package imports nothing heavy; each module imports torch
(and transformers) itself, so only code that uses a reference needs the
`port` extra.
"""
