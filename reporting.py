"""Reading run folders' evaluations and laying them out as the paper does: Table 4 and Fig. 1.

- `read_eval` / `epoch_evals`: a run's eval.json, or its per-epoch evaluations from metrics.jsonl lines
  {"epoch": k, "eval": {...}} (train.py writes them after every epoch), else eval_epoch{k}/eval.json; a
  missing epoch is named on stderr, never skipped silently.
- `format_table`: the Table 4 layout (CIDEr, accuracy, AVG per dataset pair, best bold, second underlined,
  a "+ vs zero-shot" row).
- `plot_curves`: Fig. 1-style curves, score against epoch, one line per run.

Used by `python evaluate.py table ...` and `python evaluate.py plot ...`; reads files only, loads no model.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------
def read_text(path: Path) -> str:
    """A text file the tools read (a run's files, a test split, predictions); one that is not UTF-8 is named."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None


def read_json(path: Path, expected: type = dict, hint: str = "") -> dict | list:
    """A JSON object (or, expected=list, a list) from a run folder (eval.json, config.json, a model's config.json, a
    base's gates); a damaged one is named, never a traceback, never read as "no scores"; `hint` says what to do."""
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                         f"truncated or edited?{' ' + hint if hint else ''}") from None
    if not isinstance(value, expected):
        raise ValueError(f"{path}: holds a JSON {type(value).__name__}, expected "
                         f"{'an object' if expected is dict else 'a list'}")
    return value


def read_eval(run: str | Path, noisy: bool = False) -> dict:
    """RUN/eval.json (eval_noisy.json), else the last per-epoch eval in RUN/metrics.jsonl; a .json file as is."""
    run = Path(run)
    if run.is_file():
        return read_json(run)
    path = run / ("eval_noisy.json" if noisy else "eval.json")
    if path.is_file():
        return read_json(path)
    epochs = [] if noisy else epoch_evals(run)
    if epochs:
        return epochs[-1][1]
    raise FileNotFoundError(f"run {run}: no {path.name}" + ("" if noisy else " and no per-epoch evals in "
                                                                           "metrics.jsonl / eval_epoch*/eval.json")
                            + f"; run `python evaluate.py {run}{' --noisy' if noisy else ''}` first")


def epoch_folders(run: str | Path) -> dict[int, Path]:
    """{k: RUN/eval_epoch{k}}: the per-epoch evaluation folders train.py writes (eval.json, predictions)."""
    found = {}
    for folder in Path(run).glob("eval_epoch*"):
        match = re.fullmatch(r"eval_epoch(\d+)", folder.name)
        if match:
            found[int(match.group(1))] = folder
    return dict(sorted(found.items()))


def epoch_evals(run: str | Path) -> list[tuple[float, dict]]:
    """[(epoch, eval dict)] sorted by epoch from RUN/metrics.jsonl lines with "epoch" and "eval"; if there
    are none, from RUN/eval_epoch{k}/eval.json."""
    run = Path(run)
    found = {}
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        for n, line in enumerate(metrics.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{metrics} line {n}: not JSON") from None
            if isinstance(entry, dict) and isinstance(entry.get("eval"), dict) and "epoch" in entry:
                found[float(entry["epoch"])] = entry["eval"]  # a resumed run's repeat replaces the earlier one
    if not found:
        for epoch, folder in epoch_folders(run).items():
            if (folder / "eval.json").is_file():
                found[float(epoch)] = read_json(folder / "eval.json")
    missing = missing_epochs(run, found)
    if missing:
        print(f"warning: run {run} has no per-epoch evaluation for epoch(s) {missing}: tables and curves skip them "
              "(a run killed during an evaluation redoes it when resumed: python train.py --resume --out-dir "
              f"{run})", file=sys.stderr)
    return sorted(found.items())


def missing_epochs(run: Path, found: dict) -> list[int]:
    """Epochs without an evaluation in a run that evaluates every epoch: gaps before its last evaluation and,
    once it has a final model, every epoch up to config.json's "epochs"."""
    config = read_json(run / "config.json") if (run / "config.json").is_file() else {}
    if not found or not config.get("eval_every_epoch", True):
        return []
    last = int(config.get("epochs", 0)) if (run / "final").is_dir() else 0
    return [k for k in range(1, max(last, int(max(found))) + 1) if float(k) not in found]


def run_name(run: str | Path) -> str:
    run = Path(run)
    config = run / "config.json"
    if run.is_dir() and config.is_file():
        method = read_json(config).get("method")
        if method:
            return f"{method} ({run.name})"
    return run.stem if run.is_file() else run.name


# ---------------------------------------------------------------------------------------------
# Table 4 layout and Fig. 1 curves
# ---------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _delta(value, base) -> str:
    if value is None or base is None:
        return "–"
    d = value - base
    return f"+ {d:.2f}" if d >= 0 else f"- {-d:.2f}"


def format_table(runs: list[tuple[str, dict]], zero_shot: list[dict] | None = None) -> str:
    """Markdown table laid out like the paper's Table 4: one row per run, a column block per
    (caption dataset, choice dataset) pair with CIDEr (x100), accuracy (%) and AVG; the best tuned value
    of each column in bold, the second underlined; a "+" row under each run with its change against
    the zero-shot evaluation of the same datasets (the paper's "+" row, E of arXiv 2503.04543)."""
    def pair(result):
        return result.get("caption_dataset", "caption"), result.get("choice_dataset", "choice")

    pairs = []
    for _, result in runs + [("", z) for z in (zero_shot or [])]:
        if pair(result) not in pairs:
            pairs.append(pair(result))
    base = {pair(z): z for z in (zero_shot or [])}
    rows = {}  # name -> {pair: result}
    for name, result in runs:
        rows.setdefault(name, {})[pair(result)] = result
    keys = ("cider", "accuracy", "avg")
    columns = [(p, k) for p in pairs for k in keys]
    values = {name: [cells.get(p, {}).get(k) for p, k in columns] for name, cells in rows.items()}
    marks = {}
    for c in range(len(columns)):
        ranked = sorted({v[c] for v in values.values() if v[c] is not None}, reverse=True)
        for name, v in values.items():
            if len(rows) > 1 and v[c] is not None and v[c] == ranked[0]:
                marks[name, c] = "**{}**"
            elif len(rows) > 2 and len(ranked) > 1 and v[c] is not None and v[c] == ranked[1]:
                marks[name, c] = "<u>{}</u>"
    header = ["Methods"] + [p[0] if k == "cider" else p[1] if k == "accuracy" else "AVG" for p, k in columns]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * len(columns) + "|"]
    if base:
        lines.append("| Zero-shot | " + " | ".join(_fmt(base.get(p, {}).get(k)) for p, k in columns) + " |")
    for name, v in values.items():
        cells = [marks.get((name, c), "{}").format(_fmt(x)) for c, x in enumerate(v)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if base:
            deltas = [_delta(x, base.get(p, {}).get(k)) for x, (p, k) in zip(v, columns, strict=True)]
            lines.append("| + vs zero-shot | " + " | ".join(deltas) + " |")
    return "\n".join(lines)


def plot_curves(runs: list[str | Path], out: str | Path, metrics=("cider", "accuracy", "avg"),
                zero_shot: str | Path | None = None, names: list[str] | None = None) -> Path:
    """Fig. 1-style curves: one panel per metric, score against epoch, one line per run, from each run's
    per-epoch evals (see epoch_evals). A zero-shot eval, if given, is drawn at epoch 0 of every line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    titles = {"cider": "captioning CIDEr x100 (open-response)", "accuracy": "multiple-choice accuracy % (fixed-choice)",
              "avg": "AVG", "bleu4": "BLEU-4", "rouge_l": "ROUGE-L", "meteor": "METEOR"}
    start = read_eval(zero_shot) if zero_shot is not None else None
    names = names or [run_name(r) for r in runs]
    if len(names) != len(runs):
        raise ValueError(f"plot: {len(names)} names for {len(runs)} runs")
    curves = []
    for run in runs:
        points = epoch_evals(run)
        if not points:
            raise FileNotFoundError(f"plot: run {run} has no per-epoch evals (metrics.jsonl lines with 'epoch' and "
                                    "'eval', or eval_epoch{k}/eval.json)")
        if start is not None:
            points = [(0.0, start)] + points
        curves.append(points)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        drawn = False
        for name, points in zip(names, curves, strict=True):
            xs = [e for e, r in points if r.get(metric) is not None]
            ys = [r[metric] for _, r in points if r.get(metric) is not None]
            if xs:
                ax.plot(xs, ys, marker="o", label=name)
                drawn = True
        ax.set_title(titles.get(metric, metric))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def format_side_by_side(runs: list[str | Path]) -> str:
    """The embedded default's printout: per-epoch scores of several runs side by side (Fig. 1): CIDEr and
    accuracy, and where the test records carry scenes (the testbed) grounding.py's all-attributes-right and
    fabricated-detail rates; then each final model's clean vs noisy (delta = 0.5) scores and their gap
    (Fig. 3), from each run's metrics.jsonl and eval_noisy.json (when present)."""
    names = [run_name(run) for run in runs]
    curves = [dict(epoch_evals(run)) for run in runs]
    epochs = sorted({e for curve in curves for e in curve})
    columns = [("cider", "CIDEr"), ("accuracy", "accuracy")]
    if any("grounded_all" in result for curve in curves for result in curve.values()):
        columns += [("grounded_all", "all right %"), ("grounded_fabricated", "fabricated %")]
    header = " | ".join(f"{name} {label}" for name in names for _, label in columns)
    lines = [f"| epoch | {header} |", "|---:" + "|---:" * len(runs) * len(columns) + "|"]
    for epoch in epochs:
        cells = [_fmt(curve.get(epoch, {}).get(key)) for curve in curves for key, _ in columns]
        lines.append(f"| {epoch:g} | " + " | ".join(cells) + " |")
    noisy_rows = []
    for name, run, curve in zip(names, runs, curves, strict=True):
        path = Path(run) / "eval_noisy.json"
        if path.is_file() and curve:
            clean, noisy = curve[max(curve)], read_json(path)
            cells = []
            for key, _ in columns:
                a, b = clean.get(key), noisy.get(key)
                cells += [_fmt(a), _fmt(b), _fmt(None if a is None or b is None else b - a)]
            noisy_rows.append(f"| {name} | " + " | ".join(cells) + " |")
    if noisy_rows:
        header = " | ".join(f"{label} clean | {label} noisy | gap" for _, label in columns)
        lines += ["", f"final models on clean vs noisy images (delta = {noisy.get('delta')}, Fig. 3):",
                  f"| run | {header} |", "|---" + "|---:|---:|---:" * len(columns) + "|"] + noisy_rows
    return "\n".join(lines)
