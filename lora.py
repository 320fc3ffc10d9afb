"""LoRA (Hu et al., 2021) on the part of the MLLM that paper Sec. 3.1 fine-tunes, through `peft`.

Sec. 3.1 trains the connector and the last N decoder layers in full. With `train.py --lora-rank R` those N
layers stay frozen and each of their linear projections (attention q/k/v/o and MLP gate/up/down in a Llama
layer; `--lora-targets` picks others) gets a low-rank update, W x + (alpha / R) B A x, with A (R, in) drawn by
peft (Kaiming-uniform) and B (out, R) zero, so step 0 is the base model. The connector still trains in full,
as in the paper, unless `--lora-connector` puts LoRA on its linear layers instead. Every method of
methods.py / the counterparts sees the trainable tensors (A, B and the connector) and nothing else changes:
NRCA's loss, DDP, FSDP2, checkpoints and --resume work on those tensors as on partial fine-tuning's.

The adapter is injected into the model in place (`peft.inject_adapter_in_model`: no PeftModel wrapper, so the
model keeps its structure and every module path of models.py / hf_models.py); its tensors are named
`<layer path>.q_proj.lora_A.default.weight` in checkpoints.

The final model (`save_final`, rank 0, from a fresh copy of the starting model):
    final/                     the starting model with the trained connector, in its own format (LLaVA folder,
                               VILA's three folders, a transformers folder): the base of the adapter
    final/adapter_config.json  a peft LoRA adapter for the starting model: the LoRA tensors and, as peft's
    final/adapter_model.safetensors   `modules_to_save`, the trained connector; so
                               `PeftModel.from_pretrained(<starting model or final/'s model>, "final")` is the
                               trained model (transformers' `from_pretrained("final")` attaches it by itself)
With `--merge-lora`, final/ holds the merged model (W + (alpha / R) B A) in the same format and no adapter.
`models.load_model` reads both: a folder with an adapter is loaded and the adapter merged (`merge_saved_adapter`).

Not here: QLoRA (quantised base weights), DoRA and other peft variants, several adapters at once.
Tests: `python -m pytest -q tests/test_lora.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

# Methods that compare the trainable tensors with their values before fine-tuning (w0) treat w0 as the pre-trained
# weights. Under LoRA the trainable tensors are A (random at start) and B (zero at start), not pre-trained weights,
# and every pre-trained weight already stays as it was; the model's change is (alpha / R) B A, which such a method
# does not see. So they are refused rather than silently turned into something else (README, "Models and methods").
REFUSED = {
    "l2": "L2-Reg pulls the trainable tensors back to w0; under LoRA those are A (random) and B (zero), so it "
          "becomes weight decay on B and on A's drift, not a penalty on the change (alpha/R) B A of the pre-trained "
          "weights",
    "grafting": "Grafting penalises |w - w0| of the trainable tensors; under LoRA those are A and B, not the "
                "pre-trained weights, so it would not penalise the change (alpha/R) B A of the model",
    "random-mask": "a mask keeps a share of the pre-trained weights unchanged; under LoRA every pre-trained weight "
                   "is frozen already and (alpha/R) B A changes all of them, so masking elements of A and B only "
                   "restricts the adapter",
    "magnitude-mask": "Magnitude Mask keeps the largest pre-trained weights unchanged; under LoRA it would rank the "
                      "elements of A (random) and B (zero), which carry no pre-trained magnitude",
    "spider": "SPIDER weighs each trainable element's pre-trained importance |w0|; under LoRA those are elements of "
              "A (random) and B (zero), which carry none",
    "pretrain": "the testbed's base pre-training trains every part of the random model in full",
}


def check_method(method: str) -> str:
    """'' if `method` runs with LoRA, else why not (one line)."""
    return REFUSED.get(method, "")


# ---------------------------------------------------------------------------------------------
# Which modules get an adapter.
# ---------------------------------------------------------------------------------------------
def module_names(model: nn.Module, modules) -> list[str]:
    """The paths in `model` of `modules` (by identity)."""
    wanted = {id(m) for m in modules}
    return [name for name, module in model.named_modules() if id(module) in wanted]


def target_modules(mllm, tune_last_layers: int, targets: str = "", connector: bool = False) -> list[str]:
    """Full paths of the nn.Linear modules that get LoRA: inside the last `tune_last_layers` decoder layers those
    whose own name (the path's last part) is in `targets` (comma-separated; '' = every linear layer there, i.e.
    the attention and MLP projections), and with `connector` every nn.Linear of the connector."""
    wanted = {name.strip() for name in targets.split(",") if name.strip()}
    layers = list(mllm.decoder_layers)
    scopes = [(layer, wanted) for layer in layers[len(layers) - tune_last_layers:]]
    if connector:
        scopes += [(module, set()) for module in mllm.connector_modules()]
    names = []
    for scope, only in scopes:
        (prefix,) = module_names(mllm.model, [scope])
        names += [f"{prefix}.{path}" for path, module in scope.named_modules()
                  if isinstance(module, nn.Linear) and (not only or path.rsplit(".", 1)[-1] in only)]
    if wanted:
        found = {name.rsplit(".", 1)[-1] for name in names}
        if wanted - found:
            raise ValueError(f"--lora-targets: no linear layer named {sorted(wanted - found)} in the trained decoder "
                             f"layers (there: {sorted(_linear_leaf_names(layers[-1]))})")
    if not names:
        raise ValueError("--lora-rank: no linear layer to adapt (--tune-last-layers 0 and no --lora-connector)")
    return names


def _linear_leaf_names(layer: nn.Module) -> set[str]:
    return {path.rsplit(".", 1)[-1] for path, module in layer.named_modules() if isinstance(module, nn.Linear)}


def lora_config(cfg, targets: list[str], modules_to_save: list[str] | None = None):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=lora_alpha(cfg), lora_dropout=cfg.lora_dropout,
                      target_modules=targets, modules_to_save=modules_to_save or None, bias="none")


def lora_alpha(cfg) -> float:
    """--lora-alpha, by default 2 x rank (scaling alpha / R = 2, LLaVA's LoRA scripts: r 128, alpha 256)."""
    return cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_rank


# ---------------------------------------------------------------------------------------------
# Training: inject the adapter, say what trains.
# ---------------------------------------------------------------------------------------------
def add_adapters(mllm, cfg, tune_last_layers: int, groups: list[dict]) -> list[dict]:
    """Inject LoRA into mllm.model in place. `groups`: models.freeze_for_finetuning's groups of what still trains
    in full (the connector unless --lora-connector; the vision tower when it trains). Returns the optimizer
    groups: "connector" (its full weights, or its LoRA tensors with --lora-connector) and "llm" (the decoder
    layers' LoRA tensors), plus any other group unchanged."""
    from peft import inject_adapter_in_model

    targets = target_modules(mllm, tune_last_layers, cfg.lora_targets, cfg.lora_connector)
    inject_adapter_in_model(lora_config(cfg, targets), mllm.model)  # marks only the adapter trainable
    for group in groups:  # what trains in full trains again
        for p in group["params"]:
            p.requires_grad_(True)
    in_connector = {id(p) for module in mllm.connector_modules() for p in module.parameters()}
    adapter = [p for name, p in mllm.model.named_parameters() if ".lora_" in name]
    connector_lora = [p for p in adapter if id(p) in in_connector]
    llm_lora = [p for p in adapter if id(p) not in in_connector]
    by_name = {g["name"]: g for g in groups}
    by_name.setdefault("connector", {"name": "connector", "params": []})["params"] += connector_lora
    by_name["llm"] = {"name": "llm", "params": llm_lora}
    return [g for g in by_name.values() if g["params"]]


# ---------------------------------------------------------------------------------------------
# The final model: adapter + base with the trained connector, or merged.
# ---------------------------------------------------------------------------------------------
def save_final(copy, trained: dict, cfg, folder: Path, save_model_whole, tune_last_layers: int,
               source: str = "") -> None:
    """Write the final model from `copy` (a fresh load of the starting model, an MLLM) and `trained` ({name in
    the training model: full tensor} of every trainable tensor): the adapter + the base with the trained connector,
    or with cfg.merge_lora the merged model (module docstring). `save_model_whole(mllm, folder, extra_files)`
    writes the model folder atomically."""
    import tempfile

    from peft import get_peft_model

    targets = target_modules(copy, tune_last_layers, cfg.lora_targets, cfg.lora_connector)
    keep = [] if cfg.lora_connector else module_names(copy.model, copy.connector_modules())
    with quiet():
        peft_model = get_peft_model(copy.model, lora_config(cfg, targets, keep))
    peft_model.peft_config["default"].base_model_name_or_path = source
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, value in trained.items():
            if ".lora_" in name:
                params[f"base_model.model.{name}"].copy_(value)
                continue
            # A full weight: the connector's goes into peft's trained copy of it (modules_to_save), which both
            # the adapter and the unloaded / merged model take; any other (the vision tower) into the model.
            owner = next((m for m in keep if name.startswith(m + ".")), None)
            params[f"base_model.model.{owner}.modules_to_save.default.{name[len(owner) + 1:]}" if owner
                   else f"base_model.model.{name}"].copy_(value)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        extra = ()
        if not cfg.merge_lora:
            peft_model.save_pretrained(tmp, save_embedding_layers=False)  # no embedding trains
            extra = [Path(tmp) / name for name in ADAPTER_FILES]
        copy.model = peft_model.merge_and_unload() if cfg.merge_lora else peft_model.unload()
        save_model_whole(copy, folder, extra)


def merge_saved_adapter(mllm, folder: str) -> None:
    """A model folder that holds a peft adapter (`save_final`): merge the adapter into the loaded model, in place.
    transformers' from_pretrained has attached it already (LLaVA and generic folders); VILA's loader has not."""
    from peft import PeftModel

    model = mllm.model
    if getattr(model, "_hf_peft_config_loaded", False):  # attached by transformers: merge its LoRA layers
        _merge_attached(model)
        return
    with quiet():
        peft_model = PeftModel.from_pretrained(model, folder)
    mllm.model = peft_model.merge_and_unload()


def _merge_attached(model: nn.Module) -> None:
    """Merge and remove the adapter layers transformers' `load_adapter` put into `model` (peft's tuner layers and
    modules_to_save wrappers), the way peft's own merge_and_unload does."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    replaced = []
    for name, module in model.named_modules():
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and not any(
                name.startswith(done + ".") for done in replaced):
            replaced.append(name)
    for name in replaced:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(module, BaseTunerLayer):
            module.merge()
            setattr(parent, child, module.get_base_layer())
        else:
            setattr(parent, child, module.unload_and_optionally_merge_module(True, False, None))
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(model, attribute):
            delattr(model, attribute)


@contextlib.contextmanager
def quiet():
    """peft asks the model a deprecated transformers question (is_gradient_checkpointing): nothing for our user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def read_adapter_config(folder) -> dict:
    with open(os.path.join(str(folder), "adapter_config.json")) as f:
        return json.load(f)
