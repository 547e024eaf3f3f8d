"""EFIQA-CP's adapter head in PyTorch (NCHW), written from efiqa-method.md
§4.2 with the reference's state-dict keys (`model.stem.0.norm.weight`, ...).

`SpaceAdmiralCNN(d, mid, ratio)`: the wrapper the reference checkpoints are
saved from (`self.model = head`); `.model` is ModernHead64to16: a channels-
last LayerNorm and a 1x1 conv to `mid`, two ConvNeXt blocks, a 2x2 stride-2
downsampling, two blocks, another downsampling, one block, a LayerNorm and a
1x1 conv to one logit (64x64 tokens -> a 16x16 map).
"""
import torch
from torch import nn


class ChannelLayerNorm(nn.Module):
  """LayerNorm over the channels of an NCHW tensor (eps 1e-6)."""

  def __init__(self, c):
    super().__init__()
    self.norm = nn.LayerNorm(c, eps=1e-6)

  def forward(self, x):
    return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Block(nn.Module):
  """ConvNeXt block: depthwise 7x7, norm, 1x1 -> GELU -> 1x1, layer scale."""

  def __init__(self, c, ratio):
    super().__init__()
    self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
    self.norm = ChannelLayerNorm(c)
    self.pw1 = nn.Conv2d(c, int(c * ratio), 1)
    self.pw2 = nn.Conv2d(int(c * ratio), c, 1)
    self.gamma = nn.Parameter(torch.ones(1, c, 1, 1))

  def forward(self, x):
    h = self.pw2(nn.functional.gelu(self.pw1(self.norm(self.dw(x)))))
    return x + self.gamma * h


class Down(nn.Module):

  def __init__(self, c):
    super().__init__()
    self.norm = ChannelLayerNorm(c)
    self.conv = nn.Conv2d(c, c, 2, stride=2)

  def forward(self, x):
    return self.conv(self.norm(x))


class ModernHead64to16(nn.Module):

  def __init__(self, d, mid, ratio):
    super().__init__()
    self.stem = nn.Sequential(ChannelLayerNorm(d), nn.Conv2d(d, mid, 1))
    self.stage1 = nn.Sequential(Block(mid, ratio), Block(mid, ratio))
    self.down1 = Down(mid)
    self.stage2 = nn.Sequential(Block(mid, ratio), Block(mid, ratio))
    self.down2 = Down(mid)
    self.stage3 = Block(mid, ratio)
    self.head = nn.Sequential(ChannelLayerNorm(mid), nn.Conv2d(mid, 1, 1))

  def forward(self, x):
    x = self.down1(self.stage1(self.stem(x)))
    return self.head(self.stage3(self.down2(self.stage2(x))))


class SpaceAdmiralCNN(nn.Module):
  """The reference's wrapper: `self.model = head` (keys start `model.`)."""

  def __init__(self, d, mid, ratio):
    super().__init__()
    self.model = ModernHead64to16(d, mid, ratio)
