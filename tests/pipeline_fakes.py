"""Stand-ins for fundus.prepare_fundus / synth.generate in pipeline tests.

Module-level (picklable) so grain worker processes can import them. The
fake image of `.../img{i}.png` is filled with i % 251, so a row's pixels
tell which record it came from. Names containing 'bad' give status
'unreadable', names containing 'raise' raise (to exercise ReadRecord).
"""
import os
import re
import types

import numpy as np


def fake_prepare(source, size=16):
  name = os.path.basename(str(source))
  if "raise" in name:
    raise RuntimeError(f"stand-in failure for {name}")
  m = re.search(r"(\d+)", name)
  i = int(m.group(1)) if m else 0
  if "bad" in name:
    return types.SimpleNamespace(
        path=str(source), status="unreadable", message="cannot decode",
        image=None, fov_mask=None, fov=None, crop_x0=0, crop_y0=0,
        crop_size=0, orig_h=0, orig_w=0)
  img = np.full((size, size, 3), i % 251, np.uint8)
  mask = np.zeros((size, size), bool)
  mask[1:-1, 1:-1] = True
  fov = types.SimpleNamespace(cx=size / 2, cy=size / 2, r=size / 2 - 1)
  return types.SimpleNamespace(
      path=str(source), status="ok", message="", image=img, fov_mask=mask,
      fov=fov, crop_x0=i, crop_y0=0, crop_size=size, orig_h=size + 1,
      orig_w=size + 2)


def fake_generate(seed, size=16, **kwargs):
  del kwargs
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
  return types.SimpleNamespace(
      image=img, vessels=(img[..., 0] > 128).astype(np.uint8),
      degradation=np.zeros((size, size), np.float32),
      fov_mask=np.ones((size, size), bool),
      labels={"id": str(seed), "seed": seed})


def fake_paths(n, root="/nonexistent"):
  return [f"{root}/img{i}.png" for i in range(n)]
