"""Tiny randomly initialised transformers DINOv3 models for parity tests."""


def redraw(model, generator, scale: float = 0.5):
  """Norm scales -> 1 + N(0, scale^2); biases, LayerScale, CLS and register
  tokens -> N(0, scale^2), from `generator`, so that wiring mistakes show
  (a fresh model has ones and zeros there). Returns the model in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.split(".")[-1]
      if "norm" in name and leaf == "weight":
        p.copy_(1 + scale * torch.randn(p.shape, generator=generator))
      elif leaf in ("bias", "lambda1", "cls_token", "register_tokens"):
        p.copy_(scale * torch.randn(p.shape, generator=generator))
  return model.eval()


def tiny_hf_dinov3(generator):
  """A 2-layer DINOv3 (hidden 32, 4 registers, 16-px patches), weights from
  torch seed 0, then `redraw`n from `generator`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = transformers.DINOv3ViTConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, num_register_tokens=4, patch_size=16,
      image_size=224)
  torch.manual_seed(0)
  return redraw(transformers.DINOv3ViTModel(cfg), generator)
