"""SimCLR two-view augmentation: per-dataset presets, parameter sampling, torchvision backend.

The random parameters of every view (crop box, flip, colour-jitter factors and order,
grayscale, blur sigma) are drawn here with NumPy from a generator the loader seeds with
(seed, epoch, global batch index). Both backends apply the same parameters -- torchvision's
functional ops here, DALI's operators in `fastcluster_cl.data.dali` -- so a batch is a pure
function of those four numbers, the two backends share one distribution, and a resumed run
sees exactly the batches of an uninterrupted one.

Presets follow SimCLR / CC (arXiv 2002.05709, 2009.09687): random resized crop (scale 0.08-1,
ratio 3/4-4/3), horizontal flip p 0.5, colour jitter of strength s = 0.5 (brightness, contrast,
saturation 0.8 s, hue 0.2 s, as in CC's code) with p 0.8 in random order, grayscale p 0.2, and
for the ImageNet subsets a Gaussian blur (sigma 0.1-2, kernel 10% of the side) with p 0.5. The
1-channel digit sets get small crops only (scale 0.6-1): no flip (it changes a digit's
identity) and no colour operations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .datasets import _check_name


@dataclass(frozen=True)
class AugmentSpec:
    """What one augmented view does. Probabilities are per image."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter_strength: float = 0.5
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], "
                                 f"got {getattr(self, name)}")
        if not 0 <= self.jitter_strength <= 1.25:  # hue 0.2 s must stay within 0.25
            raise ValueError(f"jitter_strength must be in [0, 1.25], got {self.jitter_strength}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")

    @property
    def uses_colour(self) -> bool:
        return (self.jitter_p > 0 and self.jitter_strength > 0) or self.gray_p > 0

    def blur_kernel(self, image_size: int) -> int:
        """Odd kernel side, about 10% of the image side (SimCLR), at least 3."""
        return max(3, int(0.1 * image_size) // 2 * 2 + 1)


_RGB = AugmentSpec()
_PRESETS = {
    "digits": AugmentSpec(crop_scale=(0.6, 1.0), crop_ratio=(0.8, 1.25), flip_p=0.0,
                          jitter_p=0.0, gray_p=0.0),
    "cifar10": _RGB, "cifar100": _RGB, "stl10": _RGB, "tiny_imagenet": _RGB,
    "imagenet10": AugmentSpec(blur_p=0.5),
}
_PRESETS["mnist5k"] = _PRESETS["digits"]
_PRESETS["imagenet_dogs"] = _PRESETS["imagenet10"]


def augment_preset(name: str) -> AugmentSpec:
    """The SimCLR augmentation preset of dataset `name` (see the module docstring)."""
    _check_name(name)
    return _PRESETS[name]


@dataclass
class ViewParams:
    """Random parameters of one view for a batch of B images (NumPy arrays of length B).

    Crop boxes are in source pixels (top, left, height, width). Jitter factors are identity
    (1, 1, 1, 0) where jitter is off; `order` is each image's permutation of the four jitter
    ops (0 brightness, 1 contrast, 2 saturation, 3 hue). `sigma` is 0 where blur is off.
    """

    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    flip: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray
    order: np.ndarray
    gray: np.ndarray
    sigma: np.ndarray


def _sample_crops(rng: np.random.Generator, n: int, height: int, width: int,
                  spec: AugmentSpec, attempts: int = 10):
    """torchvision's RandomResizedCrop.get_params, vectorised over n images: up to 10 tries of
    (area, log-uniform ratio), first box that fits wins; else a centred crop of clamped ratio."""
    area = height * width
    target = area * rng.uniform(*spec.crop_scale, size=(n, attempts))
    ratio = np.exp(rng.uniform(math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]),
                               size=(n, attempts)))
    w = np.rint(np.sqrt(target * ratio)).astype(np.int64)
    h = np.rint(np.sqrt(target / ratio)).astype(np.int64)
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = fits.argmax(axis=1)
    w, h = w[np.arange(n), first], h[np.arange(n), first]
    u_top, u_left = rng.random(n), rng.random(n)
    top = np.floor(u_top * (height - h + 1)).astype(np.int64)
    left = np.floor(u_left * (width - w + 1)).astype(np.int64)

    in_ratio = width / height
    if in_ratio < spec.crop_ratio[0]:
        fw, fh = width, int(round(width / spec.crop_ratio[0]))
    elif in_ratio > spec.crop_ratio[1]:
        fh, fw = height, int(round(height * spec.crop_ratio[1]))
    else:
        fw, fh = width, height
    fallback = ~fits.any(axis=1)
    h[fallback], w[fallback] = fh, fw
    top[fallback], left[fallback] = (height - fh) // 2, (width - fw) // 2
    return top, left, h, w


def sample_view_params(rng: np.random.Generator, n: int, height: int, width: int,
                       spec: AugmentSpec) -> ViewParams:
    """Draw one view's parameters for n images of size height x width."""
    top, left, h, w = _sample_crops(rng, n, height, width, spec)
    flip = rng.random(n) < spec.flip_p
    s = spec.jitter_strength
    jitter = rng.random(n) < spec.jitter_p
    factors = [rng.uniform(max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, size=n) for _ in range(3)]
    hue = rng.uniform(-0.2 * s, 0.2 * s, size=n)
    order = rng.permuted(np.tile(np.arange(4), (n, 1)), axis=1)
    for f in factors:
        f[~jitter] = 1.0
    hue[~jitter] = 0.0
    gray = rng.random(n) < spec.gray_p
    blur = rng.random(n) < spec.blur_p
    sigma = np.where(blur, rng.uniform(*spec.blur_sigma, size=n), 0.0)
    return ViewParams(top, left, h, w, flip, *factors, hue, order, gray, sigma)


def torchvision_view(images: torch.Tensor, p: ViewParams, size: int,
                     spec: AugmentSpec) -> torch.Tensor:
    """Apply one view's parameters with torchvision.transforms.v2.functional.

    images: uint8 (B, C, H, W). Returns uint8 (B, C, size, size).
    """
    from torchvision.transforms.v2 import functional as F

    kernel = spec.blur_kernel(size)
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    out = []
    for i, img in enumerate(images):
        img = F.resized_crop(img, int(p.top[i]), int(p.left[i]), int(p.height[i]),
                             int(p.width[i]), [size, size], antialias=True)
        if p.flip[i]:
            img = F.horizontal_flip(img)
        factors = (p.brightness[i], p.contrast[i], p.saturation[i], p.hue[i])
        if factors != (1.0, 1.0, 1.0, 0.0):
            for op in p.order[i]:
                img = adjust[op](img, float(factors[op]))
        if p.gray[i]:
            img = F.rgb_to_grayscale(img, num_output_channels=img.shape[0])
        if p.sigma[i] > 0:
            # The 2-D Gaussian is separable: a (k, 1) then a (1, k) pass in float equals the
            # k x k blur (reflect padding commutes with the other axis) at 2/k of its cost.
            sigma = [float(p.sigma[i])] * 2
            x = F.gaussian_blur(img.float(), [kernel, 1], sigma)
            x = F.gaussian_blur(x, [1, kernel], sigma)
            img = x.round_().clamp_(0, 255).to(torch.uint8)
        out.append(img)
    return torch.stack(out)
