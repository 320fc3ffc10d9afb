"""`train.py --report-to tensorboard` (tensorboard_log.py): the events hold every scalar of metrics.jsonl, read back
with TensorBoard's own EventAccumulator; a run killed after a step it had logged, then resumed, has each step
exactly once in its events; under torchrun only rank 0 writes them.

    python -m pytest -q tests/test_tensorboard_log.py
"""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import torchrun_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tensorboard_log
import train

STEPS_PER_EPOCH = 2  # 8 records, batch 4


def config(data_dir, out_dir, **overrides):
    """Tiny settings (as tests/test_train.py): 8 records, batch 4, two epochs of 2 steps, no evaluation."""
    base = dict(model="tiny-llava", data_dir=str(data_dir), out_dir=str(out_dir), base_epochs=0, epochs=2,
                batch_size=4, micro_batch_size=4, samples_per_dataset=4, eval_every_epoch=False,
                report_to="tensorboard")
    return train.make_config(**{**base, **overrides})


def events(out_dir) -> dict:
    """{tag: [(step, value), ...]} of every scalar event in OUT_DIR/tensorboard, as TensorBoard reads them."""
    board = EventAccumulator(str(Path(out_dir) / "tensorboard"), size_guidance={"scalars": 0})
    board.Reload()
    return {tag: [(e.step, e.value) for e in board.Scalars(tag)] for tag in board.Tags()["scalars"]}


def expected_events(out_dir) -> dict:
    """The same, worked out from metrics.jsonl here (not with tensorboard_log.scalars): float32, as events store."""
    expected = {}

    def add(tag, step, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            expected.setdefault(tag, []).append((step, float(np.float32(value))))

    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "step" in record:
            for key, value in record.items():
                if key != "step":
                    add(f"train/{key}", record["step"], value)
        else:  # {"epoch": e, "eval": {...}, "seconds"}: at the step that ended epoch e
            for key, value in [*record["eval"].items(), ("seconds", record["seconds"])]:
                add(f"eval/{key}", record["epoch"] * STEPS_PER_EPOCH, value)
    return expected


def test_events_hold_every_scalar_of_metrics_jsonl(synthetic_data_dir, tmp_path):
    out = tmp_path / "run"
    train.main(config(synthetic_data_dir, out, method="nrca", eval_every_epoch=True, eval_limit=2,
                      eval_max_new_tokens=4))
    got, expected = events(out), expected_events(out)
    # NRCA's step scalars (loss, CE, alignment, both confidences, the share I~ > I, lr, grad norm) and the
    # per-epoch evaluation are there, at steps 1..4 and at the ends of epochs 1 and 2.
    assert {"train/loss", "train/ce", "train/alignment", "train/confidence", "train/noisy_confidence",
            "train/noisy_above_clean", "train/lr", "train/grad_norm", "eval/cider", "eval/accuracy",
            "eval/avg", "eval/seconds"} <= got.keys()
    assert [step for step, _ in got["train/loss"]] == [1, 2, 3, 4]
    assert [step for step, _ in got["eval/accuracy"]] == [2, 4]
    assert got == expected
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_resumed_run_has_each_step_once(synthetic_data_dir, tmp_path, monkeypatch):
    """Killed after step 3 was logged but before its checkpoint (the last is step 2's): the resumed run redoes
    step 3, and the events hold steps 1..4 once each, with metrics.jsonl's values."""
    out = tmp_path / "run"
    save_checkpoint = train.save_checkpoint

    def killed_at_step_3(out_dir, step, *args, **kwargs):
        if step == 3:
            raise KeyboardInterrupt("killed")
        return save_checkpoint(out_dir, step, *args, **kwargs)

    monkeypatch.setattr(train, "save_checkpoint", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train.main(config(synthetic_data_dir, out, method="full", save_every=1))
    assert [step for step, _ in events(out)["train/loss"]] == [1, 2, 3]  # step 3 was logged before the kill
    monkeypatch.setattr(train, "save_checkpoint", save_checkpoint)
    train.main(config(synthetic_data_dir, out, method="full", save_every=1, resume=True))
    got = events(out)
    assert [step for step, _ in got["train/loss"]] == [1, 2, 3, 4]
    assert got == expected_events(out)


def test_resume_may_turn_tensorboard_on(synthetic_data_dir, tmp_path):
    """A run started without --report-to tensorboard gets its earlier steps too when resumed with it."""
    out = tmp_path / "run"
    assert train.main(config(synthetic_data_dir, out, method="full", report_to="none", stop_at_step=3)) == \
        {"stopped_at_step": 3}
    assert not (out / "tensorboard").exists()
    train.main(config(synthetic_data_dir, out, method="full", resume=True))
    assert [step for step, _ in events(out)["train/loss"]] == [1, 2, 3, 4]


def test_two_ranks_write_one_set_of_events(synthetic_data_dir, tmp_path):
    """torchrun, 2 gloo ranks (DDP): rank 0 alone writes the events, and the run ends (no rank waits on another)."""
    out = tmp_path / "run"
    torchrun_train(tmp_path, ["--model", "tiny-llava", "--data-dir", str(synthetic_data_dir), "--out-dir", str(out),
                              "--base-epochs", "0", "--epochs", "1", "--batch-size", "4", "--micro-batch-size", "2",
                              "--samples-per-dataset", "4", "--no-eval-every-epoch", "--method", "full",
                              "--report-to", "tensorboard"])
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    got = events(out)
    assert [step for step, _ in got["train/loss"]] == [1, 2] and got == expected_events(out)


def test_scalars_of_one_line():
    step, values = tensorboard_log.scalars({"step": 7, "epoch": 0.5, "loss": 1.5, "n_open": 3, "flag": True}, 4)
    assert (step, values) == (7, {"train/epoch": 0.5, "train/loss": 1.5, "train/n_open": 3.0})
    step, values = tensorboard_log.scalars({"epoch": 2, "eval": {"cider": 80.0, "noisy": False, "caption_dataset":
                                                                  "val_caption", "delta": None}, "seconds": 3.0}, 4)
    assert (step, values) == (8, {"eval/cider": 80.0, "eval/seconds": 3.0})


def test_bad_report_to_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--report-to 'wandb': expected none or tensorboard"):
        config(tmp_path, tmp_path, report_to="wandb")
    find_spec = train.importlib.util.find_spec  # without the package: named before any model loads, on every rank
    monkeypatch.setattr(train.importlib.util, "find_spec", lambda name: None if name == "tensorboard" else
                        find_spec(name))
    with pytest.raises(ValueError, match="--report-to tensorboard: the tensorboard package is not installed"):
        config(tmp_path, tmp_path)
