"""Tiny random-weight image-text-to-text models of current families (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision,
Idefics3 / SmolVLM) plus LLaVA-1.5 behind the generic path, for the tests of the generic path and a quick start
of train.py on them: `python hf_tiny.py tiny-qwen2-vl runs/tiny-qwen2-vl` writes the model and its processor as a
transformers folder, which `python train.py --model runs/tiny-qwen2-vl` loads like any checkpoint. Built from
transformers configs and the project's tiny byte-level BPE tokenizer (models.build_tiny_tokenizer) with each
family's special tokens; nothing is downloaded. Processors use the families' PIL image processors
(`*ImageProcessorPil`) and hf_models.without_video, so torchvision is never needed.

The chat templates follow the layout of each family's released template (roles, turn markers, where the
image goes, the assistant prefix); they are short transcriptions for the tests, not copies:
- Qwen2-VL / Qwen2.5-VL Instruct: ChatML with a default system turn, the image as
  <|vision_start|><|image_pad|><|vision_end|>;
- LLaVA-OneVision (Qwen2 LLM): ChatML, the image as "<image>\\n" before the text;
- Idefics3 / SmolVLM: "<|im_start|>User:<image>{q}<end_of_utterance>\\nAssistant: {a}<end_of_utterance>\\n";
- LLaVA-1.5: vicuna_v1 exactly as data.py builds it (system prompt, "USER: <image>\\n{q} ASSISTANT: {a}</s>").
Sizes: hidden 64, 3 decoder layers, 2-layer vision towers, about 0.2M parameters; 16-32 px images.

    python hf_tiny.py tiny-idefics3 runs/tiny-idefics3     # NAME (tiny-qwen2-vl | tiny-qwen2-5-vl |
                                                             # tiny-llava-onevision | tiny-idefics3) OUT_FOLDER
                                                             # (new or empty: a folder with files is refused)
"""

import argparse
import math
from pathlib import Path

import torch
from torch import nn
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    LlamaConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    SiglipVisionConfig,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import hf_models
import models
from data import SYSTEM_PROMPT

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava_onevision", "idefics3"]
NAMES = {f"tiny-{family.replace('_', '-')}": family for family in FAMILIES}  # "tiny-qwen2-vl" -> "qwen2_vl"
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

QWEN_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ONEVISION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] if c['type'] == 'image' %}"
    "<image>\n{% endfor %}{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}"
    "{% if m['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
VICUNA_TEMPLATE = (
    "{{ bos_token }}" + SYSTEM_PROMPT + " {% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] if c['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %} {% else %}ASSISTANT: "
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def tokenizer_with(specials):
    tokenizer = models.build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    return tokenizer


def build(family: str, seed: int = 0) -> hf_models.HFMLLM:
    """A seeded tiny model of `family` ("qwen2_vl" or "tiny-qwen2-vl", ...) with its processor, in eval mode."""
    family = NAMES.get(family, family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family in ("qwen2_vl", "qwen2_5_vl"):
            tokenizer = tokenizer_with(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                                        "<|image_pad|>", "<|video_pad|>"])
            image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32},
                                                       patch_size=4, temporal_patch_size=2, merge_size=2)
            qwen25 = family == "qwen2_5_vl"
            processor = hf_models.without_video(Qwen2_5_VLProcessor if qwen25 else Qwen2VLProcessor)(
                image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)
            ids = tokenizer.convert_tokens_to_ids
            # Qwen2.5-VL's tower: windowed attention (16 px windows = 2 x 2 merged patches) but in its last block.
            vision = (dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           window_size=16, fullatt_block_indexes=[1]) if qwen25 else
                      dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2))
            config = (Qwen2_5_VLConfig if qwen25 else Qwen2VLConfig)(
                text_config=dict(vocab_size=len(tokenizer), rope_parameters={"rope_type": "default", "rope_theta":
                                 10000.0, "mrope_section": [2, 2, 4]}, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT),
                vision_config=dict(patch_size=4, temporal_patch_size=2, spatial_merge_size=2, **vision),
                image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
            model = (Qwen2_5_VLForConditionalGeneration if qwen25 else Qwen2VLForConditionalGeneration)(config)
        elif family == "llava_onevision":
            tokenizer = tokenizer_with(["<|im_start|>", "<|im_end|>", "<video>"])
            pinpoints = [[16, 16], [16, 32], [32, 16], [32, 32]]
            image_processor = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16},
                                                              crop_size={"height": 16, "width": 16},
                                                              image_grid_pinpoints=pinpoints)
            processor = hf_models.without_video(LlavaOnevisionProcessor)(
                image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=4,
                vision_feature_select_strategy="full", chat_template=ONEVISION_TEMPLATE)
            config = LlavaOnevisionConfig(
                text_config=Qwen2Config(vocab_size=len(tokenizer), **TEXT),
                vision_config=SiglipVisionConfig(image_size=16, patch_size=8, vision_use_head=False, **VISION),
                image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                video_token_index=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_select_strategy="full",
                vision_feature_layer=-1, image_grid_pinpoints=pinpoints, tie_word_embeddings=False)
            model = LlavaOnevisionForConditionalGeneration(config)
        elif family == "idefics3":
            tokenizer = tokenizer_with(["<|im_start|>", "<fake_token_around_image>", "<end_of_utterance>",
                                        "<global-img>"] + [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)])
            image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 16},
                                                        do_image_splitting=True)
            processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=1,
                                          chat_template=IDEFICS3_TEMPLATE)
            config = Idefics3Config(
                text_config=LlamaConfig(vocab_size=len(tokenizer), **TEXT),
                vision_config=dict(image_size=16, patch_size=8, **VISION), scale_factor=2,
                image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
            model = Idefics3ForConditionalGeneration(config)
        else:
            raise ValueError(f"hf_tiny.build: unknown model {family!r}; expected one of {sorted(NAMES)} or {FAMILIES}")
        # As models.py's tiny models: a frozen lm_head at the usual init caps every logit near 0, so confidences
        # (Eq. 4) could never leave ~1/V; rows of norm ~2 let the trainable layers reach confident predictions.
        nn.init.normal_(model.get_output_embeddings().weight,
                        std=models.TINY_LM_HEAD_NORM / math.sqrt(TEXT["hidden_size"]))
    return hf_models.HFMLLM(model.eval(), processor)


def generic_llava(mllm: models.MLLM) -> hf_models.HFMLLM:
    """models.py's tiny LLaVA-1.5 behind the generic path: the same model object, a LlavaProcessor from its
    tokenizer and CLIP image processor (CLIP's CLS counted as llava-hf's processor_config does, then dropped by
    the "default" feature strategy: 36 image tokens), and the vicuna_v1 template."""
    config = mllm.model.config
    processor = LlavaProcessor(image_processor=mllm.image_processor, tokenizer=mllm.tokenizer,
                               patch_size=config.vision_config.patch_size, num_additional_image_tokens=1,  # CLS
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               chat_template=VICUNA_TEMPLATE)
    return hf_models.HFMLLM(mllm.model, processor)


def write(name: str, folder: str, seed: int = 0) -> str:
    """The tiny model `name` (seeded) as a transformers folder: config, weights, processor, chat template. The
    folder must be new or empty: its files would be overwritten (a run, a checkpoint, another model)."""
    if Path(folder).is_file() or (Path(folder).is_dir() and any(Path(folder).iterdir())):
        raise ValueError(f"{folder} exists and is not an empty folder; its files would be overwritten: "
                         "pass a new or empty folder")
    build(name, seed).save(folder)
    return folder


if __name__ == "__main__":
    import cli

    parser = argparse.ArgumentParser(description="Write a tiny random-weight model of a current family as a "
                                                 "transformers folder (train.py --model FOLDER).")
    parser.add_argument("name", choices=sorted(NAMES), help="family")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    cli.run(lambda: print(f"wrote {write(args.name, args.out, args.seed)}"))
