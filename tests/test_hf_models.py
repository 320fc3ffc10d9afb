"""hf_models.py: the generic transformers path on tiny random-weight models of four families (Qwen2-VL,
Qwen2.5-VL, LLaVA-OneVision, Idefics3 / SmolVLM; hf_tiny.py builds them, nothing downloaded): chat-template labels,
the trainable set, a few steps of NRCA and Full FT, save / reload / generate, CIDEr and accuracy; LLaVA-1.5
through the generic path equals its dedicated path (models.py + data.py); Noisy Visual Mixup per image for
packed patches and tiles (noise.noisy_mixup_each).

Run: TRITON_INTERPRET=1 python -m pytest -q tests/test_hf_models.py   (about 30 s on 2 CPU cores)
"""

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import data
import evaluate
import hf_models
import hf_tiny
import models
import train
from methods import get_method, model_forward
from noise import noisy_mixup_each, noisy_pixel_values

# ---------------------------------------------------------------------------------------------------
# Noisy Visual Mixup per image (Eq. 2a-2b)


def test_noisy_mixup_each_uses_each_tensors_own_statistics():
    generator = torch.Generator().manual_seed(0)
    dark, bright = torch.randn(300), 100 + 10 * torch.randn(5, 60)
    noisy_dark, noisy_bright = noisy_mixup_each([dark, bright], delta=1.0, generator=generator)  # pure noise
    assert noisy_bright.shape == (5, 60)
    assert abs(float(noisy_dark.mean())) < 0.5 and abs(float(noisy_bright.mean()) - 100) < 3
    assert 0.7 < float(noisy_dark.std()) < 1.3 and 7 < float(noisy_bright.std()) < 13
    # stats="batch": one pair over both, so the dark image gets noise around the batch mean (~67)
    noisy_dark, _ = noisy_mixup_each([dark, bright], delta=1.0, stats="batch", generator=generator)
    assert float(noisy_dark.mean()) > 40
    same = noisy_mixup_each([dark, bright], delta=0.0)  # Fig. 4: delta = 0 is the clean view
    assert torch.equal(same[0], dark) and torch.equal(same[1], bright)
    with pytest.raises(ValueError, match="non-empty list"):
        noisy_mixup_each([])


def test_packed_patches_noise_per_image_and_shared_over_temporal_copies():
    """Qwen2-VL: rows = patches, (C, T, p*p) per row, image i owns prod(image_grid_thw[i]) consecutive rows."""
    config = SimpleNamespace(vision_config=SimpleNamespace(temporal_patch_size=2, in_channels=3))
    grid = torch.tensor([[1, 2, 2], [1, 2, 4]])  # 4 + 8 patches

    def patches(offset, rows):
        frame = offset + torch.randn(rows, 3, 1, 4)  # (rows, C, 1, p*p)
        return frame.expand(rows, 3, 2, 4).reshape(rows, 24)  # a still image: both temporal copies equal

    first, second = patches(0.0, 4), patches(50.0, 8)
    images = {"pixel_values": torch.cat([first, second]), "image_grid_thw": grid}  # (12, 24)
    out = noisy_pixel_values(images, config, delta=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out["image_grid_thw"], grid)
    noisy = out["pixel_values"].reshape(12, 3, 2, 4)
    assert torch.equal(noisy[:, :, 0], noisy[:, :, 1])  # one draw for both copies of the still image
    assert abs(float(noisy[:4].mean())) < 1.5 and abs(float(noisy[4:].mean()) - 50) < 1.5  # each image's own mu
    # image 0's noisy view does not depend on image 1 (its own statistics, drawn first)
    other = {"pixel_values": torch.cat([first, patches(-30.0, 8)]), "image_grid_thw": grid}
    again = noisy_pixel_values(other, config, delta=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again["pixel_values"][:4], out["pixel_values"][:4])
    video = {"pixel_values": torch.randn(4, 24), "image_grid_thw": grid[:1]}  # temporal copies differ
    with pytest.raises(ValueError, match="temporal copies"):
        noisy_pixel_values(video, config)


def test_anyres_tiles_one_pair_per_image_padding_untouched():
    """LLaVA-OneVision: image 0 has 5 real tiles, image 1 (a 16 x 16 image) 2, padded with zero tiles to 5."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    pinpoints = [[16, 16], [16, 32], [32, 16], [32, 32]]
    config = SimpleNamespace(image_grid_pinpoints=pinpoints, vision_config=SimpleNamespace(image_size=16))
    sizes = torch.tensor([[30, 30], [16, 16]])
    assert [image_size_to_num_patches(s, pinpoints, 16) for s in sizes.tolist()] == [5, 2]
    pixels = torch.zeros(2, 5, 3, 16, 16)
    pixels[0, :] = torch.tensor([0.0, 10.0, 10.0, 10.0, 10.0])[:, None, None, None]  # mean 8, per tile 0 or 10
    pixels[1, :2] = -5.0
    pixels[0] += 0.1 * torch.randn(5, 3, 16, 16)
    out = noisy_pixel_values({"pixel_values": pixels, "image_sizes": sizes}, config, delta=1.0,
                                       generator=torch.Generator().manual_seed(2))["pixel_values"]
    assert torch.equal(out[1, 2:], pixels[1, 2:])  # padding tiles stay exact zeros (the model drops them)
    assert abs(float(out[0, 0].mean()) - 8) < 0.5  # the image's mu (8), not the tile's own (0)
    assert float(out[0, 0].std()) > 3  # the image's sigma (~4), not the tile's (~0.1)
    assert abs(float(out[1, :2].mean()) + 5) < 0.1  # a constant image: sigma 0, noise = its mean


def test_idefics3_tiles_zero_tiles_and_masked_pixels_untouched():
    pixels = torch.randn(2, 3, 3, 8, 8)
    pixels[1, 2] = 0.0  # padding image slot
    mask = torch.ones(2, 3, 8, 8, dtype=torch.long)
    mask[0, 1, :, 4:] = 0  # padded pixels of a tile
    pixels[0, 1, :, :, 4:] = 0.0
    out = noisy_pixel_values({"pixel_values": pixels, "pixel_attention_mask": mask}, None, delta=0.5,
                                       generator=torch.Generator().manual_seed(3))["pixel_values"]
    assert torch.equal(out[1, 2], pixels[1, 2]) and torch.equal(out[0, 1, :, :, 4:], pixels[0, 1, :, :, 4:])
    assert not torch.equal(out[0, 1, :, :, :4], pixels[0, 1, :, :, :4]) and not torch.equal(out[1, :2], pixels[1, :2])


# ---------------------------------------------------------------------------------------------------
# The three families end to end


def records(root, split, task):
    return json.loads((root / f"{split}_{task}.json").read_text())


def mixed(root):
    sources = [data.Source("synthetic-caption", str(root / "train_caption.json"), "caption"),
               data.Source("synthetic-choice", str(root / "train_choice.json"), "choice")]
    return data.mix_datasets(sources, samples_per_dataset=4, seed=0)


def steps(mllm, method_name, batch, n):
    cfg = train.make_config(method=method_name)
    named = [(name, p) for name, p in mllm.model.named_parameters() if p.requires_grad]
    method = get_method(method_name)(cfg, mllm, named)
    optimizer = torch.optim.AdamW([p for _, p in named], lr=1e-2)
    mllm.model.train()
    losses, metrics = [], {}
    for step in range(n):
        loss, metrics = method.loss(model_forward(mllm.model), {**batch, "noise_seed": step})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    mllm.model.eval()
    return losses, metrics


@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_family_end_to_end(family, synthetic_data_dir, tmp_path):
    mllm = hf_tiny.build(family)
    train_records = mixed(synthetic_data_dir)
    dataset = mllm.dataset(train_records, synthetic_data_dir, max_length=512)
    items = [dataset[i] for i in (0, 1, 4, 5)]  # 2 captions, 2 choices
    # Labels through the chat template: the reply and its end-of-turn token, nothing of the prompt.
    for item, record in zip(items, [train_records[i] for i in (0, 1, 4, 5)], strict=True):
        labelled = item["labels"][item["labels"] != -100]
        assert torch.equal(item["input_ids"][item["prompt_length"]:], labelled)
        text = mllm.tokenizer.decode(labelled)
        assert text.strip() == record["answer"] + mllm.tokenizer.convert_ids_to_tokens(int(labelled[-1]))
        assert int(labelled[-1]) in mllm.eos_token_ids
        # These templates write no BOS, so the tokenizer adds its one (transformers' apply_chat_template rule).
        assert int(item["input_ids"][0]) == mllm.tokenizer.bos_token_id
        assert int((item["input_ids"] == mllm.tokenizer.bos_token_id).sum()) == 1
    batch = mllm.collate(items)

    # Trainable set: connector (by name) + last 2 decoder layers; the vision tower stays frozen.
    groups = models.freeze_for_finetuning(mllm, tune_last_layers=2)
    trainable = {n for n, p in mllm.model.named_parameters() if p.requires_grad}
    connector = {n for n, _ in mllm.connector_parameters()}
    expected_connector = {"qwen2_vl": "visual.merger.", "qwen2_5_vl": "visual.merger.",
                          "llava_onevision": "multi_modal_projector.", "idefics3": "connector."}[family]
    assert connector and all(expected_connector in n or n.endswith("image_newline") for n in connector)
    assert {n for n in trainable if n not in connector} == {
        n for n, _ in mllm.model.named_parameters() if any(f"layers.{k}." in n for k in (1, 2)) and n not in connector
        and "vision" not in n and "visual" not in n}
    assert [g["name"] for g in groups] == ["connector", "llm"]

    # Answer-row logits: logits_to_keep and the hidden-state fallback agree.
    mask = batch["labels"] != -100
    with torch.no_grad():
        kept = model_forward(mllm.model)(batch["attention_mask"], mask, input_ids=batch["input_ids"],
                                                pixel_values=batch["pixel_values"])  # (N, V)
        sliced = model_forward(mllm.model, via_hidden=True)(batch["attention_mask"], mask,
                                                                   input_ids=batch["input_ids"],
                                                                   pixel_values=batch["pixel_values"])
    assert kept.shape == (int(mask.sum()), mllm.model.config.get_text_config().vocab_size)
    torch.testing.assert_close(kept, sliced)

    before = {n: p.detach().clone() for n, p in mllm.model.named_parameters()}
    nrca_losses, metrics = steps(mllm, "nrca", batch, 3)
    assert metrics["n_open"] == 2 and float(metrics["alignment"]) > 0  # the two captions are open-response
    full_losses, _ = steps(mllm, "full", batch, 2)
    assert all(torch.isfinite(torch.tensor(nrca_losses + full_losses)))
    assert full_losses[-1] < nrca_losses[0]  # five steps on one batch lower its CE
    for name, parameter in mllm.model.named_parameters():
        assert torch.equal(parameter, before[name]) != (name in trainable), name

    mllm.save(str(tmp_path / "model"))
    again = models.load_model(str(tmp_path / "model"))
    assert type(again.model) is type(mllm.model)
    state, reloaded = mllm.model.state_dict(), again.model.state_dict()
    assert state.keys() == reloaded.keys() and all(torch.equal(state[k], reloaded[k]) for k in state)
    assert torch.equal(again.collate([dataset[0]])["input_ids"], mllm.collate([dataset[0]])["input_ids"])

    tests = {"caption": records(synthetic_data_dir, "test", "caption"),
             "choice": records(synthetic_data_dir, "test", "choice")}
    result = evaluate.evaluate_model(again, tests, image_folder=synthetic_data_dir, max_new_tokens=6, batch_size=3,
                                     out_dir=tmp_path / "eval")
    assert result["cider"] >= 0 and 0 <= result["accuracy"] <= 100 and result["n_caption"] == len(tests["caption"])
    lines = [json.loads(line) for line in (tmp_path / "eval" / "predictions_caption.jsonl").read_text().splitlines()]
    one = evaluate.validate_test_records(tests["caption"][:1], "caption")
    alone = evaluate.generate_answers(again, one, synthetic_data_dir, batch_size=1, max_new_tokens=6)
    assert alone[0]["prediction"] == lines[0]["prediction"]  # batching (left padding) does not change it
    noisy = evaluate.generate_answers(again, one, synthetic_data_dir, max_new_tokens=6, noisy=True)
    assert noisy == evaluate.generate_answers(again, one, synthetic_data_dir, max_new_tokens=6, noisy=True)


def test_llava15_generic_path_equals_dedicated_path(synthetic_data_dir):
    """models.py's tiny LLaVA-1.5 with data.py's vicuna_v1 labels vs the same model behind hf_models with the
    vicuna_v1 chat template: same input_ids, labels, pixels and answer-row logits."""
    mllm = models.load_model("tiny-llava")
    generic = hf_tiny.generic_llava(mllm)
    train_records = mixed(synthetic_data_dir)
    first = train_records[0]  # and a three-exchange record: later turns are text pieces between labelled replies
    train_records.append({**first, "id": "multi", "conversations": first["conversations"] + [
        {"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "two red circles"}]})
    dedicated = data.MultiTaskDataset(train_records, synthetic_data_dir, mllm.tokenizer, mllm.preprocess,
                                      mllm.num_image_tokens, mllm.image_token_id, max_length=256)
    through_template = generic.dataset(train_records, synthetic_data_dir, max_length=256)
    indices = (0, 1, 4, 5, len(train_records) - 1)
    ours = data.collate([dedicated[i] for i in indices], mllm.pad_token_id)
    theirs = generic.collate([through_template[i] for i in indices])
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["labels"], theirs["labels"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"]["pixel_values"])  # square images: no padding
    assert generic.eos_token_ids == [mllm.eos_token_id]
    mask = ours["labels"] != -100
    with torch.no_grad():
        dedicated_logits = model_forward(mllm.model)(ours["attention_mask"], mask, input_ids=ours["input_ids"],
                                                     pixel_values=ours["pixel_values"])
        generic_logits = model_forward(generic.model)(theirs["attention_mask"], mask,
                                                             input_ids=theirs["input_ids"],
                                                             pixel_values=theirs["pixel_values"])
    assert torch.equal(dedicated_logits, generic_logits)


def test_template_that_does_not_extend_its_prompt_is_rejected():
    mllm = hf_tiny.build("idefics3")
    mllm.processor.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}<image>Q{% else %}A{% endif %}"
                                    "{% endfor %}{% if add_generation_prompt %}GEN:{% endif %}")  # "GEN:" then no "A"
    with pytest.raises(ValueError, match="exchange 1 does not extend"):
        mllm.encode(Image.new("RGB", (16, 16)), [("q", "a")])


def test_connector_override_and_missing_connector():
    mllm = hf_tiny.build("idefics3")
    mllm.connector_names = ("nothing.here",)
    with pytest.raises(ValueError, match="connector"):
        models.freeze_for_finetuning(mllm)
    mllm.connector_names = ("modality_projection",)
    assert [n for n, _ in mllm.connector_parameters()] == ["model.connector.modality_projection.proj.weight"]


def test_merge_images_pads_tiles_and_masks_with_zeros():
    """Idefics3-style samples with 3 and 2 tiles of different sizes: zero tiles / zero mask where padded."""
    a = {"pixel_values": torch.ones(1, 3, 3, 8, 8), "pixel_attention_mask": torch.ones(1, 3, 8, 8, dtype=torch.long)}
    b = {"pixel_values": 2 * torch.ones(1, 2, 3, 8, 6),
         "pixel_attention_mask": torch.ones(1, 2, 8, 6, dtype=torch.long)}
    merged = data.merge_images([a, b])
    assert merged["pixel_values"].shape == (2, 3, 3, 8, 8) and merged["pixel_attention_mask"].shape == (2, 3, 8, 8)
    assert torch.equal(merged["pixel_values"][0], a["pixel_values"][0])
    assert torch.equal(merged["pixel_values"][1, :2, :, :, :6], b["pixel_values"][0])
    assert merged["pixel_values"][1, 2].abs().sum() == 0 and merged["pixel_values"][1, :, :, :, 6:].abs().sum() == 0
    assert int(merged["pixel_attention_mask"][1].sum()) == 2 * 8 * 6
    packed = data.merge_images([{"pixel_values": torch.ones(4, 24), "image_grid_thw": torch.tensor([[1, 2, 2]])},
                                     {"pixel_values": torch.ones(8, 24), "image_grid_thw": torch.tensor([[1, 2, 4]])}])
    assert packed["pixel_values"].shape == (12, 24) and packed["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4]]
    with pytest.raises(ValueError, match="different image keys"):
        data.merge_images([a, {"pixel_values": torch.ones(1, 3, 8, 8)}])


def test_parts_for_fsdp_and_freezing_and_early_errors(synthetic_data_dir):
    mllm = hf_tiny.build("qwen2_vl")
    # A connector named by a container (Qwen3-VL's deepstack_merger_list): FSDP2 gets its children, which have a
    # forward; here Qwen2-VL's vision blocks stand in for such a list.
    mllm.connector_names = ("visual.blocks",)
    assert mllm.connector_modules() == list(mllm.model.model.visual.blocks)
    mllm.connector_names = ()
    assert mllm.connector_modules() == [mllm.model.model.visual.merger]
    assert mllm.vision_layers is mllm.model.model.visual.blocks
    # The merger lies inside Qwen2-VL's tower: with the tower trained too, it is in one optimizer group only.
    groups = models.freeze_for_finetuning(mllm, tune_last_layers=1, tune_vision_tower=True)
    ids = [id(p) for group in groups for p in group["params"]]
    assert len(ids) == len(set(ids)) and [g["name"] for g in groups] == ["connector", "llm", "vision"]
    torch.optim.AdamW(groups)  # raises if a parameter sat in two groups
    # A max_length that the processor's image tokens alone exceed stops before step 1, naming it.
    with pytest.raises(ValueError, match="leaves no room.*max_length=8"):
        mllm.dataset(mixed(synthetic_data_dir), synthetic_data_dir, max_length=8)
    # Eq. (2) on packed patches needs the config; the hidden-state fallback refuses a DDP-wrapped model.
    with pytest.raises(ValueError, match="need the model's config"):
        noisy_pixel_values({"pixel_values": torch.ones(4, 24), "image_grid_thw": torch.tensor([[1, 2, 2]])})
    with pytest.raises(ValueError, match="one rank"):
        model_forward(SimpleNamespace(module=torch.nn.Linear(2, 2)))


def test_multi_turn_labels_every_reply_through_the_template(synthetic_data_dir):
    """Qwen2-VL's ChatML: reply k and its <|im_end|> are labelled, the user turns between them are not, the image
    is expanded once in the first user turn, and a cut keeps the whole prompt."""
    mllm = hf_tiny.build("qwen2_vl")
    image = Image.open(synthetic_data_dir / json.loads((synthetic_data_dir / "train_caption.json").read_text())[0]
                       ["image"])
    turns = [("What is shown?", "two red circles"), ("And the colour?", "red"), ("Where?", "on the left")]
    sample = mllm.encode(image, turns)
    labelled = sample["labels"] != -100
    spans, start = [], None  # maximal runs of labelled positions
    for position, flag in enumerate(labelled.tolist() + [False]):
        if flag and start is None:
            start = position
        elif not flag and start is not None:
            spans.append(mllm.tokenizer.decode(sample["input_ids"][start:position]))
            start = None
    assert spans == [f"{answer}<|im_end|>" for _, answer in turns]
    text = mllm.tokenizer.decode(sample["input_ids"])
    assert text.count("<|im_start|>user") == 3 and text.count("<|vision_start|>") == 1
    assert int(sample["prompt_length"]) == int(labelled.nonzero()[0])
    single = mllm.encode(image, turns[:1])
    assert torch.equal(sample["input_ids"][:len(single["input_ids"])], single["input_ids"])
    # The pieces add up to the processor's own tokens of the whole conversation (but its last "\n", not labelled).
    whole = mllm.processed_prompt(mllm.render(turns).removesuffix("\n"), image)
    assert torch.equal(sample["input_ids"], whole["input_ids"])
    assert torch.equal(sample["pixel_values"]["mm_token_type_ids"], whole["pixel_values"]["mm_token_type_ids"])
    for extra in (3, 9):  # cut inside reply 1, and inside the user turn after it
        cut = mllm.encode(image, turns, max_length=sample["prompt_length"] + extra)
        assert len(cut["input_ids"]) == sample["prompt_length"] + extra
        assert torch.equal(cut["labels"], sample["labels"][:len(cut["input_ids"])])
        assert cut["pixel_values"]["mm_token_type_ids"].shape == (1, len(cut["input_ids"]))


def test_multi_turn_with_a_template_that_closes_replies_with_no_special_token():
    """llava-hf's template ends a reply with a space: each reply gets the tokenizer's eos, labelled, mid-conversation
    too (vicuna_v1's "</s>USER:")."""
    generic = hf_tiny.generic_llava(models.load_model("tiny-llava"))
    generic.processor.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}{% if c['type'] == "
        "'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: "
        "{% for c in m['content'] %}{{ c['text'] }}{% endfor %} {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    turns = [("What is shown?", "two red circles"), ("And the colour?", "red")]
    sample = generic.encode(Image.new("RGB", (48, 48)), turns)
    eos = generic.tokenizer.eos_token_id
    assert int((sample["input_ids"] == eos).sum()) == 2 and int(sample["input_ids"][-1]) == eos
    labelled = sample["input_ids"][sample["labels"] != -100]
    assert generic.tokenizer.decode(labelled).replace("</s>", "|").split("|")[:2] == [" two red circles", " red"]


def test_pieces_after_the_first_prompt_get_no_lone_prefix_piece(tmp_path):
    """A SentencePiece tokenizer puts its own "▁" before a piece: " two red" must not become "▁", "▁two"."""
    from conftest import write_sentencepiece_folder

    write_sentencepiece_folder(tmp_path)
    tokenizer = models._load_tokenizer(str(tmp_path))
    adapter = hf_models.HFMLLM(model=None, processor=SimpleNamespace(tokenizer=tokenizer))
    assert adapter.text_ids(" two red") == tokenizer("two red", add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(adapter.text_ids(" two red"))[0] != "▁"
    assert tokenizer.convert_ids_to_tokens(tokenizer(" two red", add_special_tokens=False).input_ids)[0] == "▁"
    qwen = hf_tiny.build("qwen2_vl")  # byte-level BPE: the space is part of the word, kept
    assert qwen.text_ids(" two") == qwen.tokenizer(" two", add_special_tokens=False).input_ids != qwen.text_ids("two")
