"""Backend-specific speed work, kept apart from the models (issue 16).

Each op has a plain-XLA reference form and, where it pays on a backend, a
faster form chosen when the function is traced; tests/test_kernels.py holds
the two to each other. `with kernels.disabled():` or `EFIQA_KERNELS=off`
makes every op take its plain form.

  conv           3x3 'same' conv (Winograd + custom gradient on XLA:CPU),
                 1x1 conv, 2x2 stride-2 transposed conv   (winograd.py)
  pool           2x2 max-pool
  attention      dot-product attention, dense (float32 accumulation)
  vit_inference  the ViT's inference form: params -> params, and its module
  resize         linear antialiased resize (banded)
  median         masked median of non-negative values
  xla_cpu        materialize, map_examples
  png            PNG encoder
"""
from efiqa_jax.kernels.switch import backend, disabled, enabled, set_enabled

__all__ = ["backend", "disabled", "enabled", "set_enabled"]
