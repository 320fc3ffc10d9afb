"""Tests for data.py: vicuna_v1 label masks (token by token), truncation, record validation, the
multi-task mix, the dataset's bad-input handling, collation, the synthetic set and IconQA conversion.

Tokenizers are built here from the `tokenizers` library (no models.py): a word-level one whose ids
can be written by hand, a byte-level BPE like the tiny models', and a SentencePiece-style (metaspace)
one like Llama/Vicuna's.
"""

import json
import logging
import re

import pytest
import torch
from conftest import preprocess_v1_reference
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import data
from data import CAPTION_PROMPTS, CHOICE_SUFFIX, IGNORE_INDEX, IMAGE_PLACEHOLDER, SYSTEM_PROMPT, DataError

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_PLACEHOLDER]  # ids 0..4
IMAGE_ID, N_IMAGE = 4, 3


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens=[IMAGE_PLACEHOLDER])


def word_tokenizer(texts) -> PreTrainedTokenizerFast:
    """Word-level: one id per word or punctuation run, so expected ids can be written down by hand."""
    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]+", text)})
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return _wrap(tokenizer)


@pytest.fixture(scope="module")
def bpe():
    """Byte-level BPE trained on data.tokenizer_corpus(), like models.py's tiny tokenizer."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(data.tokenizer_corpus(), trainer)
    return _wrap(tokenizer)


@pytest.fixture(scope="module", params=["normalizer", "pre_tokenizer"])
def metaspace(request):
    """SentencePiece-style (Llama): "\u2581" marks spaces and every piece gets one in front, either by a
    Prepend + Replace normalizer (Llama-2's tokenizer.json) or by a Metaspace pre-tokenizer."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    if request.param == "normalizer":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False)
    tokenizer.train_from_iterator(data.tokenizer_corpus(), trainer)
    return _wrap(tokenizer)


def expand_image(ids, n=N_IMAGE):
    i = ids.index(IMAGE_ID)
    return ids[:i] + [IMAGE_ID] * n + ids[i + 1:]


# ----------------------------------------------------------------------------------------------------
# Template and label mask
# ----------------------------------------------------------------------------------------------------
def test_build_prompt_is_vicuna_v1():
    assert data.build_prompt("How many?") == f"{SYSTEM_PROMPT} USER: <image>\nHow many? ASSISTANT:"
    assert SYSTEM_PROMPT.startswith("A chat between a curious user") and len(CAPTION_PROMPTS) == 5


def test_label_mask_token_by_token_hand_written():
    """Record: question "What colour is it?", answer "two red circles", 3 image tokens.

    Word-level tokens, written out by hand (Whitespace splits words and punctuation runs):
      <s> | A chat between a curious user and an artificial intelligence assistant . The assistant gives
      helpful , detailed , and polite answers to the user ' s questions . USER : | <image> x3 |
      What colour is it ? ASSISTANT : | two red circles </s>
    Labels: -100 on everything up to and including "ASSISTANT :", then the ids of two red circles </s>."""
    question, answer = "What colour is it?", "two red circles"
    tokenizer = word_tokenizer([SYSTEM_PROMPT, "USER: ASSISTANT:", question, answer])
    system = ("A chat between a curious user and an artificial intelligence assistant . The assistant gives "
              "helpful , detailed , and polite answers to the user ' s questions .").split()
    prompt_tokens = (["<s>"] + system + ["USER", ":"] + [IMAGE_PLACEHOLDER] * 3
                     + ["What", "colour", "is", "it", "?", "ASSISTANT", ":"])
    answer_tokens = ["two", "red", "circles", "</s>"]
    input_ids, labels = data.tokenize_conversation(question, answer, tokenizer, N_IMAGE, IMAGE_ID, max_length=100)
    assert input_ids.dtype == torch.long and labels.shape == input_ids.shape
    assert tokenizer.convert_ids_to_tokens(input_ids.tolist()) == prompt_tokens + answer_tokens
    expected = [IGNORE_INDEX] * len(prompt_tokens) + tokenizer.convert_tokens_to_ids(answer_tokens)
    for position, (got, want) in enumerate(zip(labels.tolist(), expected, strict=True)):
        token = (prompt_tokens + answer_tokens)[position]
        assert got == want, f"label at position {position} ({token}): {got} != {want}"


def test_byte_level_piecewise_equals_joint_tokenisation(bpe):
    """For byte-level BPE the piece-wise ids equal tokenising the whole conversation at once; the labels
    decode to exactly " {answer}</s>"."""
    for question, answer in [(CAPTION_PROMPTS[2], "two small red circles on the left"),
                             (f"What colour are the shapes?\nA. red\nB. blue\n{CHOICE_SUFFIX}", "B"),
                             ("Odd text: é ✓ 12,5!", "Ünïcode answer, with punctuation.")]:
        input_ids, labels = data.tokenize_conversation(question, answer, bpe, N_IMAGE, IMAGE_ID, 10_000)
        joint = bpe(data.build_prompt(question) + " " + answer + "</s>").input_ids
        assert input_ids.tolist() == expand_image(joint)
        assert bpe.decode(input_ids[labels != IGNORE_INDEX]) == f" {answer}</s>"
        assert (labels[:-1] != IGNORE_INDEX).sum() + 1 == (labels != IGNORE_INDEX).sum()  # one contiguous tail
        assert labels[-1] == bpe.eos_token_id and input_ids[0] == bpe.bos_token_id


def test_sentencepiece_style_answer_space_not_doubled(metaspace):
    """Llama-style tokenizers add the space themselves: the answer ids equal those of the joint text
    ("... ASSISTANT: two red circles</s>"), with no stray lone "\u2581" token."""
    question, answer = "What colour are the shapes?", "two red circles on the left"
    input_ids, labels = data.tokenize_conversation(question, answer, metaspace, N_IMAGE, IMAGE_ID, 10_000)
    joint = metaspace(data.build_prompt(question) + " " + answer + "</s>").input_ids
    n_answer = int((labels != IGNORE_INDEX).sum())
    assert input_ids[-n_answer:].tolist() == joint[-n_answer:]
    assert metaspace.convert_ids_to_tokens(input_ids[-n_answer:].tolist())[0].startswith("\u2581two")


# ----------------------------------------------------------------------------------------------------
# Truncation
# ----------------------------------------------------------------------------------------------------
def test_truncation_never_cuts_image_tokens(bpe):
    question, answer = CAPTION_PROMPTS[0], "three large blue triangles at the top of the image"
    full_ids, full_labels = data.tokenize_conversation(question, answer, bpe, 7, IMAGE_ID, 10_000)
    prompt_length = int((full_labels == IGNORE_INDEX).sum())
    n_answer = len(full_ids) - prompt_length
    for max_length in range(prompt_length + 1, len(full_ids) + 3):
        input_ids, labels = data.tokenize_conversation(question, answer, bpe, 7, IMAGE_ID, max_length)
        assert len(input_ids) == min(max_length, len(full_ids))
        assert (input_ids == IMAGE_ID).sum() == 7  # every image token kept
        assert torch.equal(input_ids[:prompt_length], full_ids[:prompt_length])  # the prompt is never cut
        kept = len(input_ids) - prompt_length
        assert 1 <= kept <= n_answer
        assert torch.equal(labels[prompt_length:], full_ids[prompt_length:prompt_length + kept])
        # a cut answer has no </s> (the model is not taught to stop mid-sentence); a whole one keeps it
        assert (labels[-1] == bpe.eos_token_id) == (kept == n_answer)
    with pytest.raises(DataError, match=r"record 7 \(id 'x'\).*no room for an answer token.*max_length=" +
                       str(prompt_length)):
        data.tokenize_conversation(question, answer, bpe, 7, IMAGE_ID, prompt_length, where="record 7 (id 'x')")


def test_extra_image_placeholder_is_rejected(bpe):
    with pytest.raises(DataError, match="only one image"):
        data.tokenize_conversation(f"two images {IMAGE_PLACEHOLDER}?", "no", bpe, 1, IMAGE_ID, 100)


# ----------------------------------------------------------------------------------------------------
# Multi-turn conversations (LLaVA's preprocess_v1)
# ----------------------------------------------------------------------------------------------------
TURNS = [("What colour is it?", "two red circles"), ("Where are they?", "on the left"), ("How many?", "B")]


def test_multi_turn_labels_hand_written():
    """Three exchanges, word-level tokens written out by hand; every answer and its </s> labelled:
      <s> {system} USER : | <image> x3 | What colour is it ? ASSISTANT : | two red circles </s> |
      USER : Where are they ? ASSISTANT : | on the left </s> | USER : How many ? ASSISTANT : | B </s>"""
    tokenizer = word_tokenizer([SYSTEM_PROMPT, "USER: ASSISTANT:"] + [text for turn in TURNS for text in turn])
    system = ("A chat between a curious user and an artificial intelligence assistant . The assistant gives "
              "helpful , detailed , and polite answers to the user ' s questions .").split()
    pieces = [(["<s>"] + system + ["USER", ":"] + [IMAGE_PLACEHOLDER] * 3 + "What colour is it ? ASSISTANT :".split(),
               False), ("two red circles </s>".split(), True),
              ("USER : Where are they ? ASSISTANT :".split(), False), ("on the left </s>".split(), True),
              ("USER : How many ? ASSISTANT :".split(), False), (["B", "</s>"], True)]
    tokens = [token for piece, _ in pieces for token in piece]
    input_ids, labels = data.tokenize_turns(TURNS, tokenizer, N_IMAGE, IMAGE_ID, max_length=200)
    assert tokenizer.convert_ids_to_tokens(input_ids.tolist()) == tokens
    expected = [token_id if answer else IGNORE_INDEX for piece, answer in pieces
                for token_id in tokenizer.convert_tokens_to_ids(piece)]
    assert labels.tolist() == expected
    # one exchange is exactly the single-turn path
    single = data.tokenize_conversation(*TURNS[0], tokenizer, N_IMAGE, IMAGE_ID, 200)
    assert all(torch.equal(a, b) for a, b in zip(single, data.tokenize_turns(TURNS[:1], tokenizer, N_IMAGE, IMAGE_ID,
                                                                             200), strict=True))


def test_multi_turn_equals_preprocess_v1_transcription(bpe):
    """Byte-level BPE: ids and labels equal our transcription of LLaVA's preprocess_v1 (conftest), which
    tokenises the whole conversation at once and labels each round by its lengths."""
    for turns in (TURNS, TURNS[:1], [("Odd text: é ✓ 12,5!", "Ünïcode answer."), ("And then?", "C")]):
        input_ids, labels = data.tokenize_turns(turns, bpe, N_IMAGE, IMAGE_ID, 10_000)
        reference_ids, reference_labels = preprocess_v1_reference(
            turns, lambda text: bpe(text, add_special_tokens=False).input_ids, bpe.bos_token_id, bpe.eos_token_id,
            N_IMAGE, IMAGE_ID)
        assert input_ids.tolist() == reference_ids
        assert labels.tolist() == reference_labels
        assert (labels == bpe.eos_token_id).sum() == len(turns)  # every assistant turn ends with a labelled </s>


def test_multi_turn_truncation_keeps_turns_whole(bpe):
    """For every max_length: all image tokens kept; later exchanges whole or absent (their labels end with
    </s>), none left with its prompt but part of its answer; the first answer is cut only when it alone
    does not fit (then no later exchange)."""
    full_ids, full_labels = data.tokenize_turns(TURNS, bpe, 7, IMAGE_ID, 10_000)
    eos_positions = (full_labels == bpe.eos_token_id).nonzero().flatten().tolist()  # end of each exchange
    first_label = int((full_labels != IGNORE_INDEX).nonzero()[0])
    for max_length in range(first_label + 1, len(full_ids) + 2):
        input_ids, labels = data.tokenize_turns(TURNS, bpe, 7, IMAGE_ID, max_length)
        assert len(input_ids) <= max_length and (input_ids == IMAGE_ID).sum() == 7
        assert torch.equal(input_ids, full_ids[:len(input_ids)])  # a prefix of the whole conversation
        assert torch.equal(labels, full_labels[:len(labels)])
        whole = [end + 1 for end in eos_positions if end < max_length]  # lengths that end an exchange
        if whole:
            assert len(input_ids) == whole[-1]  # ends right after the last exchange that fits
        else:
            assert len(input_ids) == max_length and labels[-1] != bpe.eos_token_id  # first answer cut, no </s>
    with pytest.raises(DataError, match="no room for an answer token"):
        data.tokenize_turns(TURNS, bpe, 7, IMAGE_ID, first_label)


def test_multi_turn_of_letter_answers_is_open_response(bpe):
    """nrca.py's docstring: a sample's answer tokens run over all its turns, so two one-letter answers
    (letter + </s> each = 4 tokens) are open-response, one is not."""
    import nrca

    for turns, n_open in (([("Which?", "B")], 0), ([("Which?", "B"), ("And this one?", "C")], 1)):
        input_ids, labels = data.tokenize_turns(turns, bpe, N_IMAGE, IMAGE_ID, 200)
        assert int((labels != IGNORE_INDEX).sum()) == 2 * len(turns)
        logits = torch.randn(1, len(input_ids), len(bpe))  # (1, T, V)
        assert int(nrca.nrca_loss(logits, logits + 0.1, labels[None]).n_open) == n_open


def test_multi_turn_records_through_mix_and_dataset(bpe, tmp_path, caplog):
    """A multi-turn record passes load/mix unchanged (its turns are not rewritten) and the dataset item
    carries the labels of tokenize_turns; prompt_length ends the first exchange's prompt."""
    Image.new("RGB", (9, 7), (10, 200, 10)).save(tmp_path / "img_m.png")
    conversations = [{"from": "human", "value": f"{TURNS[0][0]}\n{IMAGE_PLACEHOLDER}"}]  # placeholder moved first
    for k, (question, answer) in enumerate(TURNS):
        conversations += [] if k == 0 else [{"from": "human", "value": question}]
        conversations.append({"from": "gpt", "value": f" {answer} "})
    (tmp_path / "multi.json").write_text(json.dumps([{"id": "m", "image": "img_m.png",
                                                      "conversations": conversations}]))
    mixed = data.mix_datasets([("multi", str(tmp_path / "multi.json"), "caption")])
    assert mixed[0]["conversations"] == conversations and mixed[0]["question"] == TURNS[0][0]
    dataset = make_dataset(mixed, tmp_path, bpe)
    item = dataset[0]
    input_ids, labels = data.tokenize_turns(TURNS, bpe, N_IMAGE, IMAGE_ID, 200)
    assert torch.equal(item["input_ids"], input_ids) and torch.equal(item["labels"], labels)
    assert item["prompt_length"] == int((labels != IGNORE_INDEX).nonzero()[0])
    assert dataset.n_truncated == 0
    # a max_length that drops the last exchange is counted and logged once
    with caplog.at_level(logging.WARNING, logger="nrca.data"):
        short = make_dataset(mixed, tmp_path, bpe, max_length=len(input_ids) - 1)
    assert short.n_truncated == 1 and (short[0]["labels"] == bpe.eos_token_id).sum() == 2
    assert any("1 of 1 records are longer than max_length" in r.message for r in caplog.records)


# ----------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------
def record(i, question="What is it?", answer="a cat", image=None, **extra):
    return {"id": i, "image": image or f"img_{i}.png",
            "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"},
                              {"from": "gpt", "value": answer}], **extra}


def test_load_records_json_and_jsonl(tmp_path):
    records = [record(i) for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    a, b = data.load_records(tmp_path / "a.json"), data.load_records(tmp_path / "b.jsonl")
    assert a == b and [r["id"] for r in a] == ["0", "1", "2"]
    assert data.question_and_answer(a[0], "x") == ("What is it?", "a cat")


@pytest.mark.parametrize("name, text, pattern", [
    ("bad.json", '[{"id": 1,\n "image": "x.png" "conversations": []}]', r"bad\.json: malformed JSON at line 2, col"
     r"umn 19"),
    ("bad.jsonl", json.dumps(record(0)) + '\n{"id": 1, oops}\n', r"bad\.jsonl: malformed JSON at line 2, column 11"),
    ("empty.json", "  \n", r"empty\.json: empty file"),
    ("object.json", '[{"id": 1}] x', r"object\.json: malformed JSON at line 1"),
])
def test_malformed_json_names_file_line_and_column(tmp_path, name, text, pattern):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=pattern):
        data.load_records(tmp_path / name, skip_bad_records=True)  # a broken file is never skipped


BAD_RECORDS = [
    ({"id": "r1", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nq"}]}, "no answer turn"),
    ({"id": "r2", "conversations": record(0)["conversations"]}, "missing 'image' field"),
    ({"image": "x.png", "conversations": record(0)["conversations"]}, "missing 'id'"),
    (record("r4", answer="   "), "answer turn is empty"),
    ({**record("r5"), "conversations": record(0)["conversations"] * 2}, "several '<image>' placeholders"),
    ({**record("r5b"), "conversations": record(0)["conversations"] + [{"from": "human", "value": "And?"}]},
     "the last turn (2) is from 'human' with no answer"),
    ({**record("r5c"), "conversations": record(0)["conversations"] + [{"from": "gpt", "value": "x"}] * 2},
     "turn 2 is from 'gpt', expected 'human'"),
    ({**record("r5d"), "conversations": record(0)["conversations"] + [{"from": "human", "value": " "},
                                                                      {"from": "gpt", "value": "x"}]},
     "human turn 2 is empty"),
    ({"id": "r6", "image": "x.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "no '<image>' placeholder"),
    (["not", "a", "record"], "must be a JSON object"),
]


def test_bad_records_raise_naming_file_index_id_and_problem(tmp_path, caplog):
    path = tmp_path / "train.json"
    for bad, problem in BAD_RECORDS:
        path.write_text(json.dumps([record("ok"), bad]))
        with pytest.raises(DataError) as error:
            data.load_records(path)
        message = str(error.value)
        assert str(path) in message and "record 1" in message and problem in message, message
        if isinstance(bad, dict) and "id" in bad:
            assert repr(bad["id"]) in message
    path.write_text(json.dumps([record("ok")] + [bad for bad, _ in BAD_RECORDS] + [record("ok2")]))
    skipped = []
    with caplog.at_level(logging.WARNING, logger="nrca.data"):
        good = data.load_records(path, skip_bad_records=True, skipped=skipped)
    assert [r["id"] for r in good] == ["ok", "ok2"]
    assert len(skipped) == len(BAD_RECORDS)
    for message, (_, problem) in zip(skipped, BAD_RECORDS, strict=True):
        assert problem in message
    assert sum("skipping bad record" in r.message for r in caplog.records) == len(BAD_RECORDS)


@pytest.mark.parametrize("text", ['{"annotations": [{"id": 1}], "images": []}',
                                  '{\n  "id": 1,\n  "image": "x.png",\n  "conversations": []\n}'],
                         ids=["object-of-lists", "one-record-over-several-lines"])
def test_json_object_instead_of_a_list_is_named(tmp_path, text):
    (tmp_path / "train.json").write_text(text)
    with pytest.raises(DataError, match=r"train\.json: holds one JSON object \(keys \[.*\]\), expected a JSON list of "
                                        r"records"):
        data.load_records(tmp_path / "train.json", skip_bad_records=True)
    (tmp_path / "one.jsonl").write_text(json.dumps(record(0)) + "\n")  # JSON lines of one record: still fine
    assert [r["id"] for r in data.load_records(tmp_path / "one.jsonl")] == ["0"]


def test_non_utf8_bytes_are_named_with_line_and_column(tmp_path):
    text = json.dumps([record(0), record(1, answer="caf\u00e9")], ensure_ascii=False, indent=1)
    (tmp_path / "latin1.json").write_bytes(text.encode("latin-1"))  # a file saved in another encoding
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "caf" in row)
    column = text.splitlines()[line - 1].index("\u00e9") + 1
    with pytest.raises(DataError, match=rf"latin1\.json: not UTF-8 text: byte 0xe9 at line {line}, column {column}"):
        data.load_records(tmp_path / "latin1.json")


def test_missing_records_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        data.load_records(tmp_path / "nope.json")


# ----------------------------------------------------------------------------------------------------
# Multi-task mixing
# ----------------------------------------------------------------------------------------------------
@pytest.fixture()
def sources(tmp_path):
    caption = [record(f"c{i}", question="Describe it.", answer=f"caption {i}") for i in range(50)]
    choice = [record(f"q{i}", question=f"Which?\nA. x\nB. y\n{CHOICE_SUFFIX}" if i % 2 else "Which?\nA. x\nB. y",
                     answer="A") for i in range(8)]
    caption2 = [record(f"d{i}", answer=f"other {i}") for i in range(30)]
    for name, records in (("cap.json", caption), ("choice.jsonl", choice), ("cap2.json", caption2)):
        text = json.dumps(records) if name.endswith(".json") else "\n".join(json.dumps(r) for r in records)
        (tmp_path / name).write_text(text)
    return [data.Source("flickr", str(tmp_path / "cap.json"), "caption"),
            ("iconqa", str(tmp_path / "choice.jsonl"), "choice"),
            data.Source("coco", str(tmp_path / "cap2.json"), "caption")]


def test_mix_proportions_and_fields(sources, caplog):
    with caplog.at_level(logging.WARNING, logger="nrca.data"):
        mixed = data.mix_datasets(sources, samples_per_dataset=20, seed=0)
    counts = {name: sum(r["source"] == name for r in mixed) for name in ("flickr", "iconqa", "coco")}
    assert counts == {"flickr": 20, "iconqa": 8, "coco": 20}  # k each, all 8 when fewer
    assert any("iconqa" in r.message and "using all" in r.message for r in caplog.records)
    assert len({(r["source"], r["id"]) for r in mixed}) == len(mixed)  # without replacement
    for r in mixed:
        assert r["task"] == ("choice" if r["source"] == "iconqa" else "caption")
        assert r["conversations"][0]["value"] == f"{IMAGE_PLACEHOLDER}\n{r['question']}"
        assert r["conversations"][1]["value"] == r["answer"]
        if r["task"] == "caption":
            assert r["question"] in CAPTION_PROMPTS
            assert r["answer"].startswith("caption" if r["source"] == "flickr" else "other")
        else:
            assert r["question"].endswith(f"B. y\n{CHOICE_SUFFIX}")
            assert r["question"].count(CHOICE_SUFFIX) == 1  # appended when missing, never doubled


def test_mix_seed_determinism(sources):
    a = data.mix_datasets(sources, samples_per_dataset=20, seed=0)
    assert a == data.mix_datasets(sources, samples_per_dataset=20, seed=0)
    b = data.mix_datasets(sources, samples_per_dataset=20, seed=1)
    assert [r["id"] for r in a] != [r["id"] for r in b]
    # a dataset's draw depends on (seed, name), not on which datasets come before it
    alone = data.mix_datasets(sources[2:], samples_per_dataset=20, seed=0)
    assert [r for r in a if r["source"] == "coco"] == alone
    # equal-sized datasets under different names get different draws (no index correlation)
    twins = data.mix_datasets([sources[0], data.Source("flickr-copy", sources[0].path, "caption")],
                              samples_per_dataset=20, seed=0)
    assert [r["id"] for r in twins[:20]] != [r["id"] for r in twins[20:]]


def test_caption_prompts_sampled_per_record(sources):
    mixed = data.mix_datasets(sources[:1], samples_per_dataset=50, seed=3)
    prompts = [r["question"] for r in mixed]
    assert set(prompts) == set(CAPTION_PROMPTS)  # 50 draws of 5 cover all five (p(miss) ~ 5 * 0.8^50)
    assert max(prompts.count(p) for p in CAPTION_PROMPTS) < 25


def test_mix_rejects_unknown_task_and_duplicate_names(sources):
    with pytest.raises(ValueError, match="task must be one of"):
        data.mix_datasets([("x", sources[0].path, "vqa")])
    with pytest.raises(ValueError, match="appears twice"):
        data.mix_datasets([sources[0], sources[0]])


def test_with_choice_suffix():
    assert data.with_choice_suffix("Q?\nA. a  \n") == f"Q?\nA. a\n{CHOICE_SUFFIX}"
    assert data.with_choice_suffix(f"Q?\n{CHOICE_SUFFIX}") == f"Q?\n{CHOICE_SUFFIX}"


# ----------------------------------------------------------------------------------------------------
# Dataset, bad inputs and collation
# ----------------------------------------------------------------------------------------------------
def preprocess(images):
    """Stand-in for the model's preprocess: pad to square (black), 8 x 8, [0, 1]."""
    rows = []
    for image in images:
        image = data.pad_to_square(image, (0, 0, 0)).resize((8, 8))
        rows.append(torch.tensor(bytearray(image.tobytes()), dtype=torch.float32).view(8, 8, 3).permute(2, 0, 1) / 255)
    return torch.stack(rows)  # (B, 3, 8, 8)


@pytest.fixture()
def image_folder(tmp_path):
    for i in range(4):
        Image.new("RGB", (12 + i, 8), (60 * i, 0, 0)).save(tmp_path / f"img_{i}.png")
    (tmp_path / "broken.png").write_text("this is not a png")
    (tmp_path / "a_folder.png").mkdir()
    Image.new("L", (5, 5), 128).save(tmp_path / "grey.png")
    return tmp_path


def make_dataset(records, folder, tokenizer, max_length=200, **kwargs):
    return data.MultiTaskDataset(records, folder, tokenizer, preprocess, N_IMAGE, IMAGE_ID, max_length, **kwargs)


def test_dataset_items(bpe, image_folder):
    records = [{**record(i, answer="two red circles"), "task": "caption", "source": "s"} for i in range(4)]
    records.append({**record("g", image="grey.png", answer="B"), "task": "choice", "source": "t"})
    dataset = make_dataset(records, image_folder, bpe)
    assert len(dataset) == 5 and dataset.skipped == []
    item = dataset[4]
    assert item["id"] == "g" and item["task"] == "choice" and item["source"] == "t"
    assert item["pixel_values"].shape == (3, 8, 8)  # greyscale converted to RGB
    input_ids, labels = data.tokenize_conversation("What is it?", "B", bpe, N_IMAGE, IMAGE_ID, 200)
    assert torch.equal(item["input_ids"], input_ids) and torch.equal(item["labels"], labels)
    assert item["prompt_length"] == int((labels == IGNORE_INDEX).sum())


def test_dataset_bad_inputs_raise_clearly_or_are_counted(bpe, image_folder, caplog):
    long_question = " ".join(["word"] * 300)
    bad = [
        (record("missing", image="nowhere.png"), FileNotFoundError, r"record 1 \(id 'missing'.*nowhere\.png does not"),
        (record("broken", image="broken.png"), DataError, r"record 1 \(id 'broken'.*broken\.png cannot be read"),
        (record("folder", image="a_folder.png"), DataError,
         r"record 1 \(id 'folder'.*a_folder\.png is a folder, not an image file"),
        ({"id": "noanswer", "image": "img_0.png", "conversations": record(0)["conversations"][:1]}, DataError,
         r"record 1 \(id 'noanswer'.*no answer turn"),
        (record("long", question=long_question), DataError, r"record 1 \(id 'long'.*no room for an answer token"),
    ]
    good = [record(0), record(1)]
    for bad_record, error_type, pattern in bad:
        with pytest.raises(error_type, match=pattern):
            make_dataset([good[0], bad_record, good[1]], image_folder, bpe)
    with caplog.at_level(logging.WARNING, logger="nrca.data"):
        dataset = make_dataset([good[0]] + [b for b, _, _ in bad] + [good[1]], image_folder, bpe, skip_bad_records=True)
    assert [r["id"] for r in dataset.records] == [0, 1] and len(dataset) == 2
    assert len(dataset.skipped) == 5
    for message, (_, _, pattern) in zip(dataset.skipped, bad, strict=True):
        assert re.search(pattern.replace("record 1", r"record \d"), message), message
    messages = [r.message for r in caplog.records]
    assert sum("skipping bad record" in m for m in messages) == 5
    assert any("skipped 5 of 7 records" in m for m in messages)
    with pytest.raises(DataError, match="no usable record"):
        make_dataset([bad[0][0]], image_folder, bpe, skip_bad_records=True)


def test_collate_right_pads_and_generation_collate_left_pads(bpe, image_folder):
    records = [record(0, answer="one"), record(1, answer="three large blue triangles on the right"),
               {**record(2, answer="C"), "references": ["c one", "c two"]}]
    records = [{**r, "task": "caption", "source": "s"} for r in records]
    dataset = make_dataset(records, image_folder, bpe)
    items = [dataset[i] for i in range(3)]
    batch = data.collate(items, pad_token_id=bpe.pad_token_id)
    lengths = [len(item["input_ids"]) for item in items]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["ids"] == ["0", "1", "2"] and batch["tasks"] == ["caption"] * 3 and batch["sources"] == ["s"] * 3
    for i, item in enumerate(items):
        n = lengths[i]
        assert torch.equal(batch["input_ids"][i, :n], item["input_ids"])
        assert torch.equal(batch["labels"][i, :n], item["labels"])
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert (batch["input_ids"][i, n:] == bpe.pad_token_id).all() and (batch["labels"][i, n:] == IGNORE_INDEX).all()
    prompts = [{"input_ids": item["input_ids"][:item["prompt_length"]], "pixel_values": item["pixel_values"][None]}
               for item in items]  # generation prompts: one-image batches (1, C, H, W), no labels
    prompt_lengths = [len(p["input_ids"]) for p in prompts]
    assert len(set(prompt_lengths)) == 1  # same question -> same prompt; make one shorter to see left padding
    prompts[0]["input_ids"] = prompts[0]["input_ids"][2:]
    generation = data.collate(prompts, pad_token_id=bpe.pad_token_id, left=True)
    width = prompt_lengths[1]
    assert generation.keys() == {"input_ids", "attention_mask", "pixel_values"}
    assert generation["input_ids"].shape == (3, width) and generation["pixel_values"].shape == (3, 3, 8, 8)
    assert generation["attention_mask"][0].tolist() == [0, 0] + [1] * (width - 2)
    assert generation["input_ids"][0, :2].tolist() == [bpe.pad_token_id] * 2
    assert bpe.decode(generation["input_ids"][1]).endswith("ASSISTANT:")


def test_pad_to_square():
    image = Image.new("RGB", (4, 2), (255, 0, 0))
    square = data.pad_to_square(image, (1, 2, 3))
    assert square.size == (4, 4)
    assert square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((0, 1)) == (255, 0, 0)
    assert data.pad_to_square(square, (0, 0, 0)) is square


# ----------------------------------------------------------------------------------------------------
# Synthetic data, tokenizer corpus, IconQA
# ----------------------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_well_formed(tmp_path, bpe):
    files = data.make_synthetic(tmp_path / "a", n_train=30, n_test=6, seed=5)
    data.main(["synthetic", str(tmp_path / "b"), "--n-train", "30", "--n-test", "6", "--seed", "5"])
    assert files == {"train_caption.json": 30, "train_choice.json": 30, "test_caption.json": 6, "test_choice.json": 6}
    for path in sorted((tmp_path / "a").rglob("*.*")):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes(), path
    data.make_synthetic(tmp_path / "c", n_train=30, n_test=6, seed=6)
    assert (tmp_path / "c" / "train_caption.json").read_text() != (tmp_path / "a" / "train_caption.json").read_text()

    root = tmp_path / "a"
    captions = data.load_records(root / "test_caption.json")
    choices = data.load_records(root / "test_choice.json")
    train = data.load_records(root / "train_caption.json") + data.load_records(root / "train_choice.json")
    assert len({r["id"] for r in train + captions + choices}) == 72
    for r in captions:
        question, answer = data.question_and_answer(r, r["id"])
        assert question in CAPTION_PROMPTS and len(r["references"]) == 5 and answer == r["references"][0]
        assert len(set(r["references"])) == 5
    for r in choices:
        question, answer = data.question_and_answer(r, r["id"])
        assert answer == r["answer"] and question.endswith(CHOICE_SUFFIX)
        letters = "ABCD"[: len(r["options"])]
        assert r["answer"] in letters
        for letter, option in zip(letters, r["options"], strict=True):
            assert f"\n{letter}. {option}\n" in question
    for r in train + captions + choices:
        with Image.open(root / r["image"]) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    # the caption describes the image: its colour is drawn, on the named side
    for r in captions:
        words = r["references"][0].split()
        colour, position = data.SYNTH_COLOURS[words[2]], words[-1]
        image = Image.open(root / r["image"])
        pixels = [(x, y) for x in range(64) for y in range(64) if image.getpixel((x, y)) == colour]
        assert pixels, r
        xs, ys = [x for x, _ in pixels], [y for _, y in pixels]
        side = {"left": max(xs) < 32, "right": min(xs) >= 32, "top": max(ys) < 32, "bottom": min(ys) >= 32}
        assert side[position], (r["references"][0], min(xs), max(xs), min(ys), max(ys))
    # the whole set goes through the dataset with a short max_length
    mixed = data.mix_datasets([("cap", str(root / "train_caption.json"), "caption"),
                               ("mc", str(root / "train_choice.json"), "choice")], samples_per_dataset=30)
    dataset = make_dataset(mixed, root, bpe, max_length=128)
    assert len(dataset) == 60 and dataset.skipped == []


def test_tokenizer_corpus_deterministic_and_covers_vocabulary(bpe):
    corpus = data.tokenizer_corpus()
    assert corpus == data.tokenizer_corpus() and all(isinstance(t, str) and t for t in corpus)
    text = "\n".join(corpus)
    for word in [*data.SYNTH_COLOURS, *data.SYNTH_SHAPES, *data.SYNTH_COUNTS, *data.SYNTH_POSITIONS, *data.SYNTH_SIZES,
                 "USER:", "ASSISTANT:", CHOICE_SUFFIX, SYSTEM_PROMPT, *CAPTION_PROMPTS, "circles", "triangles"]:
        assert word in text, word
    assert len(bpe(" red", add_special_tokens=False).input_ids) == 1  # vocabulary words become single tokens


def test_convert_iconqa_fake_tree(tmp_path):
    root = tmp_path / "iconqa_data"
    problems = {
        "11": {"question": "Which shape is bigger?", "choices": ["the circle", "the star"], "answer": 1,
               "ques_type": "choose_txt", "split": "train"},
        "12": {"question": "How many dots?", "choices": ["1", "2", "3"], "answer": 0, "ques_type": "choose_txt",
               "split": "train"},
        "13": {"question": "Pick one", "choices": ["a", "b"], "answer": 0, "ques_type": "choose_txt", "split": "test"},
    }
    root.mkdir()
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"choose_txt_train": ["11", "12"], "choose_txt_test": ["13"],
                                                      "train": ["11", "12"]}))
    for pid, split in (("11", "train"), ("12", "train"), ("13", "test")):
        folder = root / "iconqa" / split / "choose_txt" / pid
        folder.mkdir(parents=True)
        Image.new("RGB", (10, 6), (0, 0, 255)).save(folder / "image.png")
    out = tmp_path / "out" / "iconqa_train.json"
    data.main(["convert-iconqa", str(root), str(out)])
    records = data.load_records(out)
    assert [r["id"] for r in records] == ["iconqa-train-11", "iconqa-train-12"]
    first = records[0]
    assert first["conversations"][0]["value"] == (f"{IMAGE_PLACEHOLDER}\nWhich shape is bigger?\nA. the circle\n"
                                                  f"B. the star\n{CHOICE_SUFFIX}")
    assert first["conversations"][1]["value"] == "B" == first["answer"]
    assert first["options"] == ["the circle", "the star"]
    assert records[1]["answer"] == "A"
    assert Image.open(first["image"]).size == (10, 6)  # absolute path
    mixed = data.mix_datasets([("iconqa", str(out), "choice")])
    assert all(r["question"].count(CHOICE_SUFFIX) == 1 for r in mixed)
    assert data.convert_iconqa(root, tmp_path / "test.json", split="test") == 1

    (root / "iconqa" / "train" / "choose_txt" / "12" / "image.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"problem '12'.*image\.png does not exist"):
        data.convert_iconqa(root, out)
    problems["11"]["answer"] = 5
    (root / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(DataError, match=r"problem '11'.*'answer' must be an index"):
        data.convert_iconqa(root, out)
    with pytest.raises(DataError, match="no key 'choose_txt_val'"):
        data.convert_iconqa(root, out, split="val")
    with pytest.raises(FileNotFoundError, match="problems.json not found"):
        data.convert_iconqa(tmp_path, out)
