"""The run folder train.py writes into: who may write there, and whether --resume continues the same run.

- `claim`: a new run refuses a folder that already holds a run (a checkpoint or a final model) unless
  --resume or --overwrite (which first removes that run's files, listed in RUN_FILES), and takes the
  folder's lock for as long as it trains.
- `RunLock`: RUN/run.lock, held with flock(2) and holding the holder's pid, host and start time. A second
  run into the same folder stops with an error that names them. The kernel drops a flock when its process
  dies (kill -9 included), so a lock left by a killed run is seen as stale and taken over, with a note.
  The file is removed when a run ends normally. On a file system without locks (some FUSE mounts) the run
  goes on with a warning.
- `fingerprint` / `check_resume`: RUN/run.json keeps the configuration a run started with, a fingerprint
  of its starting model (every weight, config and tokenizer file: size and sha256) and of its training
  files (task, name, size, sha256), and its steps per epoch. --resume recomputes them and refuses,
  naming every difference, unless the field is in CHANGEABLE_ON_RESUME. Paths may change (a moved model
  or data set with the same contents is the same run); contents may not. Hashing costs one read of the
  model (seconds per GB); on resume, files whose size and modification time are unchanged are not re-read.
- `truncate_metrics`: on resume, RUN/metrics.jsonl is cut back (atomically) to its length when the
  checkpoint was written, so the steps redone after a kill are not logged twice.

Not here: the checkpoints themselves (train.py save_checkpoint / load_checkpoint). Images are not
hashed (there can be millions), which is why --image-folder may change on resume.

Used by train.py; `python -m pytest tests/test_run_folder.py` tests it.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

# Settings that may differ between a run's start and its --resume: they do not change what the optimizer
# steps compute (evaluation, checkpoint frequency, where files are, how the work is spread over devices).
# micro_batch_size / fsdp change the summation order of a step only (activation checkpointing not even that);
# the steps per epoch are checked.
CHANGEABLE_ON_RESUME = ("preset", "out_dir", "resume", "overwrite", "stop_at_step", "save_every", "test",
                        "eval_every_epoch", "eval_max_new_tokens", "eval_limit", "eval_noisy_final", "diagnose_every",
                        "image_folder", "micro_batch_size", "fsdp", "compile", "activation_checkpointing", "plan",
                        "gpu_memory", "plan_ranks", "plan_text_tokens", "plan_answer_tokens")
# Compared through the fingerprint (contents), not as paths.
FINGERPRINTED = ("model", "train", "data_dir", "base_epochs")
# What a run leaves in its folder; --overwrite removes exactly these.
RUN_FILES = ("checkpoint-*", ".checkpoint-*.tmp", "latest", ".latest.tmp", "final", ".final.tmp", "metrics.jsonl",
             "config.json", "run.json", "eval_epoch*", "eval.json", "eval_noisy.json", "predictions_*.jsonl")
WEIGHT_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".model", ".txt", ".tiktoken")


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


def claim(out_dir, resume: bool, overwrite: bool) -> RunLock:
    """Lock out_dir for this run; refuse a folder holding another run unless resume or overwrite."""
    out_dir = Path(out_dir)
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
            "data": data_fingerprint(sources, known.get("data")), "steps_per_epoch": steps_per_epoch}


def record_start(out_dir: Path, cfg, sources, steps_per_epoch: int) -> None:
    """A new run: OUT/run.json, against which every later --resume is compared."""
    write_json_atomic(Path(out_dir) / "run.json", fingerprint(cfg, sources, steps_per_epoch))


def differences(started: dict, now: dict) -> list[str]:
    """Every way `now` (a fingerprint) differs from the run's start, except CHANGEABLE_ON_RESUME fields."""
    found = []
    for key, then in started["config"].items():
        if key in CHANGEABLE_ON_RESUME or key in FINGERPRINTED or key not in now["config"]:
            continue
        if now["config"][key] != then:
            found.append(f"{key}: {then!r} at the start, {now['config'][key]!r} now")
    model = _model_difference(started["model"], now["model"])
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


def _model_difference(then: dict, now: dict) -> str:
    """'' if the two model fingerprints have the same files with the same sha256, else what differs."""
    if "builtin" in then or "builtin" in now:
        return "" if then == now else "another model"
    changed = sorted(name for name in then.keys() & now.keys() if then[name]["sha256"] != now[name]["sha256"])
    parts = [(changed, "differ (sha256)"), (sorted(then.keys() - now.keys()), "missing now"),
             (sorted(now.keys() - then.keys()), "new")]
    return "; ".join(f"files {names} {what}" for names, what in parts if names)


def check_resume(out_dir: Path, cfg, sources, steps_per_epoch: int) -> None:
    """--resume: refuse, naming every difference, unless this is the run OUT/run.json recorded."""
    out_dir = Path(out_dir)
    record = out_dir / "run.json"
    if not record.is_file():
        print(f"--resume: {out_dir} has no run.json (started by an older train.py): settings not compared")
        return
    started = json.loads(record.read_text())
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
