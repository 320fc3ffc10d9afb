"""The model interface train.py, evaluate.py and every method use, its adapter for the paper's two MLLMs
(Sec. 4.1), `MLLM`, and the freezing recipe of Sec. 3.1 (vision encoder frozen; connector + last N decoder
layers trained). `load_model` returns the adapter a checkpoint needs.

The interface (MLLM here, hf_models.HFMLLM for every other transformers image-text-to-text model):
    model                      the nn.Module; model(input_ids | inputs_embeds, attention_mask, <pixel_values>,
                               logits_to_keep=bool (B, T)).logits is (num_true, V): only the answer rows go
                               through lm_head (methods.model_forward)
    tokenizer, pad_token_id, device, kind ("llava" | "vila" | "hf")
    language_model, decoder_layers, connector_parameters(), connector_modules(), vision_tower, vision_layers
                               the parts Sec. 3.1 trains, FSDP2 shards and activation checkpointing recomputes
    dataset(records, image_folder, max_length, skip_bad_records)   training samples of data.py's records
    collate(items, left=False) the batch (data.collate); pixel_values a (B, C, H, W) tensor or a dict
    prompt(image, question)    a generation prompt exactly as training conditions on it
    generate(input_ids, attention_mask, pixel_values, max_new_tokens)   greedy new tokens (B, n), left padding
    save(path)                 the checkpoint in the format it came in
Only MLLM has embed / image_token_id / num_image_tokens / preprocess: modality interference and the
attention shares of Table 1 need them (README, "Models and methods").

- LLaVA-1.5 in transformers' format (`LlavaForConditionalGeneration`, e.g. llava-hf/llava-1.5-7b-hf):
  CLIP ViT-L/14-336 + 2-layer MLP connector + Vicuna, 576 image tokens, data.py's vicuna_v1 tokenisation.
- VILA1.5 in its own three-folder format (`llm/`, `vision_tower/`, `mm_projector/` + `config.json`):
  transformers has no class for it, so `VilaForConditionalGeneration` assembles a `LlamaForCausalLM`,
  a `SiglipVisionModel` and our `DownSampleProjector` (VILA's "mlp_downsample"), and `save` writes the
  same three folders back so VILA's own tools can read the result. The connector's image-token order is
  that of the VILA1.5 release code (NVlabs/VILA 1c88211, 2024-05-13); the NVILA-era order (36f6adc,
  2024-12-12) is `downsample_order="nvila"` or mm_projector_type "mlp_downsample_2x2_fix" (see DOWNSAMPLE_ORDERS).
- "tiny-llava", "tiny-vila" (and "small-llava", tiny-llava with a 128-wide Llama: the testbed's model):
  random-weight models of the same two architectures (seeded, so two
  loads are identical) with a byte-level BPE tokenizer trained here in milliseconds; they train on a
  laptop CPU in minutes and are the embedded default of the repository.
Greedy generation (`MLLM.generate`) runs a KV-cached loop over the training forward.
A broken generic folder is named before or instead of transformers' own failure: a missing weights, tokenizer,
tokenizer_config.json or processor file, no chat template, a config.json that disagrees with its weights (missing,
unexpected or reshaped tensors, which transformers would initialise at random with a report only), a tokenizer
larger than the embedding (`_load_generic`).

Not here: the chat template and tokenisation of conversations (data.py), the generic adapter
(hf_models.py), losses (nrca.py, methods.py), training (train.py). Original-format LLaVA checkpoints
(liuhaotian/llava-v1.5-7b) must first be converted with transformers' `convert_llava_weights_to_hf.py`.

Quick check:  python models.py tiny-vila   (prints sizes and a forward/generate smoke test)
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from data import (
    CAPTION_PROMPTS,
    CHOICE_SUFFIX,
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    SYSTEM_PROMPT,
    DataError,
    MultiTaskDataset,
    assemble_turns,
    collate,
    encode_turns,
    pad_to_square,
    tokenize_conversation,
)

try:  # data.py grows a corpus covering the synthetic data set's vocabulary; older data.py has none.
    from data import tokenizer_corpus
except ImportError:
    tokenizer_corpus = None

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_PLACEHOLDER)  # ids 0..4 in the tiny tokenizer
TINY_SEED = 0
# Tiny architectures: a Llama decoder (hidden 64, 4 layers, 4 heads) behind a 2-layer vision tower.
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
# "small-llava": tiny-llava with a 128-wide Llama, the testbed's model (testbed.py). A 64-wide one names what it
# sees but does not learn, in minutes, to pick the letter of the option that matches (multiple choice).
SMALL_TEXT = dict(TINY_TEXT, hidden_size=128, intermediate_size=256)
BUILT_IN = ("tiny-llava", "tiny-vila", "small-llava")
TINY_LM_HEAD_NORM = 2.0  # expected row norm of the tiny models' (frozen) lm_head, see _build_tiny
TINY_LLAVA_IMAGE, TINY_LLAVA_PATCH = 48, 8  # 6 x 6 grid -> 36 image tokens
TINY_VILA_IMAGE, TINY_VILA_PATCH = 56, 8  # 7 x 7 grid (odd: zero-padded to 8 x 8) -> 16 image tokens


# ----------------------------------------------------------------------------------------------------
# VILA1.5's connector: "mlp_downsample"


# The order of the 2x2 blocks changed upstream (github.com/NVlabs/VILA, llava/model/multimodal_projector/
# base_projector.py, `DownSampleBlock.flat_square`):
#   "vila1.5": commit 1c88211 (2024-05-13, "move repo to NVLabs"), unchanged through 54c9706 (2024-08-19,
#              "Support LongVILA"): the VILA1.5 release code. Blocks come out column by column: output token
#              k = j * h + i holds block (i, j) (row i, column j of the half-size grid).
#   "nvila":   commit 36f6adc (2024-12-12, "NVILA release") appends `permute(0, 2, 1, 3)` to flat_square (and
#              adds "mlp_downsample_2x2_fix", the same block): blocks come out row by row, k = i * h + j.
# Inside a block the four patches are concatenated (r, c), (r, c+1), (r+1, c), (r+1, c+1) in both.
DOWNSAMPLE_ORDERS = ("vila1.5", "nvila")
# mm_projector/config.json "mm_projector_type" -> the order its checkpoint was trained with. VILA at 36f6adc
# and later builds "mlp_downsample" with the NVILA order too: such checkpoints need downsample_order="nvila".
PROJECTOR_TYPE_ORDER = {"mlp_downsample": "vila1.5", "mlp_downsample_2x2_fix": "nvila"}


class DownSample2x2(nn.Module):
    """(B, g*g, C) vision tokens -> (B, ceil(g/2)^2, 4C): every 2x2 block of the patch grid becomes one
    token, its four patches concatenated channel-wise in the order (r, c), (r, c+1), (r+1, c),
    (r+1, c+1); an odd grid is first zero-padded at the bottom and right.
    order "vila1.5" (default, the VILA1.5 release): blocks column-major; "nvila": blocks row-major (see
    DOWNSAMPLE_ORDERS above for the upstream commits). SigLIP-so400m-384: 27 x 27 -> 14 x 14 = 196 tokens."""

    def __init__(self, order: str = "vila1.5"):
        super().__init__()
        if order not in DOWNSAMPLE_ORDERS:
            raise ValueError(f"DownSample2x2: order must be one of {DOWNSAMPLE_ORDERS}, got {order!r}")
        self.order = order

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, channels = features.shape
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"DownSample2x2: vision features have {num_tokens} tokens, not a square grid")
        grid = features.reshape(batch, side, side, channels)  # (B, g, g, C)
        if side % 2:
            grid = F.pad(grid, (0, 0, 0, 1, 0, 1))  # (B, g+1, g+1, C): zero column right, zero row below
        half = grid.shape[1] // 2
        blocks = grid.reshape(batch, half, 2, half, 2, channels)  # (B, i, di, j, dj, C)
        # (B, i, j, di, dj, C) row-major blocks, or (B, j, i, di, dj, C) column-major blocks
        blocks = blocks.permute(0, 1, 3, 2, 4, 5) if self.order == "nvila" else blocks.permute(0, 3, 1, 2, 4, 5)
        return blocks.reshape(batch, half * half, 4 * channels)  # (B, h*h, 4C)

    def extra_repr(self) -> str:
        return f"order={self.order!r}"


class DownSampleProjector(nn.Module):
    """VILA's mlp_downsample connector; state-dict keys layers.1.* (LayerNorm), layers.2.*, layers.4.*
    (Linear) match VILA's `mm_projector/model.safetensors`. `order` is DownSample2x2's block order."""

    def __init__(self, vision_hidden_size: int, llm_hidden_size: int, order: str = "vila1.5"):
        super().__init__()
        self.layers = nn.Sequential(
            DownSample2x2(order),
            nn.LayerNorm(4 * vision_hidden_size),
            nn.Linear(4 * vision_hidden_size, llm_hidden_size),
            nn.GELU(),
            nn.Linear(llm_hidden_size, llm_hidden_size),
        )

    @property
    def order(self) -> str:
        return self.layers[0].order

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def scatter_image_features(inputs_embeds, input_ids, image_features, image_token_id):
    """Write image features (B_img, N, H) into the embedding rows where input_ids == image_token_id,
    in reading order (image by image, token by token)."""
    image_mask = input_ids == image_token_id  # (B, T)
    num_slots, num_features = int(image_mask.sum()), image_features.shape[0] * image_features.shape[1]
    if num_slots != num_features:
        raise ValueError(
            f"input_ids hold {num_slots} image tokens (id {image_token_id}) but pixel_values give "
            f"{image_features.shape[0]} images x {image_features.shape[1]} features = {num_features}"
        )
    flat = image_features.reshape(-1, image_features.shape[-1]).to(inputs_embeds.dtype)  # (B_img*N, H)
    return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), flat)


class VilaForConditionalGeneration(nn.Module):
    """VILA1.5 = SigLIP vision tower -> DownSampleProjector -> Llama, with LLaVA-style image-token slots.

    forward(input_ids, attention_mask, pixel_values, logits_to_keep) mirrors
    `LlavaForConditionalGeneration.forward`: a bool (B, T) `logits_to_keep` returns logits (num_true, V).
    The image token may lie outside the LLM's vocabulary (real VILA has no `<image>` token): its
    embedding is never looked up."""

    def __init__(self, llm: LlamaForCausalLM, vision_tower: SiglipVisionModel, mm_projector: DownSampleProjector,
                 image_token_id: int, vision_feature_layer: int = -2):
        super().__init__()
        self.llm, self.vision_tower, self.mm_projector = llm, vision_tower, mm_projector
        self.image_token_id, self.vision_feature_layer = image_token_id, vision_feature_layer

    @property
    def device(self) -> torch.device:
        return self.llm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        return self.llm.get_input_embeddings()

    def gradient_checkpointing_enable(self, **kwargs):
        self.llm.gradient_checkpointing_enable(**kwargs)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision = self.vision_tower(pixel_values, output_hidden_states=True)
        features = vision.hidden_states[self.vision_feature_layer]  # (B, g*g, C), all tokens (no CLS in SigLIP)
        return self.mm_projector(features)  # (B, ceil(g/2)^2, H)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        image_mask = input_ids == self.image_token_id  # (B, T)
        inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))  # (B, T, H)
        if pixel_values is None:
            if image_mask.any():
                raise ValueError("input_ids contain image tokens but pixel_values is None")
            return inputs_embeds
        return scatter_image_features(inputs_embeds, input_ids, self.get_image_features(pixel_values),
                                      self.image_token_id)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, inputs_embeds=None,
                logits_to_keep: int | torch.Tensor = 0, position_ids=None, cache=None,
                use_cache=None, **kwargs) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("VilaForConditionalGeneration.forward: give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)  # (B, T, H)
        elif pixel_values is not None:
            raise ValueError("VilaForConditionalGeneration.forward: inputs_embeds already hold the image; "
                             "pass pixel_values=None")
        outputs = self.llm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                 position_ids=position_ids, cache=cache, use_cache=use_cache, **kwargs)
        hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)  # (num_true, H) for a bool mask
        return CausalLMOutputWithPast(logits=self.llm.lm_head(hidden), cache=outputs.cache,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)


# ----------------------------------------------------------------------------------------------------
# The shared interface


@dataclass
class MLLM:
    """A model, its tokenizer and its image preprocessing, used the same way for LLaVA and VILA."""

    model: nn.Module  # LlavaForConditionalGeneration | VilaForConditionalGeneration: the training path
    tokenizer: PreTrainedTokenizerFast
    image_processor: object  # CLIP (LLaVA) or SigLIP (VILA) image processor
    kind: str  # "llava" | "vila"
    num_image_tokens: int
    image_token_id: int
    vila_config: dict | None = None  # VILA's top-level config.json, written back by save()
    save_tokenizer: PreTrainedTokenizerFast | None = field(default=None, repr=False)  # VILA: as read

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def language_model(self) -> nn.Module:
        """The Llama decoder stack (without lm_head)."""
        return self.model.model.language_model if self.kind == "llava" else self.model.llm.model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def connector(self) -> nn.Module:
        return self.model.model.multi_modal_projector if self.kind == "llava" else self.model.mm_projector

    def connector_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name in `model`, parameter) of the connector."""
        mine = {id(p) for p in self.connector.parameters()}
        return [(n, p) for n, p in self.model.named_parameters() if id(p) in mine]

    def connector_modules(self) -> list[nn.Module]:
        return [self.connector]

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower if self.kind == "llava" else self.model.vision_tower

    @property
    def vision_layers(self) -> nn.ModuleList:
        tower = self.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images of any size -> pixel_values (B, 3, S, S), float32.
        LLaVA-1.5: pad to square with the processor's mean colour, then CLIP resize/crop/normalise.
        VILA1.5 ("resize"): straight resize to S x S, SigLIP normalisation."""
        images = [image.convert("RGB") for image in images]
        if self.kind == "llava":
            mean_rgb = tuple(int(255 * m) for m in self.image_processor.image_mean)
            images = [pad_to_square(image, mean_rgb) for image in images]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]  # (B, 3, S, S)
        return pixel_values.float()

    def dataset(self, records: list[dict], image_folder, max_length: int = 2048, skip_bad_records: bool = False):
        """Training samples of data.py's records: the vicuna_v1 conversation tokenised as LLaVA / VILA did."""
        return MultiTaskDataset(records, image_folder, self.tokenizer, self.preprocess, self.num_image_tokens,
                                self.image_token_id, max_length, skip_bad_records=skip_bad_records)

    def encode_record(self, images: list[Image.Image], turns: list[tuple[str, str]], max_length: int,
                      where: str = "record") -> dict:
        """One training sample of a record (loader.py, on the fly): input_ids (T,), labels (T,), pixel_values
        (C, H, W) or None for a text-only record, prompt_length. The ids are MultiTaskDataset's, piece by piece
        (data.encode_turns); a text-only record is tokenised as LLaVA's preprocess_v1 does without an image."""
        if len(images) > 1:
            raise DataError(f"{where}: {len(images)} images; {self.kind} takes one image per sample (LLaVA-1.5 and "
                            "VILA1.5 were trained so): use a generic family for multi-image records")
        pieces = encode_turns(turns, self.tokenizer, where, image=bool(images))
        input_ids, labels = assemble_turns(*pieces, self.num_image_tokens if images else 0, self.image_token_id,
                                           max_length, where)
        return {"input_ids": input_ids, "labels": labels,
                "pixel_values": self.preprocess(images)[0] if images else None,  # (C, H, W)
                "prompt_length": int((labels != IGNORE_INDEX).nonzero()[0])}

    def collate(self, items: list[dict], left: bool = False) -> dict:
        return collate(items, self.pad_token_id, left=left)

    def blank_image_features(self) -> torch.Tensor:
        """The connector's output for one blank picture: what train.anchored_to_pictures runs for a micro-batch of
        text-only samples on several ranks, so that every rank runs the vision tower and the connector in every step
        (LLaVA's own code concatenates image_features[0:0] to a text-only sample for the same reason)."""
        pixels = self.preprocess([Image.new("RGB", (32, 32))]).to(self.device)  # (1, C, S, S)
        if self.kind == "vila":
            return self.model.get_image_features(pixels)  # (1, N, H)
        return torch.stack(list(self.model.model.get_image_features(pixel_values=pixels).pooler_output))

    def prompt(self, image: Image.Image, question: str) -> dict:
        """A generation prompt exactly as training conditions on it: input_ids (T,) = data.py's
        tokenize_conversation of the question with a placeholder answer, cut before the first label token (so
        it ends at "ASSISTANT:"), and pixel_values (1, C, H, W)."""
        input_ids, labels = tokenize_conversation(question, "A", self.tokenizer, self.num_image_tokens,
                                                  self.image_token_id, max_length=1_000_000)
        answer = (labels != IGNORE_INDEX).nonzero()
        if len(answer) == 0:
            raise ValueError(f"data.tokenize_conversation left no answer label for question {question[:80]!r}")
        return {"input_ids": input_ids[:int(answer[0])], "pixel_values": self.preprocess([image])}

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """inputs_embeds (B, T, H): token embeddings with the connector's image features written at the
        image-token positions. `model(inputs_embeds=..., attention_mask=...)` continues from here."""
        if self.kind == "vila":
            return self.model.embed(input_ids, pixel_values)
        inputs_embeds = self.model.get_input_embeddings()(input_ids)  # (B, T, H)
        if pixel_values is None:
            return inputs_embeds
        features = self.model.model.get_image_features(pixel_values=pixel_values).pooler_output
        return scatter_image_features(inputs_embeds, input_ids, torch.stack(list(features)), self.image_token_id)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None,
                 max_new_tokens: int, output_attentions: bool = False):
        """Greedy decoding of a LEFT-padded batch with a KV cache.

        Returns new tokens (B, n) with n <= max_new_tokens: a finished row holds its eos and then
        pad_token_id; decoding stops when every row has produced eos. With output_attentions=True it
        returns (tokens, attentions), attentions a list over decoder layers of (B, heads, T): the
        attention of the last prompt position (the query that predicts the first new token) over the
        prompt, computed with eager attention (switched on for this call only)."""
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"generate: input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} differ")
        attention_mask = attention_mask.long()
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate: attention_mask has padding at the end; pad prompts on the LEFT")
        language_model, previous_attention = self.language_model, None
        if output_attentions and language_model.config._attn_implementation != "eager":
            previous_attention = language_model.config._attn_implementation
            language_model.set_attn_implementation("eager")
        was_training = self.model.training
        self.model.eval()
        # A half-precision model whose trainable parts train.py keeps in fp32 needs autocast to mix them.
        half = self.model.get_input_embeddings().weight.dtype
        try:
            with torch.autocast(input_ids.device.type, dtype=half, enabled=half in (torch.bfloat16, torch.float16)):
                tokens, attentions = self._greedy(input_ids, attention_mask, pixel_values, max_new_tokens,
                                                  output_attentions)
        finally:
            self.model.train(was_training)
            if previous_attention is not None:
                language_model.set_attn_implementation(previous_attention)
        return (tokens, attentions) if output_attentions else tokens

    def _greedy(self, input_ids, attention_mask, pixel_values, max_new_tokens, output_attentions):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding shifts positions
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         position_ids=position_ids, use_cache=True, logits_to_keep=1,
                         output_attentions=output_attentions)
        attentions = [a[:, :, -1, :].float() for a in out.attentions] if output_attentions else None
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # (B,)
        new_tokens = []
        for step in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1).masked_fill(finished, self.pad_token_id)  # (B,)
            new_tokens.append(token)
            finished |= token == self.eos_token_id
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
            position_ids = position_ids[:, -1:] + 1  # (B, 1)
            out = self.model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position_ids,
                             cache=out.cache, use_cache=True, logits_to_keep=1)
        tokens = torch.stack(new_tokens, 1) if new_tokens else input_ids.new_zeros(input_ids.shape[0], 0)  # (B, n)
        return tokens, attentions

    def save(self, path: str) -> None:
        """Write the checkpoint in the format it came in: LLaVA -> a transformers folder (model, tokenizer,
        image processor); VILA -> config.json + llm/ + vision_tower/ + mm_projector/."""
        os.makedirs(path, exist_ok=True)
        if self.kind == "llava":
            self.model.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            self.image_processor.save_pretrained(path)
            return
        _save_vila(self, path)


# ----------------------------------------------------------------------------------------------------
# Freezing (paper Sec. 3.1)


def freeze_for_finetuning(mllm, tune_last_layers: int = 2, tune_connector: bool = True,
                          tune_vision_tower: bool = False) -> list[dict]:
    """Freeze everything (vision tower, embeddings, lm_head, earlier decoder layers), then unfreeze the
    connector and the last `tune_last_layers` decoder layers, for either kind of model (MLLM, HFMLLM). Returns
    the optimizer groups [{"name": "connector", "params": [...]}, {"name": "llm", "params": [...]}]; a group
    with no parameters (tune_connector=False or tune_last_layers=0) is left out. `tune_vision_tower` adds a
    "vision" group: the testbed's base-model pre-training trains the tower; fine-tuning never does."""
    layers = mllm.decoder_layers
    if not 0 <= tune_last_layers <= len(layers):
        raise ValueError(f"tune_last_layers={tune_last_layers}: the model has {len(layers)} decoder layers")
    mllm.model.requires_grad_(False)
    connector = [p for _, p in mllm.connector_parameters()] if tune_connector else []
    llm = [p for layer in layers[len(layers) - tune_last_layers:] for p in layer.parameters()]
    in_connector = {id(p) for p in connector}  # Qwen2-VL's merger lies inside its tower: one group each
    vision = [p for p in mllm.vision_tower.parameters() if id(p) not in in_connector] if tune_vision_tower else []
    groups = [{"name": "connector", "params": connector}, {"name": "llm", "params": llm},
              {"name": "vision", "params": vision}]
    for group in groups:
        for parameter in group["params"]:
            parameter.requires_grad_(True)
    return [group for group in groups if group["params"]]


# ----------------------------------------------------------------------------------------------------
# Loading


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str | None = None, downsample_order: str | None = None):
    """"tiny-llava" | "tiny-vila" | "small-llava" | a transformers LLaVA folder | a VILA1.5 folder -> MLLM;
    any other transformers image-text-to-text folder -> hf_models.HFMLLM (the chat-template adapter). Eval mode.
    A folder that holds a peft LoRA adapter (train.py --lora-rank: adapter_config.json beside the model, or alone,
    then loaded onto its base_model_name_or_path) is returned with the adapter merged (lora.merge_saved_adapter).

    downsample_order (VILA only): None reads it from mm_projector/config.json (PROJECTOR_TYPE_ORDER:
    "mlp_downsample" -> "vila1.5", "mlp_downsample_2x2_fix" -> "nvila"); "vila1.5" | "nvila" overrides it,
    for "mlp_downsample" checkpoints trained with VILA's code from 36f6adc on."""
    if downsample_order is not None and downsample_order not in DOWNSAMPLE_ORDERS:
        raise ValueError(f"load_model: downsample_order must be None or one of {DOWNSAMPLE_ORDERS}, "
                         f"got {downsample_order!r}")
    if name_or_path in BUILT_IN:
        kind = "vila" if name_or_path == "tiny-vila" else "llava"
        mllm = _build_tiny(kind, attn_implementation, SMALL_TEXT if name_or_path == "small-llava" else TINY_TEXT,
                           downsample_order or "vila1.5")
    elif os.path.isfile(os.path.join(name_or_path, "adapter_config.json")):  # train.py --lora-rank's final/
        import lora

        if os.path.exists(os.path.join(name_or_path, "config.json")):  # the base (trained connector) + its adapter
            mllm = _load_folder(name_or_path, dtype, attn_implementation, downsample_order)
        else:  # the adapter alone: onto the model it names (it carries the trained connector itself)
            base = lora.read_adapter_config(name_or_path).get("base_model_name_or_path")
            if not base:
                raise ValueError(f"load_model: {name_or_path} holds a peft adapter without a model and its "
                                 "adapter_config.json names no base_model_name_or_path")
            mllm = load_model(base, dtype, "cpu", attn_implementation, downsample_order)
        lora.merge_saved_adapter(mllm, name_or_path)
    else:
        mllm = _load_folder(name_or_path, dtype, attn_implementation, downsample_order)
    mllm.model.to(device=device, dtype=dtype).eval()
    return mllm


def _load_folder(path: str, dtype, attn_implementation, downsample_order=None) -> MLLM:
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_model: {path!r} is neither a built-in model {BUILT_IN} nor a folder (download "
                                "the checkpoint first; `python hf_tiny.py NAME FOLDER` writes a tiny Qwen2-VL, "
                                "Qwen2.5-VL, LLaVA-OneVision or Idefics3 folder)")
    for root, _, files in sorted(os.walk(path)):  # damaged files are named here, not deep inside transformers
        for name in sorted(files):
            if name.endswith("config.json"):
                _read_json(os.path.join(root, name))
            elif name.endswith(".safetensors"):
                check_safetensors(os.path.join(root, name))
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    if os.path.isdir(os.path.join(path, "llm")) or "llm_cfg" in config:
        return _load_vila(path, config, dtype, attn_implementation, downsample_order)
    if downsample_order is not None:
        raise ValueError(f"load_model: downsample_order={downsample_order!r} is for VILA1.5 folders; {path} is not one")
    if config.get("model_type") == "llava":
        return _load_llava(path, dtype, attn_implementation)
    return _load_generic(path, config, dtype, attn_implementation)


def _load_generic(path: str, config: dict, dtype, attn_implementation):
    """Any other image-text-to-text folder: the chat-template adapter (hf_models.HFMLLM)."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    import hf_models

    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        found = f"config.json has model_type {model_type!r}" if config else "no config.json"
        raise ValueError(
            f"load_model: {path!r} is not a supported checkpoint ({found}). Expected a transformers "
            "image-text-to-text folder (config.json with a model_type AutoModelForImageTextToText knows: llava, "
            "qwen2_vl, llava_onevision, idefics3, ...) or a VILA1.5 folder (config.json + llm/ + vision_tower/ + "
            "mm_projector/). Original-format LLaVA (liuhaotian/llava-v1.5-7b) must first be converted with "
            "transformers' convert_llava_weights_to_hf.py")
    _check_generic_files(path)
    try:
        # Mismatched shapes reported in `loading` (named below), not raised as transformers' "look at the report".
        model, loading = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True,
            ignore_mismatched_sizes=True)
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, StrictDataclassError) as error:  # the user's
        # folder (a config transformers' validation refuses, a damaged file), not our code: bad input
        raise ValueError(f"load_model: transformers cannot load the model in {path}: {_first_line(error)}") from error
    _check_loading(path, loading)
    try:
        processor = hf_models.load_processor(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"load_model: transformers cannot load the processor in {path}: {_first_line(error)}"
                         ) from error
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"load_model: {path} has no chat template (chat_template.jinja, chat_template.json or "
                         "tokenizer_config.json's chat_template): prompts and labels come from it")
    vocabulary, rows = len(processor.tokenizer), model.get_input_embeddings().num_embeddings
    if vocabulary > rows:
        raise ValueError(f"load_model: the tokenizer in {path} has {vocabulary} tokens, the model's embedding "
                         f"{rows} rows: tokenizer and weights do not belong together")
    return hf_models.HFMLLM(model, processor)


try:  # what transformers' config validation raises (huggingface_hub's strict dataclasses)
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # an older huggingface_hub: configs were not validated
    StrictDataclassError = ValueError

# The files a transformers image-text-to-text folder needs besides config.json, as alternatives.
GENERIC_FILES = {
    "weights": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json"),
    "tokenizer": ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "qwen.tiktoken"),
    "tokenizer settings": ("tokenizer_config.json",),  # without it the special tokens differ (eos, pad, bos)
    "image processor settings": ("processor_config.json", "preprocessor_config.json"),
}


def _check_generic_files(path: str) -> None:
    """Name the first missing part of a generic folder before transformers fails on it somewhere deeper (or, for
    tokenizer_config.json, loads a tokenizer with other special tokens)."""
    for part, names in GENERIC_FILES.items():
        if not any(os.path.isfile(os.path.join(path, name)) for name in names):
            raise FileNotFoundError(f"load_model: {path} has no {part} ({' or '.join(names)}): an incomplete "
                                    "download or copy?")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.isfile(os.path.join(path, index)):
            shards = sorted(set(_read_json(os.path.join(path, index)).get("weight_map", {}).values()))
            missing = [name for name in shards if not os.path.isfile(os.path.join(path, name))]
            if missing:
                raise FileNotFoundError(f"load_model: {path}/{index} lists weight files that are missing: {missing}")


def _check_loading(path: str, loading: dict) -> None:
    """A config that disagrees with its weights: transformers initialises missing tensors at random and drops
    unexpected ones with a report only; here that is an error naming them."""
    problems = []
    for key, what in (("missing_keys", "missing from the weights (they would start random)"),
                      ("unexpected_keys", "in the weights but not in the model config.json describes"),
                      ("mismatched_keys", "of another shape in the weights")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in loading.get(key) or ())
        if names:
            problems.append(f"{len(names)} tensors {what}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    problems += [str(message) for message in loading.get("error_msgs") or ()]
    if problems:
        raise ValueError(f"load_model: {path}/config.json does not match its weights: {'; '.join(problems)}")


def _first_line(error: Exception) -> str:
    """The start of a library's message, on one line (its first two lines: a validator's name, then its reason)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:2]) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"load_model: {path} is not valid JSON (line {error.lineno}, column {error.colno}: "
                         f"{error.msg})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"load_model: {path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    if not isinstance(value, dict):
        raise ValueError(f"load_model: {path} holds a JSON {type(value).__name__}, expected an object")
    return value


def check_safetensors(path) -> None:
    """Raise ValueError naming the file unless its header is whole and the file is as long as the header
    says (a truncated copy or an interrupted save otherwise fails inside safetensors with "invalid header
    length" or "incomplete metadata", naming no file). Reads the header only."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)  # little-endian u64: the JSON header's length
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        if n is None or 8 + n > size:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, shorter than its header"
                             f"{'' if n is None else f' of {n} bytes'}): an interrupted copy or save?")
        try:
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError, AttributeError):
            raise ValueError(f"{path}: damaged safetensors header (not the JSON table of tensors)") from None
    if 8 + n + end != size:
        state = "truncated" if 8 + n + end > size else "longer than its header says"
        raise ValueError(f"{path}: {state}: its header describes {8 + n + end} bytes, the file has {size} "
                         "(an interrupted copy or save?)")


def _require(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_model: missing {path}")
    return path


def _load_tokenizer(folder: str):
    """`tokenizer.json` -> AutoTokenizer (llava-hf folders); only `tokenizer.model` (VILA's `llm/`, saved by its
    trainer as a slow tokenizer) -> SentencePieceTokenizer, SentencePiece token for token as LLaVA/VILA's
    `use_fast=False` loading (AutoTokenizer would convert it to a BPE that disagrees on runs of spaces)."""
    try:
        if os.path.isfile(os.path.join(folder, "tokenizer.model")) and \
                not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            from sentencepiece_tokenizer import SentencePieceTokenizer

            return SentencePieceTokenizer.from_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)
    except (ImportError, ValueError, OSError) as error:
        hint = ""
        if not os.path.exists(os.path.join(folder, "tokenizer.json")):
            hint = " (no tokenizer.json: converting tokenizer.model needs `pip install sentencepiece protobuf`)"
        raise RuntimeError(f"load_model: cannot load the tokenizer in {folder}{hint}: {error}") from error


def _finish_tokenizer(tokenizer, source: str):
    """Pad token = unk when the checkpoint defines none (Llama); eos must be `</s>`."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    if tokenizer.eos_token != "</s>":
        raise ValueError(f"load_model: tokenizer in {source} has eos {tokenizer.eos_token!r}, expected '</s>'")
    return tokenizer


def _load_llava(path, dtype, attn_implementation) -> MLLM:
    _require(os.path.join(path, "preprocessor_config.json"))
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = _finish_tokenizer(_load_tokenizer(path), path)
    image_token_id = model.config.image_token_id
    if tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER) != image_token_id:
        raise ValueError(f"load_model: tokenizer in {path} maps {IMAGE_PLACEHOLDER!r} to "
                         f"{tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)}, config.json says {image_token_id}")
    return MLLM(model, tokenizer, AutoImageProcessor.from_pretrained(path), "llava",
                _llava_num_image_tokens(model.config), image_token_id)


def _llava_num_image_tokens(config: LlavaConfig) -> int:
    grid = config.vision_config.image_size // config.vision_config.patch_size
    return grid * grid + (config.vision_feature_select_strategy == "full")  # "default" drops CLS


def _vila_num_image_tokens(vision_config: SiglipVisionConfig) -> int:
    half = math.ceil(vision_config.image_size // vision_config.patch_size / 2)
    return half * half


def _load_vila(path, config, dtype, attn_implementation, downsample_order=None) -> MLLM:
    _require(os.path.join(path, "config.json"))
    llm_path, vision_path, projector_path = (os.path.join(path, sub) for sub in ("llm", "vision_tower", "mm_projector"))
    for required in ("config.json", "tokenizer_config.json"):
        _require(os.path.join(llm_path, required))
    for required in ("config.json", "preprocessor_config.json"):
        _require(os.path.join(vision_path, required))
    projector_config = _read_json(_require(os.path.join(projector_path, "config.json")))
    weights = load_file(_require(os.path.join(projector_path, "model.safetensors")))
    projector_type = projector_config.get("mm_projector_type")
    if projector_type not in PROJECTOR_TYPE_ORDER:
        raise ValueError(f"load_model: {projector_path}/config.json has mm_projector_type {projector_type!r}; "
                         f"supported: {sorted(PROJECTOR_TYPE_ORDER)} (VILA1.5's 2x2 downsample connector)")
    downsample_order = downsample_order or PROJECTOR_TYPE_ORDER[projector_type]

    llm = LlamaForCausalLM.from_pretrained(llm_path, dtype=dtype, attn_implementation=attn_implementation)
    vision_tower = SiglipVisionModel.from_pretrained(vision_path, dtype=dtype, attn_implementation=attn_implementation)
    vision_hidden, llm_hidden = vision_tower.config.hidden_size, llm.config.hidden_size
    expected = (llm_hidden, 4 * vision_hidden)
    if "layers.2.weight" not in weights or tuple(weights["layers.2.weight"].shape) != expected:
        got = tuple(weights["layers.2.weight"].shape) if "layers.2.weight" in weights else "missing"
        raise ValueError(f"load_model: {projector_path}/model.safetensors layers.2.weight is {got}, expected "
                         f"{expected} (llm hidden, 4 x vision hidden)")
    projector = DownSampleProjector(vision_hidden, llm_hidden, downsample_order)
    projector.load_state_dict(weights)  # strict: names every missing/unexpected key

    tokenizer = _finish_tokenizer(_load_tokenizer(llm_path), llm_path)
    save_tokenizer = None
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():  # real VILA: image slots live outside the vocabulary
        save_tokenizer = _load_tokenizer(llm_path)
        tokenizer.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    model = VilaForConditionalGeneration(llm, vision_tower, projector.to(dtype), image_token_id,
                                         config.get("mm_vision_select_layer", -2))
    return MLLM(model, tokenizer, AutoImageProcessor.from_pretrained(vision_path), "vila",
                _vila_num_image_tokens(vision_tower.config), image_token_id, vila_config=config,
                save_tokenizer=save_tokenizer)


def _save_vila(mllm: MLLM, path: str) -> None:
    model = mllm.model
    llm_path, vision_path, projector_path = (os.path.join(path, sub) for sub in ("llm", "vision_tower", "mm_projector"))
    model.llm.save_pretrained(llm_path)
    (mllm.save_tokenizer or mllm.tokenizer).save_pretrained(llm_path)
    model.vision_tower.save_pretrained(vision_path)
    mllm.image_processor.save_pretrained(vision_path)
    os.makedirs(projector_path, exist_ok=True)
    dtype = str(next(model.mm_projector.parameters()).dtype).removeprefix("torch.")
    # The type names the block order, so the saved folder reloads with the order it was trained with.
    projector_type = {order: name for name, order in PROJECTOR_TYPE_ORDER.items()}[model.mm_projector.order]
    projector_config = {"architectures": ["MultimodalProjector"], "mm_projector_type": projector_type,
                        "model_type": "v2l_projector", "torch_dtype": dtype}
    with open(os.path.join(projector_path, "config.json"), "w") as f:
        json.dump(projector_config, f, indent=2)
    state = {k: v.detach().contiguous().cpu() for k, v in model.mm_projector.state_dict().items()}
    save_file(state, os.path.join(projector_path, "model.safetensors"), metadata={"format": "pt"})
    top = dict(mllm.vila_config or {})
    top.update(
        architectures=["LlavaLlamaModel"], model_type="llava_llama",
        llm_cfg=model.llm.config.to_dict(), vision_tower_cfg=model.vision_tower.config.to_dict(),
        mm_projector_cfg=projector_config, hidden_size=model.llm.config.hidden_size,
        mm_hidden_size=model.vision_tower.config.hidden_size, mm_vision_select_layer=model.vision_feature_layer,
    )
    for key, value in (("mm_vision_select_feature", "cls_patch"), ("image_aspect_ratio", "resize"),
                       ("mm_use_im_start_end", False), ("mm_use_im_patch_token", False)):
        top.setdefault(key, value)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(top, f, indent=2)


# ----------------------------------------------------------------------------------------------------
# Tiny random-weight models and their tokenizer


def _fallback_corpus() -> list[str]:
    """Template text + prompts + a small vocabulary of shapes/colours/positions/counts."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "gray"]
    shapes = ["circle", "square", "triangle", "rectangle", "star", "ellipse"]
    places = ["top", "bottom", "left", "right", "center", "corner", "middle", "upper", "lower"]
    counts = ["one", "two", "three", "four", "five", "1", "2", "3", "4", "5"]
    texts = []
    for i, prompt in enumerate(CAPTION_PROMPTS):
        c, s, p = colours[i % len(colours)], shapes[i % len(shapes)], places[i % len(places)]
        texts.append(f"{SYSTEM_PROMPT} USER: {IMAGE_PLACEHOLDER}\n{prompt} ASSISTANT: A {c} {s} in the {p}.</s>")
    options = "\n".join(f"{letter}. {colour}" for letter, colour in zip("ABCDE", colours[:5], strict=True))
    texts.append(f"USER: {IMAGE_PLACEHOLDER}\nWhat colour is the shape?\n{options}\n{CHOICE_SUFFIX} ASSISTANT: A</s>")
    texts += [" ".join(words) for words in (colours, shapes, places, counts)]
    texts += [f"There are {n} {c} {s}s on a {b} background." for n in counts[:5] for c in colours
              for s, b in zip(shapes, colours[::-1][:len(shapes)], strict=True)]
    return texts


@functools.lru_cache(maxsize=1)
def _train_tiny_bpe() -> str:
    """The trained `tokenizers` BPE as JSON (trained once per process; a few milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    import testbed

    corpus = (tokenizer_corpus() if tokenizer_corpus is not None else _fallback_corpus()) + testbed.tokenizer_texts()
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                             special_tokens=[("<s>", 1)])
    return tokenizer.to_str()


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab <= 1000) trained on data.tokenizer_corpus() (or the fallback corpus);
    deterministic. Specials: <unk>=0, <s>=1, </s>=2, <pad>=3, <image>=4; <s> is prepended like Llama."""
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_train_tiny_bpe()), unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens=[IMAGE_PLACEHOLDER])


def _build_tiny(kind: str, attn_implementation, text_size: dict = TINY_TEXT, downsample_order: str = "vila1.5") -> MLLM:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = build_tiny_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    text_config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              tie_word_embeddings=False, **text_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        if kind == "llava":
            vision_config = CLIPVisionConfig(image_size=TINY_LLAVA_IMAGE, patch_size=TINY_LLAVA_PATCH, **TINY_VISION)
            config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                                 image_token_index=image_token_id, vision_feature_layer=-2,
                                 vision_feature_select_strategy="default",
                                 image_seq_length=(TINY_LLAVA_IMAGE // TINY_LLAVA_PATCH) ** 2)
            model = LlavaForConditionalGeneration(config)
            side = TINY_LLAVA_IMAGE
            processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
            num_image_tokens = _llava_num_image_tokens(config)
        else:
            vision_config = SiglipVisionConfig(image_size=TINY_VILA_IMAGE, patch_size=TINY_VILA_PATCH,
                                               vision_use_head=False, **TINY_VISION)
            llm, vision_tower = LlamaForCausalLM(text_config), SiglipVisionModel(vision_config)
            projector = DownSampleProjector(vision_config.hidden_size, text_config.hidden_size, downsample_order)
            model = VilaForConditionalGeneration(llm, vision_tower, projector, image_token_id)
            side = TINY_VILA_IMAGE
            processor = SiglipImageProcessorPil(size={"height": side, "width": side})
            num_image_tokens = _vila_num_image_tokens(vision_config)
        # A frozen lm_head at the usual init (std 0.02) caps every logit near 0.02 * |h| = 0.16 after the
        # final RMSNorm, so confidences p_t (Eq. 4) could never leave ~1/V. Rows of norm ~2 (like a trained
        # head) let the trainable layers reach confident predictions by choosing h's direction.
        lm_head = model.lm_head if kind == "llava" else model.llm.lm_head
        nn.init.normal_(lm_head.weight, std=TINY_LM_HEAD_NORM / math.sqrt(text_config.hidden_size))
    if attn_implementation is not None:
        for module in ((model,) if kind == "llava" else (model.llm, model.vision_tower)):
            module.set_attn_implementation(attn_implementation)
    return MLLM(model, tokenizer, processor, kind, num_image_tokens, image_token_id)


if __name__ == "__main__":
    mllm = load_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-vila")
    total = sum(p.numel() for p in mllm.model.parameters())
    side = mllm.preprocess([Image.new("RGB", (9, 5))]).shape[-1]
    print(f"{mllm.kind}: {total:,} parameters, {len(mllm.decoder_layers)} decoder layers, vocab {len(mllm.tokenizer)}, "
          f"{side} x {side} px images -> {mllm.num_image_tokens} image tokens")
    before, after = f"{SYSTEM_PROMPT} USER: ", f"\n{CAPTION_PROMPTS[0]} ASSISTANT:"
    prompt = (mllm.tokenizer(before).input_ids + [mllm.image_token_id] * mllm.num_image_tokens
              + mllm.tokenizer(after, add_special_tokens=False).input_ids)
    input_ids = torch.tensor([prompt], device=mllm.device)  # (1, T)
    pixel_values = mllm.preprocess([Image.new("RGB", (64, 48), (200, 30, 30))]).to(mllm.device)
    new_tokens = mllm.generate(input_ids, torch.ones_like(input_ids), pixel_values, max_new_tokens=8)
    print(f"prompt {len(prompt)} tokens -> {mllm.tokenizer.decode(new_tokens[0], skip_special_tokens=True)!r}")
