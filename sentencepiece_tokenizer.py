"""Llama's SentencePiece tokenizer, token for token as LLaVA and VILA trained with it.

LLaVA-1.5 (haotian-liu/LLaVA 44e0562, 2023-10-05, transformers 4.31) and VILA1.5 (NVlabs/VILA 1c88211,
2024-05-13, transformers 4.36) load the LLM's tokenizer with `AutoTokenizer.from_pretrained(...,
use_fast=False)`: transformers' slow `LlamaTokenizer`, which hands every stretch of text between special
tokens to `sentencepiece.SentencePieceProcessor.encode` (the model's own normalisation, dummy "▁" prefix,
score-ordered BPE merges, byte fallback). VILA's trainer saves that slow tokenizer, so a VILA `llm/` folder
may ship only `tokenizer.model`.

transformers 5 has no slow `LlamaTokenizer` any more: `AutoTokenizer` converts `tokenizer.model` into a
`tokenizers` BPE whose merges do not always agree with SentencePiece's (runs of spaces: "What  is" ->
[What, "▁▁", is] where SentencePiece gives [What, "▁", "▁is"]; text starting with a space loses a "▁"),
so the labels would differ from those the checkpoint was trained on. `SentencePieceTokenizer` is a
transformers `PreTrainedTokenizer` (the `SentencePieceBackend` of transformers 5) whose `_tokenize` is
`sp.encode` itself; models.py uses it for folders with `tokenizer.model` and no `tokenizer.json`.

One difference is left on purpose. VILA's builder (1c88211, llava/model/language_model/builder.py) passes
`legacy=False`; its copy of LlamaTokenizer (llava/train/transformers_replace/models/llama/tokenization_llama.py)
then encodes "▁" + text once per string, so text that follows a special token inside one string gets no
"▁" of its own (VILA's `preprocess_v1` subtracts one token per later round to match). Our data.py never
tokenizes a string holding a special token (it tokenises the template piece by piece, see
data.encode_turns), and LLaVA-1.5's `preprocess_v1` counts each round tokenised on its own, "▁" included;
we follow that (`legacy=True`) for every piece. So for VILA the first word ("USER") of a multi-turn
record's later turns is tokenized with a "▁" where VILA's training had none (a prompt token, never a
label); answers and single-turn records are unaffected.

Not here: the chat template (data.py), choosing between this and `AutoTokenizer` (models._load_tokenizer).

    python -m pytest -q tests/test_sentencepiece_tokenizer.py
"""

from __future__ import annotations

import json
import os

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class SentencePieceTokenizer(SentencePieceBackend):
    """`tokenizer(text).input_ids == [bos] + sentencepiece.encode(text)` for text without special tokens;
    special and added tokens (`</s>`, an added `<image>`) are split out first, the text between them is
    encoded piece by piece. Decoding is `sentencepiece.decode` (byte-fallback pieces become UTF-8 again)."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token=None,
                 add_bos_token: bool = True, add_eos_token: bool = False, **kwargs):
        if add_eos_token:
            raise ValueError(f"SentencePieceTokenizer: {vocab_file}: add_eos_token=True is not supported "
                             "(LLaVA/VILA add </s> themselves)")
        self.folder_legacy = kwargs.pop("legacy", None)  # what the folder's config said; written back by save
        kwargs["legacy"] = True  # sp.encode with the model's own dummy prefix on every piece (module docstring)
        kwargs["special_tokens_pattern"] = "bos" if add_bos_token else kwargs.get("special_tokens_pattern")
        super().__init__(vocab_file=vocab_file, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
                         pad_token=pad_token, **kwargs)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(tokens)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers saves it, with `tokenizer_class` "LlamaTokenizer" (and the folder's own `legacy`)
        so that LLaVA's and VILA's `AutoTokenizer(use_fast=False)` read the folder back."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        path = os.path.join(save_directory, "tokenizer_config.json")
        with open(path) as f:
            config = json.load(f)
        config.update(tokenizer_class="LlamaTokenizer")
        config.pop("backend", None)
        config.pop("special_tokens_pattern", None)
        if self.folder_legacy is None:
            config.pop("legacy", None)
        else:
            config["legacy"] = self.folder_legacy
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
        return files
