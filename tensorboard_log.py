"""`train.py --report-to tensorboard`: every scalar of a run's metrics.jsonl as TensorBoard events in RUN/tensorboard.

metrics.jsonl stays the record of a run; the events are made from it. `MetricsBoard.sync()` reads the lines
train.py appended since its last call and writes their numbers:
- a step line {"step": s, "epoch", "loss", "ce", "alignment", the confidences, the share I~ > I, "lr",
  "grad_norm", "tokens_per_s", ...} as train/KEY at step s;
- a per-epoch evaluation line {"epoch": e, "eval": {"cider", "accuracy", "avg", ...}, "seconds"} as eval/KEY (and
  eval/seconds) at the step that ended epoch e, so the evaluation sits on the training curves' axis.
Strings, booleans and None (dataset names, "noisy") are not scalars and are left out.

On --resume, train.py first cuts metrics.jsonl back to the checkpoint (run_folder.truncate_metrics) and the steps
after it are done again. Opening the board deletes the run's event files and writes them again from the cut file,
so every step is in the events exactly once, with the value metrics.jsonl holds. (TensorBoard's `purge_step` would
leave the old values in the files for readers that do not honour it, and would not know an epoch's evaluation that
is redone at the checkpoint's own step.) Events a killed run had not flushed are recovered the same way.

Rank 0 only (train.py). tensorboard is imported when a board opens, so runs without it do not pay for the import
(train.validate_config names a missing package before any model loads).
Not here: histograms, images, other loggers (wandb, MLflow).

    python train.py --compare full --report-to tensorboard && tensorboard --logdir runs/embedded  # NRCA, Full FT
"""

from __future__ import annotations

import json
from pathlib import Path

FOLDER = "tensorboard"  # inside the run folder (run_folder.RUN_FILES: --overwrite removes it)


def scalars(record: dict, steps_per_epoch: int) -> tuple[int, dict[str, float]]:
    """One metrics.jsonl line -> (global step, {tag: value})."""
    numbers = lambda items, prefix: {f"{prefix}/{key}": float(value) for key, value in items
                                     if isinstance(value, (int, float)) and not isinstance(value, bool)}
    if "step" in record:
        return int(record["step"]), numbers(((k, v) for k, v in record.items() if k != "step"), "train")
    if "eval" in record:  # an epoch's evaluation: at the optimizer step that ended the epoch
        extra = ((k, v) for k, v in record.items() if k not in ("epoch", "eval") and k not in record["eval"])
        return (round(record["epoch"] * steps_per_epoch),
                {**numbers(record["eval"].items(), "eval"), **numbers(extra, "eval")})
    return 0, {}


class MetricsBoard:
    """TensorBoard events that follow RUN/metrics.jsonl: `sync()` after every write to it, `close()` at the end."""

    def __init__(self, out_dir: Path, steps_per_epoch: int):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (train.validate_config)

        self.metrics = Path(out_dir) / "metrics.jsonl"
        self.steps_per_epoch = steps_per_epoch
        folder = Path(out_dir) / FOLDER
        for old in folder.glob("events.out.tfevents.*"):  # rewritten below from metrics.jsonl as it is now
            old.unlink()
        self.writer = SummaryWriter(log_dir=str(folder))
        self.read_bytes = 0
        self.sync()

    def sync(self) -> int:
        """Write the scalars of the whole lines appended to metrics.jsonl since the last call; returns how many
        lines were read."""
        if not self.metrics.is_file():
            return 0
        with self.metrics.open("rb") as f:
            f.seek(self.read_bytes)
            new = f.read()
        new = new[:new.rfind(b"\n") + 1]  # a line being written waits for the next call
        self.read_bytes += len(new)
        lines = [line for line in new.decode().splitlines() if line.strip()]
        for line in lines:
            step, values = scalars(json.loads(line), self.steps_per_epoch)
            for tag, value in values.items():  # NaN / inf too: TensorBoard shows them
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        return len(lines)

    def close(self) -> None:
        self.writer.close()
