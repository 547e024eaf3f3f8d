"""PyTorch version of the default model's per-image chain (bench/assess.py
times it; tests/test_assess_torch_parity.py holds it equal to ours).

The reference scripts (penway/EFIQA `vuad/infer.py`) run one image at a time
in eager PyTorch; this module does the same for OUR default model so that a
speed comparison is for the same function:

  FOV crop (efiqa_jax.fundus.prepare_fundus: PIL decode + numpy FOV, the very
  same code as ours) -> label-free Hessian vessel map (`vessel_probability`,
  a line-by-line torch port of efiqa_jax/vessels.py) -> teacher input (resize
  to the teacher size, grey <= 50 set to 0) -> `RefUNetRes.forward_res` with
  the default model's weights (`torch_unet_from_nnx`, the inverse of
  efiqa_jax/port/vuad.py) -> |f(x)| -> map pooling (`pool_anomaly`).

`assess_one` is the whole per-image step (batch 1) including the outputs
`efiqa assess` writes per image (map .npy, overlay PNG, a CSV row).
Maps are (B, H, W) float32 tensors; only the U-Net sees NCHW.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from efiqa_jax import vessels as jv
from efiqa_jax.reference.unet import RefUNetRes


# ----------------------------------------------------------- vessel segmenter


def _conv1d(x: torch.Tensor, k: np.ndarray, axis: int) -> torch.Tensor:
  """(B,H,W) convolved along axis 1 (rows) or 2 (cols), edge-replicate pad.

  As in vessels._conv1d: correlation with the reversed kernel."""
  half = (k.shape[0] - 1) // 2
  kr = torch.from_numpy(np.ascontiguousarray(k[::-1], np.float32))
  x4 = x[:, None]
  if axis == 1:
    xp = F.pad(x4, (0, 0, half, half), mode="replicate")
    w = kr.view(1, 1, -1, 1)
  else:
    xp = F.pad(x4, (half, half, 0, 0), mode="replicate")
    w = kr.view(1, 1, 1, -1)
  return F.conv2d(xp, w)[:, 0]


def _blur(x, sigma):
  g, _, _ = jv._gauss_kernels(sigma)  # pylint: disable=protected-access
  return _conv1d(_conv1d(x, g, 1), g, 2)


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
  """jax.image.resize(..., 'linear', antialias=True) on (B,H,W)."""
  if x.shape[1:] == (h, w):
    return x
  return F.interpolate(x[:, None], size=(h, w), mode="bilinear",
                       align_corners=False, antialias=True)[:, 0]


def _erode(mask, radius):
  if radius <= 0:
    return mask
  m = mask[:, None]
  m = F.pad(m, (0, 0, radius, radius), value=0.0)
  m = -F.max_pool2d(-m, (2 * radius + 1, 1), stride=1)
  m = F.pad(m, (radius, radius, 0, 0), value=0.0)
  m = -F.max_pool2d(-m, (1, 2 * radius + 1), stride=1)
  return m[:, 0]


def _masked_blur_lowres(x, m, sigma, factor):
  _, h, w = x.shape
  hl, wl = max(1, h // factor), max(1, w // factor)
  xs = _resize(x * m, hl, wl)
  ms = _resize(m, hl, wl)
  s = max(sigma / factor, 0.5)
  num, den = _blur(xs, s), _blur(ms, s)
  out = num / torch.clamp(den, min=1e-4)
  mean = (x * m).sum((1, 2)) / torch.clamp(m.sum((1, 2)), min=1.0)
  out = torch.where(den > 1e-3, out, mean[:, None, None])
  return _resize(out, h, w)


def _rim_field(m, sigma, gain):
  _, h, w = m.shape
  f = 4 if min(h, w) >= 64 else 1
  mb = _resize(_blur(_resize(m, max(1, h // f), max(1, w // f)),
                     max(sigma / f, 0.5)), h, w)
  gy = torch.gradient(mb, dim=1)[0]
  gx = torch.gradient(mb, dim=2)[0]
  norm = torch.sqrt(gx**2 + gy**2) + 1e-12
  weight = torch.clamp(gain * (1.0 - mb), 0.0, 1.0) * m
  return gx / norm, gy / norm, weight


def _ridge(c, sigma, cfg, rim=None, noise=None):
  g, g1, g2 = jv._gauss_kernels(sigma)  # pylint: disable=protected-access
  cr = _conv1d(c, g, 1)
  cc = _conv1d(c, g, 2)
  dxx = _conv1d(cr, g2, 2)
  dx = _conv1d(cr, g1, 2)
  dyy = _conv1d(cc, g2, 1)
  dy = _conv1d(cc, g1, 1)
  dxy = _conv1d(_conv1d(c, g1, 1), g1, 2)
  half_tr = -0.5 * (dxx + dyy)
  disc = torch.sqrt(0.25 * (dxx - dyy) ** 2 + dxy**2)
  lam_big = half_tr + disc
  lam_small = half_tr - disc
  if rim is not None:
    ux, uy, wr = rim
    tx, ty = -uy, ux
    lam_tan = -(tx * tx * dxx + 2 * tx * ty * dxy + ty * ty * dyy)
    lam_big = (1 - wr) * lam_big + wr * torch.minimum(lam_tan, lam_big)
  if noise is not None and cfg.noise_k > 0:
    gain = float(np.sqrt((g2.astype(np.float64)**2).sum()
                         * (g.astype(np.float64)**2).sum()))
    lam_big = lam_big - cfg.noise_k * gain * noise
  norm = sigma**cfg.gamma
  grad = torch.sqrt(dx**2 + dy**2) * sigma
  r = (norm * lam_big - cfg.grad_weight * grad
       - cfg.blob_weight * norm * torch.abs(lam_small))
  return torch.clamp(r, min=0.0)


def _nanmedian(v: torch.Tensor) -> torch.Tensor:
  """Row-wise median ignoring NaN, the mean of the two middle values for an
  even count (numpy / jnp.nanmedian; torch.nanmedian takes the lower one)."""
  n = (~torch.isnan(v)).sum(1)
  s = torch.sort(torch.nan_to_num(v, nan=float("inf")), dim=1).values
  lo = torch.clamp((n - 1) // 2, min=0)
  hi = torch.clamp(n // 2, min=0)
  med = 0.5 * (s.gather(1, lo[:, None])[:, 0] + s.gather(1, hi[:, None])[:, 0])
  return torch.where(n > 0, med, torch.zeros_like(med))


def _noise_std(g, m):
  k = np.array([1.0, -2.0, 1.0], np.float32)
  lap = torch.abs(_conv1d(_conv1d(g, k, 1), k, 2))[:, ::2, ::2]
  valid = _erode(m, 1)[:, ::2, ::2] > 0.5
  vals = torch.where(valid, lap, torch.full_like(lap, float("nan")))
  return _nanmedian(vals.reshape(g.shape[0], -1)) * (1.4826 / 6.0)


def vessel_response(images: torch.Tensor, fov_masks: torch.Tensor,
                    cfg: jv.VesselConfig = jv.DEFAULT_CONFIG):
  """vessels._response in torch: (B,H,W,3) uint8, (B,H,W) bool."""
  x = images.to(torch.float32)
  if not torch.is_floating_point(images):
    x = x / 255.0
  g = x[..., 1].contiguous()
  _, h, w = g.shape
  side = min(h, w)
  scale = side / 512.0
  m = _erode(fov_masks.to(torch.float32),
             int(round(cfg.erode_fraction * side)))
  bg_sigma = cfg.background_sigma * side
  bg = _masked_blur_lowres(g, m, bg_sigma, 4)
  c = (bg - g) / (bg + cfg.bg_eps)
  bg = _masked_blur_lowres(g, m * (torch.abs(c) < cfg.bg_clip), bg_sigma, 4)
  gf = m * g + (1 - m) * bg
  c = (bg - gf) / (bg + cfg.bg_eps)
  c = torch.clamp(c, min=-cfg.clip_neg)
  sig = sorted({max(s * scale, cfg.min_sigma) for s in cfg.full_res_sigmas})
  rim = (_rim_field(m, cfg.rim_sigma * side, cfg.rim_gain)
         if cfg.rim_sigma > 0 else None)
  inv_bg = 1.0 / (bg + cfg.bg_eps)
  noise = _noise_std(g, m)[:, None, None] * inv_bg
  resp = None
  for s in sig:
    r = _ridge(c, s, cfg, rim, noise)
    resp = r if resp is None else torch.maximum(resp, r)
  if cfg.half_res_sigmas:
    h2, w2 = max(1, h // 2), max(1, w // 2)
    c2 = _resize(c, h2, w2)
    rim2 = None if rim is None else tuple(_resize(a, h2, w2) for a in rim)
    g2 = _resize(g, h2, w2)
    m2 = (_resize(m, h2, w2) > 0.99).to(torch.float32)
    noise2 = _noise_std(g2, m2)[:, None, None] * _resize(inv_bg, h2, w2)
    resp2 = None
    for s in cfg.half_res_sigmas:
      r = _ridge(c2, s * scale / 2, cfg, rim2, noise2)
      resp2 = r if resp2 is None else torch.maximum(resp2, r)
    resp = torch.maximum(resp, _resize(resp2, h, w))
  if cfg.smooth_sigma > 0:
    resp = _blur(resp, cfg.smooth_sigma * scale)
  return resp * m, m


def vessel_probability(images, fov_masks, cfg=jv.DEFAULT_CONFIG):
  """vessels.vessel_probability in torch: (B,H,W) float32 in [0, 1]."""
  resp, m = vessel_response(images, fov_masks, cfg)
  p0 = 1.0 / (1.0 + math.exp(cfg.thresh / cfg.width))
  p = torch.sigmoid((resp - cfg.thresh) / cfg.width)
  p = torch.clamp((p - p0) / (1 - p0), 0.0, 1.0)
  return p * m


# -------------------------------------------------------------- teacher chain


def teacher_input(images, fov_masks, size, gray_threshold=50):
  """quality_model.teacher_input: (B,3,T,T) float32, NCHW for the U-Net."""
  p = vessel_probability(images, fov_masks)
  b = p.shape[0]
  pr = _resize(p, size, size)
  mr = _resize(fov_masks.to(torch.float32), size, size) > 0.5
  pr = torch.clamp(pr, 0.0, 1.0) * mr
  q = torch.round(pr * 255.0)
  v = torch.where(q <= gray_threshold, torch.zeros_like(q), q / 255.0)
  return v[:, None].expand(b, 3, size, size).contiguous()


def pool_anomaly(anomaly, fov_t, threshold, map_size=64):
  """quality_model.pool_anomaly: (B,T,T) -> (B,map_size,map_size)."""
  b, t = anomaly.shape[0], anomaly.shape[1]
  hard = (anomaly > threshold).to(torch.float32) * fov_t
  f = t // map_size
  k = max(1, (t // 16) // f)
  lo, hi = (k - 1) // 2, k - 1 - (k - 1) // 2  # XLA "SAME" padding

  def box(x):
    x = x.reshape(b, map_size, f, map_size, f).sum(dim=(2, 4))
    x = F.pad(x[:, None], (lo, hi, lo, hi))
    return F.avg_pool2d(x, k, stride=1, divisor_override=1)[:, 0]

  num, den = box(hard), box(fov_t)
  return torch.where(den > 0, num / torch.clamp(den, min=1e-6),
                     torch.zeros_like(num))


def teacher_maps(unet: RefUNetRes, images, fov_masks, *, teacher_size,
                 threshold, map_size=64):
  """quality_model._teacher_maps: crops (B,S,S,3) uint8 -> maps (B,64,64)."""
  v = teacher_input(images, fov_masks, teacher_size)
  f = unet.forward_res(v)
  anomaly = torch.mean(torch.abs(f), dim=1)
  fov_t = (_resize(fov_masks.to(torch.float32), teacher_size, teacher_size)
           > 0.5).to(torch.float32)
  return pool_anomaly(anomaly, fov_t, threshold, map_size)


# ------------------------------------------------------------ weights (NNX ->)


def torch_state_dict_from_nnx(model) -> dict[str, torch.Tensor]:
  """efiqa_jax UNet -> VUAD `unet_res` state dict (inverse of port/vuad).

  Each tensor goes under both of the reference's duplicate keys."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  state = nnx.state(model, nnx.Param)
  flat = {tuple(str(k) for k in path): np.asarray(v[...])
          for path, v in nnx.to_flat_state(state)}
  sd = {}

  def put(keys, arr):
    t = torch.from_numpy(np.array(arr, np.float32))  # a writable copy
    for k in keys:
      sd[k] = t.clone()

  for i in range(1, 10):
    for j, seq in ((1, 0), (2, 2)):
      kern = flat[(f"conv{i}", f"conv{j}", "kernel")]
      bias = flat[(f"conv{i}", f"conv{j}", "bias")]
      put((f"conv{i}.conv{j}.weight", f"conv{i}.conv_block.{seq}.weight"),
          np.transpose(kern, (3, 2, 0, 1)))
      put((f"conv{i}.conv{j}.bias", f"conv{i}.conv_block.{seq}.bias"), bias)
  for k in range(1, 5):
    kern = flat[(f"upconv{k}", "kernel")]
    put((f"upconv{k}.conv.weight", f"upconv{k}.conv_block.0.weight"),
        np.transpose(kern[::-1, ::-1], (2, 3, 0, 1)))
    put((f"upconv{k}.conv.bias", f"upconv{k}.conv_block.0.bias"),
        flat[(f"upconv{k}", "bias")])
  put(("outconv.weight",), np.transpose(flat[("outconv", "kernel")],
                                        (3, 2, 0, 1)))
  put(("outconv.bias",), flat[("outconv", "bias")])
  used = {(f"conv{i}", f"conv{j}", t) for i in range(1, 10) for j in (1, 2)
          for t in ("kernel", "bias")}
  used |= {(f"upconv{k}", t) for k in range(1, 5) for t in ("kernel", "bias")}
  used |= {("outconv", "kernel"), ("outconv", "bias")}
  left = sorted(set(flat) - used)
  if left:
    raise ValueError(f"parameters not ported to torch: {left}")
  return sd


def torch_unet_from_nnx(model) -> RefUNetRes:
  """A RefUNetRes holding `model`'s weights (strict load, eval mode)."""
  sizes = dict(input_ch=model.in_channels, output_ch=model.out_channels,
               base_ch=model.base_channels)
  ref = RefUNetRes(**sizes)
  ref.load_state_dict(torch_state_dict_from_nnx(model), strict=True)
  ref.eval()
  return ref


# ------------------------------------------------------------ one image, all


class ReferenceAssessor:
  """The per-image chain of `efiqa assess --model default` in eager torch.

  quality_model: efiqa_jax.quality_model.TeacherQualityModel (its weights,
  threshold, sizes and grading are used; nothing of its jitted code).
  """

  SCORE_COLUMNS = ("image", "id", "status", "message", "quality", "grade",
                   "degraded_fraction")

  def __init__(self, quality_model):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    qm = quality_model
    self.unet = torch_unet_from_nnx(nnx.merge(qm._graphdef, qm._state))  # pylint: disable=protected-access
    self.work_size = qm.work_size
    self.teacher_size = qm.teacher_size
    self.threshold = qm.threshold
    self.grading = qm.grading
    self.name = qm.name

  def maps(self, images: np.ndarray, fov: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
      return teacher_maps(self.unet, torch.from_numpy(images),
                          torch.from_numpy(fov),
                          teacher_size=self.teacher_size,
                          threshold=self.threshold).numpy()

  def assess_one(self, path: str, id_: str, out_dir: str) -> dict:
    """Decode + FOV crop, map, score, grade; writes map .npy + overlay PNG."""
    import os  # pylint: disable=g-import-not-at-top
    from efiqa_jax import fundus  # pylint: disable=g-import-not-at-top
    from efiqa_jax import quality as quality_lib  # pylint: disable=g-import-not-at-top
    from efiqa_jax import report as report_lib  # pylint: disable=g-import-not-at-top
    p = fundus.prepare_fundus(path, self.work_size)
    if p.status != "ok":
      return dict(image=path, id=id_, status=p.status, message=p.message,
                  quality="", grade="", degraded_fraction="")
    qmap = self.maps(p.image[None], p.fov_mask[None])[0]
    w = quality_lib.fov_at(p.fov_mask, qmap.shape)
    qmap = np.where(w > 0, qmap, 0.0).astype(np.float32)
    q, frac = quality_lib.summarise(qmap, w)
    grade = self.grading.grade(q)
    report_lib.write_png(os.path.join(out_dir, "overlays", id_ + ".png"),
                         report_lib.overlay(p.image, qmap, p.fov_mask))
    np.save(os.path.join(out_dir, "maps", id_ + ".npy"), qmap)
    return dict(image=path, id=id_, status="ok", message=p.message,
                quality=round(q, 6), grade=grade,
                degraded_fraction=round(frac, 6))

  def assess(self, paths, ids, out_dir: str) -> list[dict]:
    """One image at a time, like the reference scripts; rows to scores.csv
    as they finish (flushed per row)."""
    import csv  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    for sub in ("maps", "overlays"):
      os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    rows = []
    with open(os.path.join(out_dir, "scores.csv"), "w", newline="") as f:
      wr = csv.DictWriter(f, fieldnames=self.SCORE_COLUMNS)
      wr.writeheader()
      for path, id_ in zip(paths, ids):
        row = self.assess_one(path, id_, out_dir)
        wr.writerow(row)
        f.flush()
        rows.append(row)
    return rows
