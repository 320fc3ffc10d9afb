"""sentencepiece_tokenizer.py and models._load_tokenizer on a folder that ships only tokenizer.model (as VILA's
trainer saves it): token for token the `sentencepiece` library, as LLaVA/VILA's LlamaTokenizer(use_fast=False);
and the vicuna_v1 labels built on it equal our transcription of LLaVA's preprocess_v1 (conftest).

The SentencePiece model is trained inside the test (conftest.write_sentencepiece_folder, ~20 ms).

Run: python -m pytest -q tests/test_sentencepiece_tokenizer.py   (about 2 s)
"""

import json

import pytest
from conftest import preprocess_v1_reference, write_sentencepiece_folder

import data
import models

TEXTS = [
    "What  is",  # runs of spaces: SentencePiece [▁What, ▁, ▁is]; a converted BPE gives [▁What, ▁▁, is]
    "What   is  that?    Indented",
    " leading space", "  two leading spaces", "trailing space ", "trailing spaces   ", " ", "   ",
    "line\nbreak", "\nstarts with a newline", "two\n\nnewlines\n", "tab\there",
    "café naïve über 東京",  # unicode in the vocabulary
    "emoji 🙂 and ÿ and €",  # not in the vocabulary: byte fallback
    "digits 12345 and 3.14", "USER: What is in the image? ASSISTANT: two red circles",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm")
    return path, write_sentencepiece_folder(path)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenization_equals_sentencepiece(folder, text):
    path, sp = folder
    tokenizer = models._load_tokenizer(str(path))
    ids = sp.encode(text)
    assert tokenizer(text, add_special_tokens=False).input_ids == ids, (
        tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids), sp.id_to_piece(ids))
    assert tokenizer(text).input_ids == [sp.bos_id()] + ids
    assert tokenizer.convert_ids_to_tokens(ids) == sp.id_to_piece(ids)
    assert tokenizer.decode(ids) == sp.decode(ids)


def test_special_tokens_and_added_image_token(folder):
    """Only tokenizer.model -> SentencePieceTokenizer. Special tokens inside a text are split out; each
    stretch around them is encoded on its own."""
    from sentencepiece_tokenizer import SentencePieceTokenizer

    path, sp = folder
    tokenizer = models._load_tokenizer(str(path))
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer("a  b</s>USER: c", add_special_tokens=False).input_ids == sp.encode("a  b") + [2] + sp.encode(
        "USER: c")
    assert tokenizer.decode([1] + sp.encode("two red") + [2], skip_special_tokens=True) == "two red"
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == sp.get_piece_size() == len(tokenizer) - 1
    assert tokenizer("x <image>\ny", add_special_tokens=False).input_ids == sp.encode("x ") + [image_id] + sp.encode(
        "\ny")


@pytest.mark.parametrize("turns", [
    [("What  is in  the image?", "two  red circles on the left")],
    [(" What is it?\n A. red\n B. blue", "B")],
    [("Describe it.", "A café, 東京 🙂"), ("And  then?", "nothing  more"), ("Which?\nA. x\nB. y", "A")],
])
def test_vicuna_v1_labels_equal_preprocess_v1(folder, turns):
    """data.tokenize_turns with the loaded tokenizer equals our transcription of preprocess_v1 run on
    `sentencepiece` itself (LLaVA tokenises the whole conversation and labels rounds by length); answers
    and questions here are already stripped, as data.py strips them."""
    path, sp = folder
    tokenizer = models._load_tokenizer(str(path))
    turns = [(question.strip(), answer.strip()) for question, answer in turns]
    input_ids, labels = data.tokenize_turns(turns, tokenizer, 5, 9999, 10_000)
    reference_ids, reference_labels = preprocess_v1_reference(turns, sp.encode, 1, 2, 5, 9999)
    assert input_ids.tolist() == reference_ids
    assert labels.tolist() == reference_labels
    assert sum(label == 2 for label in labels.tolist()) == len(turns)  # no "tokenization mismatch" masking


def test_save_writes_a_llama_tokenizer_folder(folder, tmp_path):
    """Saved as transformers writes a slow tokenizer, with tokenizer_class LlamaTokenizer and the folder's own
    `legacy`, so LLaVA/VILA's AutoTokenizer(use_fast=False) reads it; it reloads to the same ids."""
    path, sp = folder
    tokenizer = models._load_tokenizer(str(path))
    tokenizer.save_pretrained(str(tmp_path))
    config = json.load(open(tmp_path / "tokenizer_config.json"))
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["legacy"] is False
    assert (tmp_path / "tokenizer.model").read_bytes() == (path / "tokenizer.model").read_bytes()
    assert not (tmp_path / "tokenizer.json").exists()
    again = models._load_tokenizer(str(tmp_path))
    for text in TEXTS:
        assert again(text).input_ids == tokenizer(text).input_ids
    from sentencepiece_tokenizer import SentencePieceTokenizer

    with pytest.raises(ValueError, match="add_eos_token"):
        SentencePieceTokenizer(vocab_file=str(path / "tokenizer.model"), add_eos_token=True)
