"""MoCo's two-crop augmentation, batched on the device that holds the images.

The CPU recipe (:func:`moco_pretrain.data.pretrain_transform`, i.e. the official ``main_moco.py``
pipeline on PIL images) costs one Python call chain per image and view; fed by a handful of CPU
cores it cannot keep a fast GPU busy. Here the workers only decode (and resize to a fixed
``pre_size`` so that images stack), and every random transform runs batched on the device with
per-sample parameters drawn from the same distributions as torchvision's:

* ``RandomResizedCrop(size, scale=(min_scale, 1), ratio=(3/4, 4/3))``, including its 10 attempts
  and the centre-crop fallback, drawn in the coordinates of the *original* image;
* ``ColorJitter`` (v2: 0.4, 0.4, 0.4, 0.1 with p=0.8; v1: 0.4 each, always), its four ops in a
  fresh random order per sample;
* ``RandomGrayscale(p=0.2)`` (v2: after the jitter; v1: before it);
* v2: Gaussian blur with sigma ~ U(0.1, 2) and p=0.5 (the official PIL ``GaussianBlur(radius=sigma)``);
* ``RandomHorizontalFlip(p=0.5)``, then ``Normalize(mean, std)``.

Grey images may come as one channel (Nx1xHxW, :class:`DecodeResize` with ``grey``): saturation,
hue and grayscale, identities on grey pixels (exactly so in PIL's integer luma, whose weights sum
to 1), are skipped, the other ops run on one channel (a third of the memory traffic, and no hue),
and the normalised views come out with 3 channels, as the PIL recipe's. The parameters drawn are
the same as for 3 channels.

Every view's parameters come from :data:`VIEW_DRAWS` uniform numbers per sample. In training they
are drawn by the loader (:class:`DecodeResize`, under the per-sample seed of
:class:`moco_pretrain.data.SeededSamples`) and travel with the batch, so a view is a function of
``(SEED, epoch, sample index)`` as in the PIL path; without them, a ``generator`` (or torch's
global RNG) draws them on the device.

Deviations from the PIL pipeline, all small and checked statistically by
``tests/test_gpu_augment.py``:

* Resampling uses ``roi_align`` (bilinear, ``aligned=True``, adaptive sampling ratio). Inside the
  crop it equals ``resized_crop(..., antialias=True)`` when upsampling; when downsampling its
  box-averaging stands in for PIL's antialiasing filter; at the crop's border it interpolates
  with the pixels just outside the crop instead of clamping to the crop's edge.
* Images are pre-resized to ``pre_size`` x ``pre_size`` on the workers (aspect ratio not kept);
  crops are drawn on the original size and mapped into the pre-resized image, so crop geometry
  and aspect ratio follow torchvision exactly, but crops smaller than the output see the
  resolution of ``pre_size`` rather than of the original.
* Colour ops run in float32 without PIL's rounding to uint8 after every op; the blur is an exact
  Gaussian (radius ``ceil(3 * 2.0)``, replicate padding) where PIL uses three extended box blurs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops import roi_align

# ITU-R 601-2 luma, the weights of torchvision's rgb_to_grayscale (and, /1000, of PIL's "L").
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params
BLUR_SIGMA = (0.1, 2.0)  # official moco/loader.py GaussianBlur
# Kernel 13 = 2 * 6 + 1: the Gaussian's mass beyond 3 sigma (0.3 %) is dropped.
BLUR_RADIUS = math.ceil(3 * BLUR_SIGMA[1])
CROP_DRAWS = 2 * CROP_ATTEMPTS + 2  # (area, log aspect) per attempt, then (top, left)
VIEW_DRAWS = CROP_DRAWS + 13  # + jitter factors (4), jitter, order (4), gray, blur, sigma, flip
RECIPES = {
    # name: (jitter strengths (brightness, contrast, saturation, hue), jitter p, grayscale first)
    "v1": ((0.4, 0.4, 0.4, 0.4), 1.0, True),
    "v2": ((0.4, 0.4, 0.4, 0.1), 0.8, False),
}


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample random parameters of one view of a batch of N images.

    Attributes:
        crop: Nx4 float64 ``(top, left, height, width)`` in pixels of the original image, as
            torchvision's ``RandomResizedCrop.get_params`` returns them.
        jitter: N bool, colour jitter applied.
        factors: Nx4 ``(brightness, contrast, saturation, hue)`` jitter factors.
        order: Nx4 long, a permutation of ``0..3`` (the indices of ``factors``) per sample.
        gray: N bool, converted to grayscale.
        blur: N bool, blurred.
        sigma: N, the blur's standard deviation in output pixels.
        flip: N bool, mirrored left-right.
    """

    crop: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    flip: torch.Tensor


def sample_crops(
    sizes: torch.Tensor, *, scale: Sequence[float], uniforms: torch.Tensor | None = None
) -> torch.Tensor:
    """``RandomResizedCrop.get_params`` for a batch, without a host round trip.

    Every sample makes the same :data:`CROP_ATTEMPTS` draws of (area, log aspect ratio); the first
    crop that fits wins, and a sample where none fits takes torchvision's central fallback crop.

    Args:
        sizes: Nx2 ``(height, width)`` of the original images.
        uniforms: Nx:data:`CROP_DRAWS` float64 numbers in [0, 1) to use instead of drawing them
            from torch's global RNG.
    Returns:
        Nx4 float64 ``(top, left, height, width)``, integer-valued.
    """
    sizes = sizes.to(torch.float64)
    height, width = sizes[:, 0:1], sizes[:, 1:2]  # Nx1 each
    n, device = sizes.shape[0], sizes.device
    if uniforms is None:
        uniforms = torch.rand(n, CROP_DRAWS, device=device, dtype=torch.float64)
    u = uniforms[:, : 2 * CROP_ATTEMPTS].reshape(n, CROP_ATTEMPTS, 2)  # u: N x attempts x 2
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])  # N x attempts
    ratio = CROP_RATIO
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])  # N x attempts
    w = torch.round(torch.sqrt(area * aspect))  # round half to even, as Python's round()
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # N x attempts
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # N x 1, first fitting attempt
    w, h = w.gather(1, first), h.gather(1, first)  # Nx1 each
    found = fits.any(dim=1, keepdim=True)  # Nx1

    in_ratio = width / height  # fallback: the largest central crop within the ratio range
    fallback_w = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fallback_h = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)

    u_pos = uniforms[:, 2 * CROP_ATTEMPTS : CROP_DRAWS]  # Nx2
    top = torch.where(
        found, torch.floor(u_pos[:, 0:1] * (height - h + 1)), (height - h).div(2).floor()
    )
    left = torch.where(
        found, torch.floor(u_pos[:, 1:2] * (width - w + 1)), (width - w).div(2).floor()
    )
    return torch.cat([top, left, h, w], dim=1)  # crop: Nx4


def rgb_to_gray(images: torch.Tensor) -> torch.Tensor:
    """Luma of Nx3xHxW float images, Nx1xHxW (torchvision's ``rgb_to_grayscale`` weights)."""
    r, g, b = images.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * images + (1 - factor) * other`` clipped to [0, 1]; factor: Nx1x1x1."""
    return (factor * images + (1.0 - factor) * other).clamp_(0.0, 1.0)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, torch.zeros_like(images), factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = rgb_to_gray(images).mean(dim=(1, 2, 3), keepdim=True)  # Nx1x1x1
    return _blend(images, mean, factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, rgb_to_gray(images), factor)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of Nx3xHxW images in [0, 1] by ``shift`` (Nx1x1x1, in turns)."""
    value, argmax = images.max(dim=1, keepdim=True)  # V: Nx1xHxW, index of the max channel
    chroma = value - images.min(dim=1, keepdim=True).values  # C: Nx1xHxW
    saturation = chroma / value.clamp_min(1e-12)  # S (0 where V = 0)
    r, g, b = images.unbind(dim=1)
    safe = chroma.squeeze(1).clamp_min(1e-12)
    # Hue in sixths of a turn, from the sector of the max channel (ties: r before g before b).
    sector = torch.stack([(g - b) / safe, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe], dim=1)
    hue = sector.gather(1, argmax) / 6.0  # Nx1xHxW, in turns
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    hue = torch.remainder(hue + shift, 1.0)
    # HSV -> RGB: channel n = V - V S clip(min(k, 4 - k), 0, 1) with k = (n + 6 H) mod 6.
    offsets = torch.arange(5.0, 0.0, -2.0, device=images.device).view(1, 3, 1, 1)  # R, G, B
    k = torch.remainder(offsets + 6.0 * hue, 6.0)
    return value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # indices of AugmentParams.factors
IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)


def _blend_step(
    images: torch.Tensor, params: AugmentParams, *, step: int, active: torch.Tensor
) -> torch.Tensor:
    """Apply each sample's ``step``-th jitter op where it is a blend and ``active`` (N bool).

    ``adjust_brightness``, ``adjust_contrast`` and ``adjust_saturation`` in one pass: the blend
    partner is 0, the mean luma or the luma, per sample.
    """
    op = params.order[:, step]  # N
    factor = params.factors.gather(1, op.unsqueeze(1)).squeeze(1)  # N
    factor = torch.where(active & params.jitter & (op != HUE), factor, 1.0).view(-1, 1, 1, 1)
    gray = images if images.shape[1] == 1 else rgb_to_gray(images)  # Nx1xHxW
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)  # Nx1x1x1
    op = op.view(-1, 1, 1, 1)
    other = torch.where(op == CONTRAST, mean, gray)
    other = torch.where(op == BRIGHTNESS, 0.0, other)
    return _blend(images, other, factor)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of Nx3xHxW images with a per-sample ``sigma`` (N; 0: identity).

    The official recipe uses PIL's ``GaussianBlur(radius=sigma)``, which approximates a Gaussian
    of standard deviation ``sigma`` by three box blurs and repeats the edge pixels.
    """
    n, c, height, width = images.shape
    offsets = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=images.device, dtype=images.dtype)
    sigma = sigma.to(images.dtype).view(n, 1)
    kernel = torch.exp(-0.5 * (offsets / sigma.clamp_min(1e-6)) ** 2)  # N x (2R+1)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # sigma -> 0 gives the identity (a delta)
    kernel = kernel.repeat_interleave(c, dim=0)  # (N*3) x (2R+1), one filter per channel
    x = images.reshape(1, n * c, height, width)
    x = F.pad(x, (BLUR_RADIUS,) * 4, mode="replicate")
    x = F.conv2d(x, kernel.view(n * c, 1, 1, -1), groups=n * c)  # along W
    x = F.conv2d(x, kernel.view(n * c, 1, -1, 1), groups=n * c)  # along H
    return x.view(n, c, height, width)


def _batch_of(images: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images in [0, 1] as one NxCxHxW batch (C: 3, or 1 for grey images), and their Nx2
    (height, width).

    A list of differently sized images is padded at the bottom and right by repeating the edge
    pixels, so that bilinear sampling at an image's border reads its own edge, not the padding.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected Nx3xHxW or Nx1xHxW images, got shape {tuple(images.shape)}")
        n, _, height, width = images.shape
        sizes = torch.full((n, 2), height, device=images.device)  # no host-to-device copy
        sizes[:, 1] = width
        return _to_unit_float(images), sizes
    if not images or any(im.dim() != 3 or im.shape[0] != images[0].shape[0] for im in images):
        raise ValueError("expected a non-empty list of CxHxW images with the same C")
    if images[0].shape[0] not in (1, 3):
        raise ValueError(f"expected 3 or 1 channels, got {images[0].shape[0]}")
    sizes = torch.tensor([im.shape[-2:] for im in images], device=images[0].device)  # Nx2
    height, width = (int(v) for v in sizes.max(dim=0).values)
    padded = [
        F.pad(
            _to_unit_float(im)[None],
            (0, width - im.shape[2], 0, height - im.shape[1]),
            mode="replicate",
        )
        for im in images
    ]
    return torch.cat(padded), sizes


def _to_unit_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float().mul_(1.0 / 255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.float()


class GpuMocoAugment(nn.Module):
    """One random view per image, batched on the images' device (see the module docstring).

    Args:
        size: output height and width.
        recipe: ``"v1"`` (InstDisc augmentation) or ``"v2"`` (MoCo v2's aug+).
        mean, std: per-channel normalisation of the [0, 1] output.
        min_scale: RandomResizedCrop's smallest area fraction.
        blur: v2 only: the Gaussian blur (off for tiny images, as ``DATA.BLUR``).
    """

    def __init__(
        self,
        *,
        size: int,
        recipe: str = "v2",
        mean: Sequence[float],
        std: Sequence[float],
        min_scale: float = 0.2,
        blur: bool = True,
    ) -> None:
        super().__init__()
        if recipe not in RECIPES:
            raise ValueError(f"unknown augmentation recipe {recipe!r} (expected 'v1' or 'v2')")
        if size < 1 or not 0.0 < min_scale <= 1.0:
            raise ValueError(f"need size >= 1 and 0 < min_scale <= 1, got {size}, {min_scale}")
        self.size = size
        self.recipe = recipe
        self.scale = (min_scale, 1.0)
        self.strengths, self.jitter_p, self.gray_first = RECIPES[recipe]
        self.blur_p = 0.5 if recipe == "v2" and blur else 0.0
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        # jitter factors ~ U(low, low + width): 1 +- strength (brightness, contrast, saturation),
        # +- strength (hue). Buffers, so that sampling never copies from the host.
        strengths = torch.tensor(self.strengths)
        self.register_buffer(
            "jitter_low", torch.tensor(IDENTITY_FACTORS) - strengths, persistent=False
        )
        self.register_buffer("jitter_width", 2.0 * strengths, persistent=False)

    def sample_params(
        self,
        sizes: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        uniforms: torch.Tensor | None = None,
    ) -> AugmentParams:
        """The parameters of one view for images of original ``sizes`` (Nx2, height/width), from
        ``uniforms`` (Nx:data:`VIEW_DRAWS` in [0, 1)) or from fresh draws of ``generator``."""
        n, device = sizes.shape[0], sizes.device
        if uniforms is None:
            uniforms = torch.rand(
                n, VIEW_DRAWS, generator=generator, device=device, dtype=torch.float64
            )
        crop = sample_crops(sizes, scale=self.scale, uniforms=uniforms[:, :CROP_DRAWS])
        u = uniforms[:, CROP_DRAWS:]  # u: Nx13 float64, compared before rounding to float32
        return AugmentParams(
            crop=crop,
            jitter=u[:, 4] < self.jitter_p,
            factors=self.jitter_low + self.jitter_width * u[:, 0:4].float(),  # Nx4
            order=u[:, 5:9].argsort(dim=1),  # a uniformly random permutation per sample
            gray=u[:, 9] < 0.2,
            blur=u[:, 10] < self.blur_p,
            sigma=(BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 11]).float(),
            flip=u[:, 12] < 0.5,
        )

    def resized_crop(
        self, images: torch.Tensor, crop: torch.Tensor, *, scale_hw: torch.Tensor
    ) -> torch.Tensor:
        """Crop ``crop`` (Nx4 top/left/height/width, original pixels) and resize to ``size``.

        ``scale_hw`` (Nx2) maps original pixels to the pixels of ``images`` (pre-resized ones).
        """
        top, left, height, width = crop.unbind(dim=1)
        sy, sx = scale_hw.to(torch.float64).unbind(dim=1)
        index = torch.arange(crop.shape[0], device=crop.device, dtype=torch.float64)
        boxes = torch.stack(
            [index, left * sx, top * sy, (left + width) * sx, (top + height) * sy], dim=1
        )  # boxes: Nx5 (batch index, x1, y1, x2, y2)
        return roi_align(
            images, boxes.to(images.dtype), output_size=self.size, sampling_ratio=-1, aligned=True
        )

    def color_jitter(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """The four jitter ops in each sample's own order, without a host round trip.

        Brightness, contrast and saturation are all ``blend(x, other, factor)``; factor 1 is
        exactly the identity. So: the blends ordered before the hue (up to 3 steps, each sample
        blending with its own op's ``other``), the hue once for all, then the blends after it.
        """
        hue_step = params.order.argsort(dim=1)[:, HUE]  # N, position of the hue in the order
        for step in range(3):  # blends before the hue: steps 0..2
            images = _blend_step(images, params, step=step, active=step < hue_step)
        shifted = adjust_hue(images, params.factors[:, HUE].view(-1, 1, 1, 1))
        images = torch.where(params.jitter.view(-1, 1, 1, 1), shifted, images)
        for step in range(1, 4):  # blends after the hue: steps 1..3
            images = _blend_step(images, params, step=step, active=step > hue_step)
        return images

    def random_grayscale(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        return torch.where(
            params.gray.view(-1, 1, 1, 1), rgb_to_gray(images).expand_as(images), images
        )

    def forward(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        *,
        source_sizes: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        uniforms: torch.Tensor | None = None,
        params: AugmentParams | None = None,
    ) -> torch.Tensor:
        """One augmented view per image.

        Args:
            images: Nx3xHxW uint8 (0-255) or float (0-1) images on the target device, or a list
                of N differently sized 3xHixWi ones.
            source_sizes: Nx2 (height, width) of the original images when ``images`` were
                pre-resized (the :class:`DecodeResize` loader path); crops are drawn on these.
            generator: a generator on the images' device, for reproducible views.
            uniforms: Nx:data:`VIEW_DRAWS` numbers in [0, 1) that fix the view (no draws).
            params: explicit parameters instead of fresh draws (tests).
        Returns:
            Nx3x``size``x``size`` float32, normalised.
        """
        with torch.autocast(device_type=self.mean.device.type, enabled=False), torch.no_grad():
            batch, valid = _batch_of(images)  # batch: Nx3xHxW in [0, 1], valid: Nx2
            return self._view(
                batch, valid, source_sizes, generator=generator, params=params, uniforms=uniforms
            )

    def two_crops(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        *,
        source_sizes: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        uniforms: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The query and key views (independent draws), as ``TwoCropsTransform`` gives them;
        ``uniforms`` (Nx2x:data:`VIEW_DRAWS`, as :class:`DecodeResize` draws them) fix both."""
        with torch.autocast(device_type=self.mean.device.type, enabled=False), torch.no_grad():
            batch, valid = _batch_of(images)  # converted once for both views
            return [
                self._view(
                    batch,
                    valid,
                    source_sizes,
                    generator=generator,
                    uniforms=None if uniforms is None else uniforms[:, view],
                )  # fmt: skip
                for view in range(2)
            ]

    def _view(
        self,
        batch: torch.Tensor,
        valid: torch.Tensor,
        source_sizes: torch.Tensor | None,
        *,
        generator: torch.Generator | None,
        params: AugmentParams | None = None,
        uniforms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        sources = valid if source_sizes is None else source_sizes.to(valid.device)
        if params is None:
            params = self.sample_params(sources, generator=generator, uniforms=uniforms)
        x = self.resized_crop(batch, params.crop, scale_hw=valid / sources)  # x: NxCxSxS
        if x.shape[1] == 1:  # grey: brightness and contrast in each sample's order
            for step in range(4):
                x = _blend_step(x, params, step=step, active=params.jitter)
        else:
            if self.gray_first:
                x = self.random_grayscale(x, params)
            x = self.color_jitter(x, params)
            if not self.gray_first:
                x = self.random_grayscale(x, params)
        if self.blur_p > 0:
            x = gaussian_blur(x, torch.where(params.blur, params.sigma, 0.0))
        x = torch.where(params.flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return (x - self.mean) / self.std  # Nx3xSxS, also from one grey channel


class DecodeResize:
    """Worker-side half of the device path: PIL image -> (3xPxP uint8 tensor, original (H, W),
    2x:data:`VIEW_DRAWS` float64 uniforms for the two views); with ``grey``, a 1xPxP luma tensor
    (for data sets of grey images, see the module docstring).

    Resizing every image to ``pre_size`` x ``pre_size`` lets the default collate stack a batch;
    :class:`GpuMocoAugment` draws crops on the original size it is given alongside. The uniforms
    come from torch's CPU generator, which :class:`moco_pretrain.data.SeededSamples` seeds per
    sample, so the views depend on the sample and epoch, not on the worker or the batch.
    """

    def __init__(self, *, pre_size: int, grey: bool = False) -> None:
        self.pre_size, self.mode = pre_size, "L" if grey else "RGB"

    def __call__(
        self, image: Image.Image | np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``image``: a PIL image, or (``grey``) an HxW uint8 array, used as is at the pre-size."""
        if (
            isinstance(image, np.ndarray)
            and image.shape == (self.pre_size,) * 2
            and self.mode == "L"
        ):
            original = torch.tensor(image.shape)
            pixels = torch.from_numpy(image.copy())[None]  # 1xPxP uint8
        else:
            image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
            original = torch.tensor([image.height, image.width])
            image = image.convert(self.mode)
            if image.size != (self.pre_size, self.pre_size):
                image = image.resize((self.pre_size, self.pre_size), Image.BILINEAR)
            pixels = np.asarray(image).reshape(image.height, image.width, -1)
            pixels = torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # 3xPxP (1xPxP grey) uint8
        uniforms = torch.rand(2, VIEW_DRAWS, dtype=torch.float64)  # uniforms: 2 x VIEW_DRAWS
        return pixels.contiguous(), original, uniforms


def default_pre_size(image_size: int) -> int:
    """Decode size for the device path: 1.5x the crop (336 px for 224 px crops), a compromise
    between the resolution small crops see and the bytes each batch moves to the device."""
    return round(1.5 * image_size)


def device_augment_step(
    step_fn: Callable[[Any, Any], Any], augment: GpuMocoAugment
) -> Callable[[Any, Any], Any]:
    """Wrap a ``step_fn(model, ((im_q, im_k), labels))`` to take :class:`DecodeResize` batches
    ``((images, sizes, uniforms), labels)`` already on the device, and augment them there."""

    def step(model: Any, batch: Any) -> Any:
        (images, sizes, uniforms), labels = batch
        with torch.profiler.record_function("moco/augment"):
            views = augment.two_crops(images, source_sizes=sizes, uniforms=uniforms)
        return step_fn(model, (views, labels))

    return step
