"""Modality-interference consistency fine-tuning (arXiv 2505.19616, "Diagnosing and Mitigating Modality
Interference in MLLMs"), a related method run in the same harness as NRCA's counterparts.

The paper makes a model ignore the modality a task does not need. Every sample is labelled by which
modality its answer depends on, and the *other* (irrelevant) modality is perturbed:

- image-heavy sample (answer depends on the image): misleading or unrelated text is added;
- text-heavy sample (answer depends on the text): the image is replaced by an unrelated image or an
  all-black / all-white canvas;
- plain VQA sample (needs both): not perturbed.

Two kinds of perturbation, both optional (`mi_heuristic`, `mi_pgd`):

1. Heuristic (one perturbed copy per perturbable sample and step, variant drawn at random):
   text: "This picture seems to depict a {random wrong option}." (multiple choice only), one
   unrelated fact, or ten unrelated facts, inserted right after the image tokens (before the
   question); image: another sample's image of the batch, a black canvas or a white canvas.
2. PGD on the LLM input embeddings (after the connector), restricted to the irrelevant modality's
   positions m (text tokens except answer tokens for image-heavy rows, image tokens for text-heavy rows):

       delta_0 ~ U(-eps, eps)
       delta_{k+1} = clip(delta_k + alpha * grad_delta CE(e + m * delta_k), -eps, eps)   (raw gradient)

   `pgd_steps` times, on every unperturbed row and heuristic copy. The ascent uses
   `torch.autograd.grad` with respect to delta only, so no parameter's `.grad` is touched and the weights
   are the same during all steps. CE here is the sum over rows of each row's mean answer-token CE, so a
   row's step does not depend on how many rows share its batch (the released code uses the batch token
   mean).

The loss of one step (paper Sec. 4, released reduction adapted to our per-sample CE):

    L = CE(originals and heuristic copies) + CE(their PGD copies) + lam * consistency
    consistency = mean_samples mean_views sum_answer_positions sum_vocab D(q_view || p_clean)

with `p_clean` the detached clean distribution of the same answer token (temperature 1) and D either
KL(q || p) (`mi_divergence="kl"`, the paper's default) or the Jensen-Shannon divergence
0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2 (`"js"`, reported slightly stronger). The views of a
sample are its heuristic copy, its PGD copy and the PGD copy of its heuristic copy. CE terms are means
over rows of each row's mean answer-token CE (Eq. 5a of NRCA, the reduction every method here shares).
Distributions are only built on the answer rows: (N, V) logits, never (B, T, V).

Our caption / multiple-choice mix: every sample's answer depends on its image, so every sample is
image-heavy and gets the text perturbations; `perturbation_kind(task)` documents the mapping and also
accepts "text-heavy" and "vqa" tasks for mixes that have them.

Cost (per step, nothing persistent: `extra_memory_bytes() == 0`): with B samples, all image-heavy, the
main forward runs 4B rows (clean, heuristic, 2 PGD copies; heuristic rows are longer by the inserted
text) instead of Full FT's B, so ~4x its activations, plus (N, V) fp32 log-probabilities and two
(N_view, V) gathers for the consistency. Each PGD step is an extra forward and backward of 2B rows
through *all* decoder layers (the gradient must reach the input embeddings), freed before the next.

Randomness (variants, unrelated-image partner, delta_0) comes from generators seeded with
`batch["noise_seed"]`, so a step is reproducible across resume and distinct per rank.

Not done here: reading option lists from the data (the options of a choice question are parsed back from
its tokens, or taken from `batch["options"]` when collate provides it); the paper's diagnostic
experiments; the temperature of the consistency (fixed at 1 as in the paper's runs).

    TRITON_INTERPRET=1 python -m pytest -q tests/test_modality_interference.py
    python train.py --method mi-consistency --mi-divergence js
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from data import pad_sequences
from methods import IGNORE_INDEX, Method, answer_positions, model_forward
from nrca import answer_mean, to_grid

# Which modality a task's answer depends on. "caption" and "choice" (our mix) are about the image.
TASK_MODALITY = {
    "caption": "image-heavy",
    "choice": "image-heavy",
    "image-heavy": "image-heavy",
    "text-heavy": "text-heavy",
    "text": "text-heavy",
    "vqa": "vqa",
}
PERTURBATION = {"image-heavy": "text", "text-heavy": "image", "vqa": "none"}
TEXT_VARIANTS = ("misleading", "one fact", "ten facts")
IMAGE_VARIANTS = ("unrelated", "black", "white")
MISLEADING = "This picture seems to depict a {option}."
NUM_FACTS = 10  # the paper's "ten unrelated facts" variant
# Our own short general-knowledge sentences, none about images.
UNRELATED_FACTS = (
    "Water boils at 100 degrees Celsius at sea level.",
    "The Pacific is the largest ocean on Earth.",
    "A year on Mars lasts about 687 Earth days.",
    "Honey can stay edible for a very long time.",
    "The human heart has four chambers.",
    "Mount Everest is the highest mountain above sea level.",
    "Light from the Sun reaches Earth in about eight minutes.",
    "Octopuses have three hearts.",
    "The chess board has sixty-four squares.",
    "Sound travels faster in water than in air.",
    "Bamboo is one of the fastest growing plants.",
    "The Great Wall of China is thousands of kilometres long.",
    "A triangle has angles that add up to 180 degrees.",
    "Penguins live mostly in the Southern Hemisphere.",
    "Iron is the main element of the Earth's core.",
    "The violin usually has four strings.",
)


def perturbation_kind(task: str) -> str:
    """"text" (image-heavy task: perturb the text), "image" (text-heavy: perturb the image) or "none" (VQA).

    Every task of our caption / multiple-choice mix answers from the image, so both map to "text".
    """
    if task not in TASK_MODALITY:
        raise ValueError(f"modality_interference: batch['tasks'] has task {task!r}; expected one of "
                         f"{sorted(TASK_MODALITY)}")
    return PERTURBATION[TASK_MODALITY[task]]


# ----------------------------------------------------------------------------------------------------
# Heuristic image perturbations (text-heavy samples)


def canvas_value(image_processor, colour: str) -> torch.Tensor:
    """(C,) normalised pixel value of an all-black or all-white image: (rescale * {0, 255} - mean) / std."""
    if colour not in ("black", "white"):
        raise ValueError(f"canvas_value: colour must be 'black' or 'white', got {colour!r}")
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float64)  # (C,)
    std = torch.tensor(image_processor.image_std, dtype=torch.float64)  # (C,)
    rescale = image_processor.rescale_factor if getattr(image_processor, "do_rescale", True) else 1.0
    raw = 0.0 if colour == "black" else 255.0 * rescale
    normalise = getattr(image_processor, "do_normalize", True)
    return ((raw - mean) / std).float() if normalise else torch.full_like(mean, raw).float()


def blank_images(pixel_values: torch.Tensor, image_processor, colour: str) -> torch.Tensor:
    """A canvas of one colour shaped like `pixel_values` (B, C, H, W), in normalised pixel space."""
    value = canvas_value(image_processor, colour).to(pixel_values.device, pixel_values.dtype)  # (C,)
    if pixel_values.dim() < 3 or pixel_values.shape[-3] != value.numel():
        raise ValueError(f"blank_images: pixel_values {tuple(pixel_values.shape)} must be (..., C, H, W) with "
                         f"C = {value.numel()} channels of the image processor")
    return value[:, None, None].expand(pixel_values.shape).clone()


# ----------------------------------------------------------------------------------------------------
# Heuristic text perturbations (image-heavy samples), on token ids


def parse_options(question: str) -> dict[str, str]:
    """Option letter -> text from a multiple-choice question: "A. cat" lines or inline "(A) cat (B) dog"."""
    question = question.split("ASSISTANT:")[0]
    options = dict(re.findall(r"^\s*([A-Z])[.)]\s+(.+?)\s*$", question, flags=re.M))
    if len(options) < 2:
        options = dict(re.findall(r"\(([A-Z])\)\s*([^()\n]+?)\s*(?=\([A-Z]\)|\n|$)", question))
    return options if len(options) >= 2 else {}


def answer_letter(answer: str) -> str | None:
    match = re.match(r"^\s*\(?([A-Z])\b", answer)
    return match.group(1) if match else None


def insert_tokens(input_ids, labels, length, position, new_ids):
    """One row (T,) with `new_ids` (L,) inserted before `position`; labels -100 on them, the rest shifted.

    Only the first `length` tokens (right padding) are kept; returns (input_ids, labels) of length + L."""
    ids = torch.cat([input_ids[:position], new_ids, input_ids[position:length]])  # (length + L,)
    ignore = torch.full_like(new_ids, IGNORE_INDEX)  # (L,)
    return ids, torch.cat([labels[:position], ignore, labels[position:length]])


def pad_rows(rows, pad_token_id: int, length: int | None = None):
    """Right-pad a list of (input_ids, labels) rows -> input_ids, attention_mask, labels (R, T)."""
    width = length or 0
    input_ids = pad_sequences([ids for ids, _ in rows], pad_token_id, width=width)  # (R, T)
    attention_mask = pad_sequences([torch.ones_like(ids) for ids, _ in rows], 0, width=width)  # (R, T)
    labels = pad_sequences([lab for _, lab in rows], IGNORE_INDEX, width=width)  # (R, T)
    return input_ids, attention_mask, labels


def _randint(n: int, generator: torch.Generator) -> int:
    return int(torch.randint(n, (1,), generator=generator))


def misleading_sentence(question: str, answer: str, generator, options: list[str] | None = None) -> str | None:
    """"This picture seems to depict a {random wrong option}." or None when no wrong option is known."""
    letters = parse_options(question) if options is None else {chr(65 + i): o for i, o in enumerate(options)}
    correct = answer_letter(answer)
    wrong = [text for letter, text in letters.items() if letter != correct]
    if correct not in letters or not wrong:
        return None
    return MISLEADING.format(option=wrong[_randint(len(wrong), generator)].rstrip("."))


def unrelated_facts(n: int, generator) -> str:
    order = torch.randperm(len(UNRELATED_FACTS), generator=generator)[:n]
    return " ".join(UNRELATED_FACTS[int(i)] for i in order)


# ----------------------------------------------------------------------------------------------------
# PGD on the input embeddings


def irrelevant_positions(input_ids, attention_mask, labels, kinds, image_token_id) -> torch.Tensor:
    """(R, T) bool: where PGD may perturb. "text" rows: attended text tokens except answer tokens;
    "image" rows: image tokens; "none" rows: nowhere."""
    image = input_ids == image_token_id  # (R, T)
    text = attention_mask.bool() & ~image & (labels == IGNORE_INDEX)  # (R, T)
    kind = torch.tensor([{"text": 0, "image": 1, "none": 2}[k] for k in kinds], device=input_ids.device)[:, None]
    return torch.where(kind == 0, text, torch.where(kind == 1, image, torch.zeros_like(image)))


def row_ce(logits, labels):
    """Per-row mean answer-token CE (R,) from answer-row logits (N, V); has_answer (R,)."""
    logits_mask, targets = answer_positions(labels)
    nll = F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
    return answer_mean(to_grid(nll, logits_mask), logits_mask)


def pgd_delta(forward, inputs_embeds, attention_mask, labels, positions, eps, alpha, steps, generator):
    """delta (R, T, H) float32 with |delta| <= eps: `steps` ascent steps on the CE, raw gradient, clipped.

    inputs_embeds (R, T, H) is treated as a constant; only delta receives a gradient (autograd.grad), so
    the model's parameters and their .grad are untouched. `positions` (R, T) bool selects where delta acts.
    """
    embeds = inputs_embeds.detach()
    mask = positions[..., None].to(torch.float32)  # (R, T, 1)
    logits_mask, _ = answer_positions(labels)
    delta = (torch.rand(embeds.shape, generator=generator, device=embeds.device) * 2 - 1) * eps  # (R, T, H)
    for _ in range(steps):
        with torch.enable_grad():  # the ascent needs a gradient even when the caller runs under no_grad
            delta.requires_grad_(True)
            perturbed = (embeds.float() + mask * delta).to(embeds.dtype)  # (R, T, H)
            logits = forward(attention_mask, logits_mask, inputs_embeds=perturbed)  # (N, V)
            ce, _ = row_ce(logits, labels)  # (R,)
            (grad,) = torch.autograd.grad(ce.sum(), delta)
        delta = (delta.detach() + alpha * grad).clamp(-eps, eps)  # projection onto the L-inf ball
    return delta.detach()


# ----------------------------------------------------------------------------------------------------
# Consistency between the perturbed and the clean distributions


def kl_consistency(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = sum_v q (log q - log p) per row: (M, V) log-probabilities -> (M,)."""
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def js_consistency(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """JS(p, q) = 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2, per row: (M, V) -> (M,)."""
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)  # (M, V)
    return 0.5 * (kl_consistency(log_p, log_m) + kl_consistency(log_q, log_m))


DIVERGENCES = {"kl": kl_consistency, "js": js_consistency}


# ----------------------------------------------------------------------------------------------------
# The method


class ModalityInterferenceConsistency(Method):
    """Heuristic + PGD perturbations of the irrelevant modality, CE on all copies, consistency to clean.

    cfg fields (defaults in brackets): mi_lam [0.01], mi_divergence ["kl"] | "js", mi_eps [1e-3],
    mi_alpha [0.1], mi_pgd_steps [2 for kl, 1 for js when None], mi_heuristic [True], mi_pgd [True].
    """

    name = "mi-consistency"

    def __init__(self, cfg, mllm, named_params):
        super().__init__(cfg, mllm, named_params)
        self.lam = float(getattr(cfg, "mi_lam", 0.01))
        self.divergence = getattr(cfg, "mi_divergence", "kl")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"mi_divergence={self.divergence!r}: expected one of {sorted(DIVERGENCES)}")
        self.eps = float(getattr(cfg, "mi_eps", 1e-3))
        self.alpha = float(getattr(cfg, "mi_alpha", 0.1))
        steps = getattr(cfg, "mi_pgd_steps", None)
        self.pgd_steps = (1 if self.divergence == "js" else 2) if steps is None else int(steps)
        self.heuristic = bool(getattr(cfg, "mi_heuristic", True))
        self.pgd = bool(getattr(cfg, "mi_pgd", True))
        if self.eps < 0 or self.pgd_steps < 0:
            raise ValueError(f"mi_eps={self.eps}, mi_pgd_steps={self.pgd_steps}: both must be >= 0")
        if not (self.heuristic or self.pgd):
            raise ValueError("mi_heuristic and mi_pgd are both off: there is no perturbed view to be consistent with")
        if not hasattr(mllm, "embed"):
            raise ValueError(f"mi-consistency: the model is a {type(mllm.model).__name__}; modality interference "
                             "perturbs the input embeddings (models.MLLM.embed) and the images of LLaVA-1.5 / VILA1.5, "
                             "which the chat-template path (hf_models.py) does not expose")
        self.seed = int(getattr(cfg, "seed", 0))
        # PGD runs on the unwrapped model: autograd.grad w.r.t. delta never reaches a DDP reducer hook.
        self.pgd_forward = model_forward(mllm.model)
        self.max_positions = _max_positions(mllm)

    # --- heuristic copies ------------------------------------------------------------------------
    def heuristic_copies(self, batch, kinds, generator):
        """Heuristic perturbed copies: list of (owner index, input_ids, labels, pixel_values (C, H, W))."""
        tokenizer, image_token_id = self.mllm.tokenizer, self.mllm.image_token_id
        input_ids, labels, attention_mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        pixel_values, options = batch["pixel_values"], batch.get("options")
        ids_of = batch.get("ids") or [str(i) for i in range(len(kinds))]
        copies = []
        for i, kind in enumerate(kinds):
            length = int(attention_mask[i].sum())
            if kind == "image":
                variants = [v for v in IMAGE_VARIANTS if v != "unrelated" or len(kinds) > 1]
                variant = variants[_randint(len(variants), generator)]
                if variant == "unrelated":  # another sample's image of the same batch
                    j = (i + 1 + _randint(len(kinds) - 1, generator)) % len(kinds)
                    image = pixel_values[j]
                else:
                    image = blank_images(pixel_values[i:i + 1], self.mllm.image_processor, variant)[0]
                copies.append((i, input_ids[i, :length], labels[i, :length], image))
            elif kind == "text":
                image_slots = (input_ids[i, :length] == image_token_id).nonzero()
                answer = (labels[i, :length] != IGNORE_INDEX).nonzero()
                if len(answer) == 0:  # no answer token (train.py's epoch padding, a truncated answer): no loss
                    continue
                if len(image_slots) == 0:
                    raise ValueError(f"modality_interference: sample {ids_of[i]!r} needs image tokens for a text "
                                     "perturbation (image-heavy task)")
                position = int(image_slots[-1]) + 1
                question = tokenizer.decode(input_ids[i, position:int(answer[0])], skip_special_tokens=True)
                answer_text = tokenizer.decode(labels[i, int(answer[0]):length].clamp(min=0),
                                               skip_special_tokens=True)
                sentence = self.misleading_text(question, answer_text, generator,
                                                options[i] if options is not None else None)
                if sentence is None:
                    continue
                new_ids = torch.tensor(tokenizer("\n" + sentence, add_special_tokens=False).input_ids,
                                       dtype=input_ids.dtype, device=input_ids.device)  # (L,)
                if self.max_positions and length + len(new_ids) > self.max_positions:
                    continue
                ids, lab = insert_tokens(input_ids[i], labels[i], length, position, new_ids)
                copies.append((i, ids, lab, pixel_values[i]))
        return copies

    def misleading_text(self, question, answer, generator, options=None):
        """One of TEXT_VARIANTS: a misleading sentence (choice questions), one or ten unrelated facts."""
        misleading = misleading_sentence(question, answer, generator, options)
        variants = [v for v in TEXT_VARIANTS if v != "misleading" or misleading is not None]
        variant = variants[_randint(len(variants), generator)]
        if variant == "misleading":
            return misleading
        return unrelated_facts(1 if variant == "one fact" else NUM_FACTS, generator)

    # --- the hook ----------------------------------------------------------------------------------
    def loss(self, forward, batch):
        for key in ("input_ids", "attention_mask", "labels", "pixel_values", "tasks"):
            if batch.get(key) is None:
                raise ValueError(f"modality_interference: the batch has no {key!r}")
        seed = int(batch.get("noise_seed", self.seed))
        choices = torch.Generator().manual_seed(seed)  # discrete choices, on the CPU
        B = batch["input_ids"].shape[0]
        kinds = [perturbation_kind(task) for task in batch["tasks"]]

        # Rows without PGD: the originals, then one heuristic copy per perturbable sample.
        rows = [(batch["input_ids"][i], batch["labels"][i]) for i in range(B)]
        owners, images = list(range(B)), [batch["pixel_values"][i] for i in range(B)]
        if self.heuristic:
            for owner, ids, lab, image in self.heuristic_copies(batch, kinds, choices):
                rows.append((ids, lab))
                owners.append(owner)
                images.append(image)
        lengths = [int(batch["attention_mask"][i].sum()) for i in range(B)] + [len(ids) for ids, _ in rows[B:]]
        rows = [(ids[:n], lab[:n]) for (ids, lab), n in zip(rows, lengths, strict=True)]
        input_ids, attention_mask, labels = pad_rows(rows, self.mllm.pad_token_id, batch["input_ids"].shape[1])
        inputs_embeds = self.mllm.embed(input_ids, torch.stack(images))  # (R0, T, H), grads reach the connector

        # PGD copies of every row with somewhere to perturb.
        row_kinds = [kinds[o] for o in owners]
        n_clean_rows = len(rows)
        if self.pgd:
            positions = irrelevant_positions(input_ids, attention_mask, labels, row_kinds,
                                             self.mllm.image_token_id)  # (R0, T)
            chosen = positions.any(1).nonzero()[:, 0]  # (P,) rows with somewhere to perturb ("none": nowhere)
        if self.pgd and chosen.numel() > 0:
            noise = torch.Generator(device=inputs_embeds.device).manual_seed(seed + 1)
            delta = pgd_delta(self.pgd_forward, inputs_embeds[chosen], attention_mask[chosen], labels[chosen],
                              positions[chosen], self.eps, self.alpha, self.pgd_steps, noise)  # (P, T, H)
            shift = (positions[chosen][..., None] * delta).to(inputs_embeds.dtype)  # (P, T, H)
            inputs_embeds = torch.cat([inputs_embeds, inputs_embeds[chosen] + shift])  # (R0 + P, T, H)
            attention_mask = torch.cat([attention_mask, attention_mask[chosen]])
            labels = torch.cat([labels, labels[chosen]])
            owners += [owners[int(r)] for r in chosen]

        # One forward of every row; distributions on the answer rows only.
        logits_mask, targets = answer_positions(labels)  # (R, T), (N,)
        logits = forward(attention_mask, logits_mask, inputs_embeds=inputs_embeds)  # (N, V)
        log_probs = logits.float().log_softmax(-1)  # (N, V)
        nll = -log_probs.gather(-1, targets[:, None])[:, 0]  # (N,)
        ce_rows, has_answer = answer_mean(to_grid(nll, logits_mask), logits_mask)  # (R,), (R,)
        mean = lambda x, m: (x * m).sum() / m.sum().clamp(min=1)
        ce = mean(ce_rows[:n_clean_rows], has_answer[:n_clean_rows])
        ce_pgd = mean(ce_rows[n_clean_rows:], has_answer[n_clean_rows:])
        consistency = self.consistency(log_probs, logits_mask, torch.tensor(owners, device=labels.device), B)
        total = ce + ce_pgd + self.lam * consistency
        metrics = {"ce": mean(ce_rows[:B], has_answer[:B]).detach(), "ce_with_heuristic": ce.detach(),
                   "ce_pgd": ce_pgd.detach(), "consistency": consistency.detach(),
                   "n_views": len(owners) - B, "n_empty": int((~has_answer[:B]).sum())}
        return total, metrics

    def consistency(self, log_probs, logits_mask, owners, n_samples):
        """mean over samples of mean over its views of sum over answer positions of D(q_view || sg(p_clean))."""
        counts = logits_mask.sum(1)  # (R,) answer rows per row of the batch
        starts = counts.cumsum(0) - counts  # (R,) first answer row of each row in (N, V)
        views = torch.arange(n_samples, len(owners), device=counts.device)  # (P,) perturbed rows
        if views.numel() == 0:
            return log_probs.new_zeros(())
        clean = owners[views]  # (P,)
        if not torch.equal(counts[views], counts[clean]):
            raise RuntimeError("modality_interference: a perturbed copy has a different number of answer tokens "
                               "than its clean sample (labels misaligned)")
        n = counts[views]  # (P,)
        within = torch.arange(int(n.sum()), device=counts.device) - torch.repeat_interleave(n.cumsum(0) - n, n)
        index_q = torch.repeat_interleave(starts[views], n) + within  # (M,)
        index_p = torch.repeat_interleave(starts[clean], n) + within  # (M,)
        divergence = DIVERGENCES[self.divergence](log_probs[index_q], log_probs[index_p].detach())  # (M,)
        view_index = torch.repeat_interleave(torch.arange(len(views), device=counts.device), n)  # (M,)
        per_view = divergence.new_zeros(len(views)).index_add(0, view_index, divergence)  # (P,) summed over positions
        view_has_answer = (n > 0).to(divergence.dtype)  # (P,)
        per_sample = divergence.new_zeros(n_samples).index_add(0, clean, per_view * view_has_answer)  # (B,)
        n_views = divergence.new_zeros(n_samples).index_add(0, clean, view_has_answer)  # (B,)
        has_view = n_views > 0
        return (per_sample[has_view] / n_views[has_view]).sum() / has_view.sum().clamp(min=1)

    def extra_memory_bytes(self) -> int:
        return 0  # no weight copies; the per-step activation cost is in the module docstring


def _max_positions(mllm) -> int | None:
    """The LLM's position limit (inserted text must not push a row past it), None when unknown."""
    config = getattr(mllm.model, "config", None)
    text_config = getattr(config, "text_config", None) if config is not None else None
    if text_config is None and hasattr(mllm.model, "llm"):
        text_config = mllm.model.llm.config
    return getattr(text_config, "max_position_embeddings", None)
