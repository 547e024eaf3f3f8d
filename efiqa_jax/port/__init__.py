"""Strict PyTorch -> Flax NNX weight porting.

`common` holds the generic machinery (load a .pth / .safetensors state dict,
apply a mapping table target-path -> source key(s) + hook, check that every
parameter is filled and every tensor consumed). One module per source family:

  vuad    VUAD `unet_res` (penway/EFIQA) -> efiqa_jax.models.unet.UNet.
          Its state dict stores every conv twice (attribute + nn.Sequential
          entry, e.g. `conv1.conv1.weight` and `conv1.conv_block.0.weight`,
          `upconv1.conv.weight` and `upconv1.conv_block.0.weight`); both keys
          are required, must be equal, and are both consumed.
  rrwnet  RRWNet (j-morano/rrwnet) and R2-V2 bv/av (j-morano/R2-V2, with its
          `*_config.json`) -> efiqa_jax.models.rrwnet.RRWNet (same duplicated
          layout under `first_u.` / `second_u.`).

  vit     DINOv3 / DINOv2 (+registers) / RETFound-MAE / timm ViTs (HF
          snapshot folders, original or timm `.pth`) ->
          efiqa_jax.models.vit.VisionTransformer; see efiqa_jax/port/vit.py.

Converters register in `efiqa_jax.commands.port.CONVERTERS` for `efiqa port`.
"""
