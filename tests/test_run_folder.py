"""Tests for run_folder.py through train.py (tiny-llava, CPU, a few steps each): what a run folder protects.

Covered: --resume refuses another method, another starting model of the same shape, another batch size or
number of epochs, naming the field, and leaves config.json alone (a moved model folder or a changed evaluation
option is accepted); a new run refuses a finished run's folder unless --overwrite; a second concurrent run
gets the lock error and a killed run's stale lock is taken over; after a kill and --resume the metrics.jsonl
step lines equal an uninterrupted run's; a kill -9 during an epoch's evaluation is redone on resume; a full
disk during a checkpoint names the file and keeps the previous checkpoint; a truncated checkpoint is named.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_run_folder.py
"""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from test_train import REPO, config, latest_weights, run, step_records

import models
import run_folder
import train

TIMING = ("tokens_per_s", "peak_memory_mb", "seconds")  # wall-clock measurements: the only fields a rerun may change
EVAL = dict(eval_every_epoch=True, eval_limit=1, eval_max_new_tokens=2)


def metrics_lines(out_dir) -> list[dict]:
    """metrics.jsonl without its timing fields: steps and per-epoch evaluations in order."""
    lines = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines]


class Killed(Exception):
    """Stands in for a kill at a chosen point of the run."""


# ---------------------------------------------------------------------------------------------
# 1. --resume continues the same run only.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("started, resumed, named", [
    (dict(method="full"), dict(method="nrca"), "method: 'full' at the start, 'nrca' now"),
    (dict(method="spider"), dict(method="magnitude-mask"), "method: 'spider' at the start, 'magnitude-mask' now"),
    (dict(batch_size=4), dict(batch_size=8), "batch_size: 4 at the start, 8 now"),
    (dict(epochs=2), dict(epochs=3), "epochs: 2 at the start, 3 now"),
], ids=["full-to-nrca", "spider-to-magnitude-mask", "batch-size", "epochs"])
def test_resume_refuses_changed_settings(started, resumed, named, synthetic_data_dir, tmp_path):
    out = tmp_path / "run"
    assert train.main(config(synthetic_data_dir, out, stop_at_step=1, **started)) == {"stopped_at_step": 1}
    saved = (out / "config.json").read_text()
    with pytest.raises(run_folder.RunFolderError) as error:
        run(synthetic_data_dir, out, resume=True, **{**started, **resumed})
    assert named in str(error.value) and "Only these may change on --resume" in str(error.value)
    assert (out / "config.json").read_text() == saved  # never rewritten with settings the checkpoint lacks
    assert [r["step"] for r in step_records(out)] == [1] and (out / "latest").read_text() == "checkpoint-1"


def test_resume_refuses_another_model_of_the_same_shape(synthetic_data_dir, tmp_path):
    first, other = tmp_path / "model-a", tmp_path / "model-b"
    models.load_model("tiny-llava").save(str(first))
    changed = models.load_model("tiny-llava")
    with torch.no_grad():
        changed.connector.linear_1.weight.add_(0.01)  # a different random model: same files, same shapes
    changed.save(str(other))
    out = tmp_path / "run"
    train.main(config(synthetic_data_dir, out, model=str(first), stop_at_step=1))
    with pytest.raises(run_folder.RunFolderError, match=rf"starting model: {first} at the start, {other} now; files "
                                                        r"\['model.safetensors'\] differ \(sha256\)\n"):
        run(synthetic_data_dir, out, model=str(other), resume=True)
    # The same model moved elsewhere is the same run; evaluation options may change on --resume.
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    run(synthetic_data_dir, out, model=str(moved), resume=True, eval_max_new_tokens=5)
    assert [r["step"] for r in step_records(out)] == [1, 2] and (out / "final").is_dir()
    assert json.loads((out / "config.json").read_text())["eval_max_new_tokens"] == 5


# ---------------------------------------------------------------------------------------------
# 2. A run folder holds one run: never overwritten by accident, never written by two runs at once.
# ---------------------------------------------------------------------------------------------
def test_new_run_refuses_a_finished_runs_folder_unless_overwrite(synthetic_data_dir, tmp_path):
    out = run(synthetic_data_dir, tmp_path / "run", method="full")
    final, metrics = (out / "final" / "model.safetensors").read_bytes(), (out / "metrics.jsonl").read_text()
    with pytest.raises(run_folder.RunFolderError, match=r"already holds a run \(checkpoint-2, final, latest\).*"
                                                        r"--resume.*--overwrite"):
        run(synthetic_data_dir, out, method="nrca")
    assert (out / "final" / "model.safetensors").read_bytes() == final
    assert (out / "metrics.jsonl").read_text() == metrics
    run(synthetic_data_dir, out, method="nrca", overwrite=True)
    assert [r["step"] for r in step_records(out)] == [1, 2]  # the new run's lines only
    assert json.loads((out / "config.json").read_text())["method"] == "nrca"
    assert (out / "final" / "model.safetensors").read_bytes() != final


HOLD_LOCK = "import sys, time, run_folder; run_folder.RunLock(sys.argv[1]).acquire(); print('held', flush=True); " \
            "time.sleep(300)"


def test_second_concurrent_run_gets_the_lock_error_and_a_dead_runs_lock_is_taken_over(synthetic_data_dir, tmp_path,
                                                                                        capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"  # another run holds the folder
        with pytest.raises(run_folder.RunFolderError, match=rf"{out} is in use by another run: {out}/run.lock is held "
                                                            rf"by pid {holder.pid} on {socket.gethostname()} since "):
            run(synthetic_data_dir, out)
        assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()
    finally:
        holder.kill()  # like kill -9: the lock file stays, the kernel drops the flock
        holder.wait()
    assert json.loads((out / "run.lock").read_text())["pid"] == holder.pid
    capsys.readouterr()
    run(synthetic_data_dir, out)
    assert f"taking over the stale lock {out / 'run.lock'} of pid {holder.pid}" in capsys.readouterr().out
    assert [r["step"] for r in step_records(out)] == [1, 2] and not (out / "run.lock").exists()


# ---------------------------------------------------------------------------------------------
# 3. metrics.jsonl and the epoch-end evaluation after a kill.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(synthetic_data_dir, tmp_path_factory):
    """2 epochs of 2 steps with an evaluation after each, never stopped: the reference metrics.jsonl."""
    return metrics_lines(run(synthetic_data_dir, tmp_path_factory.mktemp("straight"), epochs=2, **EVAL))


def test_metrics_after_kill_and_resume_equal_an_uninterrupted_run(uninterrupted, synthetic_data_dir, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "run"
    real_save, evaluations = train.save_checkpoint, []

    def killed_before_checkpoint_3(out_dir, step, *args, **kwargs):
        if step == 3:  # step 3 is applied and logged, its checkpoint never written
            raise Killed
        return real_save(out_dir, step, *args, **kwargs)

    monkeypatch.setattr(train, "save_checkpoint", killed_before_checkpoint_3)
    with pytest.raises(Killed):
        run(synthetic_data_dir, out, epochs=2, save_every=1, **EVAL)
    assert [r.get("step") for r in metrics_lines(out)] == [1, 2, None, 3]  # None: epoch 1's evaluation
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    real_evaluate = train.evaluate_epoch
    monkeypatch.setattr(train, "evaluate_epoch",  # the per-epoch evaluations (not --eval-noisy-final's)
                        lambda *a, **k: (k.get("noisy") or evaluations.append(a[2])) or real_evaluate(*a, **k))
    run(synthetic_data_dir, out, epochs=2, save_every=1, resume=True, **EVAL)
    assert metrics_lines(out) == uninterrupted  # step 3 once, epoch 1's evaluation kept (checkpoint-2 has it)
    assert evaluations == [2]


KILL_IN_EVALUATION = '''
import os, signal, sys
import evaluate, train

evaluate.evaluate_model = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # kill -9 mid-evaluation
train.main(train.parse_config(sys.argv[1:]))
'''


def test_kill_during_an_evaluation_then_resume_gives_every_epochs_evaluation(uninterrupted, synthetic_data_dir,
                                                                             tmp_path, capsys):
    out = tmp_path / "run"
    command = [sys.executable, "-c", KILL_IN_EVALUATION, "--model", "tiny-llava", "--data-dir", str(synthetic_data_dir),
               "--out-dir", str(out), "--base-epochs", "0", "--epochs", "2", "--batch-size", "4",
               "--micro-batch-size", "4", "--samples-per-dataset", "4", "--eval-limit", "1",
               "--eval-max-new-tokens", "2"]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-3000:]
    assert (out / "latest").read_text() == "checkpoint-2" and [r["step"] for r in step_records(out)] == [1, 2]
    capsys.readouterr()
    run(synthetic_data_dir, out, epochs=2, resume=True, **EVAL)
    assert [line["epoch"] for line in metrics_lines(out) if "eval" in line] == [1, 2]
    printed = capsys.readouterr().out
    assert f"taking over the stale lock {out / 'run.lock'}" in printed  # the killed run's
    assert "\n| 1 | " in printed and "\n| 2 | " in printed  # the table has both epochs
    assert metrics_lines(out) == uninterrupted


# ---------------------------------------------------------------------------------------------
# 4. Saves that fail, checkpoints that are damaged.
# ---------------------------------------------------------------------------------------------
def _no_space(*args, **kwargs):  # what safetensors' save_file raises on a full disk (tmpfs, measured)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _torch_save_fails(*args, **kwargs):  # what torch.save raises on a full disk (tmpfs, measured)
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def _no_permission(*args, **kwargs):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))


@pytest.mark.parametrize("writer, failing, file", [("save_file", _no_space, "trainable.safetensors"),
                                                   ("torch", _torch_save_fails, "state.pt"),
                                                   ("save_file", _no_permission, "trainable.safetensors")],
                         ids=["safetensors-no-space", "torch-save-no-space", "no-permission"])
def test_full_disk_during_a_checkpoint_names_the_file_and_keeps_the_previous(writer, failing, file,
                                                                             synthetic_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real = train.save_file if writer == "save_file" else torch.save

    def fails_the_second_time(*args, **kwargs):
        calls.append(1)
        return (failing if len(calls) == 2 else real)(*args, **kwargs)

    monkeypatch.setattr(*((train, "save_file") if writer == "save_file" else (torch, "save")), fails_the_second_time)
    with pytest.raises(OSError) as error:
        run(synthetic_data_dir, out, save_every=1)
    message = str(error.value)
    assert f"cannot write {out / '.checkpoint-2.tmp' / file}" in message and "MiB free on its disk" in message
    assert f"the previous checkpoint {out / 'checkpoint-1'} is kept" in message
    assert (out / "latest").read_text() == "checkpoint-1" and not (out / ".checkpoint-2.tmp").exists()
    monkeypatch.undo()
    run(synthetic_data_dir, out, save_every=1, resume=True)  # continues from the kept checkpoint
    assert [r["step"] for r in step_records(out)] == [1, 2]


def test_damaged_checkpoint_files_are_named(synthetic_data_dir, tmp_path):
    out = tmp_path / "run"
    train.main(config(synthetic_data_dir, out, stop_at_step=1))
    weights = out / "checkpoint-1" / "trainable.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # a copy or a save cut short
    with pytest.raises(ValueError, match=rf"{weights}: truncated: its header describes {len(whole)} bytes"):
        run(synthetic_data_dir, out, resume=True)
    weights.write_bytes(whole)
    state = out / "checkpoint-1" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{state}: not a readable checkpoint state"):
        run(synthetic_data_dir, out, resume=True)
    assert set(latest_weights(out)) and [r["step"] for r in step_records(out)] == [1]


# ---------------------------------------------------------------------------------------------
# 5. run_folder's pieces on their own.
# ---------------------------------------------------------------------------------------------
def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_folder.fcntl, "flock", no_locks)
    with run_folder.claim(tmp_path, resume=False, overwrite=False):
        assert f"warning: cannot lock {tmp_path / 'run.lock'}" in capsys.readouterr().out


def test_truncate_metrics_cuts_whole_lines_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    assert run_folder.truncate_metrics(path, len('{"step": 1}\n')) == 2
    assert path.read_text() == '{"step": 1}\n'
    with pytest.raises(run_folder.RunFolderError, match="was it edited"):
        run_folder.truncate_metrics(path, 5)  # not at a line end
    with pytest.raises(run_folder.RunFolderError, match="was it edited"):
        run_folder.truncate_metrics(path, 100)  # longer than the file
