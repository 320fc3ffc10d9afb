"""cli.py: bad input ends a command in one clean line and exit status 2; bugs keep their traceback.

    python -m pytest -q tests/test_cli.py
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import data
import evaluate

ROOT = Path(__file__).resolve().parents[1]


def run_tool(*args, env=None):
    environment = {k: v for k, v in os.environ.items() if k != cli.DEBUG_VARIABLE}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**environment, **(env or {})})


def test_bad_option_prints_one_named_line_and_exits_2():
    done = run_tool("train.py", "--lam", "-1")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["train.py: error: --lam -1.0: expected >= 0",
                                        "(add --debug, or set NRCA_DEBUG=1, to see the traceback)"]


def test_missing_run_folder_is_named_without_traceback(tmp_path):
    done = run_tool("evaluate.py", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"evaluate.py: error: checkpoint or run folder {tmp_path / 'nowhere'} does not exist")


@pytest.mark.parametrize("how", ["flag", "variable"])
def test_debug_shows_the_traceback(how):
    args, env = (["--debug"], None) if how == "flag" else ([], {cli.DEBUG_VARIABLE: "1"})
    done = run_tool("train.py", "--lam", "-1", *args, env=env)
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
    assert done.stderr.rstrip().endswith("ValueError: --lam -1.0: expected >= 0")


def raised(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the test inspects whatever was raised
        return error
    raise AssertionError("nothing was raised")


def test_only_our_own_checks_count_as_bad_input(tmp_path):
    (tmp_path / "folder.png").mkdir()
    assert cli.is_bad_input(raised(lambda: data.open_image(tmp_path / "folder.png", "record 0")))
    assert cli.is_bad_input(raised(lambda: evaluate.parse_test_spec("caption-no-path")))
    # An internal consistency check (RuntimeError) is a bug: traceback.
    assert not cli.is_bad_input(raised(lambda: evaluate.evaluate_model(None, {}, world_size=2)))
    # A ValueError raised inside a library is not ours to explain: traceback.
    error = raised(lambda: torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long)))
    assert isinstance(error, ValueError) and not cli.is_bad_input(error)


def test_unexpected_error_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tool.py"])

    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.run(bug)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: evaluate.parse_test_spec("caption-no-path"))
    assert exit_info.value.code == 2
