"""scripts/testbed_study.py's fixed rules: the paired bootstrap, the divergence rule, the budget's selection, and
the runs the parts share; scripts/study_report.py on fake run folders.

    python -m pytest -q tests/test_testbed_study.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import study_report  # noqa: E402
import testbed_study as study  # noqa: E402


def test_paired_bootstrap_on_a_fixed_toy_input():
    a, b = [3.0, 5.0, 4.0, 6.0], [1.0, 2.0, 2.0, 3.0]  # differences 2, 3, 2, 3: mean 2.5
    mean, low, high = study.paired_bootstrap(a, b)
    assert mean == 2.5 and 2.0 <= low <= 2.5 <= high <= 3.0
    assert (low, high) == study.paired_bootstrap(a, b)[1:]  # a fixed generator: the same interval every time
    # Differences 0, 0, 0, 10: a resample's mean is 2.5 k for k tens among 4 draws. P(k = 0) = 0.32 > 2.5 %, so the
    # low end is 0; P(k >= 3) = 0.051 > 2.5 % but P(k = 4) = 0.004 < 2.5 %, so the high end is 7.5, not the
    # largest mean 10 (which about 39 of 10,000 resamples reach): the percentiles, not the extremes.
    assert study.paired_bootstrap([0.0, 0.0, 0.0, 10.0], [0.0] * 4) == (2.5, 0.0, 7.5)
    # Identical differences leave no uncertainty; a sign change across seeds gives an interval around 0.
    assert study.paired_bootstrap([2.0, 2.0], [1.0, 1.0]) == (1.0, 1.0, 1.0)
    _, low, high = study.paired_bootstrap([10.0, 0.0, 10.0, 0.0], [5.0, 5.0, 5.0, 5.0])
    assert low < 0 < high
    with pytest.raises(ValueError, match="equally long"):
        study.paired_bootstrap([1.0], [1.0, 2.0])


@pytest.mark.parametrize("result, expected", [
    ({"accuracy": 96.3, "grounded_colour": 99.7}, False),  # Full FT, seed 0: overfits, does not diverge
    ({"accuracy": 10.0, "grounded_colour": 0.0}, True),  # no answers, no captions of the picture
    ({"accuracy": 57.9, "grounded_colour": 100.0}, True),  # answers fell below chance + 30
    ({"accuracy": 90.0, "grounded_colour": 49.0}, True),  # most captions no longer name the colour
    ({"accuracy": 58.0, "grounded_colour": 50.0}, False),  # on both thresholds: not diverged
])
def test_divergence_rule_on_fake_runs(result, expected):
    assert study.diverged(result) is expected


def test_selection_takes_the_best_grounded_avg_and_the_paper_on_ties():
    paper, other = study.cell("nrca", lam=2.0), study.cell("nrca", lam=1.0)
    better = {paper: [{"grounded_all": 40, "accuracy": 90}] * 2, other: [{"grounded_all": 50, "accuracy": 90}] * 2}
    assert study.select(better, paper) == other
    tie = {paper: [{"grounded_all": 40, "accuracy": 90}], other: [{"grounded_all": 50, "accuracy": 80}]}
    assert study.select(tie, paper) == paper
    # CIDEr does not enter the rule.
    cider = {paper: [{"grounded_all": 40, "accuracy": 90, "cider": 10}],
             other: [{"grounded_all": 40, "accuracy": 90, "cider": 500}]}
    assert study.select(cider, paper) == paper


def test_parts_share_runs_with_the_same_evaluation():
    """A setting that two parts name is one run folder per seed, evaluated the same way in both."""
    seen = {}
    for part in ("seeds", "map", "variants", "budget"):
        for job in study.part_jobs(part, Path("unused")):
            key = (job.cell.name, job.seed)
            assert seen.setdefault(key, (job.cell, job.per_epoch, job.test)) == (job.cell, job.per_epoch, job.test)
    assert ("full_lr-1e-3", 9) in seen and ("nrca_ratio-10_lam2", 4) in seen
    assert study.NRCA.flags == ("--lr-llm", "0.001", "--lr-connector", "0.001", "--lam", "2.0")
    ratio = study.cell("full", "ratio-10")
    assert ratio.flags == ("--lr-llm", "0.001", "--lr-connector", "0.0001")


def fake_run(out: Path, cell, seed: int, val_curve: list[dict], test: dict | None = None):
    folder = study.run_folder(out, study.Job(cell, seed, True, True))
    (folder / "final").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"epochs": len(val_curve), "eval_every_epoch": True}))
    lines = [json.dumps({"step": 1, "seconds": 2.0})]
    lines += [json.dumps({"epoch": e, "eval": r, "seconds": 1.0}) for e, r in enumerate(val_curve, 1)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if test is not None:
        (folder / "test").mkdir()
        (folder / "test" / "eval.json").write_text(json.dumps(test))


def scores(cider, grounded, accuracy=90.0, colour=100.0):
    return {"cider": cider, "grounded_all": grounded, "accuracy": accuracy, "grounded_colour": colour,
            "grounded_fabricated": 10.0, "grounded_size_prior": 20.0}


def test_report_pairs_seeds_and_counts_divergence(tmp_path):
    for seed in (0, 1, 2):
        fake_run(tmp_path, study.FULL, seed, [scores(200, 40), scores(100, 40)], scores(150, 40))
        nrca_test = scores(0, 0, accuracy=10, colour=0) if seed == 2 else scores(160, 50)
        fake_run(tmp_path, study.NRCA, seed, [scores(300, 45), scores(150, 45)], nrca_test)
    table = study_report.rows_with_pairs(tmp_path, [("Full FT", study.FULL), ("NRCA", study.NRCA)], [0, 1, 2], "test")
    full_row, nrca_row = table.splitlines()[2:]
    assert "| Full FT | 3 | 0/3 |" in full_row and "| NRCA | 3 | 1/3 |" in nrca_row
    differences = [10.0, 10.0, -150.0]  # NRCA - Full FT CIDEr per seed
    assert f"{statistics.fmean(differences):+.1f} [" in nrca_row
    assert "**div**" in study_report.per_seed_table(tmp_path, [("NRCA", study.NRCA)], [0, 1, 2], "test")
    # CIDEr halves from epoch 1 to 2 while accuracy and grounding stay: 66.7 %, 0.0 %, 0.0 %.
    swing = study_report.swing_table(tmp_path, [("Full FT", study.FULL)], [0, 1, 2])
    assert "| Full FT | 66.7 % | 0.0 % | 0.0 % |" in swing


def test_unfinished_and_nonfinite_runs(tmp_path):
    """A run still training has no scores yet (its per-epoch lines are not the final model's); a run stopped by a
    non-finite loss is finished and diverged; the variants' gate needs all ten seeds of part 1."""
    folder = study.run_folder(tmp_path, study.Job(study.NRCA, 0, True, True))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"eval_split": "val"}))
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "eval": scores(100, 40)}) + "\n")
    assert study.final_val(folder) == {} and not study.job_done(tmp_path, study.Job(study.NRCA, 0, True, True))
    (folder / "final").mkdir()
    assert study.final_val(folder)["cider"] == 100
    (folder / "config.json").write_text(json.dumps({"eval_split": "test"}))  # per-epoch lines on test: not val
    assert study.final_val(folder) == {}
    for seed in study.SEEDS[1:]:
        fake_run(tmp_path, study.NRCA, seed, [scores(100, 40)], scores(100, 40))
    with pytest.raises(RuntimeError, match="part 1"):  # seed 0 has no test evaluation yet
        study.unstable_as_published(tmp_path)
    (folder / "test").mkdir()
    (folder / "test" / "eval.json").write_text(json.dumps(scores(100, 40)))
    assert study.unstable_as_published(tmp_path) is False  # ten seeds, none diverged
    (folder / study.NONFINITE).write_text(json.dumps({"nonfinite": "error: non-finite loss (nan) at step 9"}))
    assert study.job_done(tmp_path, study.Job(study.NRCA, 0, True, True))
    assert study.diverged(study.final_test(folder)) and study.unstable_as_published(tmp_path) is True
    assert "non-finite loss **div**" in study_report.per_seed_table(tmp_path, [("NRCA", study.NRCA)], [0, 1], "test")
