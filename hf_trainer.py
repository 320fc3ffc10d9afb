"""NRCA inside `transformers.Trainer`: `NRCATrainer` (TRL's trainers subclass Trainer; combining them is untested).

HF Trainer users keep their model, data and `TrainingArguments`, swap `Trainer` for `NRCATrainer` and
get the loss train.py optimises (paper Sec. 3.2, Alg. 1), computed by the same code: methods.py's NRCA (one
forward of 2B samples, clean and Noisy-Visual-Mixup images with the text shared, Eq. 2), logits only at the
answer rows (methods.model_forward), confidence_kernel.py's fused kernel, and nrca.py's Eq. (4)-(6) with the
released code's reduction (per-sample token mean, then the sample mean). Nothing of the loss, the batching or
the noise is written again here: the samples and batches are the model interface's (models.py).

    from hf_trainer import NRCATrainer
    import models
    mllm = models.load_model("/ckpt/Qwen2-VL-2B-Instruct")           # any model train.py takes
    models.freeze_for_finetuning(mllm, tune_last_layers=2)           # connector + last 2 layers (Sec. 3.1)
    train_set = mllm.dataset(records, image_folder)                  # data.py records (data.mix_datasets)
    trainer = NRCATrainer(model=mllm.model, args=TrainingArguments(..., remove_unused_columns=False),
                          train_dataset=train_set, data_collator=mllm.collate,
                          processing_class=getattr(mllm, "processor", None), nrca={"lam": 2.0, "delta": 0.5})
    trainer.train()

The batches must hold input_ids, attention_mask, labels (-100 off the answer) and pixel_values, a
(B, C, H, W) tensor (LLaVA-1.5, VILA1.5) or the dict of a processor's image tensors (Qwen2-VL's packed
patches, anyres / Idefics3 tiles): what `mllm.collate` builds. The noise seed of a micro-batch is train.py's
`noise_seed(seed, step, micro, rank)`, so a run can be reproduced and a step's loss equals train.py's on the
same batch (tests/test_hf_trainer.py).

`nrca`: fields of train.py's TrainConfig that concern the loss (method "nrca" or "full", lam, delta,
noise_stats, min_open_tokens, nrca_impl, nrca_alignment, seed); the defaults are the paper's. The
counterparts with state (masks, SPIDER), modality interference, per-epoch evaluation, FSDP2 and resume are
train.py's: `python train.py --model FOLDER --method ...` runs them on every model (README, "Models and methods").
Trainer divides the returned loss by the gradient-accumulation steps, as train.py does (each micro-batch's
loss is already its own mean, so it is not re-normalised by token counts).

    TRITON_INTERPRET=1 python -m pytest -q tests/test_hf_trainer.py
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import Trainer

from methods import get_method, model_forward
from train import TrainConfig, make_config, noise_seed

SUPPORTED_METHODS = ("nrca", "full")


class NRCATrainer(Trainer):
    """`transformers.Trainer` whose `compute_loss` is methods.py's NRCA (or Full FT, the same reduction)."""

    def __init__(self, *args, nrca: TrainConfig | dict | None = None, **kwargs):
        self.nrca = nrca if isinstance(nrca, TrainConfig) else make_config(**(nrca or {}))
        if self.nrca.method not in SUPPORTED_METHODS:
            raise ValueError(f"NRCATrainer: method {self.nrca.method!r}; expected one of {SUPPORTED_METHODS} "
                             "(the other counterparts run in train.py)")
        super().__init__(*args, **kwargs)
        # Our loss is a per-micro-batch mean (train.py's reduction): let Trainer divide by the accumulation steps
        # and never hand the model a token count.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._method, self._step, self._micro = None, -1, 0
        self.nrca_metrics: dict = {}  # the last micro-batch's ce / alignment / n_open / n_empty

    def nrca_method(self, model):
        """methods.py's method object, built once on the model's trainable parameters."""
        if self._method is None:
            inner = getattr(model, "module", model)
            mllm = SimpleNamespace(model=inner)  # NRCA and Full FT read only the model (its config: Eq. 2's layouts)
            named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
            self._method = get_method(self.nrca.method)(self.nrca, mllm, named)
        return self._method

    def next_noise_seed(self) -> int:
        """train.py's seed for (step, micro-batch within the step, rank)."""
        if self.state.global_step != self._step:
            self._step, self._micro = self.state.global_step, 0
        seed = noise_seed(self.nrca.seed, self._step, self._micro, self.args.process_index)
        self._micro += 1
        return seed

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
            if key not in inputs:
                raise KeyError(f"NRCATrainer.compute_loss: the batch lacks {key!r} (has {sorted(inputs)}); build "
                               "batches with mllm.collate (data.collate)")
        # Training: train.py's seed of this micro-batch; evaluation (Trainer.evaluate) must not advance that count.
        seed = self.next_noise_seed() if model.training else noise_seed(self.nrca.seed, self.state.global_step, 0,
                                                                        self.args.process_index)
        batch = {**inputs, "noise_seed": seed}
        loss, metrics = self.nrca_method(model).loss(model_forward(model), batch)
        self.nrca_metrics = {key: float(value) for key, value in metrics.items()
                             if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1)}
        return (loss, {"loss": loss}) if return_outputs else loss
