"""NRCA for any transformers image-text-to-text model: the generic path beside models.py's two paper models.

Anything that `AutoModelForImageTextToText` + `AutoProcessor` load (tested on tiny models: Qwen2-VL,
Qwen2.5-VL, LLaVA-OneVision, Idefics3 / SmolVLM, LLaVA-1.5; see the README's table) is wrapped in `HFMLLM`:

- Prompts and labels come from the processor's chat template, never from a hand-written one. For one
  (image, question, answer) the template renders the user turn with the generation prompt (`prompt`)
  and the user + assistant turns (`full`); `full` must start with `prompt`, and the rest, the assistant's
  reply, is what gets labels. Trailing whitespace after the reply's last token is not labelled (Qwen's
  "<|im_end|>\\n" -> "<|im_end|>"). A template that closes the assistant turn with no special token
  (llava-hf's ends the reply with a space) gets the tokenizer's eos appended, else the model would never
  learn to stop. The prompt goes through the processor (which expands the image placeholder into the
  family's image tokens), the reply through the tokenizer alone, and the two are concatenated: the label
  boundary is exact, and generation conditions on exactly the training prompt (LLaVA's piece-wise
  tokenisation, as data.py does for vicuna_v1). Special tokens: the tokenizer adds its own (BOS) to the
  prompt unless the rendered prompt already starts with the BOS token, the rule of transformers 5.23's
  `ProcessorMixin.apply_chat_template(tokenize=True)` (llava-hf's template writes no BOS, vicuna_v1's does).
- Trainable set (paper Sec. 3.1): the connector + the last N decoder layers. The connector is found by
  module name per family (`CONNECTORS`; override with `connector=("name", ...)`), the decoder layers
  through `model.get_decoder().layers`.
- Answer-row logits: `logits_to_keep` = a bool (B, T) mask where the model's forward takes it (every
  family above); otherwise the documented fallback `hf_forward(via_hidden=True)` runs the base model
  (`model.model`), keeps the answer rows of its last hidden state and applies `get_output_embeddings()`
  (lm_head) to them. The fallback has no logit soft-capping or scaling a family may add in its own head.
- Noisy Visual Mixup (Eq. 2) on the normalised pixels the vision tower receives, per image in every
  layout (`noisy_image_inputs`): (B, C, H, W) per row; Qwen2-VL's packed patches per image via
  `image_grid_thw`, one noise draw shared by the `temporal_patch_size` copies of a still image (the
  noisy view is a still image too); LLaVA-NeXT / OneVision anyres and Idefics3 tiles per IMAGE, one
  mu/sigma over all its real tiles (the tiles are views of one image; a tile's own statistics would give
  a dark corner dark noise), padding tiles (and Idefics3's padded pixels) untouched, since the models
  recognise padding by its exact zeros.

A batch for methods.py holds `pixel_values` = the dict of the processor's image tensors (pixel_values,
image_grid_thw, image_sizes, pixel_attention_mask, ...) and of its token-aligned extras
(`mm_token_type_ids`); `hf_forward` unpacks it into the model call. One image per sample.

Not here: the Trainer subclass (hf_trainer.py), train.py's LLaVA / VILA loop (models.py), videos,
several images per sample, modality-interference (needs `embed`).

    TRITON_INTERPRET=1 python -m pytest -q tests/test_hf_models.py
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from PIL import Image
from torch import nn

from data import IGNORE_INDEX, open_image, pad_sequences
from noise import noisy_mixup, noisy_mixup_each

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
TOKEN_ALIGNED = ("mm_token_type_ids", "token_type_ids")  # processor outputs of shape (B, T), padded like ids


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


# ----------------------------------------------------------------------------------------------------
# The wrapper


@dataclass
class HFMLLM:
    """A transformers image-text-to-text model with its processor, used like models.MLLM for training."""

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

    @property
    def decoder_layers(self) -> nn.ModuleList:
        decoder = self.model.get_decoder()
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
                             f"{self.model.config.model_type!r}) lies under the connector names {names}; pass "
                             "connector=('module.name', ...) (see model.named_modules())")
        return found

    # --- chat template and labels ---------------------------------------------------------------
    def render(self, question: str, answer: str | None = None) -> str:
        """The chat template's text: the user turn (image + question) with the generation prompt, or with
        the assistant's answer when given."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)

    @functools.cached_property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end generation: the tokenizer's eos and the token closing the template's assistant turn."""
        reply = self._reply_ids("ok")
        ids = [self.tokenizer.eos_token_id, reply[-1]] if self.tokenizer.eos_token_id is not None else [reply[-1]]
        return sorted(set(ids))

    def _reply_ids(self, answer: str, question: str = "?") -> list[int]:
        prompt, full = self.render(question), self.render(question, answer)
        if not full.startswith(prompt):
            raise ValueError("hf_models: the chat template's assistant turn does not extend its generation "
                             f"prompt (prompt ends {prompt[-40:]!r}, the conversation reads "
                             f"{full[len(prompt) - 40:][:80]!r}): labels cannot be placed through this template")
        reply = full[len(prompt):].rstrip()  # trailing "\n" after the end-of-turn token: not labelled
        if answer.strip() not in reply:
            raise ValueError(f"hf_models: the chat template dropped the answer text {answer!r} from the assistant turn")
        ids = self.tokenizer(reply, add_special_tokens=False).input_ids
        if not ids or ids[-1] not in self.tokenizer.all_special_ids:  # the turn has no closing token: add eos
            if self.tokenizer.eos_token_id is None:
                raise ValueError("hf_models: the template closes the assistant turn with no special token and the "
                                 "tokenizer has no eos: the model could never learn to stop")
            ids = ids + [self.tokenizer.eos_token_id]
        return ids

    def encode_prompt(self, image: Image.Image, question: str) -> dict:
        """Processor output for the prompt (the image expanded into the family's image tokens), batch of 1."""
        text = self.render(question)
        bos = self.tokenizer.bos_token
        out = self.processor(text=[text], images=[image], return_tensors="pt",
                             add_special_tokens=not (bos is not None and text.startswith(bos)))
        return dict(out)

    def encode(self, image: Image.Image, question: str, answer: str, max_length: int = 4096) -> dict:
        """One training sample: input_ids (T,), labels (T,) (-100 but on the reply), images (dict of the
        processor's image tensors and token-aligned extras, each with a leading batch dim of 1). As data.py,
        truncation never cuts the prompt (image tokens): it cuts the reply's tail."""
        prompt = self.encode_prompt(image, question)
        prompt_ids = prompt.pop("input_ids")[0]  # (T_prompt,)
        prompt.pop("attention_mask", None)
        reply = self._reply_ids(answer.strip(), question)
        room = max_length - len(prompt_ids)
        if room < 1:
            raise ValueError(f"hf_models.encode: the prompt is {len(prompt_ids)} tokens and leaves no room for an "
                             f"answer token within max_length={max_length}")
        reply = torch.tensor(reply[:room], dtype=torch.long)  # (T_reply,)
        input_ids = torch.cat([prompt_ids, reply])  # (T,)
        labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), reply])  # (T,)
        for key in TOKEN_ALIGNED:  # the reply is text: type 0
            if key in prompt:
                prompt[key] = torch.cat([prompt[key], prompt[key].new_zeros(1, len(reply))], dim=1)  # (1, T)
        return {"input_ids": input_ids, "labels": labels, "images": prompt, "prompt_length": len(prompt_ids)}

    def collate(self, items: list[dict], left: bool = False) -> dict:
        """Samples from `encode` -> batch: input_ids, attention_mask, labels (B, T) (right-padded; left with
        left=True, for generation) and pixel_values = the merged dict of image tensors."""
        if not items:
            raise ValueError("hf_models.collate: empty batch")
        ids = [item["input_ids"] for item in items]
        batch = {"input_ids": pad_sequences(ids, self.pad_token_id, left=left),  # (B, T)
                 "attention_mask": pad_sequences([torch.ones_like(row) for row in ids], 0, left=left),  # (B, T)
                 "pixel_values": merge_images([item["images"] for item in items], left=left)}
        if "labels" in items[0]:
            batch["labels"] = pad_sequences([item["labels"] for item in items], IGNORE_INDEX, left=left)  # (B, T)
        return batch

    # --- Eq. (2) and generation -------------------------------------------------------------------
    def noisy_images(self, images: dict, delta: float, stats: str, generator=None) -> dict:
        return noisy_image_inputs(images, self.model.config, delta=delta, stats=stats, generator=generator)

    @torch.no_grad()
    def generate(self, images: list[Image.Image], questions: list[str], max_new_tokens: int = 24) -> list[str]:
        """Greedy answers (text) for one batch; prompts left-padded."""
        items = []
        for image, question in zip(images, questions, strict=True):
            prompt = self.encode_prompt(image, question)
            items.append({"input_ids": prompt.pop("input_ids")[0],
                          "images": {k: v for k, v in prompt.items() if k != "attention_mask"}})
        batch = to_device(self.collate(items, left=True), self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      **batch["pixel_values"], max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id)
        finally:
            self.model.train(was_training)
        new = out[:, batch["input_ids"].shape[1]:]  # (B, n)
        return [text.strip() for text in self.tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)]

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)


def load(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         connector: tuple = ()) -> HFMLLM:
    """A folder (or hub id) that AutoModelForImageTextToText and AutoProcessor load -> HFMLLM (eval mode)."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    return HFMLLM(model.to(device).eval(), load_processor(path), tuple(connector))


def freeze(mllm: HFMLLM, tune_last_layers: int = 2, tune_connector: bool = True) -> list[dict]:
    """Paper Sec. 3.1 on any family: everything frozen but the connector and the last N decoder layers.
    Returns optimizer groups [{"name": "connector", ...}, {"name": "llm", ...}] as models.freeze_for_finetuning."""
    layers = mllm.decoder_layers
    if not 0 <= tune_last_layers <= len(layers):
        raise ValueError(f"tune_last_layers={tune_last_layers}: the model has {len(layers)} decoder layers")
    mllm.model.requires_grad_(False)
    connector = [p for _, p in mllm.connector_parameters()] if tune_connector else []
    llm = [p for layer in layers[len(layers) - tune_last_layers:] for p in layer.parameters()]
    groups = [{"name": "connector", "params": connector}, {"name": "llm", "params": llm}]
    for group in groups:
        for parameter in group["params"]:
            parameter.requires_grad_(True)
    return [group for group in groups if group["params"]]


# ----------------------------------------------------------------------------------------------------
# Batching and the forward methods.py calls


def merge_images(parts: list[dict], left: bool = False) -> dict:
    """Per-sample image dicts (leading dim 1) -> one batch dict. Packed patches (Qwen2-VL) are concatenated
    along the patch axis; tiled layouts (1, n_tiles, C, H, W) and Idefics3's pixel_attention_mask are
    zero-padded to the largest n_tiles, H and W (what the processors do in a batched call: the models drop
    all-zero tiles and mask zero pixels); token-aligned extras are padded like input_ids."""
    keys = set(parts[0])
    for part in parts:
        if set(part) != keys:
            raise ValueError(f"hf_models.merge_images: samples carry different image keys {sorted(keys)} vs "
                             f"{sorted(part)}")
    merged = {}
    for key in sorted(keys):
        tensors = [part[key] for part in parts]
        tiled = "image_grid_thw" not in keys and (key == "pixel_attention_mask" or tensors[0].dim() == 5)
        if key in TOKEN_ALIGNED:
            merged[key] = pad_sequences([t[0] for t in tensors], 0, left=left)  # (B, T)
        elif tiled:
            shape = [max(sizes) for sizes in zip(*(t.shape[1:] for t in tensors), strict=True)]
            padded = []
            for t in tensors:
                out = t.new_zeros(1, *shape)  # (1, n, [C,] H, W)
                out[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
                padded.append(out)
            merged[key] = torch.cat(padded)
        else:
            merged[key] = torch.cat(tensors)  # packed patches, (B, C, H, W), image_grid_thw, image_sizes, ...
    return merged


def to_device(batch: dict, device) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, dict):
            out[key] = to_device(value, device)
        else:
            out[key] = value.to(device) if torch.is_tensor(value) else value
    return out


def takes_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def hf_forward(model: nn.Module, via_hidden: bool | None = None):
    """methods.py's `forward(attention_mask, logits_mask, input_ids, pixel_values)` -> answer-row logits
    (N, V) for a transformers model (maybe wrapped by DDP). via_hidden=None: logits_to_keep when the
    forward takes it, else the fallback (base model's last hidden state, answer rows, lm_head)."""
    inner = getattr(model, "module", model)
    if via_hidden is None:
        via_hidden = not takes_logits_to_keep(inner)

    def forward(attention_mask, logits_mask, input_ids=None, pixel_values=None, inputs_embeds=None):
        if inputs_embeds is not None:
            raise ValueError("hf_models: the generic path takes input_ids and images, not inputs_embeds")
        images = pixel_values if isinstance(pixel_values, dict) else {"pixel_values": pixel_values}
        if not via_hidden:
            return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_mask,
                         use_cache=False, **images).logits  # (N, V)
        hidden = inner.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                             **images).last_hidden_state
        return inner.get_output_embeddings()(hidden[logits_mask])  # (N, H) -> (N, V)

    return forward


# ----------------------------------------------------------------------------------------------------
# Noisy Visual Mixup (Eq. 2) per image, whatever the layout


def noisy_image_inputs(images: dict, config, delta: float = 0.5, stats: str = "image", generator=None) -> dict:
    """Eq. (2a)-(2b) on the normalised pixels of a batch's image dict, per image (see the module docstring);
    every other key (grids, sizes, masks) is passed through unchanged."""
    pixels = images["pixel_values"]
    out = dict(images)
    if "image_grid_thw" in images:  # Qwen2-VL / Qwen2.5-VL: (sum_i t*h*w, C * T * p * p) packed patches
        vision = config.vision_config
        frames = vision.temporal_patch_size
        patches = pixels.reshape(pixels.shape[0], vision.in_channels, frames, -1)  # (P, C, T, p*p)
        if not torch.equal(patches, patches[:, :, :1].expand_as(patches)):
            raise ValueError("hf_models.noisy_image_inputs: the temporal copies of a packed patch differ (a video?); "
                             "Noisy Visual Mixup here is for still images")
        counts = images["image_grid_thw"].prod(-1).tolist()  # patches per image
        first = patches[:, :, 0]  # (P, C, p*p): one frame
        mixed = noisy_mixup_each(list(first.split(counts)), delta=delta, stats=stats, generator=generator)
        noisy = torch.cat(mixed)[:, :, None].expand_as(patches)  # (P, C, T, p*p): one draw for every copy
        out["pixel_values"] = noisy.reshape(pixels.shape).contiguous()
        return out
    if pixels.dim() == 4:  # (B, C, H, W): one image per row, as noise.noisy_mixup
        out["pixel_values"] = noisy_mixup(pixels, delta=delta, stats=stats, generator=generator)
        return out
    if pixels.dim() != 5:
        raise ValueError(f"hf_models.noisy_image_inputs: pixel_values {tuple(pixels.shape)} with keys "
                         f"{sorted(images)}: expected (B, C, H, W), tiles (B, n, C, H, W) or packed patches "
                         "with image_grid_thw")
    if "image_sizes" in images:  # LLaVA-NeXT / OneVision anyres: the first n_b tiles of row b are real
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        counts = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                  for size in images["image_sizes"].tolist()]
        valid = torch.zeros(pixels.shape[:2], dtype=torch.bool, device=pixels.device)  # (B, n)
        for row, count in enumerate(counts):
            valid[row, :count] = True
        valid = valid[:, :, None, None, None].expand_as(pixels)  # (B, n, C, H, W)
    else:  # Idefics3 / SmolVLM: all-zero tiles are padding (the model's own rule), pixel_attention_mask marks pixels
        real = (pixels != 0).flatten(2).any(-1)  # (B, n)
        valid = real[:, :, None, None, None].expand_as(pixels)
        if "pixel_attention_mask" in images:
            valid = valid & images["pixel_attention_mask"].bool()[:, :, None].expand_as(pixels)
    groups = [pixels[row][valid[row]] for row in range(pixels.shape[0])]  # each image's own values, (n_b,)
    noisy = pixels.clone()
    for row, mixed in enumerate(noisy_mixup_each(groups, delta=delta, stats=stats, generator=generator)):
        noisy[row][valid[row]] = mixed
    out["pixel_values"] = noisy
    return out


# ----------------------------------------------------------------------------------------------------
# Data and evaluation on the project's record format (data.py / evaluate.py)


class HFDataset(torch.utils.data.Dataset):
    """data.py records (question, answer, image) -> `HFMLLM.encode` samples, tokenised lazily."""

    def __init__(self, records: list[dict], image_folder, mllm: HFMLLM, max_length: int = 4096):
        self.records, self.image_folder, self.mllm, self.max_length = records, Path(image_folder), mllm, max_length

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        where = f"record {index} (id {record.get('id')!r})"
        image = open_image(self.image_folder / record["image"], where)
        return self.mllm.encode(image, record["question"], record["answer"], self.max_length)


def evaluate(mllm: HFMLLM, splits: dict, image_folder, max_new_tokens: int = 24, batch_size: int = 8) -> dict:
    """Greedy answers and the paper's scores: {"caption": records} -> CIDEr (x100), {"choice": records}
    -> top-1 accuracy (%), records as evaluate.py's test splits. Returns the scores and the predictions."""
    from evaluate import validate_test_records
    from metrics import caption_metrics, choice_metrics

    result = {}
    for task, records in splits.items():
        records = validate_test_records(records, task, f"splits[{task!r}]")
        predictions = {}
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            images = [open_image(Path(image_folder) / r["image"], f"test record {r['id']!r}") for r in chunk]
            answers = mllm.generate(images, [r["question"] for r in chunk], max_new_tokens)
            predictions.update({r["id"]: answer for r, answer in zip(chunk, answers, strict=True)})
        result[f"{task}_predictions"] = predictions
        if task == "caption":
            scores = caption_metrics(predictions, {r["id"]: r["references"] for r in records}, bleu=False,
                                     rouge=False, allow_empty=True)
            result["cider"] = 100 * scores["cider"]
        else:
            scores = choice_metrics(predictions, {r["id"]: r["answer"] for r in records},
                                    {r["id"]: r["options"] for r in records})
            result["accuracy"] = scores["accuracy"]
    return result
