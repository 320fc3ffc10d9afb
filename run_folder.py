"""The run folder train.py writes into: who may write there, and whether --resume continues the same run.

- `claim`: a new run refuses a folder that already holds a run (a checkpoint or a final model) unless
  --resume or --overwrite (which first removes that run's files, listed in RUN_FILES), and takes the
  folder's lock for as long as it trains. A non-empty folder that holds no run (a model folder, anything
  else) and the starting model's own folder are refused whatever the flags (`refuse_foreign_folder`).
- `RunLock`: RUN/run.lock, held with flock(2) and holding the holder's pid, host and start time. A second
  run into the same folder stops with an error that names them. The kernel drops a flock when its process
  dies (kill -9 included), so a lock left by a killed run is seen as stale and taken over, with a note.
  The file is removed when a run ends normally. On a file system without locks (some FUSE mounts) the run
  goes on with a warning.
- `fingerprint` / `check_resume`: RUN/run.json keeps the configuration a run started with, a fingerprint
  of its starting model (every weight, config, tokenizer, processor and chat-template file, WEIGHT_SUFFIXES:
  size and sha256) and of its training files (task, name, size, sha256), and its steps per epoch. --resume
  recomputes them and refuses, naming every difference, unless the field is in CHANGEABLE_ON_RESUME; a run
  without run.json (an older train.py's) is compared with its config.json, paths as paths. A damaged run.json
  or config.json is named (`read_record`). Paths may change (a moved model
  or data set with the same contents is the same run); contents may not. Hashing costs one read of the
  model (seconds per GB); on resume, files whose size and modification time are unchanged are not re-read.
- `truncate_metrics`: on resume, RUN/metrics.jsonl is cut back (atomically) to its length when the
  checkpoint was written, so the steps redone after a kill are not logged twice (--report-to tensorboard's
  events are then rebuilt from it: tensorboard_log.py).

Not here: the checkpoints themselves (train.py save_checkpoint / load_checkpoint). Images are not
hashed (there can be millions), which is why --image-folder may change on resume.

Used by train.py; `python -m pytest tests/test_run_folder.py` tests it.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

# Settings that may differ between a run's start and its --resume: they do not change what the optimizer
# steps compute (evaluation, checkpoint frequency, where files are, how the work is spread over devices).
# micro_batch_size / fsdp change the summation order of a step only (activation checkpointing not even that);
# the steps per epoch are checked. merge_lora changes only how the final model is written.
CHANGEABLE_ON_RESUME = ("preset", "out_dir", "resume", "overwrite", "stop_at_step", "save_every", "test",
                        "num_workers", "check_images",
                        "eval_every_epoch", "eval_max_new_tokens", "eval_limit", "eval_noisy_final", "diagnose_every",
                        "image_folder", "micro_batch_size", "fsdp", "compile", "activation_checkpointing", "plan",
                        "gpu_memory", "plan_ranks", "plan_text_tokens", "plan_answer_tokens", "report_to",
                        "merge_lora")
# Compared through the fingerprint (contents), not as paths.
FINGERPRINTED = ("model", "train", "data_dir", "base_epochs")
# What a run leaves in its folder; --overwrite removes exactly these.
RUN_FILES = ("checkpoint-*", ".checkpoint-*.tmp", "latest", ".latest.tmp", "final", ".final.tmp", "metrics.jsonl",
             "config.json", "run.json", "eval_epoch*", "eval.json", "eval_noisy.json", "predictions_*.jsonl",
             "tensorboard")
# A model folder's files that shape what a run computes: weights, configs (model, generation, processor, the chat
# template inside tokenizer_config.json or chat_template.json), tokenizer files (tokenizer.json, SentencePiece
# .model, BPE merges.txt / vocab.txt, tiktoken ranks) and the chat template as a file of its own (.jinja).
WEIGHT_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".model", ".txt", ".tiktoken", ".jinja")
OLD_WEIGHT_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".model", ".txt", ".tiktoken")  # run.json without
# "model_suffixes" (before .jinja was hashed): a resume compares these files only


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked: it holds another run, it is locked, or --resume differs."""


def write_json_atomic(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)  # also when train._train is called without main's claim
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)  # readers see the old file or the new one, never half of it


# ---------------------------------------------------------------------------------------------
# Who may write: a run at a time, never over another run by accident.
# ---------------------------------------------------------------------------------------------
class RunLock:
    """flock(2) on OUT/run.lock for the lifetime of a run. `previous` is the holder record of a stale lock
    that was taken over (None if there was none)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / "run.lock"
        self.previous, self._fd = None, None

    def acquire(self) -> RunLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # a file system without locks
                    os.close(fd)
                    print(f"warning: cannot lock {self.path} ({error}): a second run into this folder is not detected")
                    return self
                holder = _read_holder(fd)
                os.close(fd)
                raise RunFolderError(
                    f"{self.path.parent} is in use by another run: {self.path} is held by pid {holder.get('pid')} "
                    f"on {holder.get('host')} since {holder.get('started')}. Wait for it to end, stop it, or "
                    "pass another --out-dir") from None
            try:  # the holder may have removed the file between our open and our flock: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.previous = _read_holder(fd) or None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it: nobody locks a file about to vanish
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {"pid": "?", "host": "?", "started": "? (unreadable lock record)"}


def holds_run(out_dir: Path) -> list[str]:
    """What in out_dir shows that a run already wrote there (checkpoints or a final model)."""
    return sorted(p.name for pattern in ("latest", "checkpoint-*", "final") for p in Path(out_dir).glob(pattern))


def is_run_folder(out_dir: Path) -> bool:
    """True if train.py wrote out_dir: a checkpoint, a final model, run.json, metrics.jsonl, or a config.json that is
    a TrainConfig (a model folder's config.json is not)."""
    out_dir = Path(out_dir)
    if holds_run(out_dir) or (out_dir / "run.json").exists() or (out_dir / "metrics.jsonl").exists():
        return True
    try:
        config = json.loads((out_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "out_dir" in config and "method" in config


def refuse_foreign_folder(out_dir: Path, model: str = "", keep: tuple = ()) -> None:
    """--out-dir may be new, empty or a run's folder; never a model folder or anything else that is no run
    (--overwrite would delete its config.json, a run would write over it), never the starting model's folder,
    inside it (the model's fingerprint would read the run's files), or one of the run's own files (--model
    RUN/final with --out-dir RUN: --overwrite deletes it, the run replaces it). `keep`: names (glob patterns) a
    caller keeps beside its run (the testbed base's vision-stage/)."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise RunFolderError(f"--out-dir {out_dir} is a file, not a folder; pass a new or empty folder")
    if model and Path(model).is_dir():
        model_dir = Path(model).resolve()
        inside = model_dir.is_relative_to(out_dir) and model_dir != out_dir
        if out_dir.is_relative_to(model_dir):
            raise RunFolderError(f"--out-dir {out_dir} is {'' if out_dir == model_dir else 'inside '}the --model "
                                 f"folder {model_dir}: a run writes its own config.json, checkpoints and final model "
                                 "there; pass another --out-dir")
        if inside and any(model_dir.relative_to(out_dir).parts[0] == p.name for pattern in RUN_FILES
                          for p in out_dir.glob(pattern)):
            raise RunFolderError(f"--model {model_dir} is one of the run files of --out-dir {out_dir}, which this "
                                 "run replaces (--overwrite deletes it first): copy the model elsewhere or pass "
                                 "another --out-dir")
    if not out_dir.is_dir() or is_run_folder(out_dir):
        return
    ignored = ("run.lock",) + tuple(keep)
    found = sorted(p.name for p in out_dir.iterdir() if not any(fnmatch.fnmatch(p.name, k) for k in ignored))
    if found:
        shown = ", ".join(found[:8]) + (f", ... ({len(found)} entries)" if len(found) > 8 else "")
        raise RunFolderError(f"--out-dir {out_dir} is not empty and holds no run of train.py ({shown}): a run "
                             "would write over these files and --overwrite deletes a run's files only; pass a new "
                             "or empty --out-dir")


def claim(out_dir, resume: bool, overwrite: bool, model: str = "", keep: tuple = ()) -> RunLock:
    """Lock out_dir for this run; refuse a folder holding another run unless resume or overwrite, and a folder
    that is no run (refuse_foreign_folder)."""
    out_dir = Path(out_dir)
    refuse_foreign_folder(out_dir, model, keep)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out_dir).acquire()
    try:
        if lock.previous:
            print(f"taking over the stale lock {lock.path} of pid {lock.previous.get('pid')} on "
                  f"{lock.previous.get('host')} (started {lock.previous.get('started')}): that process has ended")
        found = holds_run(out_dir)
        if found and not resume and not overwrite:
            raise RunFolderError(
                f"{out_dir} already holds a run ({', '.join(found)}): pass --resume to continue it, --overwrite to "
                "delete it and start again, or another --out-dir")
        if resume and overwrite:
            raise RunFolderError("--resume and --overwrite together: continue the run or replace it, not both")
        if overwrite and found:
            removed = [p for pattern in RUN_FILES for p in out_dir.glob(pattern)]
            for path in removed:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            print(f"--overwrite: removed the previous run in {out_dir} ({', '.join(sorted(p.name for p in removed))})")
        elif not resume:  # the metrics of an attempt that never reached a checkpoint would be appended to
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    except BaseException:
        lock.release()
        raise
    return lock


# ---------------------------------------------------------------------------------------------
# Whether --resume continues the same run.
# ---------------------------------------------------------------------------------------------
def file_fingerprint(path: Path, known: dict | None = None) -> dict:
    """size + sha256 of a file; `known` (an earlier fingerprint with its mtime) is reused if size and
    modification time are unchanged."""
    stat = path.stat()
    if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return known
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def model_fingerprint(model: str, known: dict | None = None) -> dict:
    """{relative file: fingerprint} of a model folder's weight, config and tokenizer files; a built-in model
    (tiny-llava, tiny-vila: seeded, built by models.py) is its name."""
    folder = Path(model)
    if not folder.is_dir():
        return {"builtin": model}
    known = known or {}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return {str(p.relative_to(folder)): file_fingerprint(p, known.get(str(p.relative_to(folder)))) for p in files}


def data_fingerprint(sources: list[tuple[str, str, str]], known: list | None = None) -> list[dict]:
    """[{task, name, size, sha256}] of the training files, in --train order."""
    known = {(k["task"], k["name"]): k for k in (known or [])}
    out = []
    for task, name, path in sources:
        entry = {"task": task, "name": name, "path": str(path)}
        if Path(path).is_file():
            entry.update(file_fingerprint(Path(path), known.get((task, name))))
        else:
            entry["missing"] = True
        out.append(entry)
    return out


def fingerprint(cfg, sources, steps_per_epoch: int, known: dict | None = None) -> dict:
    known = known or {}
    return {"config": dataclasses.asdict(cfg), "model": model_fingerprint(cfg.model, known.get("model")),
            "model_suffixes": list(WEIGHT_SUFFIXES), "data": data_fingerprint(sources, known.get("data")),
            "steps_per_epoch": steps_per_epoch}


def record_start(out_dir: Path, cfg, sources, steps_per_epoch: int, skipped: dict | None = None) -> None:
    """A new run: OUT/run.json, against which every later --resume is compared; `skipped`: the records
    --skip-bad-records left out before step 1, a count per reason (records.Skipped)."""
    write_json_atomic(Path(out_dir) / "run.json", {**fingerprint(cfg, sources, steps_per_epoch),
                                                   "skipped_before_step_1": skipped or {}})


def differences(started: dict, now: dict) -> list[str]:
    """Every way `now` (a fingerprint) differs from the run's start, except CHANGEABLE_ON_RESUME fields."""
    found = config_differences(started["config"], now["config"])
    suffixes = tuple(started.get("model_suffixes", OLD_WEIGHT_SUFFIXES))  # files the start could have hashed
    model = _model_difference(started["model"], {name: value for name, value in now["model"].items()
                                                 if name == "builtin" or Path(name).suffix in suffixes})
    if model:
        found.append(f"starting model: {started['config']['model']} at the start, {now['config']['model']} now; "
                     + model)
    old_data, new_data = started["data"], now["data"]
    describe = [f"{d['task']}:{d['name']}" for d in old_data], [f"{d['task']}:{d['name']}" for d in new_data]
    if describe[0] != describe[1]:
        found.append(f"training data: {describe[0]} at the start, {describe[1]} now")
    else:
        for then, current in zip(old_data, new_data, strict=True):
            if current.get("missing"):
                found.append(f"training data {then['task']}:{then['name']}: {current['path']} is missing")
            elif then.get("sha256") != current.get("sha256"):
                found.append(f"training data {then['task']}:{then['name']}: contents differ ({then['path']}, "
                             f"{then.get('size')} bytes at the start; {current['path']}, {current['size']} bytes now)")
    if started.get("steps_per_epoch") not in (None, now["steps_per_epoch"]):
        found.append(f"steps per epoch: {started['steps_per_epoch']} at the start, {now['steps_per_epoch']} now "
                     "(the micro-batch size x ranks pads the epoch differently)")
    return found


def config_differences(then: dict, now: dict, paths: bool = False) -> list[str]:
    """The settings that differ, but for CHANGEABLE_ON_RESUME; FINGERPRINTED ones (paths) only with `paths`
    (there is no fingerprint of their contents)."""
    skipped = CHANGEABLE_ON_RESUME + (() if paths else FINGERPRINTED)
    return [f"{key}: {value!r} at the start, {now[key]!r} now" for key, value in then.items()
            if key not in skipped and key in now and now[key] != value]


def _model_difference(then: dict, now: dict) -> str:
    """'' if the two model fingerprints have the same files with the same sha256, else what differs."""
    if "builtin" in then or "builtin" in now:
        return "" if then == now else "another model"
    changed = sorted(name for name in then.keys() & now.keys() if then[name]["sha256"] != now[name]["sha256"])
    parts = [(changed, "differ (sha256)"), (sorted(then.keys() - now.keys()), "missing now"),
             (sorted(now.keys() - then.keys()), "new")]
    return "; ".join(f"files {names} {what}" for names, what in parts if names)


def read_record(path: Path, fields: dict) -> dict:
    """A run's JSON record (run.json, config.json) as a dict holding `fields` ({name: type}); a damaged one is
    named."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); the "
                             "file is truncated or was edited: restore it, or start a new run (another --out-dir, or "
                             "--overwrite)") from None
    except UnicodeDecodeError as error:
        raise RunFolderError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    if not isinstance(value, dict):
        raise RunFolderError(f"{path}: holds a JSON {type(value).__name__}, expected the object train.py writes")
    for name, kind in fields.items():
        if not isinstance(value.get(name), kind):
            raise RunFolderError(f"{path}: no {name!r} {kind.__name__}; not the record train.py writes (edited?)")
    return value


def check_resume(out_dir: Path, cfg, sources, steps_per_epoch: int) -> None:
    """--resume: refuse, naming every difference, unless this is the run OUT/run.json recorded."""
    out_dir = Path(out_dir)
    record = out_dir / "run.json"
    if not record.is_file():  # started by an older train.py: its config.json still says how
        record = out_dir / "config.json"
        if not record.is_file():
            print(f"--resume: {out_dir} has neither run.json nor config.json: settings not compared")
            return
        started = read_record(record, {})
        print(f"--resume: {out_dir} has no run.json (started by an older train.py): settings compared with its "
              "config.json, the model and the training files by path, not by contents")
        found = config_differences(started, dataclasses.asdict(cfg), paths=True)
    else:
        started = read_record(record, {"config": dict, "model": dict, "data": list})
        for field in ("model", "train", "data_dir"):
            if field not in started["config"]:
                raise RunFolderError(f"{record}: its config has no {field!r}; not a run.json that train.py wrote "
                                     "(edited?)")
        found = differences(started, fingerprint(cfg, sources, steps_per_epoch, known=started))
    if found:
        raise RunFolderError(
            f"--resume: {out_dir} was started with other settings, so its checkpoint cannot continue with these:\n  "
            + "\n  ".join(found) + f"\nOnly these may change on --resume: {', '.join(CHANGEABLE_ON_RESUME)}. "
            f"Resume with the run's settings ({record}), or start a new run (another --out-dir, or --overwrite).")


# ---------------------------------------------------------------------------------------------
# metrics.jsonl after a resume
# ---------------------------------------------------------------------------------------------
def truncate_metrics(path: Path, n_bytes: int | None) -> int:
    """Cut path back to its first n_bytes (its length when the checkpoint was written); returns the number
    of lines dropped. The cut file replaces the old one in one rename."""
    path = Path(path)
    if n_bytes is None or not path.is_file():
        return 0
    content = path.read_bytes()
    if len(content) < n_bytes or (n_bytes and content[n_bytes - 1:n_bytes] != b"\n"):
        raise RunFolderError(f"{path}: {len(content)} bytes, the checkpoint was written when it had {n_bytes} "
                             "ending a line; was it edited? Move it away to resume without it")
    dropped = content[n_bytes:].count(b"\n")
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(content[:n_bytes])
        os.replace(tmp, path)
    return dropped
