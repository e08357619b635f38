"""The batched device augmentation: exact op math against torchvision/PIL, and the statistics of
its views against the CPU recipe (``data.pretrain_transform``) on the same images."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader
from torchvision import transforms

from moco_pretrain.config import augmentation_options, setup_cfg
from moco_pretrain.data import FashionMNIST, RobustImageFolder, pretrain_transform
from moco_pretrain.gpu_augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    VIEW_DRAWS,
    AugmentParams,
    DecodeResize,
    GpuMocoAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    default_pre_size,
    device_augment_step,
    gaussian_blur,
    rgb_to_gray,
    sample_crops,
)

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]  # equal per channel: grey stays grey


@pytest.fixture(autouse=True)
def _one_thread(_few_threads):
    """Small elementwise ops: one thread is faster, and steady on a shared 2-core machine."""
    torch.set_num_threads(1)


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # 3xHxW uint8


def _ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, grid, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


def _torchvision_crops(height: int, width: int, n: int) -> torch.Tensor:
    image = torch.empty(3, height, width)
    draws = [
        transforms.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)
    ]
    return torch.tensor(draws, dtype=torch.float64)  # n x (top, left, height, width)


def _neutral_params(n: int, **changes) -> AugmentParams:
    """Whole-image crop of 24x24 images and every random op off; ``changes`` switch some on."""
    fields = dict(
        crop=torch.tensor([[0.0, 0.0, 24.0, 24.0]], dtype=torch.float64).repeat(n, 1),
        jitter=torch.zeros(n, dtype=torch.bool),
        factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1),
        order=torch.arange(4).repeat(n, 1),
        gray=torch.zeros(n, dtype=torch.bool),
        blur=torch.zeros(n, dtype=torch.bool),
        sigma=torch.ones(n),
        flip=torch.zeros(n, dtype=torch.bool),
    )
    fields.update(changes)
    return AugmentParams(**fields)


# ----------------------------------------------------------------------------- crop sampling
def test_crop_sampler_matches_torchvision_distribution():
    torch.manual_seed(0)
    ours = sample_crops(torch.tensor([[40, 48]]).expand(4000, 2), scale=(0.2, 1.0))
    ref = _torchvision_crops(40, 48, 2000)
    assert torch.equal(ours, ours.round()) and (ours[:, 2:] > 0).all()
    assert (ours[:, 0] + ours[:, 2] <= 40).all() and (ours[:, 1] + ours[:, 3] <= 48).all()
    area = lambda c: c[:, 2] * c[:, 3] / (40 * 48)  # noqa: E731
    aspect = lambda c: (c[:, 3] / c[:, 2]).log()  # noqa: E731
    centre_x = lambda c: c[:, 1] + c[:, 3] / 2  # noqa: E731
    # 0.053 is the 0.1 % critical KS distance for samples of 4000 and 2000
    for stat in (area, aspect, centre_x):
        assert _ks_distance(stat(ours), stat(ref)) < 0.053
    assert area(ours).mean().item() == pytest.approx(area(ref).mean().item(), abs=0.02)


def test_crop_sampler_fallback_is_torchvision_central_crop():
    # 1x100: no attempt can fit, every sample takes the central crop of ratio 4/3 (h 1, w 1).
    ours = sample_crops(torch.tensor([[1, 100]]).expand(50, 2), scale=(0.2, 1.0))
    assert torch.equal(ours, _torchvision_crops(1, 100, 50))
    # 16x80: few attempts fit; the fallback rate (the 16x21 central crop) must match.
    torch.manual_seed(0)
    ours = sample_crops(torch.tensor([[16, 80]]).expand(3000, 2), scale=(0.2, 1.0))
    ref = _torchvision_crops(16, 80, 1500)
    central = torch.tensor([0.0, 29.0, 16.0, 21.0], dtype=torch.float64)

    def rate(crops: torch.Tensor) -> float:
        return (crops == central).all(dim=1).double().mean().item()

    assert 0.2 < rate(ref) < 0.9
    assert rate(ours) == pytest.approx(rate(ref), abs=0.05)


# ----------------------------------------------------------------------------- exact op math
def test_colour_ops_equal_torchvision_functional():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 9, 11)
    factors = torch.tensor([0.6, 1.0, 1.3, 1.4])
    shifts = torch.tensor([-0.1, 0.0, 0.07, 0.4])
    view = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731
    for i in range(4):
        image, f, h = images[i], float(factors[i]), float(shifts[i])
        assert torch.equal(rgb_to_gray(images)[i], TF.rgb_to_grayscale(image))
        assert torch.equal(
            adjust_brightness(images, view(factors))[i], TF.adjust_brightness(image, f)
        )
        assert torch.equal(adjust_contrast(images, view(factors))[i], TF.adjust_contrast(image, f))
        assert torch.equal(
            adjust_saturation(images, view(factors))[i], TF.adjust_saturation(image, f)
        )
        torch.testing.assert_close(adjust_hue(images, view(shifts))[i], TF.adjust_hue(image, h))


def test_colour_jitter_applies_each_samples_order():
    """The blend/hue/blend split equals the four torchvision ops in each sample's order."""
    torch.manual_seed(0)
    n = 24
    images = torch.rand(n, 3, 24, 24)
    orders = torch.stack([torch.randperm(4) for _ in range(n)])
    factors = torch.cat([0.6 + 0.8 * torch.rand(n, 3), 0.2 * torch.rand(n, 1) - 0.1], dim=1)
    jitter = torch.arange(n) % 5 != 0
    params = _neutral_params(n, order=orders, factors=factors, jitter=jitter)
    ours = GpuMocoAugment(size=24, mean=MEAN, std=STD).color_jitter(images, params)
    ops = {
        BRIGHTNESS: TF.adjust_brightness,
        CONTRAST: TF.adjust_contrast,
        SATURATION: TF.adjust_saturation,
        HUE: TF.adjust_hue,
    }
    for i in range(n):
        expected = images[i]
        for op in orders[i].tolist() if jitter[i] else []:
            expected = ops[op](expected, float(factors[i, op]))
        torch.testing.assert_close(ours[i], expected, atol=2e-6, rtol=0)


def test_flip_is_a_mirror_and_grayscale_is_luma():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 24, 24)
    aug = GpuMocoAugment(size=24, mean=MEAN, std=STD)
    plain = aug(images, params=_neutral_params(6))
    torch.testing.assert_close(plain * 0.25 + 0.5, images, atol=1e-6, rtol=0)  # identity crop
    flipped = aug(images, params=_neutral_params(6, flip=torch.ones(6, dtype=torch.bool)))
    assert torch.equal(flipped, plain.flip(-1))
    gray = aug(images, params=_neutral_params(6, gray=torch.ones(6, dtype=torch.bool)))
    assert torch.equal(gray, ((TF.rgb_to_grayscale(images, 3) - 0.5) / 0.25))


def test_blur_matches_pil_gaussian_blur():
    """PIL's GaussianBlur(radius=sigma) (three box blurs) vs the exact Gaussian: within 3/255."""
    rng = np.random.default_rng(0)
    grid = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    image = grid.resize((40, 40), Image.BILINEAR)
    sigmas = torch.tensor([0.1, 0.5, 1.0, 2.0])
    ours = gaussian_blur(_pixels(image)[None].float().repeat(4, 1, 1, 1), sigmas)
    for out, sigma in zip(ours, sigmas.tolist(), strict=True):
        ref = _pixels(image.filter(ImageFilter.GaussianBlur(radius=sigma))).float()
        assert (out - ref).abs().max() < 3.0
        assert (out - ref).abs().mean() < 1.0
    assert torch.equal(gaussian_blur(ours, torch.zeros(4)), ours)  # sigma 0: identity


def test_resized_crop_equals_torchvision_inside_the_crop():
    """Upsampling crops: bilinear, exactly torchvision's except at the border pixels."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 20, 30)
    crop = torch.tensor([[3.0, 5.0, 8.0, 12.0], [6.0, 10.0, 14.0, 15.0]], dtype=torch.float64)
    ours = GpuMocoAugment(size=16, mean=MEAN, std=STD).resized_crop(
        images, crop, scale_hw=torch.ones(2, 2)
    )
    for i, (top, left, h, w) in enumerate(crop.int().tolist()):
        ref = TF.resized_crop(images[i], top, left, h, w, [16, 16], antialias=True)
        torch.testing.assert_close(ours[i, :, 1:-1, 1:-1], ref[:, 1:-1, 1:-1])  # border: see docs


def test_pre_resized_images_are_cropped_in_original_coordinates():
    """A crop drawn on the original image, taken from the pre-resized copy, shows the same region."""
    ramp = torch.linspace(0, 1, 60).view(1, 1, 60).expand(3, 30, 60).contiguous()  # 30x60 original
    pre = TF.resize(ramp, [32, 32], antialias=True)  # the DecodeResize path (aspect not kept)
    aug = GpuMocoAugment(size=8, mean=MEAN, std=STD)
    params = _neutral_params(1, crop=torch.tensor([[10.0, 30.0, 10.0, 20.0]], dtype=torch.float64))
    from_original = aug(ramp[None], params=params)
    from_pre = aug(pre[None], params=params, source_sizes=torch.tensor([[30, 60]]))
    torch.testing.assert_close(from_pre, from_original, atol=0.05, rtol=0)


def test_list_input_equals_one_image_at_a_time():
    torch.manual_seed(0)
    images = [torch.rand(3, 20, 30), torch.rand(3, 28, 18)]
    aug = GpuMocoAugment(size=12, recipe="v1", mean=MEAN, std=STD)
    params = aug.sample_params(torch.tensor([[20, 30], [28, 18]]))
    batched = aug(images, params=params)
    for i, image in enumerate(images):
        single = AugmentParams(**{k: v[i : i + 1] for k, v in vars(params).items()})
        torch.testing.assert_close(batched[i : i + 1], aug(image[None], params=single))


def test_generator_makes_views_reproducible():
    images = torch.randint(0, 256, (4, 3, 30, 20), dtype=torch.uint8)
    aug = GpuMocoAugment(size=16, mean=MEAN, std=STD)
    first, again, other = (
        aug.two_crops(images, generator=torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)
    )
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], other[0])


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="unknown augmentation recipe 'v3'"):
        GpuMocoAugment(size=8, recipe="v3", mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="Nx3xHxW or Nx1xHxW images, got shape \\(2, 2, 8, 8\\)"):
        GpuMocoAugment(size=8, mean=MEAN, std=STD)(torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match="same C"):
        GpuMocoAugment(size=8, mean=MEAN, std=STD)([torch.zeros(1, 8, 8), torch.zeros(3, 8, 8)])


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("recipe", ["v2", "v1"])
def test_view_statistics_match_the_cpu_recipe(recipe, tiny_imagefolder):
    """Per-channel mean/std, within-image std and grayscale rate of >= 600 views of the same
    images, device path vs the PIL recipe. Tolerances hold over seeds 0-4 with margin. (PIL
    truncates to uint8 after every colour op, which darkens its views by ~2/255, 0.03 in these
    normalised units; on sharp-edged images its antialiased resampling and box blur keep the
    within-image std up to 4 % lower.)"""
    images = [
        Image.open(p).convert("RGB") for p in sorted((tiny_imagefolder / "train").rglob("*.png"))
    ]
    repeats = -(-600 // len(images))  # ceil
    torch.manual_seed(0)
    random.seed(0)
    cpu_recipe = pretrain_transform(size=24, recipe=recipe, mean=MEAN, std=STD)
    cpu = torch.stack([cpu_recipe(image) for _ in range(repeats) for image in images])
    batch = torch.stack([_pixels(image) for image in images]).repeat(repeats, 1, 1, 1)
    ours = GpuMocoAugment(size=24, recipe=recipe, mean=MEAN, std=STD)(batch)
    gray_c, gray_o = _assert_view_statistics_match(ours, cpu)
    assert gray_c == pytest.approx(0.2, abs=0.05)
    assert gray_o == pytest.approx(gray_c, abs=0.06)


def _assert_view_statistics_match(ours: torch.Tensor, cpu: torch.Tensor) -> tuple[float, float]:
    """Per-channel mean and std and mean within-image std of two sets of views agree; returns
    the fraction of grey views (all channels equal) of each."""

    def stats(views: torch.Tensor):
        channels_equal = (views - views[:, :1]).abs().amax(dim=(1, 2, 3)) < 1e-6
        return (
            views.mean(dim=(0, 2, 3)),
            views.std(dim=(0, 2, 3)),
            views.std(dim=(2, 3)).mean(0),
            float(channels_equal.float().mean()),
        )

    (mean_c, std_c, within_c, gray_c), (mean_o, std_o, within_o, gray_o) = stats(cpu), stats(ours)
    torch.testing.assert_close(mean_o, mean_c, atol=0.1, rtol=0)
    torch.testing.assert_close(std_o, std_c, atol=0.06, rtol=0)
    torch.testing.assert_close(within_o, within_c, atol=0, rtol=0.07)
    return gray_c, gray_o


def test_demo_recipe_views_match_its_cpu_recipe(tiny_fashion_mnist):
    """The demo's default input path (28 px images decoded as one grey channel, 32 px views, v2
    without blur, as ``pretrain/fashion_mnist_demo.yaml`` sets it) against its PIL recipe, on
    >= 600 views of the same images: the statistics of the test above."""
    cfg = setup_cfg("pretrain/fashion_mnist_demo.yaml", ["DATA.ROOT", str(tiny_fashion_mnist)])
    assert cfg.DATA.DEVICE_AUG and cfg.DATA.DEVICE_AUG_GREY  # the demo's default
    options = augmentation_options(cfg)
    images = [image for image, _ in FashionMNIST(tiny_fashion_mnist, split="train")]
    repeats = -(-600 // len(images))  # ceil
    torch.manual_seed(0)
    random.seed(0)
    cpu_recipe = pretrain_transform(**options)
    cpu = torch.stack([cpu_recipe(image) for _ in range(repeats) for image in images])
    decode = DecodeResize(pre_size=cfg.DATA.DEVICE_AUG_PRE_SIZE, grey=True)
    pixels, sizes, _ = (torch.stack(parts) for parts in zip(*map(decode, images), strict=True))
    assert pixels.shape[1:] == (1, 28, 28)
    ours = GpuMocoAugment(**options)(
        pixels.repeat(repeats, 1, 1, 1), source_sizes=sizes.repeat(repeats, 1)
    )
    assert _assert_view_statistics_match(ours, cpu) == (1.0, 1.0)  # grey images stay grey


@pytest.mark.parametrize("recipe", ["v2", "v1"])
def test_grey_channel_gives_the_views_of_its_rgb_copy(recipe):
    """One grey channel gives the 3-channel path's views of the replicated image, with the same
    parameters: saturation, hue and grayscale leave grey pixels grey. (The 3-channel path's float
    luma weights sum to 0.9999, so grey pixels move by up to 1e-4 there.)"""
    grey = torch.randint(0, 256, (64, 1, 20, 24), dtype=torch.uint8)
    aug = GpuMocoAugment(size=16, recipe=recipe, mean=MEAN, std=STD)
    uniforms = torch.rand(
        64, VIEW_DRAWS, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    one = aug(grey, uniforms=uniforms)
    three = aug(grey.expand(64, 3, 20, 24), uniforms=uniforms)
    assert one.shape == three.shape == (64, 3, 16, 16)
    torch.testing.assert_close(one, three, atol=2e-3, rtol=0)
    assert aug.sample_params(torch.tensor([[20, 24]]).expand(64, 2), uniforms=uniforms).jitter.any()


def test_grey_decoding_keeps_one_channel():
    image = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)).convert("RGB")
    pixels, size, uniforms = DecodeResize(pre_size=28, grey=True)(image)
    assert pixels.shape == (1, 28, 28) and size.tolist() == [28, 28]
    assert torch.equal(pixels[0], torch.arange(28 * 28, dtype=torch.uint8).view(28, 28))
    assert DecodeResize(pre_size=14)(image)[0].shape == (3, 14, 14)


def test_flip_rate_matches_the_cpu_recipe():
    """On a grey left-to-right ramp every op but the flip keeps the slope's sign."""
    ramp = np.repeat(np.linspace(60, 160, 40).astype(np.uint8)[None, :, None], 40, 0).repeat(3, 2)
    image = Image.fromarray(ramp)
    torch.manual_seed(0)
    random.seed(0)
    cpu_recipe = pretrain_transform(size=16, recipe="v2", mean=MEAN, std=STD)
    cpu = torch.stack([cpu_recipe(image) for _ in range(400)])
    ours = GpuMocoAugment(size=16, recipe="v2", mean=MEAN, std=STD)(
        _pixels(image)[None].repeat(400, 1, 1, 1)
    )

    def flip_rate(views: torch.Tensor) -> float:
        right, left = views[..., 8:].mean(dim=(1, 2, 3)), views[..., :8].mean(dim=(1, 2, 3))
        return float((right < left).float().mean())

    assert flip_rate(cpu) == pytest.approx(0.5, abs=0.08)
    assert flip_rate(ours) == pytest.approx(0.5, abs=0.08)


def test_parameter_rates_follow_the_recipe():
    torch.manual_seed(0)
    sizes = torch.tensor([[40, 40]]).expand(20000, 2)
    v2 = GpuMocoAugment(size=8, recipe="v2", mean=MEAN, std=STD).sample_params(sizes)
    rates = {k: float(getattr(v2, k).float().mean()) for k in ("jitter", "gray", "blur", "flip")}
    assert rates == pytest.approx({"jitter": 0.8, "gray": 0.2, "blur": 0.5, "flip": 0.5}, abs=0.015)
    assert v2.sigma.min() >= 0.1 and v2.sigma.max() <= 2.0
    assert v2.factors[:, :3].min() >= 0.6 and v2.factors[:, :3].max() <= 1.4
    assert v2.factors[:, 3].abs().max() <= 0.1
    assert len(set(map(tuple, v2.order.tolist()))) == 24  # all orders occur
    v1 = GpuMocoAugment(size=8, recipe="v1", mean=MEAN, std=STD).sample_params(sizes)
    assert bool(v1.jitter.all()) and not bool(v1.blur.any())
    assert v1.factors[:, 3].abs().max() > 0.35


# ----------------------------------------------------------------------------- loader path
def test_device_augment_takes_the_cpu_recipes_keys():
    opts = ["DATA.IMAGE_SIZE", "48", "DATA.AUG", "v2", "DATA.BLUR", "False"]
    cfg = setup_cfg(None, [*opts, "DATA.CROP_MIN_SCALE", "0.5", "DATA.MEAN", "[0.1, 0.2, 0.3]"])
    augment = GpuMocoAugment(**augmentation_options(cfg))
    assert (augment.size, augment.recipe, augment.scale, augment.blur_p) == (
        48,
        "v2",
        (0.5, 1.0),
        0.0,
    )
    assert augment.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert default_pre_size(224) == 336


def test_decode_loader_feeds_the_device_step(tiny_imagefolder):
    dataset = RobustImageFolder(tiny_imagefolder / "train", transform=DecodeResize(pre_size=48))
    (images, sizes, uniforms), labels = next(iter(DataLoader(dataset, batch_size=8)))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 48, 48)
    assert sizes.tolist() == [[40, 40]] * 8
    assert uniforms.shape == (8, 2, VIEW_DRAWS) and uniforms.dtype == torch.float64
    seen = {}

    def step_fn(model, batch):
        seen["model"], seen["batch"] = model, batch
        return torch.zeros(()), {}

    augment = GpuMocoAugment(size=32, mean=MEAN, std=STD)
    device_augment_step(step_fn, augment)("model", ((images, sizes, uniforms), labels))
    (im_q, im_k), got_labels = seen["batch"]
    assert seen["model"] == "model"
    assert im_q.shape == im_k.shape == (8, 3, 32, 32) and im_q.dtype == torch.float32
    assert not torch.equal(im_q, im_k) and torch.equal(got_labels, labels)
    # the views are a function of the loader's draws: the global RNG plays no part
    torch.manual_seed(123)
    again = augment.two_crops(images, source_sizes=sizes, uniforms=uniforms)
    assert torch.equal(again[0], im_q) and torch.equal(again[1], im_k)


def test_explicit_uniforms_give_the_generator_views():
    """A view drawn from a generator equals the view of the same numbers passed as uniforms."""
    aug = GpuMocoAugment(size=16, recipe="v2", mean=MEAN, std=STD)
    images = torch.randint(0, 256, (6, 3, 24, 20), dtype=torch.uint8)
    drawn = aug(images, generator=torch.Generator().manual_seed(5))
    uniforms = torch.rand(
        6, VIEW_DRAWS, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    assert torch.equal(aug(images, uniforms=uniforms), drawn)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_views_need_no_host_sync():
    aug = GpuMocoAugment(size=32, recipe="v2", mean=MEAN, std=STD).cuda()
    images = torch.randint(0, 256, (16, 3, 48, 40), dtype=torch.uint8, device="cuda")
    sizes = torch.tensor([[300, 400]], device="cuda").expand(16, 2)
    torch.cuda.set_sync_debug_mode("error")
    try:
        im_q, im_k = aug.two_crops(images, source_sizes=sizes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert im_q.shape == im_k.shape == (16, 3, 32, 32) and im_q.is_cuda
