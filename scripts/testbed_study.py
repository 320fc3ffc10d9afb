"""The testbed study: is NRCA stable, and does it help? Pre-registered: every grid, rule and seed below was fixed
and committed before any of these runs started (git log of this file). Nothing here is tuned on NRCA vs others.

    python scripts/testbed_study.py run seeds      # 1. Full FT vs NRCA at the paper's settings, seeds 0-9
    python scripts/testbed_study.py run map        # 2. the stability map
    python scripts/testbed_study.py run variants   # 3. NRCA variants beyond the paper (only if 1. says unstable)
    python scripts/testbed_study.py run budget     # 4. equal tuning budget: the grid on the validation split
    python scripts/testbed_study.py run budget-test   # 4. then the paper's and the chosen setting on the test split
    python scripts/testbed_study.py run zero-shot  # the base models before fine-tuning, test split (a reference row)
    python scripts/testbed_study.py collect        # part 1's raw results -> results/testbed_study.jsonl
    python scripts/study_report.py                 # every table, from results/*.jsonl -> runs/study_report.md
    (--out runs/study by default; --workers 2: runs in parallel, one thread each; resumable: a finished run is
    kept, an interrupted one resumes)

The protocol, common to every run:
- The world and the base model are the embedded default's (testbed.py world v10, seed S; the base pre-trained
  and cached per seed). Fine-tuning: the embedded preset (connector + last 2 decoder layers, batch 16, 5 epochs,
  warm-up 5 %, cosine), seed S, one thread per process. The settings a cell changes are named below.
- The validation split (300 + 300 records on pictures of their own, val_*.json) is what every choice and the
  stability map read: runs of part 1 are evaluated on it after every epoch (the Fig. 1 curves), the others once,
  after the last epoch. The test split is read once per run, on the final model, only where the report needs it
  (parts 1, 3, and the settings part 4 selects), never to choose anything.
- Metrics: CIDEr (the paper's), accuracy, and grounding.py's phrasing-invariant caption scores: all attributes
  right (grounded_all), captions with a fabricated detail, size errors that follow the fine-tuning size prior.
- Divergence, defined before running from the zero-shot base and Full FT on seed 0 only: a run diverged if at
  its last epoch its multiple-choice accuracy is below 58.0 % (chance on seed 0's test split, 28.0 %, + 30: the
  "sees" gate; the base reaches 92 %) or fewer than half of its captions name the drawn colour and no other
  (grounded_colour < 50; the base and Full FT do in >= 99 % of captions): the model no longer answers or no
  longer describes the picture. (Added during part 1, before any run had crashed: a run that stops on a
  non-finite loss, train.py's FloatingPointError, has diverged too; it has no scores, so it counts in the
  divergence rate and is missing from the means and the paired differences.) A caption score below the base's
  is not divergence: Full FT itself ends below the base in grounded_all (45 vs 67 % on seed 0), which is the
  overfitting under study.

1. seeds: Full FT and NRCA (lam 2, delta 0.5, Eq. 5b as published) at the testbed's lr (1e-3, connector = LLM),
   seeds 0-9. Reported on the test split, last epoch: mean ± std, the paired difference NRCA - Full FT per seed
   with a 95 % bootstrap interval (10,000 resamples of the seeds, percentile), the divergence rate of each.
   NRCA is "unstable as published" if it diverges on at least one of the ten seeds. (Changed after the study, in
   the second one's commit: this decision, which starts part 3, reads the validation split; the test split is read
   for the report only.)
2. map: seeds 0-4, validation split, last epoch; divergence rate and grounded scores per cell.
   lr arms, Full FT and NRCA each:  lr-1e-3 (LLM 1e-3, connector 1e-3: the testbed's, = part 1),
                                    lr-3e-4 (3e-4, 3e-4), lr-1e-4 (1e-4, 1e-4),
                                    ratio-10 (LLM 1e-3, connector 1e-4: the paper's LLaVA ratio, connector = LLM / 10)
   lam arm, NRCA at lr-1e-3:        lam 1, 3, 4, 5 (the values the released code carries besides 2; the paper's
                                    Fig. 5 gives no numbers in the text)
   Reading, fixed in advance: if NRCA diverges at lr-1e-3 but not (or far less) at the smaller lrs or the
   ratio-10 arm, its instability is one of the testbed's step size (b); if it diverges across the arms, it is
   unstable as published (a).
3. variants (run only if part 1 finds NRCA unstable): nrca.py's "squared", "difference", "squared-difference"
   alignments, lam 2, lr-1e-3, seeds 0-9, reported as part 1 (paired against Full FT on the test split).
4. budget: Table 4's methods (Full FT, L2-Reg, Grafting, Ran Mask, Mag Mask, NRCA), each on the same grid:
   lr in {lr-1e-3, lr-3e-4} x its own main hyper-parameter in {the paper's value, one alternative}:
       L2-Reg reg_lam {1e-3, 10}   Grafting reg_lam {1e-6, 1e-2}   Ran Mask / Mag Mask mask_ratio {0.5, 0.8}
       NRCA lam {2, 1}             Full FT has no own hyper-parameter: lr only
   (the alternatives: the regularisers 10^4 times stronger, since at the paper's values they change nothing
   here; masks keeping 80 % frozen; NRCA's smallest lam in the released code). Selection on seeds 0 and 1,
   validation split, last epoch: the setting with the highest mean of (grounded_all + accuracy) / 2 (CIDEr is
   not used to select: it measures phrasing here); ties go to the paper's setting. The selected setting and the
   paper's are then reported on the test split over seeds 0-4 (mean ± std, divergence rate).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import reporting  # noqa: E402
from reporting import epoch_evals, read_text  # noqa: E402

SEEDS = list(range(10))
MAP_SEEDS = list(range(5))
SELECTION_SEEDS = [0, 1]
BUDGET_TEST_SEEDS = list(range(5))
LR_ARMS = {"lr-1e-3": (1e-3, 1e-3), "lr-3e-4": (3e-4, 3e-4), "lr-1e-4": (1e-4, 1e-4), "ratio-10": (1e-3, 1e-4)}
MAP_LAMS = (1.0, 3.0, 4.0, 5.0)
VARIANTS = ("squared", "difference", "squared-difference")
OWN_GRID = {  # method -> (flag, the paper's value, the alternative)
    "full": None, "l2": ("--reg-lam", 1e-3, 10.0), "grafting": ("--reg-lam", 1e-6, 1e-2),
    "random-mask": ("--mask-ratio", 0.5, 0.8), "magnitude-mask": ("--mask-ratio", 0.5, 0.8),
    "nrca": ("--lam", 2.0, 1.0)}
BUDGET_LRS = ("lr-1e-3", "lr-3e-4")
CHANCE_PLUS_GATE = 58.0  # chance (28.0 % on the testbed's choice splits) + 30: the base's "sees" gate
COLOUR_FLOOR = 50.0
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Cell:
    """One setting of the study: a method and the flags that set it apart from the embedded preset."""

    name: str  # folder name, e.g. "nrca_lr-1e-3_lam2"
    method: str
    flags: tuple = ()


def cell(method: str, lr_arm: str = "lr-1e-3", **own) -> Cell:
    llm, connector = LR_ARMS[lr_arm]
    flags = ["--lr-llm", str(llm), "--lr-connector", str(connector)]
    parts = [method, lr_arm]
    for key, value in own.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
        parts.append(f"{key.replace('nrca_', '').replace('_', '')}{value:g}" if isinstance(value, float)
                     else f"{value}")
    return Cell("_".join(parts), method, tuple(flags))


FULL, NRCA = cell("full"), cell("nrca", lam=2.0)


@dataclass
class Job:
    cell: Cell
    seed: int
    per_epoch: bool  # evaluate on the validation split after every epoch (part 1), else once at the end
    test: bool  # evaluate the final model on the test split


def part_jobs(part: str, out: Path) -> list[Job]:
    if part == "seeds":
        return [Job(c, s, True, True) for c in (FULL, NRCA) for s in SEEDS]
    if part == "map":
        cells = [cell(m, arm, **({"lam": 2.0} if m == "nrca" else {})) for arm in LR_ARMS for m in ("full", "nrca")]
        cells += [cell("nrca", lam=lam) for lam in MAP_LAMS]
        return [Job(c, s, c in (FULL, NRCA), c in (FULL, NRCA)) for c in cells for s in MAP_SEEDS]
    if part == "variants":
        return [Job(cell("nrca", lam=2.0, nrca_alignment=v), s, False, True) for v in VARIANTS for s in SEEDS]
    if part == "budget":
        return [Job(c, s, c in (FULL, NRCA), c in (FULL, NRCA)) for c in budget_cells() for s in SELECTION_SEEDS]
    if part == "budget-test":
        return [Job(c, s, c in (FULL, NRCA), True) for c in budget_report_cells(out) for s in BUDGET_TEST_SEEDS]
    raise ValueError(f"testbed_study: unknown part {part!r}; expected seeds, map, variants, budget, budget-test")


def budget_cells() -> list[Cell]:
    cells = []
    for method, own in OWN_GRID.items():
        for arm in BUDGET_LRS:
            if own is None:
                cells.append(cell(method, arm))
                continue
            key = own[0].lstrip("-").replace("-", "_")
            cells += [cell(method, arm, **{key: value}) for value in own[1:]]
    return cells


class NotReady(ValueError):
    """A part started (or collected) before the part whose results it needs: named, exit 2 (cli.py)."""


def read_json(path: Path, expected: type = dict):
    """A JSON file a run or a base wrote (eval.json, config.json, seconds.json, the gates' list): reporting.read_json,
    saying how to redo it."""
    return reporting.read_json(path, expected, hint="Rerun what wrote it, or remove it to redo that step")


def read_metrics(folder: Path) -> list[dict]:
    """RUN/metrics.jsonl's entries ([] when absent); a truncated or non-JSON line is named."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict):
                raise ValueError(f"{path} line {number}: not a JSON object (truncated or edited?)")
            entries.append(entry)
    return entries


# ---------------------------------------------------------------------------------------------------------------
# Running


def run_folder(out: Path, job: Job) -> Path:
    return out / f"seed{job.seed}" / job.cell.name  # OUT/seedS/: the base model is cached there, once per seed


NONFINITE = "nonfinite.json"  # written into a run folder whose training stopped on a non-finite loss


def final_val(folder: Path) -> dict:
    """The final model's validation scores: RUN/val/eval.json, else the last per-epoch evaluation of a finished
    run that evaluated on the validation split; {"nonfinite": ...} for a run stopped by a non-finite loss; {}
    while a run is unfinished."""
    if (folder / NONFINITE).is_file():
        return read_json(folder / NONFINITE)
    if not (folder / "final").is_dir():
        return {}
    path = folder / "val" / "eval.json"
    if path.is_file():
        return read_json(path)
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    points = epoch_evals(folder) if config.get("eval_split") == "val" else []
    return points[-1][1] if points else {}


def final_test(folder: Path) -> dict:
    if (folder / NONFINITE).is_file():
        return read_json(folder / NONFINITE)
    path = folder / "test" / "eval.json"
    return read_json(path) if (folder / "final").is_dir() and path.is_file() else {}


def judge(folder: Path, result: dict, split: str) -> bool:
    """diverged(result) for the run in `folder`; a result without the rule's scores is named with its run and
    split (an error, never a divergence)."""
    try:
        return diverged(result)
    except ValueError as error:
        raise ValueError(f"{folder} ({split} split, {folder / split / 'eval.json'} or the last per-epoch "
                         f"evaluation): {error}") from None


def job_done(out: Path, job: Job) -> bool:
    folder = run_folder(out, job)
    return bool(final_val(folder)) and (not job.test or bool(final_test(folder)))


def run_logged(args: list[str], log: Path) -> tuple[int, str]:
    """`python ARGS` in the repository with one thread (the study's protocol), its output appended to `log`:
    (return code, what it wrote)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = log.stat().st_size if log.is_file() else 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    with log.open("a") as f:
        done = subprocess.run([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    return done.returncode, log.read_text(errors="replace")[start:]


def execute(out: Path, job: Job) -> float:
    folder = run_folder(out, job)
    log = out / "logs" / f"seed{job.seed}-{job.cell.name}.log"
    started = time.time()

    def call(args):
        returncode, said = run_logged(args, log)
        if returncode:
            if args[0] == "train.py" and "error: non-finite loss" in said:  # cli.py's line for FloatingPointError
                line = said[said.index("error: non-finite loss"):].splitlines()[0]
                (folder / NONFINITE).write_text(json.dumps({"nonfinite": line}) + "\n")
                return False
            raise RuntimeError(f"failed ({returncode}): {' '.join(args)}; see {log}")
        return True

    if not (folder / "final").is_dir():
        again = ["--resume"] if (folder / "latest").is_file() else ["--overwrite"]
        if again == ["--overwrite"]:  # a new training: evaluations of an earlier model must not survive it
            for stale in ("val", "test"):
                shutil.rmtree(folder / stale, ignore_errors=True)
        evaluation = ["--eval-split", "val"] if job.per_epoch else ["--no-eval-every-epoch"]
        if not call(["train.py", "--seed", str(job.seed), "--method", job.cell.method, "--compare", "", "--out-dir",
                     str(folder), "--no-eval-noisy-final", *evaluation, *job.cell.flags, *again]):
            return time.time() - started
    if not final_val(folder):
        call(["evaluate.py", str(folder), "--split", "val", "--out", str(folder / "val"), "--batch-size", "32"])
    if job.test and not (folder / "test" / "eval.json").is_file():
        call(["evaluate.py", str(folder), "--split", "test", "--out", str(folder / "test"), "--batch-size", "32"])
    return time.time() - started


def unstable_as_published(out: Path) -> bool:
    """Part 1's rule for running part 3: NRCA at the paper's settings diverges on at least one of the ten seeds.
    A decision, so it reads the validation split (the last per-epoch evaluation), never the test split."""
    folders = [run_folder(out, Job(NRCA, s, True, True)) for s in SEEDS]
    found = [final_val(folder) for folder in folders]
    if not all(found):
        missing = [f"seed{s}" for s, result in zip(SEEDS, found, strict=True) if not result]
        raise NotReady(f"variants: part 1 (seeds) has not finished under {out}: NRCA has no validation result for "
                       f"{', '.join(missing)}; run `run seeds` first")
    return any([judge(folder, result, "val") for folder, result in zip(folders, found, strict=True)])


def zero_shot(out: Path, seeds: list[int] | None = None) -> None:
    """The base model before fine-tuning, per seed, on the test split (a reference row, chooses nothing). Every
    seed with a base is evaluated; seeds without one are named at the end (exit 2)."""
    no_base = []
    for seed in seeds or SEEDS:
        folder = out / f"seed{seed}" / "zero-shot"
        bases = sorted((out / f"seed{seed}").glob("base-*/final"))
        if not bases:
            no_base.append(seed)
        if (folder / "test" / "eval.json").is_file() or not bases:
            continue
        log = out / "logs" / f"seed{seed}-zero-shot.log"
        args = ["evaluate.py", str(bases[0]), "--data", f"data/testbed-seed{seed}", "--split", "test", "--out",
                str(folder / "test"), "--batch-size", "32"]
        if run_logged(args, log)[0]:
            raise RuntimeError(f"failed: {' '.join(args)}; see {log}")
    if no_base:
        raise NotReady(f"zero-shot: no base model under {out} for seed(s) {', '.join(map(str, no_base))} (looked for "
                       f"{out}/seedS/base-*/final); the first run of a seed builds its base: run `run seeds` first")


def run_part(out: Path, part: str, workers: int, seeds: list[int] | None = None) -> None:
    if part == "zero-shot":
        return zero_shot(out, seeds)
    if part == "variants" and not unstable_as_published(out):  # decided on the validation split
        print("variants: NRCA diverged on none of the ten seeds of part 1, so, as fixed in advance, they do not run")
        return
    jobs = [job for job in part_jobs(part, out) if not job_done(out, job) and (seeds is None or job.seed in seeds)]
    # Seed by seed, so that a part stopped early has whole seeds; the first run of seed s + 1 (which builds its base)
    # goes before the other runs of seed s, so that while one process builds a base the other has work.
    first = {job.seed: job for job in reversed(jobs)}
    jobs.sort(key=lambda job: (job.seed, 0) if first[job.seed] is job else (job.seed + 1, 1))
    print(f"{part}: {len(jobs)} runs to do ({workers} at a time)", flush=True)
    timing = out / "seconds.json"
    timing_lock = threading.Lock()
    base_locks = defaultdict(threading.Lock)  # the first run of a seed builds its base; the others wait for it

    def work(job):
        if any(run_folder(out, job).parent.glob("base-*/final/config.json")):
            seconds = execute(out, job)
        else:
            with base_locks[job.seed]:
                seconds = execute(out, job)
        print(f"{time.strftime('%H:%M:%S')} done {run_folder(out, job).relative_to(out)} in {seconds:.0f} s",
              flush=True)
        with timing_lock:
            old = read_json(timing) if timing.is_file() else {}
            timing.write_text(json.dumps({**old, f"seed{job.seed}/{job.cell.name}": round(seconds, 1)}, indent=1))
        return f"seed{job.seed}/{job.cell.name}", seconds

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(work, jobs))


# ---------------------------------------------------------------------------------------------------------------
# Raw results: one JSON line per run, committed under results/ (study_report.py computes every table from them)

RESULTS = REPO / "results" / "testbed_study.jsonl"
SCORES = ("cider", "accuracy", "grounded_all", "grounded_fabricated", "grounded_detail_word", "grounded_size_prior",
          "grounded_colour", "grounded_shape", "grounded_count", "grounded_position", "grounded_size", "n_caption",
          "n_choice")
RUN_SETTINGS = ("method", "nrca_alignment", "lam", "delta", "lr_llm", "lr_connector", "base_noise_max_delta",
                "reg_lam", "mask_ratio")


def rescored(result: dict, evaluation: Path, records_path: Path) -> dict:
    """`result`'s scores (SCORES only), its grounded ones recomputed with today's grounding.py from the captions
    the evaluation wrote (EVALUATION/predictions_caption.jsonl) against the split's scenes; as written where the
    captions were not kept."""
    import evaluate

    scores = {key: result[key] for key in SCORES if key in result}
    if "nonfinite" in result:
        return {"nonfinite": result["nonfinite"]}
    captions = evaluation / "predictions_caption.jsonl"
    if captions.is_file() and records_path.is_file():
        records = json.loads(records_path.read_text())
        regrounded = evaluate.grounded(evaluate.read_predictions(captions), records)
        scores |= {key: value for key, value in regrounded.items() if key in SCORES}
    return scores


def base_summary(seed_folder: Path, dial: float) -> dict:
    """A cached base's measurements for the raw results: its gates, its confidence gap per delta (the gap study's
    SEEDFOLDER/gap-noiseD, else the one train.py wrote at delta 0.5), its pre-training seconds."""
    import testbed

    bases = sorted(seed_folder.glob(f"base-*-noise{dial:g}"))
    if not bases:
        return {}
    base = bases[0]
    gates = base / f"gates-world{testbed.WORLD_VERSION}.json"
    rows = read_json(gates, list) if gates.is_file() else []
    gap = {}
    for path in (seed_folder / f"gap-noise{dial:g}" / "confidence_gap.json", base / "confidence_gap.json"):
        if path.is_file():
            tasks = read_json(path).get("tasks")
            if not isinstance(tasks, dict):
                raise ValueError(f"{path}: no 'tasks' object (written by evaluate.py confidence-gap?)")
            caption = next((entry for entry in tasks.values() if entry["task"] == "caption"), None)
            gap = caption["deltas"] if caption else {}
            break
    seconds = base / "seconds.json"
    return {"folder": base.name,
            "gates": {row["gate"]: {"value": row["value"], "threshold": row["threshold"], "passed": row["passed"]}
                      for row in rows},
            "gap": gap, "seconds": read_json(seconds) if seconds.is_file() else {}}


def training_diagnostics(logged: list[dict]) -> list[dict]:
    """Per epoch, NRCA's means over its steps (`logged`: a run's metrics.jsonl entries): clean confidence I and noisy
    I~ of the open samples, the share with I~ > I, CE and the alignment term (empty for other methods)."""
    steps = [entry for entry in logged if "step" in entry and "confidence" in entry]
    rows = []
    for epoch in sorted({math.ceil(e["epoch"] - 1e-9) for e in steps}):
        mine = [e for e in steps if math.ceil(e["epoch"] - 1e-9) == epoch]
        rows.append({"epoch": epoch, **{key: round(statistics.fmean(float(e[key]) for e in mine), 5)
                                        for key in ("confidence", "noisy_confidence", "noisy_above_clean", "ce",
                                                    "alignment") if all(key in e for e in mine)}})
    return rows


def run_record(out: Path, job: Job, part: str, study: str, data_dir: Path, **extra) -> dict:
    """One run's raw result: its settings, per-epoch validation scores (when evaluated per epoch), final
    validation and test scores (rescored), NRCA's per-epoch confidences, whether it diverged (the rule above, on
    the test split where the run has one, else on validation), and its wall seconds."""
    folder = run_folder(out, job)
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    nonfinite = read_json(folder / NONFINITE) if (folder / NONFINITE).is_file() else None
    per_epoch = []
    if not nonfinite and config.get("eval_split") == "val":
        per_epoch = [{"epoch": int(epoch), **rescored(result, folder / f"eval_epoch{int(epoch)}",
                                                      data_dir / "val_caption.json")}
                     for epoch, result in epoch_evals(folder)]
    val = final_val(folder)
    val_folder = folder / "val" if (folder / "val" / "eval.json").is_file() else \
        folder / f"eval_epoch{per_epoch[-1]['epoch']}" if per_epoch else folder / "val"
    val = rescored(val, val_folder, data_dir / "val_caption.json") if val else {}
    test = final_test(folder)
    test = rescored(test, folder / "test", data_dir / "test_caption.json") if test else {}
    timing = out / "seconds.json"
    seconds = read_json(timing).get(f"seed{job.seed}/{job.cell.name}") if timing.is_file() else None
    logged = read_metrics(folder)
    judged = test or val
    dial = config.get("base_noise_max_delta", 0.6)
    return {"study": study, "part": part, "arm": job.cell.name, "seed": job.seed,
            **{key: config.get(key) for key in RUN_SETTINGS}, "base_noise_max_delta": dial,
            "base": base_summary(folder.parent, dial), **extra,
            "train_seconds": round(sum(e.get("seconds", 0) for e in logged if "step" in e), 1) if logged else None,
            "eval_seconds": round(sum(e.get("seconds", 0) for e in logged if "eval" in e), 1) if logged else None,
            "val_per_epoch": per_epoch, "val_final": val, "test_final": test,
            "diverged": judge(folder, judged, "test" if test else "val") if judged else None,
            "diverged_on": "test" if test else "val",
            "training": training_diagnostics(logged), "seconds": seconds}


def write_results(out: Path, path: Path, jobs: list[tuple[str, Job]], study: str = "testbed_study",
                  extra=lambda job: {}, also=lambda folder: False) -> int:
    """The records (run_record) of the finished runs, of those stopped by a non-finite loss and of those `also`
    accepts, one JSON line each, to `path` (rewritten whole); returns how many. The runs left out (unfinished or
    never started) are named; with none to write, `path` is left as it is and that is an error (a wrong --out)."""
    if not out.is_dir():
        raise FileNotFoundError(f"--out {out}: no such folder (the study's runs); {path} left as it is")
    lines, missing = [], []
    for part, job in jobs:
        folder = run_folder(out, job)
        if job_done(out, job) or (folder / NONFINITE).is_file() or also(folder):
            data_dir = REPO / "data" / f"testbed-seed{job.seed}"
            lines.append(json.dumps(run_record(out, job, part, study, data_dir, **extra(job)), sort_keys=True))
        else:
            missing.append(str(folder.relative_to(out)))
    if not lines:
        raise ValueError(f"--out {out}: none of the {len(jobs)} runs has finished there (looked for "
                         f"{out}/seedS/ARM/final with its eval.json; e.g. {missing[0] if missing else '-'}); "
                         f"{path} left as it is")
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        print(f"{len(missing)} of {len(jobs)} runs have not finished under {out} and are left out: {shown}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return len(lines)


# ---------------------------------------------------------------------------------------------------------------
# Judging


def diverged(result: dict) -> bool:
    """The divergence rule fixed above: no longer answers (accuracy < chance + 30) or no longer describes the
    picture (fewer than half of the captions name the drawn colour); a run stopped by a non-finite loss has
    diverged. A result without either score is an error (it was read from the wrong file), never a 0."""
    if "nonfinite" in result:
        return True
    missing = [key for key in ("accuracy", "grounded_colour") if result.get(key) is None]
    if missing:
        raise ValueError(f"diverged: the result has no {' or '.join(missing)} (keys: {sorted(result)}); the rule "
                         "needs both, a missing score is not a 0")
    return result["accuracy"] < CHANCE_PLUS_GATE or result["grounded_colour"] < COLOUR_FLOOR


def paired_bootstrap(a: list[float], b: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0):
    """Mean of the per-seed differences a - b and its 95 % percentile bootstrap interval (seeds resampled
    with replacement, a fixed generator): (mean, low, high)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_bootstrap: need two equally long non-empty lists, got {len(a)} and {len(b)}")
    differences = [x - y for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(differences, k=len(differences))) for _ in range(resamples))
    return statistics.fmean(differences), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def selection_score(results: list[dict]) -> float:
    """The budget's criterion: mean over the selection seeds of (grounded_all + accuracy) / 2 (a missing score,
    e.g. a run stopped by a non-finite loss, counts 0)."""
    return statistics.fmean((r.get("grounded_all", 0.0) + r.get("accuracy", 0.0)) / 2 for r in results)


def select(scores: dict[Cell, list[dict]], paper: Cell) -> Cell:
    """The budget rule: the highest selection_score over the selection seeds; ties -> paper."""
    best = max(selection_score(scores[c]) for c in scores)
    if math.isclose(selection_score(scores[paper]), best):
        return paper
    return max(scores, key=lambda c: selection_score(scores[c]))


def budget_report_cells(out: Path) -> list[Cell]:
    """The paper's setting and the selected one of every method (needs part 4's selection runs)."""
    cells = []
    for method in OWN_GRID:
        grid = [c for c in budget_cells() if c.method == method]
        paper = grid[0]
        scores = {c: [final_val(run_folder(out, Job(c, s, False, False))) for s in SELECTION_SEEDS] for c in grid}
        if not all(all(results) for results in scores.values()):
            raise NotReady(f"budget: the selection runs of {method} are not all done under {out}; run `run budget` "
                           "first")
        cells += list(dict.fromkeys([paper, select(scores, paper)]))
    return cells


def collect(out: Path) -> int:
    """Every part's runs that exist in OUT, once each (a setting two parts share is one run: its first part)."""
    items, seen = [], set()
    for part in ("seeds", "map", "variants", "budget", "budget-test"):
        try:
            jobs = part_jobs(part, out)
        except NotReady:  # budget-test before the selection runs are done
            continue
        for job in jobs:
            if (job.cell.name, job.seed) not in seen:
                seen.add((job.cell.name, job.seed))
                items.append((part, job))
    return write_results(out, RESULTS, items)


def check_workers(workers: int) -> None:
    if workers < 1:
        raise ValueError(f"--workers {workers}: expected >= 1 (runs in parallel, one thread each)")


def parse_seeds(text: str | None, part: str, out: Path) -> list[int] | None:
    """--seeds "0,3": the part's runs of these seeds only; a seed the part does not run is named."""
    if not text:
        return None
    try:
        seeds = [int(seed) for seed in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,3") from None
    own = sorted({job.seed for job in part_jobs(part, out)}) if part != "zero-shot" else SEEDS
    unknown = [seed for seed in seeds if seed not in own]
    if unknown:
        raise ValueError(f"--seeds {text}: part {part} runs seeds {own[0]}-{own[-1]}, not {unknown}")
    return seeds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "collect"))
    parser.add_argument("part", nargs="?", choices=("seeds", "map", "variants", "budget", "budget-test", "zero-shot"))
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", help="run only these seeds of the part, comma-separated (e.g. to share the "
                                        "machine between two processes); default: all")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    check_workers(args.workers)
    if args.command == "run":
        if args.part is None:
            raise ValueError("run: name the part (seeds, map, variants, budget, budget-test, zero-shot)")
        run_part(out, args.part, args.workers, parse_seeds(args.seeds, args.part, out))
    else:
        if args.part is not None or args.seeds:
            raise ValueError("collect takes every part's runs under --out: no part, no --seeds")
        print(f"wrote {collect(out)} runs to {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    import cli

    cli.run(main)
