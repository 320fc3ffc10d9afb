"""How nrca's command-line tools end: a named error in one clean line for bad input, a traceback for bugs.

Bad input is anything nrca's own code rejects on purpose: a data file, a run folder, an option, a path
that is missing or is a folder. Such an error (ValueError, hence data.DataError; OSError, hence
FileNotFoundError; run_folder.RunFolderError; FloatingPointError, a loss that is not finite) raised in one
of this project's files is printed on stderr as

    train.py: error: --lam -1.0: expected >= 0
    (add --debug, or set NRCA_DEBUG=1, to see the traceback)

and the process exits with status 2 (argparse's status for a bad command line). Every other exception,
and one of those types raised inside torch, transformers or another library, is unexpected and keeps its
full traceback. (A ValueError that a bug in our own code raises, an unpacking error say, is shown as bad
input; the one line still names it, and --debug shows where.) `--debug` anywhere on the command line (taken out
before the tool parses its options) or NRCA_DEBUG=1 in the environment shows the traceback of every error, for
bug reports.

    if __name__ == "__main__":
        cli.run(lambda: main(parse_config()))
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OWN_FOLDERS = (ROOT, ROOT / "scripts", ROOT / "bench")  # where nrca's own code lives
EXPECTED_TYPES = (ValueError, OSError, FloatingPointError)
DEBUG_FLAG, DEBUG_VARIABLE = "--debug", "NRCA_DEBUG"


def is_bad_input(error: BaseException) -> bool:
    """True for an error of an expected kind that nrca's own code raised (its last frame is in our files)."""
    expected = isinstance(error, EXPECTED_TYPES) or type(error).__name__ == "RunFolderError"
    frames = traceback.extract_tb(error.__traceback__)
    return expected and bool(frames) and Path(frames[-1].filename).resolve().parent in OWN_FOLDERS


def run(entry_point):
    """Call entry_point() and end the process: its exit status (None or a dict/str/Path result: 0), or 2 with
    a one-line message for bad input; unexpected errors propagate with their traceback."""
    debug = DEBUG_FLAG in sys.argv[1:] or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    sys.argv = [sys.argv[0]] + [a for a in sys.argv[1:] if a != DEBUG_FLAG]
    program = Path(sys.argv[0]).name
    try:
        result = entry_point()
    except Exception as error:
        if debug or not is_bad_input(error):
            raise
        world = int(os.environ.get("WORLD_SIZE", 1))
        rank = f"[rank {os.environ.get('RANK', 0)}] " if world > 1 else ""
        print(f"{rank}{program}: error: {error}\n(add {DEBUG_FLAG}, or set {DEBUG_VARIABLE}=1, to see the "
              "traceback)", file=sys.stderr)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)
