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
for the ImageNet subsets a Gaussian blur (sigma 0.1-2, kernel 10% of the side) with p 0.5.

The 1-channel digit sets (digits, mnist5k) get no crop, flip (it changes a digit's identity) or
colour operation but the strong digit augmentation instead (`DIGIT_STRONG`), applied to whole
batches by `digit_view` (affine_grid / grid_sample): rotation +-20 deg, shear +-15 deg, scale
.75-1.25, translation +-12% of the side; an elastic warp (a coarse 4 x 4 field of random
displacements, upsampled bicubically) on half the images; a soft 3 x 3 dilation or erosion of
the strokes on half (mnist5k only: the 8 x 8 digits' `DIGIT_8PX` leaves it out); contrast
.8-1.3 and Gaussian noise (sigma .1 of the range) on half; random erasing (2-20% of the area)
with p .5 (what each piece is worth on mnist5k: docs/methods.md). Every random number of it is
drawn with the view's other parameters (noise as one seed per image), so it too is a function of
(seed, epoch, batch).
"""

from __future__ import annotations

import dataclasses
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
    # Digit operations (`digit_view`); all off by default.
    rotate: float = 0.0  # degrees, uniform in [-rotate, rotate]
    shear: float = 0.0  # degrees, uniform in [-shear, shear]
    scale: tuple[float, float] = (1.0, 1.0)  # zoom factor range
    translate: float = 0.0  # fraction of the side, uniform in +-translate
    elastic_p: float = 0.0
    elastic_sigma: float = 0.0  # std of the coarse displacements, in [-1, 1] units
    morph_p: float = 0.0  # a dilation or an erosion (half each)
    intensity_p: float = 0.0  # contrast change and Gaussian noise together
    contrast: tuple[float, float] = (1.0, 1.0)
    noise_sigma: float = 0.0  # of the [0, 1] pixel range
    erase_p: float = 0.0
    erase_scale: tuple[float, float] = (0.02, 0.2)  # fraction of the area
    erase_ratio: tuple[float, float] = (0.3, 3.3)

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(
                    f"{name} must be a probability in [0, 1], got {getattr(self, name)}"
                )
        if not 0 <= self.jitter_strength <= 1.25:  # hue 0.2 s must stay within 0.25
            raise ValueError(f"jitter_strength must be in [0, 1.25], got {self.jitter_strength}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")
        for name in ("elastic_p", "morph_p", "intensity_p", "erase_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(
                    f"{name} must be a probability in [0, 1], got {getattr(self, name)}"
                )
        for name in ("rotate", "shear", "translate", "elastic_sigma", "noise_sigma"):
            if not 0 <= getattr(self, name) < 90:
                raise ValueError(f"{name} must be in [0, 90), got {getattr(self, name)}")
        for name in ("scale", "contrast", "erase_scale", "erase_ratio"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < lo <= hi, got {(lo, hi)}")
        if self.erase_scale[1] > 1:
            raise ValueError(f"erase_scale must be within (0, 1], got {self.erase_scale}")

    @property
    def uses_colour(self) -> bool:
        return (self.jitter_p > 0 and self.jitter_strength > 0) or self.gray_p > 0

    @property
    def uses_digit_ops(self) -> bool:
        """Whether `digit_view` has anything to do (affine, elastic, morphology, intensity,
        erasing)."""
        return (
            self.rotate > 0
            or self.shear > 0
            or self.scale != (1.0, 1.0)
            or self.translate > 0
            or (self.elastic_p > 0 and self.elastic_sigma > 0)
            or self.morph_p > 0
            or self.intensity_p > 0
            or self.erase_p > 0
        )

    def blur_kernel(self, image_size: int) -> int:
        """Odd kernel side, about 10% of the image side (SimCLR), at least 3."""
        return max(3, int(0.1 * image_size) // 2 * 2 + 1)


_RGB = AugmentSpec()
# The strong digit augmentation (module docstring); no crop, flip or colour.
DIGIT_STRONG = AugmentSpec(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip_p=0.0,
    jitter_p=0.0,
    gray_p=0.0,
    rotate=20.0,
    shear=15.0,
    scale=(0.75, 1.25),
    translate=0.12,
    elastic_p=0.5,
    elastic_sigma=0.06,
    morph_p=0.5,
    intensity_p=0.5,
    contrast=(0.8, 1.3),
    noise_sigma=0.1,
    erase_p=0.5,
)
# The 8 x 8 digits: the same without the dilation / erosion, which at 8 px thickens or erases
# whole strokes (digits, seed 0, one thread, cc / anchor / tcc NMI: with it .921 / .903 / .885,
# without .940 / .940 / .899; docs/methods.md).
DIGIT_8PX = dataclasses.replace(DIGIT_STRONG, morph_p=0.0)
_PRESETS = {
    "digits": DIGIT_8PX,
    "mnist5k": DIGIT_STRONG,
    "cifar10": _RGB,
    "cifar100": _RGB,
    "stl10": _RGB,
    "tiny_imagenet": _RGB,
    "imagenet10": AugmentSpec(blur_p=0.5),
}
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
    # Digit operations (None when the spec has none): theta (B, 2, 3) the affine_grid matrix
    # (output -> input, [-1, 1] coordinates), elastic (B, 2, 4, 4) coarse displacements (0 where
    # off), morph (B,) in [-1, 1] (< 0 erosion, > 0 dilation, its size the blend), gain (B,)
    # the contrast factor (1 where off), noise_seed (B,) (-1 where off), erase (B, 4) top,
    # left, height, width as fractions of the side (height 0 where off).
    theta: np.ndarray | None = None
    elastic: np.ndarray | None = None
    morph: np.ndarray | None = None
    gain: np.ndarray | None = None
    noise_seed: np.ndarray | None = None
    erase: np.ndarray | None = None


def _sample_crops(
    rng: np.random.Generator, n: int, height: int, width: int, spec: AugmentSpec, attempts: int = 10
):
    """torchvision's RandomResizedCrop.get_params, vectorised over n images: up to 10 tries of
    (area, log-uniform ratio), first box that fits wins; else a centered crop of clamped ratio."""
    area = height * width
    target = area * rng.uniform(*spec.crop_scale, size=(n, attempts))
    ratio = np.exp(
        rng.uniform(math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]), size=(n, attempts))
    )
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


def sample_view_params(
    rng: np.random.Generator, n: int, height: int, width: int, spec: AugmentSpec
) -> ViewParams:
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
    params = ViewParams(top, left, h, w, flip, *factors, hue, order, gray, sigma)
    if spec.uses_digit_ops:  # drawn after the others: the other presets' streams are unchanged
        _sample_digit_params(rng, n, spec, params)
    return params


def _sample_digit_params(
    rng: np.random.Generator, n: int, spec: AugmentSpec, p: ViewParams
) -> None:
    rot = np.deg2rad(rng.uniform(-spec.rotate, spec.rotate, size=n))
    shear = np.deg2rad(rng.uniform(-spec.shear, spec.shear, size=n))
    zoom = rng.uniform(*spec.scale, size=n)
    shift = rng.uniform(-spec.translate, spec.translate, size=(n, 2)) * 2.0  # [-1, 1] units
    # forward map M = R(rot) Sh(shear) zoom; affine_grid takes the inverse (output -> input)
    c, s, t = np.cos(rot), np.sin(rot), np.tan(shear)
    m = np.empty((n, 2, 2))
    m[:, 0, 0], m[:, 0, 1] = c, c * t - s
    m[:, 1, 0], m[:, 1, 1] = s, s * t + c
    m *= zoom[:, None, None]
    inv = np.linalg.inv(m)
    theta = np.concatenate([inv, -(inv @ shift[:, :, None])], axis=2)
    p.theta = theta.astype(np.float32)
    on = rng.random(n) < spec.elastic_p
    field = (
        rng.normal(0.0, spec.elastic_sigma, size=(n, 2, 4, 4))
        if spec.elastic_sigma
        else np.zeros((n, 2, 4, 4))
    )
    p.elastic = np.where(on[:, None, None, None], field, 0.0).astype(np.float32)
    on = rng.random(n) < spec.morph_p
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    p.morph = np.where(on, sign * rng.uniform(0.5, 1.0, size=n), 0.0).astype(np.float32)
    on = rng.random(n) < spec.intensity_p
    p.gain = np.where(on, rng.uniform(*spec.contrast, size=n), 1.0).astype(np.float32)
    seeds = rng.integers(0, 2**62, size=n)
    p.noise_seed = np.where(on & (spec.noise_sigma > 0), seeds, -1).astype(np.int64)
    on = rng.random(n) < spec.erase_p
    area = rng.uniform(*spec.erase_scale, size=n)
    ratio = np.exp(
        rng.uniform(math.log(spec.erase_ratio[0]), math.log(spec.erase_ratio[1]), size=n)
    )
    eh, ew = np.minimum(np.sqrt(area * ratio), 1.0), np.minimum(np.sqrt(area / ratio), 1.0)
    top, left = rng.random(n) * (1 - eh), rng.random(n) * (1 - ew)
    p.erase = np.stack([top, left, np.where(on, eh, 0.0), ew], axis=1).astype(np.float32)


def digit_view(x: torch.Tensor, p: ViewParams, spec: AugmentSpec) -> torch.Tensor:
    """The digit operations of one view on a whole batch: float (B, C, S, S) pixels in [0, 1]
    (background 0) on any device -> same shape, clamped to [0, 1]. Order: affine + elastic warp
    (one grid_sample, zero padding), dilation/erosion, contrast, noise, erasing."""
    import torch.nn.functional as F

    if p.theta is None:
        return x
    b, _, size, _ = x.shape
    dev, dt = x.device, x.dtype
    grid = F.affine_grid(torch.from_numpy(p.theta).to(dev, dt), list(x.shape), align_corners=False)
    if p.elastic.any():
        disp = F.interpolate(
            torch.from_numpy(p.elastic).to(dev, dt),
            size=(size, size),
            mode="bicubic",
            align_corners=True,
        )
        grid = grid + disp.permute(0, 2, 3, 1)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = torch.from_numpy(p.morph).to(dev, dt).view(b, 1, 1, 1)
    if p.morph.any():
        dilated = F.max_pool2d(x, 3, 1, 1)
        eroded = -F.max_pool2d(-x, 3, 1, 1)
        x = x + m.clamp(min=0) * (dilated - x) + (-m).clamp(min=0) * (eroded - x)
    if (p.gain != 1).any():
        c = torch.from_numpy(p.gain).to(dev, dt).view(b, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * c + mean
    noisy = np.flatnonzero(p.noise_seed >= 0)
    if len(noisy):
        shape = x.shape[1:]
        noise = torch.stack(
            [
                torch.randn(shape, generator=torch.Generator().manual_seed(int(p.noise_seed[i])))
                for i in noisy
            ]
        ).to(dev, dt)
        x = x.index_add(0, torch.from_numpy(noisy).to(dev), noise * spec.noise_sigma)
    if (p.erase[:, 2] > 0).any():
        e = torch.from_numpy(p.erase).to(dev, dt)
        pos = (torch.arange(size, device=dev, dtype=dt) + 0.5) / size
        rows = (pos >= e[:, 0:1]) & (pos < e[:, 0:1] + e[:, 2:3])  # (B, S)
        cols = (pos >= e[:, 1:2]) & (pos < e[:, 1:2] + e[:, 3:4])
        keep = ~(rows[:, :, None] & cols[:, None, :])
        x = x * keep[:, None].to(dt)
    return x.clamp_(0.0, 1.0)


def torchvision_view(
    images: torch.Tensor, p: ViewParams, size: int, spec: AugmentSpec
) -> torch.Tensor:
    """Apply one view's parameters with torchvision.transforms.v2.functional.

    images: uint8 (B, C, H, W). Returns uint8 (B, C, size, size). The digit operations of
    the spec (`digit_view`) run last, on the whole batch in float.
    """
    from torchvision.transforms.v2 import functional as F

    out = _torchvision_ops(images, p, size, spec, F)
    if spec.uses_digit_ops and p.theta is not None:
        x = digit_view(out.float().div_(255.0), p, spec)
        out = x.mul_(255.0).round_().to(torch.uint8)
    return out


def _identity_view(images: torch.Tensor, p: ViewParams, size: int, spec: AugmentSpec) -> bool:
    """Whether the per-image ops leave the batch as it is (full-image boxes at the same size,
    no flip, colour or blur): the digit presets' case, which then skips the per-image loop."""
    _, _, h, w = images.shape
    return (
        h == w == size
        and not spec.uses_colour
        and not p.flip.any()
        and not (p.sigma > 0).any()
        and (p.top == 0).all()
        and (p.left == 0).all()
        and (p.height == h).all()
        and (p.width == w).all()
    )


def _torchvision_ops(images: torch.Tensor, p: ViewParams, size: int, spec: AugmentSpec, F):
    if _identity_view(images, p, size, spec):
        return images

    kernel = spec.blur_kernel(size)
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    out = []
    for i, img in enumerate(images):
        img = F.resized_crop(
            img,
            int(p.top[i]),
            int(p.left[i]),
            int(p.height[i]),
            int(p.width[i]),
            [size, size],
            antialias=True,
        )
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
