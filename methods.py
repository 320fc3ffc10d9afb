"""What one training step optimises: the method interface, Full FT and NRCA (paper Sec. 3.2, Alg. 1).

A *method* turns a collated batch into a scalar loss. `train.py` owns everything else (data, optimiser,
distribution, checkpoints) and calls a method through four hooks:

    method = METHOD(cfg, mllm, named_trainable_params)   # once, after the model is frozen/wrapped
    loss, metrics = method.loss(forward, batch)          # every micro-batch; train.py calls backward
    method.after_optimizer_step()                        # every optimiser step (masks, SPIDER)
    method.extra_memory_bytes()                          # reported at start (paper Table 2)
    method.state_dict() / method.load_state_dict(state)  # resumable state (masks, accumulators)

`forward(attention_mask, logits_mask, input_ids=None, pixel_values=None, inputs_embeds=None)` runs the
(DDP/FSDP-wrapped) model and returns the logits of the rows where `logits_mask` (B, T) is True, as a
(N, V) tensor: the full (B, T, V) logits are never built on the training path.

Counterparts live in their own files (baselines.py, spider.py, modality_interference.py) and are found
through `METHODS`; adding one is a small class with the hooks above.

All methods share the released code's CE reduction (NOTES.md): per-sample mean over its answer
tokens, then the mean over samples (Eq. 5a), so `lam = 0` or `delta = 0` reduces NRCA to Full FT.
"""

from __future__ import annotations

import importlib
import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F

from confidence_kernel import token_confidence
from noise import noisy_mixup, noisy_pixel_values
from nrca import IGNORE_INDEX, answer_mean, answer_positions, nrca_objective, to_grid


def model_forward(model, via_hidden: bool | None = None):
    """The `forward` callable methods receive: answer-row logits (N, V) from `model` (maybe wrapped by DDP),
    for both model kinds (models.py): pixel_values a (B, C, H, W) tensor, or the dict of a transformers
    processor's image tensors (unpacked into the call). A training forward: no KV cache (use_cache=False).
    The rows are chosen by `logits_to_keep` = the bool (B, T) mask, so the full (B, T, V) logits are never
    built. A model whose forward takes no `logits_to_keep` (none of the tested families) gets the fallback
    (via_hidden; None: decided by the signature): the base model's (`model.model`) last hidden state at the
    answer rows through `get_output_embeddings()`; it has no logit soft-capping or scaling a family may add in
    its own head, and it bypasses DDP's and FSDP2's root forward, so it is refused on several ranks."""
    inner = getattr(model, "module", model)
    if via_hidden is None:
        via_hidden = "logits_to_keep" not in inspect.signature(inner.forward).parameters
    if via_hidden and (model is not inner or (dist.is_initialized() and dist.get_world_size() > 1)):
        raise ValueError(f"{type(inner).__name__}.forward takes no logits_to_keep, and the fallback (the base model "
                         "and lm_head called directly) would bypass DDP's gradient sync and FSDP2's root: run it "
                         "on one rank")

    def forward(attention_mask, logits_mask, input_ids=None, pixel_values=None, inputs_embeds=None):
        images = pixel_values if isinstance(pixel_values, dict) else {"pixel_values": pixel_values}
        if not via_hidden:
            return model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         logits_to_keep=logits_mask, use_cache=False, **images).logits  # (N, V)
        hidden = inner.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             use_cache=False, **images).last_hidden_state  # (B, T, H)
        return inner.get_output_embeddings()(hidden[logits_mask])  # (N, H) -> (N, V)

    return forward


class Method:
    """Full fine-tuning: plain CE (Eq. 5a), the base every other method builds on."""

    name = "full"

    def __init__(self, cfg, mllm, named_params):
        self.cfg = cfg
        self.mllm = mllm
        self.named_params = list(named_params)

    # --- the pieces other methods reuse -------------------------------------------------------
    def token_stats(self, forward, batch, pixel_values=None, inputs_embeds=None):
        """Per-token (confidence, nll) on the (B, T) grid for one branch, and the answer mask."""
        logits_mask, targets = answer_positions(batch["labels"])
        if inputs_embeds is not None:
            logits = forward(batch["attention_mask"], logits_mask, inputs_embeds=inputs_embeds)
        else:
            pixels = batch["pixel_values"] if pixel_values is None else pixel_values
            logits = forward(batch["attention_mask"], logits_mask, input_ids=batch["input_ids"],
                             pixel_values=pixels)  # (N, V)
        confidence, nll = token_confidence(logits, targets)  # (N,), (N,)
        return to_grid(confidence, logits_mask), to_grid(nll, logits_mask), logits_mask

    @staticmethod
    def sample_mean_ce(nll, mask):
        """Eq. (5a) per sample, then the mean over samples that have an answer token."""
        ce, has_answer = answer_mean(nll, mask)  # (B,), (B,)
        n = has_answer.sum()
        return (ce * has_answer).sum() / n.clamp(min=1), int(n), int((~has_answer).sum())

    # --- the hooks ------------------------------------------------------------------------------
    def loss(self, forward, batch):
        _, nll, mask = self.token_stats(forward, batch)
        ce, _, n_empty = self.sample_mean_ce(nll, mask)
        return ce, {"ce": ce.detach(), "n_empty": n_empty}

    def after_optimizer_step(self):
        pass

    def extra_memory_bytes(self) -> int:
        return 0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


FullFinetune = Method


class NRCA(Method):
    """Noise Resilient Confidence Alignment: Eq. (2) noisy view, Eq. (4)-(6) loss.

    `cfg.nrca_impl == "fused"` (ours): clean and noisy images in one forward of 2B samples with the text shared,
    logits only at answer rows, the fused confidence kernel on both branches.
    `cfg.nrca_impl == "released"`: the authors' way, two forwards with full fp32 (B, T, V) logits, softmax and
    PyTorch cross entropy; kept for comparison and for bench/bench_step.py. Both feed the same
    `nrca_objective`, so they agree up to float rounding.
    """

    name = "nrca"
    # train.py sets this on the steps of --diagnose-every: (ce, lam * alignment) -> gradient metrics.
    diagnose = None

    def noisy_pixels(self, batch):
        # Eq. (2a)-(2b) per image, in the model's pixel layout; a per-step generator keeps the noise reproducible
        # across resume and ranks.
        generator = torch.Generator(device=batch["attention_mask"].device)
        generator.manual_seed(int(batch["noise_seed"]))
        return noisy_pixel_values(batch["pixel_values"], getattr(self.mllm.model, "config", None),
                                  delta=self.cfg.delta, stats=self.cfg.noise_stats, generator=generator)

    def loss(self, forward, batch):
        if self.cfg.lam == 0 or self.cfg.delta == 0:
            # Eq. (6) with lam = 0 is CE; with delta = 0, Eq. (2b) gives x~ = x, so I~ = I and Eq. (5b) is 0.
            # Either way NRCA is Full FT (paper Fig. 4): skip the noisy branch, so the update is exactly Full FT's.
            return super().loss(forward, batch)
        if not has_pictures(batch):  # text-only samples alone: no noisy view, CE only (nrca.py)
            return super().loss(forward, batch)
        noisy = self.noisy_pixels(batch)
        if self.cfg.nrca_impl == "released":
            clean_stats = released_token_stats(forward, batch, batch["pixel_values"])
            noisy_stats = released_token_stats(forward, batch, noisy)
        else:
            clean_stats, noisy_stats = self.two_branch_stats(forward, batch, noisy)
        (confidence, nll, mask), (noisy_confidence, _, _) = clean_stats, noisy_stats
        out = nrca_objective(nll, confidence, noisy_confidence, mask, lam=self.cfg.lam,
                             min_open_tokens=self.cfg.min_open_tokens,
                             alignment=self.cfg.nrca_alignment, has_image=batch.get("has_image"))
        metrics = {"ce": out.ce.detach(), "alignment": out.alignment.detach(),
                   "n_open": int(out.n_open), "n_empty": int(out.n_empty),
                   # Eq. (5b) made visible: mean I and I~ of the open samples, share with I~ > I.
                   "confidence": out.open_confidence, "noisy_confidence": out.open_noisy_confidence,
                   "noisy_above_clean": out.noisy_above_clean}
        if self.diagnose is not None:
            metrics.update(self.diagnose(out.ce, self.cfg.lam * out.alignment))
        return out.total, metrics

    def two_branch_stats(self, forward, batch, noisy):
        """One forward of 2B samples: [clean; noisy] images, the same token ids twice."""
        logits_mask, targets = answer_positions(batch["labels"])
        logits = forward(batch["attention_mask"].repeat(2, 1), logits_mask.repeat(2, 1),
                         input_ids=batch["input_ids"].repeat(2, 1),
                         pixel_values=cat_images(batch["pixel_values"], noisy))  # (2N, V)
        confidence, nll = token_confidence(logits, targets.repeat(2))  # (2N,), (2N,)
        n = targets.numel()
        clean = (to_grid(confidence[:n], logits_mask), to_grid(nll[:n], logits_mask), logits_mask)
        noisy_ = (to_grid(confidence[n:], logits_mask), to_grid(nll[n:], logits_mask), logits_mask)
        return clean, noisy_


class NoisyAugmentedPretraining(Method):
    """The testbed's base-model stage (testbed.py): plain CE, but each image is, with probability 1/2,
    replaced by a Noisy Visual Mixup view (Eq. 2b) with its own delta drawn from U(0, D), D =
    cfg.base_noise_max_delta (train.py --base-noise-max-delta). The dial sets how the base reads NRCA's noisy view:
    a real MLLM's tower has seen degraded pictures in pre-training; a tiny one trained on clean pictures only
    (D = 0: the draws still happen, but every view is the clean picture, bit for bit) reads a delta = 0.5 view
    much worse, while with D = 0.6 it is as confident on that view as on the clean picture (the first testbed
    study's base, README)."""

    name = "pretrain"

    def loss(self, forward, batch):
        pixels = batch["pixel_values"]  # (B, C, H, W)
        if not torch.is_tensor(pixels):
            raise ValueError("method 'pretrain' (the testbed's base stage) is for the tiny LLaVA / VILA models")
        generator = torch.Generator(device=pixels.device)
        generator.manual_seed(int(batch["noise_seed"]))
        pure_noise = noisy_mixup(pixels, delta=1.0, stats="image", generator=generator)  # N(mu, sigma^2) per image
        shape = (pixels.shape[0],) + (1,) * (pixels.dim() - 1)
        max_delta = float(self.cfg.base_noise_max_delta)
        delta = torch.rand(shape, generator=generator, device=pixels.device) * max_delta  # (B, 1, 1, 1)
        delta = delta * (torch.rand(shape, generator=generator, device=pixels.device) < 0.5)
        augmented = delta * pure_noise + (1 - delta) * pixels  # Eq. (2b) with a per-image delta
        _, nll, mask = self.token_stats(forward, batch, pixel_values=augmented)
        ce, _, n_empty = self.sample_mean_ce(nll, mask)
        return ce, {"ce": ce.detach(), "n_empty": n_empty}


def has_pictures(batch) -> bool:
    """Whether any sample of the batch has a picture (data.collate: `has_image` is there when some have none; a
    generic family's batch of text-only samples keeps its token-aligned extras in pixel_values)."""
    return batch["pixel_values"] is not None and ("has_image" not in batch or bool(batch["has_image"].any()))


def cat_images(clean, noisy):
    """[clean; noisy] images along the batch: a (B, C, H, W) tensor, or the generic path's dict of image tensors."""
    if isinstance(clean, dict):
        return {key: torch.cat([clean[key], noisy[key]]) for key in clean}
    return torch.cat([clean, noisy])


def released_token_stats(forward, batch, pixel_values):
    """The released code's per-token statistics: full fp32 logits, softmax, F.cross_entropy."""
    labels = batch["labels"]
    everything = torch.ones_like(labels, dtype=torch.bool)
    logits = forward(batch["attention_mask"], everything, input_ids=batch["input_ids"],
                     pixel_values=pixel_values).float()  # (B*T, V) fp32, as released
    logits = logits.view(*labels.shape, -1)[:, :-1]  # (B, T-1, V)
    next_labels = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(logits.transpose(1, 2), next_labels, ignore_index=IGNORE_INDEX,
                          reduction="none")  # (B, T-1)
    probs = logits.softmax(-1)  # (B, T-1, V): the N x V probabilities our kernel never builds
    mask = next_labels != IGNORE_INDEX
    confidence = probs.gather(-1, next_labels.clamp(min=0)[..., None])[..., 0] * mask  # (B, T-1)
    pad = labels.new_zeros(labels.shape[0], 1, dtype=torch.bool)
    grid = lambda x: torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)  # back to (B, T)
    return grid(confidence), grid(nll), torch.cat([mask, pad], dim=1)


# Registry: name -> "module:Class". Imported lazily so a counterpart's file is only read when used.
METHODS = {
    "full": "methods:FullFinetune",
    "pretrain": "methods:NoisyAugmentedPretraining",
    "nrca": "methods:NRCA",
    "l2": "baselines:L2Reg",
    "grafting": "baselines:Grafting",
    "random-mask": "baselines:RandomMask",
    "magnitude-mask": "baselines:MagnitudeMask",
    "spider": "spider:Spider",
    "mi-consistency": "modality_interference:ModalityInterferenceConsistency",
}


def get_method(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    module_name, class_name = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
