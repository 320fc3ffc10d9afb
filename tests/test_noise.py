"""Tests for noise.py: Noisy Visual Mixup (paper Eq. 2a-2b), per-image (paper) and batch (released) stats.

    python -m pytest -q tests/test_noise.py
"""

import pytest
import torch

from noise import noisy_mixup


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def scaled_images(shape=(2, 3, 16, 16), means=(2.0, -1.0), stds=(3.0, 0.1), seed=0):
    """A batch whose images have very different statistics, as normalised pixels of a bright, busy
    image and a dark, flat one would."""
    x = torch.randn(shape, generator=seeded(seed))
    for i, (mean, std) in enumerate(zip(means, stds, strict=True)):
        x[i] = mean + std * x[i]
    return x


@pytest.mark.parametrize("stats", ["image", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 3, 5, 7), (2, 2, 3, 4, 4)])
def test_shape_dtype_device(stats, dtype, shape):
    x = torch.randn(shape, generator=seeded(0)).to(dtype)
    before = x.clone()
    out = noisy_mixup(x, delta=0.5, stats=stats, generator=seeded(1))
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.isfinite(out.float()).all()
    assert torch.equal(x, before), "the input must not be modified"
    assert not torch.equal(out, x)


@pytest.mark.parametrize("stats", ["image", "batch"])
def test_statistics_in_float32(stats):
    """A bf16 input gives the fp32 computation on the same values, rounded once at the end."""
    x = torch.randn(2, 3, 8, 8, generator=seeded(0)).to(torch.bfloat16)
    out = noisy_mixup(x, stats=stats, generator=seeded(2))
    expected = noisy_mixup(x.float(), stats=stats, generator=seeded(2)).to(torch.bfloat16)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stats", ["image", "batch"])
def test_delta_zero_returns_input(dtype, stats):
    x = scaled_images().to(dtype)
    out = noisy_mixup(x, delta=0.0, stats=stats, generator=seeded(3))
    assert torch.equal(out, x)
    assert out.data_ptr() != x.data_ptr(), "a copy, so callers may modify it"


def test_delta_one_matches_each_image_statistics():
    """At delta = 1 the output is pure N(mu, sigma^2) noise with each image's own mu and sigma.
    With n = 3 * 128 * 128 = 49152 samples the sample mean is within 5 sigma / sqrt(n) ~ 0.023 sigma
    and the sample std within ~2% of sigma (its standard error is sigma / sqrt(2n) ~ 0.3%)."""
    x = scaled_images(shape=(2, 3, 128, 128))
    out = noisy_mixup(x, delta=1.0, stats="image", generator=seeded(4))
    n = x[0].numel()
    for i in range(2):
        mu, sigma = x[i].mean(), x[i].std()
        assert abs(out[i].mean() - mu) < 5 * sigma / n**0.5, (i, out[i].mean(), mu)
        assert abs(out[i].std() / sigma - 1) < 0.02, (i, out[i].std(), sigma)
    # Nothing of the clean image is left: correlation with the input is sampling noise only.
    corr = torch.corrcoef(torch.stack([out[0].flatten(), x[0].flatten()]))[0, 1]
    assert abs(corr) < 0.05


def test_mixup_formula_per_image():
    """Eq. (2b) with the generator's draws: x~ = delta (mu + sigma * eps) + (1 - delta) x."""
    x = scaled_images()
    delta = 0.3
    out = noisy_mixup(x, delta=delta, stats="image", generator=seeded(5))
    eps = torch.randn(x.shape, generator=seeded(5))
    mu = x.mean(dim=(1, 2, 3), keepdim=True)
    sigma = x.std(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out, delta * (mu + sigma * eps) + (1 - delta) * x)


def test_batch_stats_is_released_formula():
    """Released code: noise = randn_like * images.std() + images.mean(); x~ = (noise + x) / 2."""
    x = scaled_images()
    out = noisy_mixup(x, delta=0.5, stats="batch", generator=seeded(6))
    noise = torch.randn(x.shape, generator=seeded(6)) * x.std() + x.mean()
    torch.testing.assert_close(out, (noise + x) / 2)


def test_image_and_batch_stats_differ():
    """The flat dark image gets its own small noise per image, but the batch's large noise with
    batch statistics."""
    x = scaled_images(shape=(2, 3, 32, 32))
    per_image = noisy_mixup(x, delta=1.0, stats="image", generator=seeded(7))
    per_batch = noisy_mixup(x, delta=1.0, stats="batch", generator=seeded(7))
    assert not torch.allclose(per_image, per_batch)
    assert per_image[1].std() < 0.2  # image 1 has sigma 0.1
    assert per_batch[1].std() > 1.0  # batch sigma is about 2.3
    assert abs(per_image[1].mean() + 1.0) < 0.05  # image 1's own mean, -1
    assert abs(per_batch[1].mean() - x.mean()) < 0.5  # the batch mean, about 0.5


def test_extra_leading_dims_use_each_image():
    """(B, N, C, H, W): statistics per (C, H, W) image, i.e. the same as flattening B and N."""
    x = scaled_images(shape=(4, 3, 8, 8), means=(2.0, -1.0, 0.0, 5.0), stds=(3.0, 0.1, 1.0, 0.5))
    out = noisy_mixup(x.view(2, 2, 3, 8, 8), stats="image", generator=seeded(8))
    flat = noisy_mixup(x, stats="image", generator=seeded(8))
    assert torch.equal(out.view(4, 3, 8, 8), flat)


def test_generator_determinism():
    x = scaled_images()
    a = noisy_mixup(x, generator=seeded(9))
    b = noisy_mixup(x, generator=seeded(9))
    c = noisy_mixup(x, generator=seeded(10))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_constant_image_is_finite():
    x = torch.zeros(2, 3, 4, 4)
    x[1] = 0.7
    out = noisy_mixup(x, delta=0.5, stats="image", generator=seeded(11))
    # sigma = 0: the noise is the image's mean, so x~ = x up to the rounding of the mean.
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"delta": -0.1}, "delta"),
        ({"delta": 1.5}, "delta"),
        ({"delta": float("nan")}, "delta"),
        ({"stats": "pixel"}, "stats"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        noisy_mixup(torch.randn(2, 3, 4, 4), **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(bad):
    x = torch.randn(2, 3, 4, 4)
    x[1, 2, 3, 0] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        noisy_mixup(x)


def test_bad_tensor_raises():
    with pytest.raises(ValueError, match="floating"):
        noisy_mixup(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(\.\.\., C, H, W\)"):
        noisy_mixup(torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match="at least 2 values"):
        noisy_mixup(torch.randn(2, 1, 1, 1), stats="image")
