"""Tiny randomly initialised transformers reference models for parity tests."""


def tiny_hf_dinov3(torch, transformers, generator):
  """A 2-layer DINOv3 (hidden 32, 4 registers) with biases, LayerScale,
  tokens and norms re-drawn from `generator` so that wiring mistakes show."""
  cfg = transformers.DINOv3ViTConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, num_register_tokens=4, patch_size=16,
      image_size=224)
  torch.manual_seed(0)
  ref = transformers.DINOv3ViTModel(cfg)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      leaf = name.split(".")[-1]
      if "norm" in name and leaf == "weight":
        p.copy_(1 + 0.5 * torch.randn(p.shape, generator=generator))
      elif leaf in ("bias", "lambda1", "cls_token", "register_tokens"):
        p.copy_(0.5 * torch.randn(p.shape, generator=generator))
  return ref.eval()
