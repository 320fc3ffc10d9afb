"""The generic adapter of the model interface (models.py): any transformers image-text-to-text model.

Anything that `AutoModelForImageTextToText` + `AutoProcessor` load (tested on tiny models: Qwen2-VL,
Qwen2.5-VL, LLaVA-OneVision, Idefics3 / SmolVLM, LLaVA-1.5; see the README's table) is wrapped in `HFMLLM`,
which exposes what models.MLLM exposes for LLaVA-1.5 / VILA1.5, so train.py, evaluate.py and every method
run on it unchanged. `models.load_model(folder)` returns one for every folder that is neither LLaVA nor VILA.

- Prompts and labels come from the processor's chat template, never from a hand-written one
  (`HFMLLM.conversation`). For exchange k of a record the template renders the conversation up to k's
  generation prompt (`prompt_k`) and up to k's answer (`full_k`); `full_k` must extend `prompt_k`, and
  `prompt_k` the text through reply k - 1. Each reply is what gets labels; trailing whitespace after its last
  token is not labelled (Qwen's "<|im_end|>\\n" -> "<|im_end|>"). A template that closes the assistant turn
  with no special token (llava-hf's ends the reply with a space) gets the tokenizer's eos appended, else the
  model would never learn to stop. The first prompt goes through the processor (which expands the image
  placeholder into the family's image tokens), every later piece through the tokenizer alone, and the pieces
  are concatenated: the label boundaries are exact, and generation conditions on exactly the training prompt
  (LLaVA's piece-wise tokenisation, as data.py does for vicuna_v1). Special tokens: the tokenizer adds its own
  (BOS) to the prompt unless the rendered prompt already starts with the BOS token, the rule of transformers
  5.23's `ProcessorMixin.apply_chat_template(tokenize=True)` (llava-hf's template writes no BOS, vicuna_v1's
  does).
- Trainable set (paper Sec. 3.1, models.freeze_for_finetuning): the connector + the last N decoder layers.
  The connector is found by module name per family (`CONNECTORS`; override with train.py's `--connector`),
  the decoder layers through `model.get_decoder().layers`, the vision tower by name (`VISION_TOWERS`).
- Answer-row logits: methods.model_forward passes `logits_to_keep` = a bool (B, T) mask (every family
  above takes it; a forward without it gets the documented fallback there).
- Noisy Visual Mixup (Eq. 2) per image in every layout: noise.noisy_pixel_values.

A batch holds `pixel_values` = the dict of the processor's image tensors (pixel_values, image_grid_thw,
image_sizes, pixel_attention_mask, ...) and of its token-aligned extras (`mm_token_type_ids`), which
data.collate merges and methods.model_forward unpacks into the model call. A sample's image goes first in its first
user turn; a text-only sample has none (`render`, n_images=0); several images (MULTI_IMAGE families, train.py's lazy
path) go where the record's `<image>` placeholders are, each its own rows, so that Eq. (2) treats each image alone.
`set_resolution` is train.py's --max-pixels / --min-pixels; `image_size_error` and `image_tokens` (a picture's
tokens from its size) serve --check-images.

Not here: videos, several images on Idefics3 / SmolVLM (one row holds every image's tiles), modality interference
(needs `embed`),
attention shares (Table 1 locates the vicuna_v1 system prompt): the README's table lists them.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_hf_models.py
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from PIL import Image
from torch import nn

from data import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    TOKEN_ALIGNED,
    DataError,
    adds_prefix_space,
    collate,
    conversation_turns,
    open_image,
    record_name,
    usable_records,
)

# Connector module names per family (model_type -> names matched against parameter names). The LLaVA-NeXT
# family's learned `image_newline` (ends every row of anyres features) belongs to the connector too.
CONNECTORS = {
    "llava": ("multi_modal_projector",),
    "llava_next": ("multi_modal_projector", "image_newline"),
    "llava_onevision": ("multi_modal_projector", "image_newline"),
    "qwen2_vl": ("visual.merger",),
    "qwen2_5_vl": ("visual.merger",),
    "qwen3_vl": ("visual.merger", "visual.deepstack_merger_list"),
    "idefics3": ("connector",),
    "smolvlm": ("connector",),
    "gemma3": ("multi_modal_projector",),
    "internvl": ("multi_modal_projector",),
}
DEFAULT_CONNECTORS = ("multi_modal_projector", "visual.merger", "connector", "image_newline")
# Families whose image processor resizes each picture to a pixel budget (train.py --max-pixels / --min-pixels).
DYNAMIC_RESOLUTION = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Families whose processor and model take several images in one sample (train.py's multi-image records) with a
# layout where Eq. (2) finds each image: packed patches with a grid row per image (Qwen), a row per image
# (OneVision). Idefics3 / SmolVLM put every tile of a sample's images in one row: its images could not be told apart.
MULTI_IMAGE = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")
VISION_TOWERS = ("vision_tower", "visual", "vision_model")  # attribute of the base model (model.model)
log = logging.getLogger("nrca.hf_models")


def without_video(processor_class):
    """The family's processor class minus its video processor. transformers' video processors need
    torchvision, which has no CPU wheel matching the CPU torch of our CI; images never touch them."""
    return _without_video(processor_class)


@functools.cache
def _without_video(processor_class):
    def get_attributes(cls):
        return [name for name in processor_class.get_attributes() if "video" not in name]

    return type(processor_class.__name__, (processor_class,), {"get_attributes": classmethod(get_attributes)})


def load_processor(path: str):
    """AutoProcessor, or (without torchvision) the processor's image-only variant of the same class."""
    try:
        return transformers.AutoProcessor.from_pretrained(path)
    except (ValueError, OSError, ImportError) as error:
        if "video" not in str(error).lower():
            raise
        config_file = Path(path, "processor_config.json")
        if not config_file.is_file():
            raise ValueError(f"hf_models.load_processor: AutoProcessor failed on the video part of {path} (torchvision "
                             "missing?) and there is no local processor_config.json to build the image-only processor "
                             f"from; install the torchvision matching your torch or download the folder: {error}"
                             ) from error
        name = json.loads(config_file.read_text()).get("processor_class")
        if not name or not hasattr(transformers, name):
            raise ValueError(f"hf_models.load_processor: {path}/processor_config.json names no known "
                             f"processor_class ({name!r}); AutoProcessor failed with: {error}") from error
        return without_video(getattr(transformers, name)).from_pretrained(path)


def set_resolution(mllm, max_pixels: int = 0, min_pixels: int = 0) -> None:
    """train.py --max-pixels / --min-pixels: the pixel budget per image of a dynamic-resolution family's image
    processor (Qwen2-VL's `size` = {"shortest_edge": min_pixels, "longest_edge": max_pixels}, what its max_pixels
    option sets); 0 keeps the processor's own. A family with a fixed input size refuses them."""
    if not (max_pixels or min_pixels):
        return
    family = mllm.model.config.model_type if getattr(mllm, "kind", "") == "hf" else getattr(mllm, "kind", "?")
    if family not in DYNAMIC_RESOLUTION:
        raise ValueError(f"--max-pixels / --min-pixels: {family} resizes every image to a fixed size; they apply to "
                         f"the dynamic-resolution families {', '.join(DYNAMIC_RESOLUTION)}")
    image_processor = mllm.processor.image_processor
    size = {key: image_processor.size[key] for key in ("shortest_edge", "longest_edge")}
    size.update({key: value for key, value in (("longest_edge", max_pixels), ("shortest_edge", min_pixels)) if value})
    if size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"--min-pixels {size['shortest_edge']} is above the max_pixels {size['longest_edge']}")
    image_processor.size = type(image_processor.size)(**size) if not isinstance(image_processor.size, dict) else size


# ----------------------------------------------------------------------------------------------------
# The adapter


@dataclass
class HFMLLM:
    """A transformers image-text-to-text model with its processor behind models.py's model interface."""

    model: nn.Module  # an AutoModelForImageTextToText class
    processor: object  # its processor: tokenizer + image processor + chat template
    connector_names: tuple = field(default=())  # override of CONNECTORS[model_type]
    kind: str = "hf"

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def pad_token_id(self) -> int:
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- the parts: Sec. 3.1's trainable set, FSDP2's units, activation checkpointing -------------------
    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (without lm_head)."""
        return self.model.get_decoder()

    @property
    def decoder_layers(self) -> nn.ModuleList:
        decoder = self.language_model
        if not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
            raise ValueError(f"hf_models: {type(self.model).__name__}.get_decoder() ({type(decoder).__name__}) has "
                             "no `layers` ModuleList; this family is not supported")
        return decoder.layers

    def connector_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the connector: parameters whose dotted name contains one of the names."""
        names = self.connector_names or CONNECTORS.get(self.model.config.model_type, DEFAULT_CONNECTORS)
        found = [(n, p) for n, p in self.model.named_parameters()
                 if any(f".{name}." in f".{n}." for name in names)]
        if not found:
            raise ValueError(f"hf_models: no parameter of {type(self.model).__name__} (model_type "
                             f"{self.model.config.model_type!r}) lies under the connector names {names}; name the "
                             "connector's modules with train.py --connector NAME[,NAME], or set "
                             "mllm.connector_names = ('NAME', ...) in code (see model.named_modules())")
        return found

    def connector_modules(self) -> list[nn.Module]:
        """The connector's modules (FSDP2 units); a bare parameter such as LLaVA-NeXT's image_newline is none."""
        names = self.connector_names or CONNECTORS.get(self.model.config.model_type, DEFAULT_CONNECTORS)
        found = [module for path, module in self.model.named_modules()
                 if path and any(f".{path}".endswith(f".{name}") for name in names)]
        # A container (Qwen3-VL's deepstack_merger_list) has no forward of its own, which FSDP2 needs: its children.
        return [part for module in found
                for part in (module.children() if isinstance(module, (nn.ModuleList, nn.ModuleDict)) else [module])]

    @property
    def vision_tower(self) -> nn.Module:
        inner = getattr(self.model, "model", self.model)
        for name in VISION_TOWERS:
            if isinstance(getattr(inner, name, None), nn.Module):
                return getattr(inner, name)
        raise ValueError(f"hf_models: {type(self.model).__name__} has none of the vision towers {VISION_TOWERS}")

    @property
    def vision_layers(self) -> nn.ModuleList:
        """The vision tower's blocks: its longest ModuleList (encoder.layers, Qwen2-VL's blocks)."""
        lists = [m for m in self.vision_tower.modules() if isinstance(m, nn.ModuleList)]
        if not lists:
            raise ValueError(f"hf_models: the vision tower {type(self.vision_tower).__name__} has no layer list")
        return max(lists, key=len)

    # --- chat template and labels ---------------------------------------------------------------
    def render(self, turns: list[tuple[str, str | None]], n_images: int = 1) -> str:
        """The chat template's text of (question, answer) exchanges. One image goes first in the first user turn (as
        the record's placeholder is removed); none for a text-only record; several where their placeholders are
        written. A last answer of None renders that question with the generation prompt."""
        messages = []
        for k, (question, answer) in enumerate(turns):
            if n_images > 1:
                parts = question.split(IMAGE_PLACEHOLDER)
                content = [item for i, text in enumerate(parts) for item in
                           ([{"type": "image"}] if i else []) + ([{"type": "text", "text": text}] if text else [])]
            else:
                content = [{"type": "image"}] if k == 0 and n_images == 1 else []
                content = content + [{"type": "text", "text": question}]
            messages.append({"role": "user", "content": content})
            if answer is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=turns[-1][1] is None)

    @functools.cached_property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end generation: the tokenizer's eos and the token closing the template's assistant turn."""
        _, ((_, reply),) = self.conversation([("?", "ok")])
        ids = [self.tokenizer.eos_token_id, reply[-1]] if self.tokenizer.eos_token_id is not None else [reply[-1]]
        return sorted(set(ids))

    def conversation(self, turns: list[tuple[str, str]], where: str = "hf_models", n_images: int = 1
                     ) -> tuple[str, list]:
        """A conversation through the chat template: (the first prompt's text, [(ids before reply k, reply k's
        ids)]). Prompt k is the template's text up to exchange k's generation prompt, reply k what the template
        adds after it when the answer is given (its trailing whitespace after the end-of-turn token not
        labelled: Qwen's "<|im_end|>\\n" -> "<|im_end|>"). Exchange k + 1's prompt must extend exchange k's
        text, else labels could not be placed; the text between them (the newline, the next user turn, the
        assistant prefix) is the unlabelled part before reply k + 1. A reply the template closes with no special
        token gets the tokenizer's eos, else the model would never learn to stop."""
        first, pieces, said = None, [], ""
        for k in range(len(turns)):
            prompt = self.render(turns[:k] + [(turns[k][0], None)], n_images)
            full = self.render(turns[:k + 1], n_images)
            if not prompt.startswith(said) or not full.startswith(prompt):
                before, after = (said, prompt) if not prompt.startswith(said) else (prompt, full)
                raise ValueError(f"{where}: the chat template's text for exchange {k + 1} does not extend the text "
                                 f"before it (which ends {before[-40:]!r}; it reads "
                                 f"{after[max(0, len(before) - 40):][:80]!r}): labels cannot be placed through this "
                                 "template")
            reply = full[len(prompt):].rstrip()
            if turns[k][1].strip() not in reply:
                raise DataError(f"{where}: the chat template dropped the answer text {turns[k][1]!r} from assistant "
                                f"turn {k + 1}")
            ids = self.text_ids(reply)
            if not ids or ids[-1] not in self.tokenizer.all_special_ids:  # the turn has no closing token: add eos
                if self.tokenizer.eos_token_id is None:
                    raise ValueError(f"{where}: the template closes the assistant turn with no special token and the "
                                     "tokenizer has no eos: the model could never learn to stop")
                ids = ids + [self.tokenizer.eos_token_id]
            gap = [] if k == 0 else self.text_ids(prompt[len(said):])
            first = prompt if k == 0 else first
            pieces.append((gap, ids))
            said = prompt + reply
        return first, pieces

    @functools.cached_property
    def prefix_space(self) -> bool:
        return adds_prefix_space(self.tokenizer)

    def text_ids(self, text: str) -> list[int]:
        """Token ids of a piece of the conversation after the first prompt. A SentencePiece tokenizer puts its own
        "▁" before a piece, so a piece's leading space is dropped for it (data.py's rule for vicuna_v1 answers):
        " two" would otherwise become "▁", "▁two"."""
        if text.startswith(" ") and self.prefix_space:
            text = text[1:]
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def processed_prompt(self, text: str, image: Image.Image | list[Image.Image], where: str = "prompt") -> dict:
        """A prompt text through the processor (each image expanded into the family's image tokens): input_ids
        (T,) and pixel_values = the processor's image tensors and token-aligned extras, batch of 1
        (data.collate batches them). The tokenizer adds its special tokens (BOS) unless the text already starts
        with the BOS token, the rule of transformers' `ProcessorMixin.apply_chat_template(tokenize=True)`. An
        image the processor refuses (Qwen2-VL: an aspect ratio over 200) is a DataError naming `where`."""
        bos = self.tokenizer.bos_token
        images = [image] if isinstance(image, Image.Image) else list(image)
        if len(images) > 1 and self.model.config.model_type not in MULTI_IMAGE:
            raise DataError(f"{where}: {len(images)} images; multi-image samples are supported on "
                            f"{', '.join(MULTI_IMAGE)}, not on {self.model.config.model_type}")
        try:
            out = dict(self.processor(text=[text], images=(images if len(images) < 2 else [images]) or None,
                                      return_tensors="pt",  # several images: nested, one list for the one text
                                      add_special_tokens=not (bos is not None and text.startswith(bos))))
        except (ValueError, TypeError, IndexError) as error:
            raise DataError(f"{where}: the {type(self.processor).__name__} refused the record's image(s) "
                            f"{[im.size for im in images]}: {str(error).splitlines()[0]}") from None
        out.pop("attention_mask", None)
        return {"input_ids": out.pop("input_ids")[0], "pixel_values": out}

    def prompt(self, image: Image.Image, question: str) -> dict:
        """A generation prompt (processed_prompt of the question with the template's generation prompt)."""
        return self.processed_prompt(self.render([(question, None)]), image)

    def encode(self, image: Image.Image, turns: list[tuple[str, str]], max_length: int = 2048,
               where: str = "hf_models.encode") -> dict:
        """One training sample of (question, answer) exchanges (see encode_conversation)."""
        text, pieces = self.conversation([(q, a.strip()) for q, a in turns], where)
        return self.encode_conversation(image, text, pieces, max_length, where)

    @property
    def dynamic_resolution(self) -> bool:
        """Whether the processor sizes each picture by its own rule (`smart_resize`: Qwen2-VL, 2.5-VL, 3-VL), so
        that a picture's header tells its number of image tokens (`image_tokens`) and whether it is refused."""
        image_processor = self.processor.image_processor
        return (self.model.config.model_type in DYNAMIC_RESOLUTION
                and getattr(sys.modules[type(image_processor).__module__], "smart_resize", None) is not None)

    def _resized(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) after the image processor's `smart_resize` (dynamic_resolution only); ValueError when
        the processor refuses the picture."""
        image_processor = self.processor.image_processor
        smart_resize = sys.modules[type(image_processor).__module__].smart_resize
        return smart_resize(height, width, factor=image_processor.patch_size * image_processor.merge_size,
                            min_pixels=image_processor.size["shortest_edge"],
                            max_pixels=image_processor.size["longest_edge"])

    def image_size_error(self, width: int, height: int) -> str | None:
        """Why the processor would refuse a picture of this size, by its own rule, or None: a dynamic-resolution
        family's `smart_resize` (Qwen2-VL: an aspect ratio over 200). train.py --check-images runs it on every
        image's header before step 1; other families resize anything."""
        if not self.dynamic_resolution:
            return None
        try:
            self._resized(width, height)
        except ValueError as error:
            return f"the {type(self.processor.image_processor).__name__} refuses it: {error}"
        return None

    def image_tokens(self, width: int, height: int) -> int:
        """How many tokens a picture of this size adds to a prompt. A dynamic-resolution family: one per merge x
        merge patches of smart_resize's picture (no picture is made); another: the processor's prompt with a blank
        picture of that size, less the same template's prompt without one (the count depends only on the size;
        cached per size). DataError for a size the processor refuses."""
        if self.dynamic_resolution:
            refused = self.image_size_error(width, height)
            if refused:
                raise DataError(f"a {width} x {height} picture: {refused}")
            image_processor = self.processor.image_processor
            resized_height, resized_width = self._resized(width, height)
            patches = (resized_height // image_processor.patch_size) * (resized_width // image_processor.patch_size)
            return patches // image_processor.merge_size ** 2
        by_size = self.__dict__.setdefault("_image_tokens_by_size", {})
        if (width, height) not in by_size:
            blank = Image.new("RGB", (width, height))
            with_picture = self.processed_prompt(self.render([("?", None)], 1), blank, f"a {width} x {height} picture")
            without = self.processed_prompt(self.render([("?", None)], 0), [])
            by_size[width, height] = len(with_picture["input_ids"]) - len(without["input_ids"])
        return by_size[width, height]

    @property
    def max_image_tokens(self) -> int | None:
        """The most image tokens one picture can become (dynamic_resolution: at the max_pixels budget), or None."""
        if not self.dynamic_resolution:
            return None
        image_processor = self.processor.image_processor
        per_token = (image_processor.patch_size * image_processor.merge_size) ** 2
        return image_processor.size["longest_edge"] // per_token

    def encode_record(self, images: list[Image.Image], turns: list[tuple[str, str]], max_length: int,
                      where: str = "record") -> dict:
        """One training sample of a record (loader.py, on the fly): `encode_conversation` of its conversation
        through the template, with its images (none: text-only; several: where their placeholders are)."""
        text, pieces = self.conversation(turns, where, n_images=len(images))
        return self.encode_conversation(images, text, pieces, max_length, where)

    def encode_conversation(self, image: Image.Image | list[Image.Image], text: str, pieces: list,
                            max_length: int = 2048, where: str = "hf_models.encode") -> dict:
        """A conversation (`conversation`'s first prompt text and pieces) with its image -> input_ids (T,),
        labels (T,) (-100 but on the replies), pixel_values (dict of the processor's image tensors and
        token-aligned extras, each with a leading batch dim of 1), prompt_length (the first prompt's tokens). The
        first prompt goes through the processor, every later piece through the tokenizer alone, so the label
        boundaries are exact (data.py's piece-wise tokenisation for vicuna_v1). As data.py, truncation never
        cuts the first prompt (the image tokens): it cuts the tail of the conversation (later turns, then the
        answer's end)."""
        prompt = self.processed_prompt(text, image, where)
        prompt_ids, images = prompt["input_ids"], prompt["pixel_values"]  # (T_prompt,)
        rest = [token for gap, reply in pieces for token in gap + reply]
        labelled = [label for gap, reply in pieces for label in [IGNORE_INDEX] * len(gap) + reply]
        room = max_length - len(prompt_ids)
        if room < 1:
            raise DataError(f"{where}: the prompt is {len(prompt_ids)} tokens and leaves no room for an answer "
                            f"token within max_length={max_length}")
        if len(rest) > room:
            log.warning("%s: %d tokens after the prompt cut to %d by max_length=%d (the prompt takes %d)", where,
                        len(rest), room, max_length, len(prompt_ids))
        input_ids = torch.cat([prompt_ids, torch.tensor(rest[:room], dtype=torch.long)])  # (T,)
        labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX),
                            torch.tensor(labelled[:room], dtype=torch.long)])  # (T,)
        added = len(input_ids) - len(prompt_ids)
        for key in TOKEN_ALIGNED:  # the rest is text: type 0
            if key in images:
                images[key] = torch.cat([images[key], images[key].new_zeros(1, added)], dim=1)  # (1, T)
        return {"input_ids": input_ids, "labels": labels, "pixel_values": images, "prompt_length": len(prompt_ids)}

    # --- the interface's data, generation and saving ------------------------------------------------
    def dataset(self, records: list[dict], image_folder, max_length: int = 2048, skip_bad_records: bool = False):
        return HFDataset(records, image_folder, self, max_length, skip_bad_records)

    def collate(self, items: list[dict], left: bool = False) -> dict:
        return collate(items, self.pad_token_id, left=left)

    def blank_image_features(self) -> torch.Tensor:
        """The vision tower and connector on one blank picture (models.MLLM.blank_image_features: why)."""
        inputs = self.processor.image_processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt")
        accepted = inspect.signature(self.model.get_image_features).parameters
        inputs = {key: value.to(self.device) for key, value in inputs.items() if key in accepted}
        out = self.model.get_image_features(**inputs)
        parts = [out] if torch.is_tensor(out) else [out.pooler_output] if hasattr(out, "pooler_output") else out
        return torch.cat([p.reshape(-1) for part in parts for p in (part if isinstance(part, (list, tuple))
                                                                      else [part])])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: dict,
                 max_new_tokens: int, output_attentions: bool = False) -> torch.Tensor:
        """Greedy decoding of a LEFT-padded batch (transformers' generate): new tokens (B, n); a finished row
        holds its end token, then pad_token_id."""
        if output_attentions:
            raise ValueError("attention shares (Table 1, evaluate.py --attention) are measured on LLaVA-1.5 / "
                             "VILA1.5 only: they locate the vicuna_v1 system prompt, which other families' chat "
                             "templates do not have")
        was_training = self.model.training
        self.model.eval()
        half = self.model.get_input_embeddings().weight.dtype  # fp32 trainable parts beside bf16 frozen ones
        try:
            with torch.autocast(input_ids.device.type, dtype=half, enabled=half in (torch.bfloat16, torch.float16)):
                out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **pixel_values,
                                          max_new_tokens=max_new_tokens, do_sample=False,
                                          eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id)
        finally:
            self.model.train(was_training)
        return out[:, input_ids.shape[1]:]  # (B, n)

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)


class HFDataset(torch.utils.data.Dataset):
    """data.py records (single- or multi-turn) -> `HFMLLM.encode` samples (plus id, task, source). Every
    record's conversation goes through the template (and its text pieces through the tokenizer) once, up front,
    with the other cheap checks (data.usable_records: structure, the template places every answer, the image's
    header); the image and its prompt are processed lazily. `skip_bad_records` as data.MultiTaskDataset. A
    prompt's length is known only once the processor has expanded its image, so the first record is encoded up
    front: a max_length too small for this model's image tokens stops the run before step 1. A later record
    whose prompt alone exceeds max_length stops the run when it is reached, naming it (an index already
    scheduled cannot be dropped)."""

    def __init__(self, records: list[dict], image_folder, mllm: HFMLLM, max_length: int = 2048,
                 skip_bad_records: bool = False):
        self.image_folder, self.mllm, self.max_length = Path(image_folder), mllm, max_length

        def through_template(record, where):  # the template places every answer; kept for __getitem__
            return mllm.conversation(conversation_turns(record, where), where)

        self.records, self.conversations, self.skipped = usable_records(records, self.image_folder,
                                                                        through_template, skip_bad_records)
        self[0]  # the processor's image tokens against max_length, before any step

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        where = record_name(index, record)
        image = open_image(self.image_folder / record["image"], where)
        sample = self.mllm.encode_conversation(image, *self.conversations[index], self.max_length, where)
        return {"id": str(record["id"]), "task": record.get("task", ""), "source": record.get("source", ""),
                **sample}
