"""scripts/testbed_study.py's fixed rules: the paired bootstrap, the divergence rule, the budget's selection, and
the runs the parts share; the raw results (JSON lines) from fake run folders and scripts/study_report.py's tables
and the gap study's verdicts on them.

    python -m pytest -q tests/test_testbed_study.py
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import gap_study  # noqa: E402
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


def fake_run(out: Path, cell, seed: int, val_curve: list[dict], test: dict | None = None, config=None):
    folder = study.run_folder(out, study.Job(cell, seed, True, True))
    (folder / "final").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or {"epochs": len(val_curve), "eval_every_epoch": True,
                                                              "eval_split": "val"}))
    lines = [json.dumps({"step": 1, "epoch": 1.0, "seconds": 2.0, "confidence": 0.4, "noisy_confidence": 0.5,
                         "noisy_above_clean": 0.5, "ce": 1.0, "alignment": 0.1})]
    lines += [json.dumps({"epoch": e, "eval": r, "seconds": 1.0}) for e, r in enumerate(val_curve, 1)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if test is not None:
        (folder / "test").mkdir()
        (folder / "test" / "eval.json").write_text(json.dumps(test))


def scores(cider, grounded, accuracy=90.0, colour=100.0):
    return {"cider": cider, "grounded_all": grounded, "accuracy": accuracy, "grounded_colour": colour,
            "grounded_fabricated": 10.0, "grounded_size_prior": 20.0}


def test_a_missing_score_is_an_error_and_a_nonfinite_run_diverged():
    with pytest.raises(ValueError, match="no grounded_colour"):
        study.diverged({"accuracy": 90.0})
    with pytest.raises(ValueError, match="no accuracy or grounded_colour"):
        study.diverged({})
    assert study.diverged({"nonfinite": "error: non-finite loss (nan) at step 3"})


def test_report_from_raw_results_pairs_seeds_and_counts_divergence(tmp_path):
    """Fake run folders -> collect (the JSON lines) -> the report's tables read only the lines."""
    for seed in (0, 1, 2):
        fake_run(tmp_path, study.FULL, seed, [scores(200, 40), scores(100, 40)], scores(150, 40))
        nrca_test = scores(0, 0, accuracy=10, colour=0) if seed == 2 else scores(160, 50)
        fake_run(tmp_path, study.NRCA, seed, [scores(300, 45), scores(150, 45)], nrca_test)
    path = tmp_path / "results.jsonl"
    jobs = [("seeds", study.Job(c, s, True, True)) for c in (study.FULL, study.NRCA) for s in (0, 1, 2)]
    assert study.write_results(tmp_path, path, jobs) == 6
    records = study_report.load(path)
    first = records[0]
    assert first["arm"] == study.FULL.name and first["val_per_epoch"][1]["cider"] == 100
    assert first["test_final"]["cider"] == 150 and first["diverged"] is False and first["train_seconds"] == 2.0
    assert first["training"] == [{"epoch": 1, "confidence": 0.4, "noisy_confidence": 0.5, "noisy_above_clean": 0.5,
                                  "ce": 1.0, "alignment": 0.1}]
    full, nrca = study_report.by_seed(records, study.FULL.name), study_report.by_seed(records, study.NRCA.name)
    table = study_report.arm_table([("Full FT", full, full), ("NRCA", nrca, full)])
    full_row, nrca_row = table.splitlines()[2:]
    assert "| Full FT | 3 | 0/3 |" in full_row and "| NRCA | 3 | 1/3 |" in nrca_row
    differences = [10.0, 10.0, -150.0]  # NRCA - Full FT CIDEr per seed
    assert f"{statistics.fmean(differences):+.1f} [" in nrca_row
    assert "**div**" in study_report.per_seed_table([("NRCA", nrca)], [0, 1, 2])
    # CIDEr halves from epoch 1 to 2 while accuracy and grounding stay: 66.7 %, 0.0 %, 0.0 %.
    assert "| Full FT | 66.7 % | 0.0 % | 0.0 % |" in study_report.swing_table([("Full FT", full)])
    assert "0.40 → 0.40 (0.50)" in study_report.confidence_table([("NRCA", nrca)], [0, 1, 2])
    with pytest.raises(ValueError, match="line 2: not JSON"):
        path.write_text(path.read_text().splitlines()[0] + "\n{\n")
        study_report.load(path)


def test_unfinished_and_nonfinite_runs(tmp_path):
    """A run still training has no scores yet (its per-epoch lines are not the final model's); a run stopped by a
    non-finite loss is finished and diverged; the variants' gate needs all ten seeds of part 1, on validation."""
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
    with pytest.raises(study.NotReady, match="part 1"):  # seed 0 has no validation result
        study.unstable_as_published(tmp_path)
    (folder / "config.json").write_text(json.dumps({"eval_split": "val"}))
    assert study.unstable_as_published(tmp_path) is False  # ten seeds, none diverged
    # The decision reads validation: a diverged *test* result does not change it.
    (folder / "test").mkdir()
    (folder / "test" / "eval.json").write_text(json.dumps(scores(0, 0, accuracy=10, colour=0)))
    assert study.unstable_as_published(tmp_path) is False
    (folder / study.NONFINITE).write_text(json.dumps({"nonfinite": "error: non-finite loss (nan) at step 9"}))
    assert study.job_done(tmp_path, study.Job(study.NRCA, 0, True, True))
    assert study.diverged(study.final_test(folder)) and study.unstable_as_published(tmp_path) is True
    path = tmp_path / "results.jsonl"
    study.write_results(tmp_path, path, [("seeds", study.Job(study.NRCA, s, True, True)) for s in (0, 1)])
    records = study_report.by_seed(study_report.load(path), study.NRCA.name)
    assert records[0]["diverged"] is True and records[0]["test_final"] == {"nonfinite": "error: non-finite loss "
                                                                                       "(nan) at step 9"}
    assert "non-finite loss **div**" in study_report.per_seed_table([("NRCA", records)], [0, 1])


def test_rescoring_uses_todays_grounding_on_the_saved_captions(tmp_path):
    """The raw results regrade saved captions with grounding.py as it is now: a caption the old scorer misread
    ("2 big red circles") is all right today, whatever eval.json says."""
    scene = {"colour": "red", "shape": "circle", "count": "two", "position": "left", "size": "large"}
    (tmp_path / "split.json").write_text(json.dumps([{"id": "a", "scene": scene}]))
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "predictions_caption.jsonl").write_text(json.dumps(
        {"id": "a", "prediction": "2 big red circles on the left"}) + "\n")
    old = {"cider": 10.0, "accuracy": 90.0, "grounded_all": 0.0, "grounded_count": 0.0, "unrelated": 1}
    new = study.rescored(old, evaluation, tmp_path / "split.json")
    assert new["grounded_all"] == 100.0 and new["grounded_count"] == 100.0 and new["cider"] == 10.0
    assert "unrelated" not in new


# ---------------------------------------------------------------------------------------------------------------
# The gap study's design and verdicts (scripts/gap_study.py, scripts/study_report.py)


def test_gap_study_grid_uses_only_unseen_seeds_and_builds_each_base_first():
    assert len(gap_study.SEEDS) >= 10 and not set(gap_study.SEEDS) & set(range(14))
    jobs = gap_study.jobs()
    assert len(jobs) == 11 * len(gap_study.SEEDS)
    first_of_base = {}
    for _, dial, job in jobs:
        first_of_base.setdefault((job.seed, dial), job.cell.method)
        assert ("--base-noise-max-delta", f"{dial:g}") == job.cell.flags[-2:]
    assert set(first_of_base.values()) == {"full"}  # the Full FT run of a base comes first and builds it
    hinge = [job for _, _, job in jobs if "hinge" in job.cell.name]
    assert len(hinge) == 3 * len(gap_study.SEEDS) and "--nrca-alignment" in hinge[0].cell.flags


def gap_record(seed, dial, arm, share, diverged=False, delta=0.5, alignment="paper", method="nrca", test=None):
    gap = {f"{d:g}": {"clean_confidence": 0.5, "noisy_confidence": 0.5 - 0.1 * d, "share_noisy_above_clean": share,
                      "n_open": 500} for d in gap_study.GAP_DELTAS}
    return {"seed": seed, "dial": dial, "arm": arm, "method": method, "nrca_alignment": alignment, "delta": delta,
            "diverged": diverged, "base": {"gap": gap, "gates": {}}, "test_final": test or {}}


def test_fisher_exact_by_hand():
    """[[1, 9], [8, 2]]: margins 10/10 rows, 9/11 columns. P(a) = C(9,a) C(11,10-a) / C(20,10); tables as or less
    likely than a = 1 are a in {0, 1, 8, 9}: (11 + 9 * 55 + 36 * 11 + 1 * 1... computed below by hand-coded
    hypergeometric terms), about 0.0055."""
    def p(a):
        return math.comb(9, a) * math.comb(11, 10 - a) / math.comb(20, 10)
    expected = p(0) + p(1) + p(8) + p(9)
    assert study_report.fisher_two_sided(1, 9, 8, 2) == pytest.approx(expected)
    assert 0.005 < expected < 0.006
    assert study_report.fisher_two_sided(5, 5, 5, 5) == pytest.approx(1.0)


def test_gap_verdicts_on_toy_records():
    records = []
    for seed in range(10):
        records.append(gap_record(seed, 0.0, "base0_x", 0.10, diverged=seed == 0))  # premise met, 1/10 diverge
        records.append(gap_record(seed, 0.6, "base0.6_x", 0.50, diverged=seed < 6))  # broken, 6/10 diverge
        records.append(gap_record(seed, 0.3, "base0.3_x", 0.30, diverged=seed < 5))
        for dial, share in ((0.0, 0.10), (0.3, 0.30), (0.6, 0.50)):  # one base per (seed, dial): its share
            records.append(gap_record(seed, dial, f"base{dial:g}_hinge", share, alignment="hinge"))
    verdict, table = study_report.verdict_h2(records)
    assert "premise met: 1/10 diverged (10 %)" in verdict and "premise broken: 11/20" in verdict
    assert ": supported" in verdict and "| base0_x | 10 | 0.10 | 10/10 | 1/10 |" in table
    assert "holds" in study_report.verdict_h1(records) and "does not" not in study_report.verdict_h1(records)
    assert study_report.verdict_h3(records).endswith("holds (needs at most 1 of 10 at every D).")
    few = [r for r in records if r["arm"] != "base0_x"]
    assert "untestable" in study_report.verdict_h2(few)[0]


def test_h4_reads_the_premise_dial_from_the_bases_alone():
    """D = 0 has the lowest share; NRCA there writes 10 points fewer fabricated details and the same all-right share
    as Full FT on every seed: 'reduces fabrication, keeps grounding'."""
    records = []
    for seed in range(5):
        for dial, share in ((0.0, 0.1), (0.3, 0.3), (0.6, 0.5)):
            full = {"grounded_fabricated": 50.0 + seed, "grounded_all": 40.0 + seed, "accuracy": 90.0}
            nrca = {"grounded_fabricated": 40.0 + seed, "grounded_all": 40.0 + seed, "accuracy": 90.0}
            records.append(gap_record(seed, dial, f"base{dial:g}_{study.FULL.name}", share, method="full",
                                      test=full))
            records.append(gap_record(seed, dial, f"base{dial:g}_{study.NRCA.name}", share, test=nrca))
    verdict, dial = study_report.verdict_h4(records)
    assert dial == 0.0
    assert "NRCA (Eq. 5b): fabricated -10.0 [-10.0, -10.0], all right +0.0 [+0.0, +0.0]" in verdict
    assert "reduces fabrication, keeps grounding." in verdict
    assert "NRCA hinge: fewer than 2 paired seeds" in verdict
