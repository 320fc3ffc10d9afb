"""Noisy Visual Mixup: the perturbed view of an image that NRCA aligns against (paper Sec. 3.2, Eq. 2).

    mu = f_mu(x),  sigma = f_sigma(x)                          Eq. (2a)
    x~ = delta * N(mu, sigma^2) + (1 - delta) * x               Eq. (2b)

`x` is the image processor's *normalised* pixel tensor (what the vision tower receives), not raw
RGB. Two choices for mu and sigma:

- `stats="image"` (default, the paper): "its own feature space" — mean and standard deviation of each
  image over its (C, H, W) values, so a dark image gets dark noise and a busy image strong noise.
- `stats="batch"` (the released code): one scalar mean and one scalar std over the whole batch
  tensor (`images.mean()`, `images.std()`, torch's unbiased std), then `(noise + x) / 2`, which is
  Eq. (2b) at delta = 0.5. Use it to reproduce the released numbers.

Both use the unbiased standard deviation (torch's default `.std()`); over C*H*W values the difference
to the population std is negligible. Statistics and the noise are computed in float32 whatever the
input dtype; the result is cast back to the input's dtype. The noise is drawn with `generator` on the
input's device, so a seeded generator reproduces the noisy view exactly.

`noisy_pixel_values` applies Eq. (2) per image to whatever a model's vision side receives: the (B, C, H, W)
tensor of LLaVA / VILA, or a transformers processor's packed patches (Qwen2-VL) and tiles (LLaVA-OneVision,
Idefics3), where one image's values are spread over rows or tiles (`noisy_mixup_each` groups them).

Not done here: the second forward pass and the loss (nrca.py), choosing delta (train.py, `--delta`).

    python -c "import torch, noise; print(noise.noisy_mixup(torch.randn(2, 3, 8, 8)).shape)"
"""

from __future__ import annotations

import math

import torch

STATS = ("image", "batch")


def noisy_mixup(
    pixel_values: torch.Tensor,
    delta: float = 0.5,
    stats: str = "image",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Eq. (2a)-(2b): mix each image with Gaussian noise drawn from its own statistics.

    pixel_values: (..., C, H, W) floating tensor, at least one leading batch dim (several images per
        sample, e.g. (B, N, C, H, W), are fine: with `stats="image"` each (C, H, W) image has its own
        mu and sigma).
    delta: noisy ratio in [0, 1]; 0 returns a copy of the input (NRCA reduces to Full FT, Fig. 4),
        1 returns pure noise.
    stats: "image" (paper, per image) or "batch" (released code, one scalar pair for the tensor).
    generator: optional torch.Generator on the input's device for reproducible noise.

    Returns a new tensor with the shape, dtype and device of `pixel_values`.
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"noise.noisy_mixup: pixel_values must be a torch.Tensor, got {type(pixel_values)}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"noise.noisy_mixup: pixel_values must be a floating tensor, got {pixel_values.dtype}")
    if pixel_values.dim() < 4:
        raise ValueError(
            "noise.noisy_mixup: pixel_values must be (..., C, H, W) with a batch dim, "
            f"got shape {tuple(pixel_values.shape)}"
        )
    delta = float(delta)
    if not 0.0 <= delta <= 1.0:  # also rejects NaN
        raise ValueError(f"noise.noisy_mixup: delta (noisy ratio, Eq. 2b) must be in [0, 1], got {delta}")
    if stats not in STATS:
        raise ValueError(f"noise.noisy_mixup: stats must be one of {STATS}, got {stats!r}")
    values_per_stat = math.prod(pixel_values.shape[-3:]) if stats == "image" else pixel_values.numel()
    if values_per_stat < 2:
        raise ValueError(
            f"noise.noisy_mixup: stats={stats!r} needs at least 2 values to estimate sigma, "
            f"got shape {tuple(pixel_values.shape)}"
        )
    if generator is not None and generator.device.type != pixel_values.device.type:
        raise ValueError(
            f"noise.noisy_mixup: generator is on {generator.device}, pixel_values on {pixel_values.device}; "
            "the noise must be drawn on the input's device"
        )
    # One host sync per call: a NaN/inf pixel would poison mu and sigma of its whole image (or batch).
    if not bool(torch.isfinite(pixel_values).all()):
        raise ValueError("noise.noisy_mixup: pixel_values contains NaN or inf")

    if delta == 0.0:
        return pixel_values.clone()  # exactly the clean view, Full FT (Fig. 4)

    x = pixel_values.float()  # (..., C, H, W) fp32 statistics whatever the input dtype
    if stats == "image":
        # Eq. (2a), paper: each image's own statistics over its C, H, W values.
        mu = x.mean(dim=(-3, -2, -1), keepdim=True)  # (..., 1, 1, 1)
        sigma = x.std(dim=(-3, -2, -1), keepdim=True)  # (..., 1, 1, 1), unbiased
    else:
        # Eq. (2a), released code: one scalar pair over the whole batch tensor.
        mu = x.mean()  # ()
        sigma = x.std()  # (), unbiased, as torch's `.std()`
    standard_normal = torch.randn(
        x.shape, generator=generator, device=x.device, dtype=torch.float32
    )  # (..., C, H, W)
    noise = mu + sigma * standard_normal  # N(mu, sigma^2)
    noisy = delta * noise + (1.0 - delta) * x  # Eq. (2b): noisy part + normal part
    return noisy.to(pixel_values.dtype)


def noisy_mixup_each(
    images: list[torch.Tensor],
    delta: float = 0.5,
    stats: str = "image",
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Eq. (2a)-(2b) for images whose values do not form a (B, C, H, W) tensor: the packed patches of
    Qwen2-VL (`image_grid_thw`) or the tiles of LLaVA-NeXT / OneVision and Idefics3. The caller gathers
    each image's own normalised values into one tensor (any shape; for tiled layouts every real tile
    of the image, padding left out) and scatters the results back (noisy_pixel_values, below).

    stats="image": mu and sigma over all values of that tensor (one image = one group, so a tiled
    image gets ONE pair over all its tiles, not one per tile); stats="batch": one pair over all values
    of all the tensors (the released code). Each tensor goes through `noisy_mixup` unchanged, so the
    maths, the checks and delta = 0 (an exact copy) are those above. Returns new tensors, same shapes.
    """
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"noise.noisy_mixup_each: images must be a non-empty list of tensors, got {type(images)}")
    shapes = [tuple(image.shape) for image in images]
    if stats == "batch":  # Eq. (2a), released code: one scalar pair over every value of the batch
        flat = torch.cat([image.reshape(-1) for image in images])  # (sum of numel,)
        mixed = noisy_mixup(flat.view(1, 1, 1, -1), delta=delta, stats="batch", generator=generator).reshape(-1)
        return [part.reshape(shape) for part, shape in zip(mixed.split([image.numel() for image in images]),
                                                            shapes, strict=True)]
    # Eq. (2a), paper: each image's own statistics, viewed as one (1, 1, 1, n) "image" for noisy_mixup.
    return [noisy_mixup(image.reshape(1, 1, 1, -1), delta=delta, stats=stats, generator=generator).reshape(shape)
            for image, shape in zip(images, shapes, strict=True)]


def noisy_pixel_values(pixel_values, config=None, delta: float = 0.5, stats: str = "image", generator=None):
    """Eq. (2a)-(2b) per image on what a model's vision side receives, whatever its layout: a (B, C, H, W)
    tensor (LLaVA-1.5, VILA1.5: `noisy_mixup`, one row per image), or the dict of a transformers processor's
    image tensors (hf_models.HFMLLM) holding the normalised pixels under "pixel_values":
    - Qwen2-VL / Qwen2.5-VL packed patches (`image_grid_thw`): image i owns prod(image_grid_thw[i]) rows; a
      still image is `temporal_patch_size` equal copies, and its noisy view gets one draw shared by the copies
      (it stays a still image); copies that differ (a video) are refused;
    - LLaVA-NeXT / OneVision anyres tiles (`image_sizes`): the first n_b tiles of row b are real, n_b from the
      image size and `config.image_grid_pinpoints`; Idefics3 / SmolVLM tiles: all-zero tiles are padding and
      `pixel_attention_mask` marks the real pixels. One mu / sigma per IMAGE over all its real tiles (views of
      one picture: a tile's own statistics would give a dark corner dark noise); padding stays exactly zero,
      since the models recognise it by its zeros.
    Every other key of the dict (grids, sizes, masks) is passed through. `config`: the model's config (packed
    patches and anyres need it)."""
    if torch.is_tensor(pixel_values):
        return noisy_mixup(pixel_values, delta=delta, stats=stats, generator=generator)
    images = pixel_values
    pixels = images["pixel_values"]
    out = dict(images)
    if config is None and ("image_grid_thw" in images or "image_sizes" in images):
        raise ValueError(f"noise.noisy_pixel_values: packed patches and anyres tiles (keys {sorted(images)}) need the "
                         "model's config (temporal patch size, grid pinpoints) to find each image's values")
    if "image_grid_thw" in images:  # (sum_i t*h*w, C * T * p * p) packed patches
        vision = config.vision_config
        frames = vision.temporal_patch_size
        patches = pixels.reshape(pixels.shape[0], vision.in_channels, frames, -1)  # (P, C, T, p*p)
        if not torch.equal(patches, patches[:, :, :1].expand_as(patches)):
            raise ValueError("noise.noisy_pixel_values: the temporal copies of a packed patch differ (a video?); "
                             "Noisy Visual Mixup here is for still images")
        counts = images["image_grid_thw"].prod(-1).tolist()  # patches per image
        first = patches[:, :, 0]  # (P, C, p*p): one frame
        mixed = noisy_mixup_each(list(first.split(counts)), delta=delta, stats=stats, generator=generator)
        noisy = torch.cat(mixed)[:, :, None].expand_as(patches)  # (P, C, T, p*p): one draw for every copy
        out["pixel_values"] = noisy.reshape(pixels.shape).contiguous()
        return out
    if pixels.dim() == 4:  # (B, C, H, W) inside a dict: one image per row
        out["pixel_values"] = noisy_mixup(pixels, delta=delta, stats=stats, generator=generator)
        return out
    if pixels.dim() != 5:
        raise ValueError(f"noise.noisy_pixel_values: pixel_values {tuple(pixels.shape)} with keys {sorted(images)}: "
                         "expected (B, C, H, W), tiles (B, n, C, H, W) or packed patches with image_grid_thw")
    if "image_sizes" in images:  # anyres: the first n_b tiles of row b are real
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        counts = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                  for size in images["image_sizes"].tolist()]
        valid = torch.zeros(pixels.shape[:2], dtype=torch.bool, device=pixels.device)  # (B, n)
        for row, count in enumerate(counts):
            valid[row, :count] = True
        valid = valid[:, :, None, None, None].expand_as(pixels)  # (B, n, C, H, W)
    else:  # Idefics3 / SmolVLM: all-zero tiles are padding (the model's own rule), pixel_attention_mask marks pixels
        real = (pixels != 0).flatten(2).any(-1)  # (B, n)
        valid = real[:, :, None, None, None].expand_as(pixels)
        if "pixel_attention_mask" in images:
            valid = valid & images["pixel_attention_mask"].bool()[:, :, None].expand_as(pixels)
    groups = [pixels[row][valid[row]] for row in range(pixels.shape[0])]  # each image's own values, (n_b,)
    noisy = pixels.clone()
    for row, mixed in enumerate(noisy_mixup_each(groups, delta=delta, stats=stats, generator=generator)):
        noisy[row][valid[row]] = mixed
    out["pixel_values"] = noisy
    return out
