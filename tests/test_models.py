"""models.py: tiny LLaVA / VILA forward-backward with a bool logits mask, freezing (paper Sec. 3.1),
VILA's mlp_downsample token order, image-feature placement, batched greedy generation, the tiny
tokenizer, checkpoint round trips (LLaVA folder, VILA three-folder layout) and bad-folder errors.

Run: python -m pytest -q tests/test_models.py   (about 20 s on 2 CPU cores)
"""

import json
import os

import pytest
import torch
from conftest import write_sentencepiece_folder
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers import models as tokenizer_models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, SiglipVisionConfig, SiglipVisionModel
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

import models
from data import CAPTION_PROMPTS, IMAGE_PLACEHOLDER, SYSTEM_PROMPT

KINDS = ["tiny-llava", "tiny-vila"]


@pytest.fixture(scope="module", params=KINDS)
def tiny(request):
    return models.load_model(request.param)


def images(n):
    """Synthetic images of different sizes and aspect ratios (preprocess must square them)."""
    sizes, colours = [(70, 50), (30, 64), (40, 40)], [(200, 20, 20), (20, 20, 200), (20, 180, 20)]
    return [Image.new("RGB", sizes[i % 3], colours[i % 3]) for i in range(n)]


def prompt_ids(mllm, question):
    """<s> {system} USER: <image> x num_image_tokens \n{question} ASSISTANT:"""
    before = mllm.tokenizer(f"{SYSTEM_PROMPT} USER: ").input_ids
    after = mllm.tokenizer(f"\n{question} ASSISTANT:", add_special_tokens=False).input_ids
    return before + [mllm.image_token_id] * mllm.num_image_tokens + after


def left_pad(sequences, pad_id):
    length = max(map(len, sequences))
    input_ids = torch.tensor([[pad_id] * (length - len(s)) + s for s in sequences])  # (B, T)
    attention_mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in sequences])  # (B, T)
    return input_ids, attention_mask


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------------------------------------------


def test_tiny_sizes_and_determinism(tiny):
    again = models.load_model(f"tiny-{tiny.kind}")
    assert_same_state(tiny.model, again.model)
    expected_tokens = {"llava": 36, "vila": 16}[tiny.kind]
    assert tiny.num_image_tokens == expected_tokens
    assert sum(p.numel() for p in tiny.model.parameters()) < 500_000
    assert tiny.preprocess(images(3)).shape == (3, 3, *[{"llava": 48, "vila": 56}[tiny.kind]] * 2)


def test_forward_backward_bool_logits_to_keep(tiny):
    mllm = models.load_model(f"tiny-{tiny.kind}")
    groups = models.freeze_for_finetuning(mllm)
    trainable = {id(p) for g in groups for p in g["params"]}
    sequences = [prompt_ids(mllm, "What is shown?") + [7, 8, 9, mllm.eos_token_id],
                 prompt_ids(mllm, "Which colour?") + [10, mllm.eos_token_id]]
    length = max(map(len, sequences))
    input_ids = torch.tensor([s + [mllm.pad_token_id] * (length - len(s)) for s in sequences])  # (2, T)
    attention_mask = (torch.arange(length)[None] < torch.tensor([[len(s)] for s in sequences])).long()  # (2, T)
    keep = torch.zeros_like(input_ids, dtype=torch.bool)  # (2, T): a different count per sample
    keep[0, len(sequences[0]) - 5: len(sequences[0]) - 1] = True
    keep[1, len(sequences[1]) - 3: len(sequences[1]) - 1] = True
    pixel_values = mllm.preprocess(images(2))

    mllm.model.train()
    out = mllm.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                     logits_to_keep=keep)
    vocab = mllm.model.get_input_embeddings().weight.shape[0]
    assert out.logits.shape == (int(keep.sum()), vocab)
    with torch.no_grad():
        full = mllm.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    torch.testing.assert_close(out.logits, full[keep], rtol=1e-5, atol=1e-5)

    targets = input_ids.roll(-1, dims=1)[keep]  # next tokens
    torch.nn.functional.cross_entropy(out.logits, targets).backward()
    for name, parameter in mllm.model.named_parameters():
        if id(parameter) in trainable:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None and not parameter.requires_grad, name


@pytest.mark.parametrize("name", KINDS)
def test_tiny_model_learns_confident_answers(name):
    """Connector + last 2 layers alone can drive the answer-token confidence p_t (Eq. 4) from ~1/V to ~1
    (the frozen lm_head of the tiny models is scaled so that this is reachable), and images matter:
    two images, same question, different answers."""
    mllm = models.load_model(name)
    groups = models.freeze_for_finetuning(mllm)
    optimizer = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=3e-3)
    prompt = prompt_ids(mllm, "Colour?")
    answers = [mllm.tokenizer(f" {w}", add_special_tokens=False).input_ids + [mllm.eos_token_id]
               for w in ("red", "blue")]
    length = len(prompt) + max(map(len, answers))
    input_ids = torch.tensor([prompt + a + [mllm.pad_token_id] * (length - len(prompt) - len(a)) for a in answers])
    keep = torch.zeros_like(input_ids, dtype=torch.bool)  # (2, T): rows predicting the answer tokens
    for b, answer in enumerate(answers):
        keep[b, len(prompt) - 1: len(prompt) - 1 + len(answer)] = True
    targets = torch.cat([torch.tensor(a) for a in answers])
    pixel_values = mllm.preprocess(images(2))
    mllm.model.train()
    confidences = []
    for _ in range(40):
        logits = mllm.model(input_ids=input_ids, attention_mask=(input_ids != mllm.pad_token_id).long(),
                            pixel_values=pixel_values, logits_to_keep=keep).logits
        confidences.append(float(logits.detach().softmax(-1).gather(1, targets[:, None]).mean()))
        loss = torch.nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert confidences[0] < 0.05 and confidences[-1] > 0.9, confidences[::10]
    generated = mllm.generate(torch.tensor([prompt, prompt]), torch.ones(2, len(prompt), dtype=torch.long),
                              pixel_values, max_new_tokens=4)
    assert [row[: len(a)] for row, a in zip(generated.tolist(), answers, strict=True)] == answers


def test_freeze_groups(tiny):
    mllm = models.load_model(f"tiny-{tiny.kind}")
    groups = models.freeze_for_finetuning(mllm, tune_last_layers=2)
    assert [g["name"] for g in groups] == ["connector", "llm"]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in mllm.connector.parameters()}
    last_two = [p for layer in mllm.decoder_layers[-2:] for p in layer.parameters()]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in last_two}
    trainable = {id(p) for g in groups for p in g["params"]}
    for name, parameter in mllm.model.named_parameters():
        assert parameter.requires_grad == (id(parameter) in trainable), name
    assert not any(p.requires_grad for p in mllm.vision_tower.parameters())
    assert not mllm.model.get_input_embeddings().weight.requires_grad

    assert [g["name"] for g in models.freeze_for_finetuning(mllm, 1, tune_connector=False)] == ["llm"]
    assert not any(p.requires_grad for p in mllm.connector.parameters())
    assert [g["name"] for g in models.freeze_for_finetuning(mllm, 0)] == ["connector"]
    with pytest.raises(ValueError, match="decoder layers"):
        models.freeze_for_finetuning(mllm, tune_last_layers=len(mllm.decoder_layers) + 1)


@pytest.mark.parametrize("order", ["vila1.5", "nvila"])
@pytest.mark.parametrize("side", [27, 5, 4, 1])
def test_downsample_token_order(side, order):
    """Block (i, j) of the half-size grid = [x(2i,2j), x(2i,2j+1), x(2i+1,2j), x(2i+1,2j+1)], zeros where
    the odd grid was padded; it is output token i * h + j ("nvila", row-major) or j * h + i ("vila1.5",
    column-major). 27 x 27 -> 196."""
    batch, channels = 2, 3
    features = torch.randn(batch, side * side, channels)  # (B, g*g, C)
    out = models.DownSample2x2(order)(features)
    half = (side + 1) // 2
    assert out.shape == (batch, half * half, 4 * channels)
    if side == 27:
        assert half * half == 196
    for b in range(batch):
        for i in range(half):
            for j in range(half):
                for k, (di, dj) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
                    r, c = 2 * i + di, 2 * j + dj
                    expected = features[b, r * side + c] if r < side and c < side else torch.zeros(channels)
                    token = i * half + j if order == "nvila" else j * half + i
                    assert torch.equal(out[b, token, k * channels:(k + 1) * channels], expected), (b, i, j, k)


# Hand-worked grids (one channel, so a token is its 4 values). 4 x 4 with x(r, c) = 10 r + c; blocks
# (i, j) of the 2 x 2 half grid: b00 = [0, 1, 10, 11], b01 = [2, 3, 12, 13], b10 = [20, 21, 30, 31],
# b11 = [22, 23, 32, 33]. 3 x 3 with x(r, c) = 1 + 3 r + c, zero-padded to 4 x 4 (column 3, row 3):
#   1 2 3 0 / 4 5 6 0 / 7 8 9 0 / 0 0 0 0  ->  b00 = [1, 2, 4, 5], b01 = [3, 0, 6, 0], b10 = [7, 8, 0, 0],
# b11 = [9, 0, 0, 0]. "vila1.5" emits b00, b10, b01, b11 (column by column); "nvila" b00, b01, b10, b11.
HAND_WORKED = {
    (4, "vila1.5"): [[0, 1, 10, 11], [20, 21, 30, 31], [2, 3, 12, 13], [22, 23, 32, 33]],
    (4, "nvila"): [[0, 1, 10, 11], [2, 3, 12, 13], [20, 21, 30, 31], [22, 23, 32, 33]],
    (3, "vila1.5"): [[1, 2, 4, 5], [7, 8, 0, 0], [3, 0, 6, 0], [9, 0, 0, 0]],
    (3, "nvila"): [[1, 2, 4, 5], [3, 0, 6, 0], [7, 8, 0, 0], [9, 0, 0, 0]],
}


@pytest.mark.parametrize("side, order", list(HAND_WORKED))
def test_downsample_hand_worked_grids(side, order):
    """Both block orders, element by element, on the grids worked out above; the default is "vila1.5"."""
    values = [10 * r + c for r in range(4) for c in range(4)] if side == 4 else list(range(1, 10))
    features = torch.tensor(values, dtype=torch.float32).reshape(1, side * side, 1)  # (1, g*g, 1)
    out = models.DownSample2x2(order)(features)  # (1, 4, 4)
    assert out[0].tolist() == HAND_WORKED[side, order]
    if order == "vila1.5":
        assert models.DownSample2x2()(features)[0].tolist() == HAND_WORKED[side, order]


def upstream_flat_square(x, final_permute):
    """Our transcription of VILA's `DownSampleBlock.flat_square` (NVlabs/VILA,
    llava/model/multimodal_projector/base_projector.py): x (n, rows, cols, c); zero row below an odd
    number of rows, zero column right of an odd number of columns; view the columns in pairs (n, rows,
    cols/2, 2c); swap the two grid axes; view the rows in pairs (n, cols/2, rows/2, 4c). Commit 1c88211
    (2024-05-13) stops here (54c9706, 2024-08-19, is the same); commit 36f6adc (2024-12-12) swaps the two
    grid axes once more (final_permute=True). The caller flattens the grid row-major."""
    n, rows, cols, c = x.shape
    if rows % 2:
        x = torch.cat([x, x.new_zeros(n, 1, cols, c)], 1)
        rows += 1
    if cols % 2:
        x = torch.cat([x, x.new_zeros(n, rows, 1, c)], 2)
        cols += 1
    x = x.reshape(n, rows, cols // 2, 2 * c).transpose(1, 2).contiguous()
    x = x.reshape(n, cols // 2, rows // 2, 4 * c)
    return x.transpose(1, 2).contiguous() if final_permute else x


@pytest.mark.parametrize("side", [27, 6, 5, 1])
def test_downsample_equals_upstream_transcription(side):
    """"vila1.5" equals VILA's flat_square at 1c88211/54c9706, "nvila" at 36f6adc, on random grids
    (27 x 27: SigLIP-so400m-384); the two differ by a transpose of the half-size grid."""
    features = torch.randn(2, side * side, 5)  # (B, g*g, C)
    grid = features.reshape(2, side, side, 5)
    for order, final_permute in (("vila1.5", False), ("nvila", True)):
        expected = upstream_flat_square(grid, final_permute).reshape(2, -1, 20)  # (B, h*h, 4C)
        assert torch.equal(models.DownSample2x2(order)(features), expected), order
    half = (side + 1) // 2
    vila15 = models.DownSample2x2("vila1.5")(features).reshape(2, half, half, 20)
    assert torch.equal(vila15.transpose(1, 2), models.DownSample2x2("nvila")(features).reshape(2, half, half, 20))
    with pytest.raises(ValueError, match="order must be one of"):
        models.DownSample2x2("row-major")


def test_downsample_projector_keys_and_shapes():
    projector = models.DownSampleProjector(vision_hidden_size=8, llm_hidden_size=16)
    assert sorted(projector.state_dict()) == [
        "layers.1.bias", "layers.1.weight", "layers.2.bias", "layers.2.weight", "layers.4.bias", "layers.4.weight"]
    assert projector.layers[2].weight.shape == (16, 32)
    assert projector(torch.randn(3, 27 * 27, 8)).shape == (3, 196, 16)


def test_embed_places_image_features(tiny):
    mllm = tiny
    sequences = [prompt_ids(mllm, "Short?"), prompt_ids(mllm, "A much longer question about the picture?")]
    input_ids, _ = left_pad(sequences, mllm.pad_token_id)
    pixel_values = mllm.preprocess(images(2))
    with torch.no_grad():
        embeds = mllm.embed(input_ids, pixel_values)  # (B, T, H)
        if mllm.kind == "llava":
            features = torch.stack(list(mllm.model.model.get_image_features(pixel_values=pixel_values).pooler_output))
        else:
            features = mllm.model.get_image_features(pixel_values)
        table = mllm.model.get_input_embeddings().weight
    assert features.shape == (2, mllm.num_image_tokens, table.shape[1])
    for b in range(2):
        positions = (input_ids[b] == mllm.image_token_id).nonzero().flatten()
        assert len(positions) == mllm.num_image_tokens
        assert torch.equal(embeds[b, positions], features[b])
        text = input_ids[b] != mllm.image_token_id
        assert torch.equal(embeds[b, text], table[input_ids[b, text]])
    one_slot_less = input_ids.clone()
    one_slot_less[1, (input_ids[1] == mllm.image_token_id).nonzero()[0]] = mllm.eos_token_id
    with pytest.raises(ValueError, match="image tokens"):
        mllm.embed(one_slot_less, pixel_values)
    with pytest.raises(ValueError, match="image tokens"):
        mllm.embed(input_ids, pixel_values[:1])


def test_forward_from_inputs_embeds_matches(tiny):
    mllm = tiny
    input_ids, attention_mask = left_pad([prompt_ids(mllm, "Hi?"), prompt_ids(mllm, "Two words?")],
                                         mllm.pad_token_id)
    pixel_values = mllm.preprocess(images(2))
    keep = attention_mask.bool()
    with torch.no_grad():
        direct = mllm.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                            logits_to_keep=keep).logits
        via_embeds = mllm.model(inputs_embeds=mllm.embed(input_ids, pixel_values), attention_mask=attention_mask,
                                logits_to_keep=keep).logits
    torch.testing.assert_close(via_embeds, direct, rtol=0, atol=1e-6)


def test_generate_left_padded_batch_equals_single(tiny):
    mllm = tiny
    sequences = [prompt_ids(mllm, "What is in the image?"), prompt_ids(mllm, "Colour?"),
                 prompt_ids(mllm, "Describe the picture in a few words please.")]
    input_ids, attention_mask = left_pad(sequences, mllm.pad_token_id)
    pixel_values = mllm.preprocess(images(3))
    batch = mllm.generate(input_ids, attention_mask, pixel_values, max_new_tokens=6)
    assert batch.dtype == torch.long and batch.shape[0] == 3 and batch.shape[1] <= 6
    for b, sequence in enumerate(sequences):
        single = mllm.generate(torch.tensor([sequence]), torch.ones(1, len(sequence), dtype=torch.long),
                               pixel_values[b:b + 1], max_new_tokens=6)[0].tolist()
        row = batch[b].tolist()
        if mllm.eos_token_id in row:
            end = row.index(mllm.eos_token_id) + 1
            assert all(t == mllm.pad_token_id for t in row[end:])
            row = row[:end]
        assert row == single[: len(row)] and len(single) == len(row), b
    with pytest.raises(ValueError, match="LEFT"):
        mllm.generate(input_ids, attention_mask.flip(1), pixel_values, max_new_tokens=2)


def test_generate_stops_at_eos():
    """lm_head rows zeroed except eos, whose row is the last prompt position's hidden state: the eos
    logit is |h|^2 > 0 = every other logit, so the first new token is eos and decoding stops there."""
    mllm = models.load_model("tiny-llava")
    ids = torch.tensor([prompt_ids(mllm, "Anything?")])
    pixel_values = mllm.preprocess(images(1))
    with torch.no_grad():
        hidden = mllm.model.model(input_ids=ids, pixel_values=pixel_values).last_hidden_state[0, -1]  # (H,)
        mllm.model.lm_head.weight.zero_()
        mllm.model.lm_head.weight[mllm.eos_token_id] = hidden
    out = mllm.generate(ids, torch.ones_like(ids), pixel_values, max_new_tokens=5)
    assert out.tolist() == [[mllm.eos_token_id]]


def test_generate_output_attentions(tiny):
    mllm = tiny
    input_ids, attention_mask = left_pad([prompt_ids(mllm, "Hi?"), prompt_ids(mllm, "Longer one?")],
                                         mllm.pad_token_id)
    before = mllm.language_model.config._attn_implementation
    tokens, attentions = mllm.generate(input_ids, attention_mask, mllm.preprocess(images(2)), 3,
                                       output_attentions=True)
    assert mllm.language_model.config._attn_implementation == before
    assert torch.equal(tokens, mllm.generate(input_ids, attention_mask, mllm.preprocess(images(2)), 3))
    config = mllm.language_model.config
    assert len(attentions) == config.num_hidden_layers
    for layer in attentions:
        assert layer.shape == (2, config.num_attention_heads, input_ids.shape[1])
        torch.testing.assert_close(layer.sum(-1), torch.ones(2, config.num_attention_heads))
        assert float(layer[0][:, attention_mask[0] == 0].abs().sum()) == 0.0  # padding gets no attention


def test_tokenizer_round_trip_and_specials():
    tokenizer = models.build_tiny_tokenizer()
    for index, token in enumerate(["<unk>", "<s>", "</s>", "<pad>", "<image>"]):
        assert tokenizer.convert_tokens_to_ids(token) == index
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert len(tokenizer) <= 1000
    text = f"{SYSTEM_PROMPT} USER: {IMAGE_PLACEHOLDER}\n{CAPTION_PROMPTS[0]} ASSISTANT: A red circle, 3 Zebras!</s>"
    ids = tokenizer(text).input_ids
    assert ids[0] == 1 and ids.count(4) == 1 and ids[-1] == 2
    assert tokenizer.decode(ids[1:]) == text
    assert tokenizer("héllo ✓", add_special_tokens=False).input_ids  # byte level: nothing is unknown
    assert tokenizer.decode(tokenizer("héllo ✓", add_special_tokens=False).input_ids) == "héllo ✓"
    assert models._train_tiny_bpe.__wrapped__() == models._train_tiny_bpe()  # training is deterministic


def test_tokenizer_corpus_comes_from_data(monkeypatch):
    """data.tokenizer_corpus() is used when data.py provides it (models.py falls back otherwise)."""
    monkeypatch.setattr(models, "tokenizer_corpus", lambda: ["zebra giraffe " * 40] * 5)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(models._train_tiny_bpe.__wrapped__()))
    assert len(tokenizer("zebra", add_special_tokens=False).input_ids) == 1
    monkeypatch.setattr(models, "tokenizer_corpus", None)
    fallback = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(models._train_tiny_bpe.__wrapped__()))
    assert len(fallback(SYSTEM_PROMPT, add_special_tokens=False).input_ids) < len(SYSTEM_PROMPT) // 3


def test_tiny_llava_save_load_round_trip(tmp_path):
    mllm = models.load_model("tiny-llava")
    with torch.no_grad():  # make the weights differ from a fresh tiny build
        mllm.connector.linear_1.weight.add_(0.5)
    mllm.save(str(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["model_type"] == "llava"
    again = models.load_model(str(tmp_path))
    assert again.kind == "llava" and again.image_token_id == mllm.image_token_id
    assert again.num_image_tokens == mllm.num_image_tokens
    assert_same_state(mllm.model, again.model)
    ids = prompt_ids(mllm, "Same?")
    assert again.tokenizer(f"{SYSTEM_PROMPT} x").input_ids == mllm.tokenizer(f"{SYSTEM_PROMPT} x").input_ids
    pixel_values = mllm.preprocess(images(1))
    assert torch.equal(again.preprocess(images(1)), pixel_values)
    ids = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(mllm.model(input_ids=ids, pixel_values=pixel_values).logits,
                           again.model(input_ids=ids, pixel_values=pixel_values).logits)


def write_vila_folder(root):
    """A VILA1.5-style checkpoint, written piece by piece the way VILA lays it out: a Llama-style
    tokenizer WITHOUT an <image> token and without a pad token, odd 5 x 5 SigLIP grid."""
    corpus = [f"{SYSTEM_PROMPT} USER: {q} ASSISTANT: a blue square." for q in CAPTION_PROMPTS]
    backend = Tokenizer(tokenizer_models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    torch.manual_seed(1)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
    vision = SiglipVisionModel(SiglipVisionConfig(image_size=20, patch_size=4, hidden_size=16, intermediate_size=32,
                                                  num_hidden_layers=2, num_attention_heads=2))
    projector = models.DownSampleProjector(16, 32)
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    vision.save_pretrained(root / "vision_tower")
    SiglipImageProcessorPil(size={"height": 20, "width": 20}).save_pretrained(root / "vision_tower")
    (root / "mm_projector").mkdir()
    json.dump({"mm_projector_type": "mlp_downsample", "model_type": "v2l_projector"},
              open(root / "mm_projector" / "config.json", "w"))
    save_file({k: v.contiguous() for k, v in projector.state_dict().items()},
              str(root / "mm_projector" / "model.safetensors"))
    json.dump({"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "llm_cfg": llm.config.to_dict(),
               "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch",
               "image_aspect_ratio": "resize", "num_video_frames": 8}, open(root / "config.json", "w"))
    return llm, vision, projector


def test_vila_folder_load_save_reload_bit_exact(tmp_path):
    source, saved = tmp_path / "vila", tmp_path / "saved"
    llm, vision, projector = write_vila_folder(source)
    mllm = models.load_model(str(source))
    assert mllm.kind == "vila" and mllm.num_image_tokens == 9  # 5 x 5 -> padded 6 x 6 -> 3 x 3
    assert mllm.image_token_id == llm.config.vocab_size  # outside the vocabulary, never embedded
    assert mllm.pad_token_id == mllm.tokenizer.unk_token_id
    assert_same_state(mllm.model.llm, llm)
    assert_same_state(mllm.model.vision_tower, vision)
    assert_same_state(mllm.model.mm_projector, projector)

    mllm.save(str(saved))
    for path in ["config.json", "llm/config.json", "llm/model.safetensors", "llm/tokenizer.json",
                 "vision_tower/config.json", "vision_tower/model.safetensors", "vision_tower/preprocessor_config.json",
                 "mm_projector/config.json", "mm_projector/model.safetensors"]:
        assert (saved / path).is_file(), path
    top = json.load(open(saved / "config.json"))
    assert top["mm_projector_cfg"]["mm_projector_type"] == "mlp_downsample" and top["num_video_frames"] == 8
    assert (top["hidden_size"], top["mm_hidden_size"], top["llm_cfg"]["hidden_size"]) == (32, 16, 32)
    weights = load_file(str(saved / "mm_projector" / "model.safetensors"))
    assert sorted(weights) == sorted(projector.state_dict())
    saved_vocab = json.load(open(saved / "llm" / "tokenizer.json"))["model"]["vocab"]
    assert IMAGE_PLACEHOLDER not in saved_vocab  # the tokenizer goes back as VILA had it

    again = models.load_model(str(saved))
    assert_same_state(mllm.model, again.model)
    assert again.image_token_id == mllm.image_token_id
    sequence = prompt_ids(mllm, "What is it?")
    assert sequence == prompt_ids(again, "What is it?")
    ids = torch.tensor([sequence])
    pixel_values = mllm.preprocess(images(1))
    assert torch.equal(pixel_values, again.preprocess(images(1)))
    with torch.no_grad():
        assert torch.equal(mllm.model(input_ids=ids, pixel_values=pixel_values).logits,
                           again.model(input_ids=ids, pixel_values=pixel_values).logits)


def test_vila_downsample_order_from_projector_config_or_flag(tmp_path):
    """mm_projector_type "mlp_downsample" loads with the VILA1.5 order, "mlp_downsample_2x2_fix" with the
    NVILA one; downsample_order= overrides; a saved folder names its order and reloads with it."""
    source = tmp_path / "vila"
    write_vila_folder(source)
    assert models.load_model(str(source)).model.mm_projector.order == "vila1.5"
    nvila = models.load_model(str(source), downsample_order="nvila")
    assert nvila.model.mm_projector.order == "nvila"
    nvila.save(str(tmp_path / "saved"))
    saved_type = json.load(open(tmp_path / "saved" / "mm_projector" / "config.json"))["mm_projector_type"]
    assert saved_type == "mlp_downsample_2x2_fix"
    assert models.load_model(str(tmp_path / "saved")).model.mm_projector.order == "nvila"
    assert models.load_model(str(tmp_path / "saved"), downsample_order="vila1.5").model.mm_projector.order == "vila1.5"
    with pytest.raises(ValueError, match="downsample_order must be"):
        models.load_model(str(source), downsample_order="columns")


def test_vila_folder_with_only_tokenizer_model(tmp_path):
    """A VILA llm/ folder with only tokenizer.model (VILA's trainer saves a slow tokenizer) loads with the
    SentencePiece-exact tokenizer, the image token outside its vocabulary; save writes tokenizer.model back
    (no tokenizer.json, no <image>) and the reload tokenizes the same."""
    from sentencepiece_tokenizer import SentencePieceTokenizer

    source, saved = tmp_path / "vila", tmp_path / "saved"
    write_vila_folder(source)
    for name in os.listdir(source / "llm"):
        if name.startswith(("tokenizer", "special_tokens")):
            os.remove(source / "llm" / name)
    sp = write_sentencepiece_folder(source / "llm")
    mllm = models.load_model(str(source))
    assert isinstance(mllm.tokenizer, SentencePieceTokenizer)
    assert mllm.image_token_id == sp.get_piece_size() and mllm.pad_token_id == 0
    text = "What  is  it?"
    assert mllm.tokenizer(text).input_ids == [1] + sp.encode(text)
    mllm.save(str(saved))
    assert (saved / "llm" / "tokenizer.model").is_file() and not (saved / "llm" / "tokenizer.json").exists()
    assert json.load(open(saved / "llm" / "tokenizer_config.json"))["tokenizer_class"] == "LlamaTokenizer"
    again = models.load_model(str(saved))
    assert again.image_token_id == mllm.image_token_id
    assert again.tokenizer(text).input_ids == mllm.tokenizer(text).input_ids


def test_tiny_vila_saves_as_vila_folder(tmp_path):
    mllm = models.load_model("tiny-vila")
    mllm.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "llm", "mm_projector", "vision_tower"]
    again = models.load_model(str(tmp_path))
    assert again.kind == "vila" and again.num_image_tokens == 16
    assert_same_state(mllm.model, again.model)


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        models.load_model(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json.*image-text-to-text.*VILA"):
        models.load_model(str(empty))
    bert = tmp_path / "bert"
    bert.mkdir()
    json.dump({"model_type": "bert"}, open(bert / "config.json", "w"))
    with pytest.raises(ValueError, match="'bert'.*AutoModelForImageTextToText.*mm_projector"):
        models.load_model(str(bert))

    llava = tmp_path / "llava"
    models.load_model("tiny-llava").save(str(llava))
    os.remove(llava / "preprocessor_config.json")
    with pytest.raises(FileNotFoundError, match="llava/preprocessor_config.json"):
        models.load_model(str(llava))

    vila = tmp_path / "vila"
    write_vila_folder(vila)
    os.remove(vila / "mm_projector" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="mm_projector/model.safetensors"):
        models.load_model(str(vila))
    json.dump({"mm_projector_type": "mlp2x_gelu"}, open(vila / "mm_projector" / "config.json", "w"))
    save_file({"layers.0.weight": torch.zeros(1)}, str(vila / "mm_projector" / "model.safetensors"))
    with pytest.raises(ValueError, match="mlp2x_gelu.*supported.*mlp_downsample"):
        models.load_model(str(vila))
    os.rename(vila / "vision_tower", vila / "vision")
    with pytest.raises(FileNotFoundError, match="vision_tower/config.json"):
        models.load_model(str(vila))


def test_broken_config_json_is_named(tmp_path):
    llava = tmp_path / "llava"
    models.load_model("tiny-llava").save(str(llava))
    config = (llava / "config.json").read_text()
    (llava / "config.json").write_text(config[: len(config) // 2])  # cut short
    with pytest.raises(ValueError, match=r"llava/config.json is not valid JSON \(line \d+, column \d+"):
        models.load_model(str(llava))
    vila = tmp_path / "vila"
    write_vila_folder(vila)
    (vila / "mm_projector" / "config.json").write_text("{mm_projector_type: mlp_downsample}")
    with pytest.raises(ValueError, match=r"mm_projector/config.json is not valid JSON \(line 1, column 2"):
        models.load_model(str(vila))


@pytest.mark.parametrize("keep", [4, 100, -10], ids=["no-header", "half-header", "short-data"])
def test_truncated_safetensors_is_named(tmp_path, keep):
    llava = tmp_path / "final"
    models.load_model("tiny-llava").save(str(llava))
    weights = llava / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:keep])
    with pytest.raises(ValueError, match=rf"{weights}: truncated"):
        models.load_model(str(llava))
    vila = tmp_path / "vila"
    write_vila_folder(vila)
    projector = vila / "mm_projector" / "model.safetensors"
    projector.write_bytes(projector.read_bytes()[:keep])
    with pytest.raises(ValueError, match=rf"{projector}: truncated"):
        models.load_model(str(vila))


def test_loading_training_and_generating_open_no_connection(monkeypatch, tmp_path):
    """transformers >= 5.24 installs `kernels`, which wraps some layers' forward and can fetch kernels from the Hub
    (only on `kernelize()` / `use_kernels=True`, which nrca never asks for). Loading from a local folder, a
    training step and generation must not open a single connection."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(AssertionError, match="network connection"):  # the guard itself works
        socket.create_connection(("127.0.0.1", 9))
    for kind in KINDS:
        models.load_model(kind).save(str(tmp_path / kind))
        mllm = models.load_model(str(tmp_path / kind))
        models.freeze_for_finetuning(mllm)
        mllm.model.train()
        ids = prompt_ids(mllm, "What is shown?") + [7, 8, mllm.eos_token_id]
        input_ids = torch.tensor([ids])  # (1, T)
        keep = torch.zeros_like(input_ids, dtype=torch.bool)
        keep[0, -3:-1] = True
        logits = mllm.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            pixel_values=mllm.preprocess(images(1)), logits_to_keep=keep, use_cache=False).logits
        logits.sum().backward()
        prompt, mask = left_pad([prompt_ids(mllm, "Which colour?")], mllm.pad_token_id)
        assert mllm.generate(prompt, mask, mllm.preprocess(images(1)), max_new_tokens=3).shape[0] == 1
