"""scripts/reproduce_testbed.py's judgements on fake run folders: the Full FT acceptance (fixed in advance,
README 'The testbed') and the per-epoch count of test captions with a fabricated detail.

    python -m pytest -q tests/test_reproduce_testbed.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import reproduce_testbed  # noqa: E402

import testbed  # noqa: E402


def fake_run(folder: Path, ciders: list[float], accuracies: list[float], captions: list[list[str]] | None = None):
    """A finished train.py run folder: config.json, final/, metrics.jsonl with one eval line per epoch and,
    when given, each epoch's caption predictions."""
    folder.mkdir(parents=True)
    (folder / "final").mkdir()
    (folder / "config.json").write_text(json.dumps({"epochs": len(ciders), "eval_every_epoch": True}))
    lines = [json.dumps({"epoch": e, "eval": {"cider": c, "n_caption": 3, "accuracy": a, "n_choice": 3}})
             for e, (c, a) in enumerate(zip(ciders, accuracies, strict=True), 1)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for e, written in enumerate(captions or [], 1):
        (folder / f"eval_epoch{e}").mkdir()
        (folder / f"eval_epoch{e}" / "predictions_caption.jsonl").write_text(
            "".join(json.dumps({"id": f"c{i}", "prediction": p}) + "\n" for i, p in enumerate(written)))


@pytest.mark.parametrize("curves, passed", [
    # peaks at epoch 2 of 5 and ends well below it: passes
    ({0: [200, 300, 280, 250, 220], 1: [210, 310, 290, 260, 230], 2: [190, 290, 270, 240, 210]}, True),
    # keeps rising: the peak is the last epoch, not early
    ({0: [200, 250, 280, 300, 320], 1: [210, 260, 290, 310, 330], 2: [190, 240, 270, 290, 310]}, False),
    # peaks early but the drop (20) is within the seeds' spread (~100)
    ({0: [200, 300, 280, 250, 280], 1: [210, 400, 290, 260, 380], 2: [190, 200, 270, 240, 180]}, False),
])
def test_acceptance_judges_the_mean_full_ft_curve(tmp_path, curves, passed):
    for seed, ciders in curves.items():
        fake_run(tmp_path / f"seed{seed}" / "full", ciders, [90.0] * len(ciders))
    verdict, text = reproduce_testbed.acceptance(tmp_path, list(curves))
    assert verdict is passed
    assert ("PASSED" if passed else "FAILED") in text and "seed 2: peak at epoch" in text


def test_acceptance_fails_when_accuracy_moves(tmp_path):
    for seed in (0, 1, 2):
        fake_run(tmp_path / f"seed{seed}" / "full", [200, 300, 280, 250, 220], [90, 90, 80, 75, 70])
    assert reproduce_testbed.acceptance(tmp_path, [0, 1, 2])[0] is False


def test_fabrication_table_counts_captions_with_a_training_detail(tmp_path):
    detail = testbed.UNGROUNDED_DETAILS[0]
    plain = "there are two small red circles on the left of the picture"
    for seed, extra in ((0, 0), (1, 2)):
        epoch1 = [plain, plain, plain]
        epoch2 = [plain + " " + detail] + [plain + " " + detail] * extra + [plain] * (2 - extra)
        fake_run(tmp_path / f"seed{seed}" / "full", [1.0, 1.0], [1.0, 1.0], [epoch1, epoch2])
    table = reproduce_testbed.fabrication_table(tmp_path, [0, 1], ["full", "nrca"])
    rows = table.splitlines()
    assert rows[0] == "| Methods | epoch 1 | epoch 2 |"
    assert rows[2] == "| Full FT | 0.00 ± 0.00 | 2.00 ± 1.41 |"  # 1 and 3 captions with the detail
    assert len(rows) == 3  # NRCA did not run: no row
