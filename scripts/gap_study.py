"""The gap study: does NRCA's outcome follow the base model's clean-noisy confidence gap? Pre-registered: the
grid, seeds, hypotheses, rules and analysis below were written and committed before any of its runs (git log of
this file); nothing here is chosen by looking at NRCA against the others.

    python scripts/gap_study.py run        # every run (resumable; --workers 2, one thread each)
    python scripts/gap_study.py collect    # raw results -> results/gap_study.jsonl (one JSON line per run)
    python scripts/gap_study.py embedded-dial   # the rule below that picks the base of `python train.py`
    python scripts/study_report.py         # every table, from results/*.jsonl

Why. In the first study (scripts/testbed_study.py) NRCA as published diverged on 7 of 10 seeds. Its base model
was pre-trained with Noisy Visual Mixup views (delta ~ U(0, 0.6) on half the pictures), so it was as confident on
NRCA's delta = 0.5 view as on the clean picture (I~ ~ I, I~ > I on about half of the open samples). The paper's
Appendix C (Eq. 8-10) reasons in the regime I >= I~, where Eq. (5b) pulls I~ up; where I~ > I it pushes I~ down
with a force lam * CE / I. So the first study tested NRCA outside the paper's premise. This study makes the gap
the variable.

Protocol (common to every run; the first study's, testbed_study.py docstring, unless named here):
- Seeds 100-109: never run before (none in 0-13, the seeds of the first study, the README and the tests). World
  testbed.py v10 of seed S, base pre-trained per seed and dial (cached), fine-tuning with the embedded preset
  (connector + last 2 decoder layers, batch 16, 5 epochs, lr 1e-3 for both, warm-up 5 %, cosine), one thread per
  process, lam 2, delta 0.5 unless named. Every run is evaluated on the validation split after every epoch and its
  final model on the test split.
- The dial: train.py --base-noise-max-delta D, the base's noise augmentation in both pre-training stages (half of
  the pictures at delta ~ U(0, D)); D in {0 (clean pictures only), 0.3, 0.6 (the first study's base)}.
- Arms, per seed:  D in {0, 0.3, 0.6} x {Full FT, NRCA "paper" (Eq. 5b as published), NRCA "hinge"}
                   + NRCA "paper" at delta 0.25 and at delta 0.75, on the D = 0.6 base
  ("hinge" = lam * max(0, 1 - I~/sg(I)) * sg(CE): Eq. 5b restricted to Appendix C's regime, nrca.py.) 11 runs a seed,
  110 runs, 30 bases.
- Measured on every base before fine-tuning (evaluate.py confidence-gap, forward passes only): on the 500 caption
  records of the fine-tuning mix, at delta 0.25, 0.5 and 0.75, the mean clean confidence I, the mean noisy
  confidence I~ of the open samples and the share with I~ > I ("share above"); and the gates (multiple-choice
  accuracy on clean and delta = 0.5 test pictures). A base that misses the "sees" gate stops its runs: that
  (seed, D) is reported and left out of every comparison. The noisy-view gate is reported, not required (the dial
  sets the noisy view's quality on purpose).
- The premise: a run's base "meets the premise" (Appendix C, Eq. 10: the clean view is the more confident one) when
  its share above, at the run's delta, is at most 0.25 (the clean view more confident on >= 75 % of the open
  samples); else the premise is "broken".
- Divergence: the first study's rule on the final model's test scores (accuracy < 58.0 or grounded_colour < 50, or a
  non-finite loss); a missing score is an error, not a 0.
- Scores: CIDEr, accuracy, grounding.py's grounded_all (all five attributes right), grounded_fabricated (a whole
  ungrounded detail), grounded_detail_word (any word of one), recomputed at collection with today's grounding.py.
  Paired differences are per seed against Full FT on the same base (same seed and D), mean with a 95 % percentile
  bootstrap interval (10,000 resamples of the seeds); a diverged run keeps its scores in the pairs (a non-finite
  run has none and is left out of them).

Hypotheses and how each is read (fixed now):
- H1 (the dial moves the gap; a check of the instrument, not of NRCA): the mean share above at delta 0.5 falls as
  D falls. Holds if the means order D = 0 < 0.3 < 0.6.
- H2 (NRCA's divergence follows the gap): over the 50 NRCA "paper" runs (three dials at delta 0.5, and delta 0.25 /
  0.75 on the D = 0.6 base), the divergence rate of runs whose base meets the premise at the run's delta is at most
  half the rate of runs whose premise is broken. Untestable if either group has fewer than 5 runs; reported with
  Fisher's exact two-sided p. Also per arm: divergence rate beside the arm's mean share above.
- H3 (the one-sided reading is stable): NRCA "hinge" diverges on at most 1 of 10 seeds at every D.
- H4 (where the premise holds, does NRCA help?): at the "premise dial", the D whose bases have the lowest mean share
  above at delta 0.5 (chosen from the base measurements alone, before any fine-tuning result is read), for NRCA
  "paper" and "hinge" each, paired against Full FT on the test split:
    "reduces fabrication"      the grounded_fabricated interval lies below 0;
    "keeps grounding"          the grounded_all interval's lower end is above -5 points;
    "improves grounding"       the grounded_all interval lies above 0; "loses grounding": it lies below 0.
  The paper's claim in this testbed's terms is "reduces fabrication" and "keeps grounding" (or improves it); accuracy
  and CIDEr are reported beside them, not judged.
- Secondary, no verdict: the same paired table at every D and for the delta arms; NRCA's clean confidence and share
  above during training (train.py's per-step log), first to last epoch.

The embedded default's base (`python train.py`, seed 0), a rule fixed before its bases were built (added in a
second commit, before any run of this study had finished; it reads base measurements only, never a fine-tuning
result): seed 0's base is built at every D of DIALS; a D qualifies when its base keeps the picture on the noisy
view (the gate: accuracy at delta 0.5 within 10 points of clean) and the clean view is the more confident one on
at least 75 % of the open training captions at delta 0.5 (share above <= PREMISE_SHARE: Eq. 10's premise). The
largest qualifying D (the most noise-robust base that meets the premise) becomes train.BASE_NOISE_MAX_DELTA_DEFAULT;
if none qualifies, 0.6 stays and the README says so.

Budget: about 90 minutes wall on 2 cores (the first study: base ~105 s, Full FT ~45 s, NRCA ~60 s per run with two
processes side by side). The report gives what each part took.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import testbed_study as study  # noqa: E402
from testbed_study import Cell, Job, cell  # noqa: E402

SEEDS = list(range(100, 110))
DIALS = (0.0, 0.3, 0.6)
DELTA_ARMS = (0.25, 0.75)  # NRCA "paper" on the D = DELTA_ARM_DIAL base
DELTA_ARM_DIAL = 0.6
GAP_DELTAS = (0.25, 0.5, 0.75)
PREMISE_SHARE = 0.25  # share above at most this: the clean view is the more confident one on >= 75 % of samples
RESULTS = REPO / "results" / "gap_study.jsonl"
BASE_EPOCHS = 3  # the embedded preset's (train.BASE_EPOCHS), in the cached base's folder name
GATE_FAILED = "gate_failed.json"  # written into a run folder whose base missed the "sees" gate


def on_base(c: Cell, dial: float) -> Cell:
    return Cell(f"base{dial:g}_{c.name}", c.method, c.flags + ("--base-noise-max-delta", f"{dial:g}"))


def arms() -> list[tuple[str, float, Cell]]:
    """(part, dial, cell) of every arm, Full FT first on each dial (its run builds the dial's base)."""
    found = []
    for dial in DIALS:
        found.append(("dial", dial, on_base(cell("full"), dial)))
        found.append(("dial", dial, on_base(cell("nrca", lam=2.0), dial)))
        found.append(("dial", dial, on_base(cell("nrca", lam=2.0, nrca_alignment="hinge"), dial)))
    for delta in DELTA_ARMS:
        found.append(("delta", DELTA_ARM_DIAL, on_base(cell("nrca", lam=2.0, delta=delta), DELTA_ARM_DIAL)))
    return found


def jobs() -> list[tuple[str, float, Job]]:
    """Seed by seed, so that a study stopped early has whole seeds; on each seed the Full FT runs first."""
    ordered = []
    for seed in SEEDS:
        mine = [(part, dial, Job(c, seed, True, True)) for part, dial, c in arms()]
        ordered += sorted(mine, key=lambda item: item[2].cell.method != "full")
    return ordered


def base_folder(out: Path, seed: int, dial: float) -> Path:
    """Where train.py caches the base of (seed, D) for runs in OUT/seedS/ (train.base_model_name)."""
    import train

    return out / f"seed{seed}" / train.base_model_name("tiny-llava", seed, BASE_EPOCHS, dial)


def gap_folder(out: Path, seed: int, dial: float) -> Path:
    return out / f"seed{seed}" / f"gap-noise{dial:g}"


def measure_gap(out: Path, seed: int, dial: float) -> None:
    """evaluate.py confidence-gap on the base, caption half of the fine-tuning mix, every delta of GAP_DELTAS."""
    folder = gap_folder(out, seed, dial)
    if (folder / "confidence_gap.json").is_file():
        return
    args = ["evaluate.py", "confidence-gap", str(base_folder(out, seed, dial) / "final"), "--train",
            f"caption:testbed-caption=data/testbed-seed{seed}/train_caption.json", "--limit", "500", "--out",
            str(folder)]
    for delta in GAP_DELTAS:
        args += ["--delta", f"{delta:g}"]
    log = out / "logs" / f"seed{seed}-gap-noise{dial:g}.log"
    if study.run_logged(args, log)[0]:
        raise RuntimeError(f"failed: {' '.join(args)}; see {log}")


def run(out: Path, workers: int) -> None:
    todo = [(part, dial, job) for part, dial, job in jobs()
            if not study.job_done(out, job) and not (study.run_folder(out, job) / GATE_FAILED).is_file()]
    print(f"gap study: {len(todo)} runs to do ({workers} at a time)", flush=True)
    base_locks = defaultdict(threading.Lock)  # one process builds a base; its other runs wait for it
    timing = out / "seconds.json"
    timing_lock = threading.Lock()

    def execute(job, dial, started):
        try:
            return study.execute(out, job)
        except RuntimeError:
            log = out / "logs" / f"seed{job.seed}-{job.cell.name}.log"
            if "misses the testbed gate" not in log.read_text(errors="replace"):
                raise
            study.run_folder(out, job).mkdir(parents=True, exist_ok=True)
            (study.run_folder(out, job) / GATE_FAILED).write_text(json.dumps({"seed": job.seed, "dial": dial}))
            return time.time() - started

    def work(item):
        part, dial, job = item
        started = time.time()
        measured = gap_folder(out, job.seed, dial) / "confidence_gap.json"
        if measured.is_file():
            seconds = execute(job, dial, started)
        else:
            with base_locks[(job.seed, dial)]:  # the first run of a base builds and measures it, the others wait
                seconds = execute(job, dial, started)
                if (base_folder(out, job.seed, dial) / "final").is_dir():
                    measure_gap(out, job.seed, dial)
        with timing_lock:
            old = study.read_json(timing) if timing.is_file() else {}
            timing.write_text(json.dumps({**old, f"seed{job.seed}/{job.cell.name}": round(seconds, 1)}, indent=1))
        print(f"{time.strftime('%H:%M:%S')} done seed{job.seed}/{job.cell.name} in {seconds:.0f} s", flush=True)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(work, todo))


def collect(out: Path) -> int:
    dial_of = {job.cell.name: (part, dial) for part, dial, job in jobs()}
    items = [(part, job) for part, _, job in jobs()]

    def extra(job):
        part, dial = dial_of[job.cell.name]
        failed = (study.run_folder(out, job) / GATE_FAILED).is_file()
        return {"dial": dial, "base_noise_max_delta": dial, "base": study.base_summary(out / f"seed{job.seed}", dial),
                "base_gate_failed": failed}

    return study.write_results(out, RESULTS, items, study="gap_study", extra=extra,
                               also=lambda folder: (folder / GATE_FAILED).is_file())


def embedded_dial(out: Path) -> dict:
    """The rule above on seed 0: builds (or reads the cached) base at every D, prints each one's measurements and the
    chosen D; written to OUT/embedded_dial.json."""
    import train

    rows = {}
    for dial in DIALS:
        folder = out / "seed0" / f"embedded-dial-{dial:g}"
        if not (base_folder(out, 0, dial) / "confidence_gap.json").is_file():
            log = out / "logs" / f"seed0-base-noise{dial:g}.log"
            code = ("import sys, torch, train; "
                    "cfg = train.make_config(seed=0, base_noise_max_delta=float(sys.argv[1]), out_dir=sys.argv[2]); "
                    "train.pretrain_base_model(cfg, 0, 1, torch.device('cpu'))")
            if study.run_logged(["-c", code, f"{dial:g}", str(folder)], log)[0]:
                raise RuntimeError(f"building seed 0's base at D = {dial:g} failed; see {log}")
        base = study.base_summary(out / "seed0", dial)  # its gates and its gap on the training captions
        missing = [what for what, found in (("base", base), ("gates", base.get("gates")),
                                            ("gap at delta 0.5", base.get("gap", {}).get("0.5"))) if not found]
        if missing:
            raise ValueError(f"embedded-dial: seed 0's base at D = {dial:g} under {out / 'seed0'} has no "
                             f"{', '.join(missing)} (its gates-world*.json, confidence_gap.json); remove the base "
                             "folder to rebuild it")
        gates, caption = base["gates"], base["gap"]["0.5"]
        keeps = gates["noisy view keeps the picture"]["passed"]
        premise = caption["share_noisy_above_clean"] <= PREMISE_SHARE
        rows[f"{dial:g}"] = {"accuracy_clean": gates["sees"]["value"],
                             "accuracy_noisy": gates["noisy view keeps the picture"]["value"],
                             "keeps_picture": keeps, **caption, "premise": premise, "qualifies": keeps and premise}
    qualifying = [float(d) for d, row in rows.items() if row["qualifies"]]
    chosen = {"dials": rows, "chosen": max(qualifying) if qualifying else 0.6, "any_qualifies": bool(qualifying),
              "current_default": train.BASE_NOISE_MAX_DELTA_DEFAULT}
    (out / "embedded_dial.json").write_text(json.dumps(chosen, indent=1) + "\n")
    print(json.dumps(chosen, indent=1))
    return chosen


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "collect", "embedded-dial"))
    parser.add_argument("--out", default="runs/gap_study")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    study.check_workers(args.workers)
    if args.command == "run":
        run(out, args.workers)
    elif args.command == "embedded-dial":
        embedded_dial(out)
    else:
        print(f"wrote {collect(out)} runs to {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    import cli

    cli.run(main)
