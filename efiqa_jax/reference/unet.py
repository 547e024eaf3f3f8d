"""PyTorch reference U-Nets (VUAD, RRWNet) for parity tests and bench/.

Written from the public reference layouts, keeping their state-dict keys:

* `RefUNet` / `RefUNetRes`: VUAD's `unet` / `unet_res` (penway/EFIQA
  `vuad/model/unet.py`, `unet_res.py`), identical to RRWNet's `UNetModule`.
  QUIRK kept on purpose: each ConvBlock stores its convs as attributes
  (`conv1`, `conv2`) AND inside `nn.Sequential` `conv_block` (indices 0 and 2),
  and each UpConv stores `conv` AND `conv_block.0`. The same tensor is therefore
  saved under two keys, e.g. `conv1.conv1.weight` and `conv1.conv_block.0.weight`,
  `upconv1.conv.weight` and `upconv1.conv_block.0.weight`.
* `RefRRWNet`: j-morano/rrwnet `model.py` RRWNet (also R2-V2's model): a base
  U-Net `first_u` (in -> 3 logits a, v, bv) and a refinement U-Net `second_u`
  (3 -> 2 logits a, v) applied once on sigmoid(base) and then `iterations`
  more times on [sigmoid(a, v), bv]; it returns every stage's logits.
"""
import torch
from torch import nn
from torch.nn import functional as F


class ConvBlock(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=True)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=True)
    self.conv_block = nn.Sequential(self.conv1, nn.ReLU(inplace=True),
                                    self.conv2, nn.ReLU(inplace=True))

  def forward(self, x):
    return self.conv_block(x)


class UpConv(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.conv = nn.ConvTranspose2d(cin, cout, 2, 2, bias=True)
    self.conv_block = nn.Sequential(self.conv)

  def forward(self, x):
    return self.conv_block(x)


class RefUNet(nn.Module):

  def __init__(self, input_ch=3, output_ch=3, base_ch=64):
    super().__init__()
    b = base_ch
    self.conv1 = ConvBlock(input_ch, b)
    self.conv2 = ConvBlock(b, 2 * b)
    self.conv3 = ConvBlock(2 * b, 4 * b)
    self.conv4 = ConvBlock(4 * b, 8 * b)
    self.conv5 = ConvBlock(8 * b, 16 * b)
    self.upconv1 = UpConv(16 * b, 8 * b)
    self.conv6 = ConvBlock(16 * b, 8 * b)
    self.upconv2 = UpConv(8 * b, 4 * b)
    self.conv7 = ConvBlock(8 * b, 4 * b)
    self.upconv3 = UpConv(4 * b, 2 * b)
    self.conv8 = ConvBlock(4 * b, 2 * b)
    self.upconv4 = UpConv(2 * b, b)
    self.conv9 = ConvBlock(2 * b, b)
    self.outconv = nn.Conv2d(b, output_ch, 1, bias=True)

  def forward(self, x):
    x1 = self.conv1(x)
    x2 = self.conv2(F.max_pool2d(x1, 2, 2))
    x3 = self.conv3(F.max_pool2d(x2, 2, 2))
    x4 = self.conv4(F.max_pool2d(x3, 2, 2))
    x = self.conv5(F.max_pool2d(x4, 2, 2))
    x = self.conv6(torch.cat((x4, self.upconv1(x)), dim=1))
    x = self.conv7(torch.cat((x3, self.upconv2(x)), dim=1))
    x = self.conv8(torch.cat((x2, self.upconv3(x)), dim=1))
    x = self.conv9(torch.cat((x1, self.upconv4(x)), dim=1))
    return self.outconv(x)


class RefUNetRes(RefUNet):
  """`unet_res`: x + f(x); `forward_res` gives f(x)."""

  def forward(self, x):
    return x + super().forward(x)

  def forward_res(self, x):
    return super().forward(x)


class RefRRWNet(nn.Module):

  def __init__(self, input_ch=3, output_ch=3, base_ch=64, iterations=5):
    super().__init__()
    self.first_u = RefUNet(input_ch, output_ch, base_ch)
    self.second_u = RefUNet(output_ch, 2, base_ch)
    self.iterations = iterations

  def forward(self, x):
    preds = []
    p1 = self.first_u(x)
    preds.append(p1)
    bv_logits = p1[:, 2:3]
    s1 = torch.sigmoid(p1)
    bv = s1[:, 2:3]
    p2 = self.second_u(s1)
    preds.append(torch.cat((p2, bv_logits), dim=1))
    for _ in range(self.iterations):
      p2 = self.second_u(torch.cat((torch.sigmoid(p2), bv), dim=1))
      preds.append(torch.cat((p2, bv_logits), dim=1))
    return preds
