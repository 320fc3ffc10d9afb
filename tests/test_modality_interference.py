"""Tests for modality_interference.py: the perturbations are what they claim, the divergences match their
formulas, PGD stays in its ball, raises the CE and leaves the weights alone, and the method trains tiny models.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_modality_interference.py
"""

import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import models
from data import SYSTEM_PROMPT
from methods import IGNORE_INDEX, answer_positions, model_forward
from modality_interference import (
    NUM_FACTS,
    UNRELATED_FACTS,
    ModalityInterferenceConsistency,
    blank_images,
    canvas_value,
    insert_tokens,
    irrelevant_positions,
    js_consistency,
    kl_consistency,
    misleading_sentence,
    pad_rows,
    parse_options,
    perturbation_kind,
    pgd_delta,
    row_ce,
)

CHOICE_Q = ("Which shape is shown?\nA. circle\nB. square\nC. triangle\n"
            "Answer with the option's letter from the given choices directly.")
SAMPLES = [  # (task, question, answer, RGB colour of the image)
    ("caption", "Give a brief summary of what you see", "a red square on a white background", (200, 30, 30)),
    ("choice", CHOICE_Q, "B", (30, 200, 30)),
    ("caption", "Write a short description for the image", "a blue circle", (30, 30, 200)),
]


@pytest.fixture(scope="module", params=["tiny-llava", "tiny-vila"])
def mllm(request):
    return models.load_model(request.param)


@pytest.fixture(scope="module")
def llava():
    return models.load_model("tiny-llava")


def config(**overrides):
    base = dict(mi_lam=0.01, mi_divergence="kl", mi_eps=1e-3, mi_alpha=0.1, mi_pgd_steps=2, mi_heuristic=True,
                mi_pgd=True, seed=0)
    return SimpleNamespace(**{**base, **overrides})


def tokenize(mllm, question, answer):
    """vicuna_v1 template as data.py's contract writes it: labels only on " {answer}</s>"."""
    tokenizer = mllm.tokenizer
    before = tokenizer(f"{SYSTEM_PROMPT} USER: ").input_ids
    after = tokenizer(f"\n{question} ASSISTANT:", add_special_tokens=False).input_ids
    target = tokenizer(f" {answer}", add_special_tokens=False).input_ids + [mllm.eos_token_id]
    prompt = before + [mllm.image_token_id] * mllm.num_image_tokens + after
    return torch.tensor(prompt + target), torch.tensor([IGNORE_INDEX] * len(prompt) + target)


def make_batch(mllm, samples=SAMPLES, noise_seed=0):
    rows = [tokenize(mllm, q, a) for _, q, a, _ in samples]
    input_ids, attention_mask, labels = pad_rows(rows, mllm.pad_token_id)
    pixel_values = mllm.preprocess([Image.new("RGB", (20, 16), c) for *_, c in samples])
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, pixel_values=pixel_values,
                ids=[f"s{i}" for i in range(len(samples))], tasks=[t for t, *_ in samples],
                sources=["synthetic"] * len(samples), noise_seed=noise_seed)


# ----------------------------------------------------------------------------------------------------
# Heuristic perturbations


def test_perturbation_kind_maps_our_mix_to_text():
    assert perturbation_kind("caption") == "text" and perturbation_kind("choice") == "text"
    assert perturbation_kind("text-heavy") == "image" and perturbation_kind("vqa") == "none"
    with pytest.raises(ValueError, match="tasks"):
        perturbation_kind("dialogue")


@pytest.mark.parametrize("colour,raw", [("black", 0), ("white", 255)])
def test_blank_image_is_blank(mllm, colour, raw):
    """Every pixel equals (raw / 255 - mean) / std of its channel, and the processor agrees on a real canvas."""
    processor = mllm.image_processor
    pixel_values = mllm.preprocess([Image.new("RGB", (20, 16), (10, 200, 90))] * 2)
    blank = blank_images(pixel_values, processor, colour)
    expected = [(raw / 255 - m) / s for m, s in zip(processor.image_mean, processor.image_std, strict=True)]
    assert blank.shape == pixel_values.shape
    for channel, value in enumerate(expected):
        assert torch.all(blank[:, channel] == blank[0, channel, 0, 0])
        assert math.isclose(float(blank[0, channel, 0, 0]), value, rel_tol=1e-6, abs_tol=1e-6)
    canvas = mllm.preprocess([Image.new("RGB", (20, 20), (raw, raw, raw))])
    torch.testing.assert_close(blank[:1], canvas, atol=1e-5, rtol=0)
    assert canvas_value(processor, colour).shape == (3,)


def test_unrelated_and_blank_images_for_text_heavy_samples(llava):
    """A text-heavy sample's copy keeps its tokens and gets another sample's image or a blank canvas."""
    method = ModalityInterferenceConsistency(config(), llava, [])
    batch = make_batch(llava, [(t, q, a, c) for (_, q, a, c), t in zip(SAMPLES, ["text-heavy"] * 3, strict=True)])
    black, white = (blank_images(batch["pixel_values"][:1], llava.image_processor, c)[0] for c in ("black", "white"))
    seen = set()
    for seed in range(12):
        copies = method.heuristic_copies(batch, ["image"] * 3, torch.Generator().manual_seed(seed))
        assert len(copies) == 3
        for owner, ids, labels, image in copies:
            n = int(batch["attention_mask"][owner].sum())
            assert torch.equal(ids, batch["input_ids"][owner, :n]) and torch.equal(labels, batch["labels"][owner, :n])
            others = [j for j in range(3) if j != owner]
            if torch.equal(image, black):
                seen.add("black")
            elif torch.equal(image, white):
                seen.add("white")
            else:
                assert any(torch.equal(image, batch["pixel_values"][j]) for j in others), "own image reused"
                seen.add("unrelated")
    assert seen == {"black", "white", "unrelated"}


def test_parse_options_and_misleading_sentence():
    assert parse_options(CHOICE_Q) == {"A": "circle", "B": "square", "C": "triangle"}
    assert parse_options("Pick one: (A) a cat (B) a dog\nAnswer ...") == {"A": "a cat", "B": "a dog"}
    assert parse_options("Describe the image") == {}
    wrong = {misleading_sentence(CHOICE_Q, "B", torch.Generator().manual_seed(s)) for s in range(20)}
    assert wrong == {"This picture seems to depict a circle.", "This picture seems to depict a triangle."}
    assert misleading_sentence("Describe the image", "a dog", torch.Generator()) is None
    assert misleading_sentence("", "A", torch.Generator(), options=["cat", "dog"]) == (
        "This picture seems to depict a dog.")


def test_insert_tokens_by_hand():
    """ids [1 2 3 | 4 5] with answer 5, insert [8 9] at 2 -> [1 2 8 9 3 4 5], labels follow the shift."""
    ids, labels = insert_tokens(torch.tensor([1, 2, 3, 4, 5, 0]), torch.tensor([-100, -100, -100, -100, 5, -100]),
                                5, 2, torch.tensor([8, 9]))
    assert ids.tolist() == [1, 2, 8, 9, 3, 4, 5]
    assert labels.tolist() == [-100, -100, -100, -100, -100, -100, 5]


def test_misleading_text_keeps_labels_aligned(mllm):
    """Decoded answer tokens of every text copy equal the original's; the sentence sits after the image."""
    method = ModalityInterferenceConsistency(config(), mllm, [])
    batch = make_batch(mllm)
    tokenizer = mllm.tokenizer
    variants = set()
    for seed in range(8):
        copies = method.heuristic_copies(batch, ["text"] * 3, torch.Generator().manual_seed(seed))
        assert [owner for owner, *_ in copies] == [0, 1, 2]
        for owner, ids, labels, image in copies:
            n = int(batch["attention_mask"][owner].sum())
            original_ids, original_labels = batch["input_ids"][owner, :n], batch["labels"][owner, :n]
            assert torch.equal(image, batch["pixel_values"][owner])
            assert torch.equal(labels[labels != IGNORE_INDEX], original_labels[original_labels != IGNORE_INDEX])
            assert torch.equal(ids[labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX]), "labels off their tokens"
            answer = SAMPLES[owner][2]
            assert tokenizer.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True).strip() == answer
            # the prompt grew by the inserted text only, right after the last image token
            added = len(ids) - n
            last_image = int((original_ids == mllm.image_token_id).nonzero()[-1])
            assert torch.equal(ids[:last_image + 1], original_ids[:last_image + 1])
            assert torch.equal(ids[last_image + 1 + added:], original_ids[last_image + 1:])
            inserted = tokenizer.decode(ids[last_image + 1:last_image + 1 + added]).strip()
            if inserted.startswith("This picture"):
                assert owner == 1 and inserted in {"This picture seems to depict a circle.",
                                                   "This picture seems to depict a triangle."}
                variants.add("misleading")
            else:
                facts = sum(fact in inserted for fact in UNRELATED_FACTS)
                assert facts in (1, NUM_FACTS), inserted
                variants.add("one fact" if facts == 1 else "ten facts")
    assert variants == {"misleading", "one fact", "ten facts"}


def test_irrelevant_positions():
    input_ids = torch.tensor([[1, 7, 7, 2, 3, 4, 0], [1, 7, 7, 2, 3, 4, 5]])  # 7 = image token, 0 = pad
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1] * 7])
    labels = torch.tensor([[-100, -100, -100, -100, 3, 4, -100], [-100, -100, -100, -100, -100, 4, 5]])
    text, image = irrelevant_positions(input_ids, attention_mask, labels, ["text", "image"], 7)
    assert text.tolist() == [True, False, False, True, False, False, False]
    assert image.tolist() == [False, True, True, False, False, False, False]
    none = irrelevant_positions(input_ids, attention_mask, labels, ["none", "none"], 7)
    assert not none.any()


# ----------------------------------------------------------------------------------------------------
# PGD


def pgd_setup(mllm):
    batch = make_batch(mllm)
    models.freeze_for_finetuning(mllm, tune_last_layers=2)
    with torch.no_grad():
        embeds = mllm.embed(batch["input_ids"], batch["pixel_values"])  # (B, T, H)
    positions = irrelevant_positions(batch["input_ids"], batch["attention_mask"], batch["labels"], ["text"] * 3,
                                     mllm.image_token_id)
    return batch, embeds, positions


def perturbed_ce(mllm, batch, embeds, positions, delta):
    logits_mask, _ = answer_positions(batch["labels"])
    with torch.no_grad():
        logits = model_forward(mllm.model)(batch["attention_mask"], logits_mask,
                                           inputs_embeds=embeds + positions[..., None] * delta)
    ce, _ = row_ce(logits, batch["labels"])
    return ce


def test_pgd_stays_in_ball_and_increases_ce(mllm):
    """The paper's eps = 1e-3, alpha = 0.1, 2 steps: on the tiny models (token embeddings of std ~0.02) this
    moves every sample's CE by ~1 nat, far above float32 noise, while delta_0 alone moves it by ~0.01."""
    batch, embeds, positions = pgd_setup(mllm)
    eps, alpha = 1e-3, 0.1
    forward = model_forward(mllm.model)
    delta = pgd_delta(forward, embeds, batch["attention_mask"], batch["labels"], positions, eps=eps, alpha=alpha,
                      steps=2, generator=torch.Generator().manual_seed(0))
    assert delta.shape == embeds.shape and delta.dtype == torch.float32
    assert delta.abs().max() <= torch.tensor(eps)  # eps as float32, the dtype delta is clipped in
    clean = perturbed_ce(mllm, batch, embeds, positions, torch.zeros_like(delta))
    attacked = perturbed_ce(mllm, batch, embeds, positions, delta)
    assert torch.all(attacked > clean + 0.1), (clean, attacked)
    random_only = pgd_delta(forward, embeds, batch["attention_mask"], batch["labels"], positions, eps=eps,
                            alpha=alpha, steps=0, generator=torch.Generator().manual_seed(0))
    assert random_only.abs().max() <= torch.tensor(eps)
    assert torch.all(perturbed_ce(mllm, batch, embeds, positions, random_only) < attacked)
    # outside the perturbed positions the input is untouched: same logits with delta there zeroed or not
    torch.testing.assert_close(perturbed_ce(mllm, batch, embeds, positions, delta * positions[..., None]), attacked)


def test_pgd_leaves_parameters_and_grads_untouched(llava):
    batch, embeds, positions = pgd_setup(llava)
    trainable = [p for p in llava.model.parameters() if p.requires_grad]
    for p in trainable[::2]:
        p.grad = torch.full_like(p, 0.5)  # an earlier micro-batch's gradient must survive
    before = {name: p.detach().clone() for name, p in llava.model.named_parameters()}
    pgd_delta(model_forward(llava.model), embeds, batch["attention_mask"], batch["labels"], positions, eps=0.05,
              alpha=1e3, steps=2, generator=torch.Generator().manual_seed(0))
    for name, p in llava.model.named_parameters():
        assert torch.equal(p, before[name]), name
    for i, p in enumerate(trainable):
        if i % 2 == 0:
            assert torch.equal(p.grad, torch.full_like(p, 0.5))
        else:
            assert p.grad is None
        p.grad = None


# ----------------------------------------------------------------------------------------------------
# Consistency


def test_kl_and_js_against_direct_formula():
    torch.manual_seed(0)
    q_logits, p_logits = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64) * 3
    q, p = q_logits.softmax(-1), p_logits.softmax(-1)
    kl = lambda a, b: sum(a[:, v] * math.log(1) + a[:, v] * (a[:, v].log() - b[:, v].log()) for v in range(7))
    m = (p + q) / 2
    torch.testing.assert_close(kl_consistency(q.log(), p.log()), kl(q, p))
    torch.testing.assert_close(js_consistency(q.log(), p.log()), 0.5 * kl(p, m) + 0.5 * kl(q, m))
    # by hand: q = (1/2, 1/2), p = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    q2, p2 = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.25, 0.75]]).log()
    assert math.isclose(float(kl_consistency(q2, p2)), 0.5 * math.log(4 / 3), rel_tol=1e-6)
    js = js_consistency(q_logits.log_softmax(-1), p_logits.log_softmax(-1))
    assert torch.all(js >= 0) and torch.all(js <= math.log(2))
    torch.testing.assert_close(js, js_consistency(p_logits.log_softmax(-1), q_logits.log_softmax(-1)))
    assert float(kl_consistency(q.log(), q.log()).abs().max()) < 1e-12


def test_consistency_pairs_each_view_with_its_clean_sample():
    """Rows: clean 0 (2 answer rows), clean 1 (1 row), view of 1 (1 row), view of 0 (2 rows), view of 0
    (2 rows). Expected: sample 0 -> mean of its two views' summed KL, sample 1 -> its view's KL; then the
    mean of the two samples. Only the views' rows receive a gradient (p_clean is detached)."""
    torch.manual_seed(0)
    logits_mask = torch.zeros(5, 4, dtype=torch.bool)
    for row, n in enumerate([2, 1, 1, 2, 2]):
        logits_mask[row, :n] = True
    logits = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)  # (N, V) in row-major answer order
    log_probs = logits.log_softmax(-1)
    method = ModalityInterferenceConsistency.__new__(ModalityInterferenceConsistency)
    method.divergence = "kl"
    value = method.consistency(log_probs, logits_mask, torch.tensor([0, 1, 1, 0, 0]), 2)
    lp = log_probs.detach()
    kl = lambda q, p: float((lp[q].exp() * (lp[q] - lp[p])).sum())
    sample0 = ((kl(4, 0) + kl(5, 1)) + (kl(6, 0) + kl(7, 1))) / 2
    sample1 = kl(3, 2)
    assert math.isclose(float(value.detach()), (sample0 + sample1) / 2, rel_tol=1e-12)
    value.backward()
    assert torch.all(logits.grad[:3] == 0) and logits.grad[3:].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# The method on tiny models


@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_a_few_steps_on_tiny_models(mllm, divergence):
    groups = models.freeze_for_finetuning(mllm, tune_last_layers=2)
    params = [p for g in groups for p in g["params"]]
    start = [p.detach().clone() for p in params]
    method = ModalityInterferenceConsistency(config(mi_divergence=divergence, mi_pgd_steps=None), mllm,
                                             [(str(i), p) for i, p in enumerate(params)])
    assert method.pgd_steps == (1 if divergence == "js" else 2) and method.extra_memory_bytes() == 0
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    forward = model_forward(mllm.model)
    for step in range(3):
        batch = make_batch(mllm, noise_seed=step)
        loss, metrics = method.loss(forward, batch)
        assert torch.isfinite(loss) and loss.dim() == 0
        assert metrics["n_views"] == 9 and metrics["n_empty"] == 0  # 3 heuristic + 6 PGD copies
        assert float(metrics["consistency"]) >= 0
        total = metrics["ce_with_heuristic"] + metrics["ce_pgd"] + 0.01 * metrics["consistency"]
        torch.testing.assert_close(loss.detach(), total)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        optimizer.step()
    assert any(not torch.equal(p, s) for p, s in zip(params, start, strict=True))
    for p, s in zip(params, start, strict=True):
        p.data.copy_(s)  # the module-scoped model goes back to its loaded weights
        p.grad = None


def test_same_noise_seed_same_loss_and_known_answers(llava):
    """Deterministic per noise_seed. With eps = 0 and no heuristic copies, the PGD copy IS the clean input:
    consistency 0 and CE(PGD) = CE(clean) exactly, so the loss is 2 CE."""
    models.freeze_for_finetuning(llava, tune_last_layers=2)
    forward = model_forward(llava.model)
    method = ModalityInterferenceConsistency(config(), llava, [])
    with torch.no_grad():
        first, _ = method.loss(forward, make_batch(llava, noise_seed=5))
        again, _ = method.loss(forward, make_batch(llava, noise_seed=5))
        other, _ = method.loss(forward, make_batch(llava, noise_seed=6))
        assert torch.equal(first, again) and not torch.equal(first, other)
        identity = ModalityInterferenceConsistency(config(mi_eps=0.0, mi_heuristic=False), llava, [])
        loss, metrics = identity.loss(forward, make_batch(llava))
        assert float(metrics["consistency"]) == 0.0 and metrics["n_views"] == 3
        torch.testing.assert_close(metrics["ce_pgd"], metrics["ce"])
        torch.testing.assert_close(loss, 2 * metrics["ce"])
        heuristic_only = ModalityInterferenceConsistency(config(mi_pgd=False), llava, [])
        loss, metrics = heuristic_only.loss(forward, make_batch(llava))
        assert metrics["n_views"] == 3 and float(metrics["ce_pgd"]) == 0.0 and torch.isfinite(loss)
        vqa = [("vqa", q, a, c) for _, q, a, c in SAMPLES]  # needs both modalities: nothing is perturbed
        loss, metrics = method.loss(forward, make_batch(llava, vqa))
        assert metrics["n_views"] == 0 and float(metrics["consistency"]) == 0.0
        torch.testing.assert_close(loss, metrics["ce"])
    with pytest.raises(ValueError, match="both off"):
        ModalityInterferenceConsistency(config(mi_pgd=False, mi_heuristic=False), llava, [])
    with pytest.raises(ValueError, match="mi_divergence"):
        ModalityInterferenceConsistency(config(mi_divergence="mse"), llava, [])
