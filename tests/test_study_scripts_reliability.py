"""The study scripts on bad input (issue 30, the study-scripts row): scripts/testbed_study.py, scripts/gap_study.py and
scripts/study_report.py end a missing, empty or partial run folder, a part run out of order, --workers 0 and a
truncated eval.json / config.json / metrics.jsonl with one named line (cli.py: `PROG: error: ...`, exit 2), never a
traceback; `collect` on a folder without runs leaves results/*.jsonl as they are; an eval.json without `accuracy`
is an error, never a diverged seed. Fake run folders only (the files the scripts read), nothing trains.

    python -m pytest -q tests/test_study_scripts_reliability.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cli

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import gap_study  # noqa: E402
import study_report  # noqa: E402
import testbed_study as study  # noqa: E402


def named(call, *args, **kwargs) -> str:
    """The message of the error call(...) raises, which cli.py must print as one line with exit 2 (bad input)."""
    with pytest.raises(Exception) as caught:
        call(*args, **kwargs)
    assert cli.is_bad_input(caught.value), repr(caught.value)
    return str(caught.value)


def scores(accuracy=90.0, colour=100.0) -> dict:
    return {"cider": 100.0, "grounded_all": 40.0, "accuracy": accuracy, "grounded_colour": colour}


def fake_run(out: Path, cell=study.NRCA, seed: int = 0, test: dict | None = None) -> Path:
    """A finished run of part 1 as train.py and evaluate.py leave it: final/, config.json, metrics.jsonl with a step
    and a per-epoch validation line, test/eval.json."""
    folder = study.run_folder(out, study.Job(cell, seed, True, True))
    (folder / "final").mkdir(parents=True)
    (folder / "test").mkdir()
    (folder / "config.json").write_text(json.dumps({"eval_split": "val", "method": cell.method}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "epoch": 1.0, "seconds": 2.0}) + "\n"
                                          + json.dumps({"epoch": 1, "eval": scores()}) + "\n")
    (folder / "test" / "eval.json").write_text(json.dumps(test or scores()))
    return folder


@pytest.fixture
def results(tmp_path, monkeypatch) -> dict[str, Path]:
    """Both studies' results files moved to tmp_path (a test never rewrites the committed ones), with one line each."""
    paths = {}
    for module in (study, gap_study):
        path = tmp_path / "results" / module.RESULTS.name
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"arm": "committed", "seed": 0}) + "\n")
        monkeypatch.setattr(module, "RESULTS", path)
        paths[module.__name__] = path
    return paths


# ---------------------------------------------------------------------------------------------------------------
# collect: a missing, empty or partial --out


@pytest.mark.parametrize("module", [study, gap_study], ids=["testbed_study", "gap_study"])
@pytest.mark.parametrize("folder, message", [("missing", "no such folder"), ("empty", "none of the .* runs has "
                                                                                       "finished there")])
def test_collect_without_runs_is_named_and_keeps_the_results(module, folder, message, results, tmp_path):
    (tmp_path / "empty").mkdir()
    before = module.RESULTS.read_text()
    text = named(module.main, ["collect", "--out", str(tmp_path / folder)])
    assert f"--out {tmp_path / folder}" in text and "left as it is" in text
    assert re.search(message, text)
    assert module.RESULTS.read_text() == before


def test_collect_names_the_runs_a_partial_folder_lacks(results, tmp_path, capsys):
    fake_run(tmp_path, study.FULL, 0)
    assert study.collect(tmp_path) == 1
    printed = capsys.readouterr().out
    assert f"133 of 134 runs have not finished under {tmp_path} and are left out: seed1/full_lr-1e-3, " in printed
    assert printed.rstrip().endswith("and 128 more")
    assert json.loads(study.RESULTS.read_text())["arm"] == study.FULL.name


# ---------------------------------------------------------------------------------------------------------------
# Damaged run files and a missing score


@pytest.mark.parametrize("file, text, message", [
    ("test/eval.json", '{"accuracy": 9', r"test/eval.json: not valid JSON \(line 1"),
    ("test/eval.json", "[1, 2]", "test/eval.json: holds a JSON list, expected an object"),
    ("config.json", '{"eval_split', r"config.json: not valid JSON"),
    ("metrics.jsonl", json.dumps({"step": 1}) + '\n{"epoch": 1, "ev', r"metrics.jsonl line 2: not "),
    ("nonfinite.json", '{"nonfin', r"nonfinite.json: not valid JSON"),
    ("../../seconds.json", '{"seed0/', r"seconds.json: not valid JSON"),
], ids=["truncated-eval", "eval-list", "config", "metrics", "nonfinite", "seconds"])
def test_damaged_run_files_are_named(file, text, message, results, tmp_path):
    folder = fake_run(tmp_path)
    (folder / file).write_text(text)
    assert re.search(message, named(study.main, ["collect", "--out", str(tmp_path)]))


def test_metrics_jsonl_is_read_even_without_per_epoch_evaluations(results, tmp_path):
    folder = fake_run(tmp_path)
    (folder / "config.json").write_text(json.dumps({"eval_split": "test"}))  # epoch_evals does not read it then
    (folder / "val").mkdir()
    (folder / "val" / "eval.json").write_text(json.dumps(scores()))
    (folder / "metrics.jsonl").write_text('{"step": 1, "seconds": 2.0}\n{"step": 2, "seco')
    assert "metrics.jsonl line 2: not a JSON object" in named(study.main, ["collect", "--out", str(tmp_path)])


def test_an_eval_json_without_accuracy_is_an_error_never_a_divergence(results, tmp_path):
    folder = fake_run(tmp_path, test={"cider": 100.0, "grounded_colour": 100.0})
    text = named(study.main, ["collect", "--out", str(tmp_path)])
    assert f"{folder} (test split" in text and "no accuracy" in text and "not a 0" in text
    assert study.RESULTS.read_text() == json.dumps({"arm": "committed", "seed": 0}) + "\n"
    # The part-3 decision reads validation: a validation result without accuracy stops it too, naming the run.
    for seed in study.SEEDS[1:]:
        fake_run(tmp_path, study.NRCA, seed)
    (folder / "val").mkdir()
    (folder / "val" / "eval.json").write_text(json.dumps({"grounded_colour": 10.0}))
    text = named(study.unstable_as_published, tmp_path)
    assert f"{folder} (val split" in text and "no accuracy" in text


# ---------------------------------------------------------------------------------------------------------------
# Options and parts out of order


@pytest.mark.parametrize("argv, message", [
    (["run", "seeds", "--workers", "0"], "--workers 0: expected >= 1"),
    (["run", "seeds", "--seeds", "1,x"], "--seeds '1,x': expected comma-separated integers"),
    (["run", "map", "--seeds", "7"], r"--seeds 7: part map runs seeds 0-4, not \[7\]"),
    (["run"], "run: name the part"),
    (["collect", "seeds"], "collect takes every part's runs"),
    (["run", "variants"], "variants: part 1 \\(seeds\\) has not finished .*seed0, seed1.*run `run seeds` first"),
    (["run", "budget-test"], "budget: the selection runs of full are not all done .*run `run budget` first"),
    (["run", "zero-shot"], "zero-shot: no base model .* seed\\(s\\) 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 .*`run seeds`"),
], ids=["workers-0", "seeds-not-int", "seeds-not-in-part", "no-part", "collect-part", "variants-first",
        "budget-test-first", "zero-shot-no-bases"])
def test_testbed_study_options_and_order(argv, message, tmp_path):
    text = named(study.main, argv + ["--out", str(tmp_path)])
    assert re.search(message, text), text


def test_zero_shot_names_only_the_seeds_without_a_base(tmp_path):
    for seed in (0, 1):  # seed 0 evaluated already, seed 1 has only its base's folder name (no final/)
        (tmp_path / f"seed{seed}" / "base-x" / ("final" if seed == 0 else "stage")).mkdir(parents=True)
    (tmp_path / "seed0" / "zero-shot" / "test").mkdir(parents=True)
    (tmp_path / "seed0" / "zero-shot" / "test" / "eval.json").write_text(json.dumps(scores()))
    assert "for seed(s) 1 (looked for" in named(study.zero_shot, tmp_path, [0, 1])


@pytest.mark.parametrize("argv", [["run", "--workers", "0"], ["embedded-dial", "--workers", "-1"]])
def test_gap_study_workers(argv, tmp_path):
    assert "expected >= 1" in named(gap_study.main, argv + ["--out", str(tmp_path)])


def test_embedded_dial_names_a_base_without_measurements(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "run_logged", lambda *args: (0, ""))  # no base is built
    base = gap_study.base_folder(tmp_path, 0, gap_study.DIALS[0])
    base.mkdir(parents=True)
    (base / "confidence_gap.json").write_text(json.dumps({"tasks": {}}))
    assert "seed 0's base at D = 0 under" in named(gap_study.embedded_dial, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# study_report.py


def test_study_report_out_writes_the_report_there(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / study.RESULTS.name).write_text("")
    out = tmp_path / "report"
    study_report.main(["--results", str(tmp_path / "results"), "--out", str(out), "--no-instrument"])
    report = (out / "report.md").read_text()
    assert "## First study: no raw results" in report
    assert f"## Gap study: no raw results ({tmp_path / 'results' / gap_study.RESULTS.name} not found)" in report
    assert report in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("missing", "--results .*missing: no such folder"),
    ("empty", "--results .*empty: holds neither testbed_study.jsonl nor gap_study.jsonl"),
    ("out-is-a-file", "--out .*: a file; expected a folder"),
    ("not-a-record", r"testbed_study.jsonl line 1: not a run's record"),
])
def test_study_report_bad_input(case, message, tmp_path):
    results, out = tmp_path / ("missing" if case == "missing" else "empty"), tmp_path / "report"
    if case != "missing":
        results.mkdir()
    if case in ("out-is-a-file", "not-a-record"):
        (results / study.RESULTS.name).write_text("[1]\n")
    if case == "out-is-a-file":
        out.write_text("")
    text = named(study_report.main, ["--results", str(results), "--out", str(out), "--no-instrument"])
    assert re.search(message, text), text
    assert not (out / "report.md").exists()


@pytest.mark.parametrize("script, argv", [
    ("testbed_study.py", ["collect", "--out", "MISSING"]),
    ("testbed_study.py", ["run", "seeds", "--workers", "0"]),
    ("gap_study.py", ["collect", "--out", "MISSING"]),
    ("study_report.py", ["--results", "MISSING", "--no-instrument"]),
])
def test_one_line_with_exit_2(script, argv, tmp_path):
    """Through the command line: cli.py's `PROG: error: ...` and status 2, no traceback; results/ untouched."""
    committed = {path: path.read_bytes() for path in (REPO / "results").glob("*.jsonl")}
    argv = [str(tmp_path / a) if a == "MISSING" else a for a in argv]
    done = subprocess.run([sys.executable, f"scripts/{script}", *argv], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert [line for line in done.stderr.splitlines() if ": error: " in line][0].startswith(f"{script}: error: ")
    assert {path: path.read_bytes() for path in (REPO / "results").glob("*.jsonl")} == committed
