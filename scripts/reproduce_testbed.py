"""Every method x several seeds on the testbed (testbed.py), then the paper's Table 4, Fig. 1, Fig. 3 and
Table 1 from the runs, mean +- std over seeds, and the Full FT acceptance check fixed in advance.

One command:
    python scripts/reproduce_testbed.py                       # 8 methods x seeds 0 1 2 into runs/testbed
    python scripts/reproduce_testbed.py --seeds 0 --methods full nrca --out runs/quick

Per seed S the world is data/testbed-seedS (written on first use) and the base model is pre-trained once
and cached (train.py --base-epochs); every method then fine-tunes that base with the embedded preset's
schedule (connector + last 2 decoder layers, 5 epochs, batch 16), evaluated after every epoch on the
300 + 300 test records, and its final model on delta = 0.5 inputs (Fig. 3). A run whose final/ exists is
kept; an interrupted one resumes. Afterwards, for Full FT and NRCA, the first generated token's attention
on noisy inputs (Table 1) and the zero-shot base are evaluated.

Written to OUT: seedS/METHOD/ (train.py run folders), seedS/zero-shot/, results.md (every table) and
fig1_curves.png, fig3_clean_vs_noisy.png.

The acceptance of the testbed (fixed before any NRCA number was looked at; README, 'The testbed'): over
the seeds, Full FT's mean caption CIDEr peaks at an epoch <= ceil(E / 2) and its last epoch is lower than
that peak by more than the larger of the two epochs' standard deviations across seeds, while its mean
multiple-choice accuracy at the last epoch is within 5 points of its value at the peak epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import testbed  # noqa: E402
from evaluate import read_predictions  # noqa: E402
from reporting import epoch_evals, epoch_folders  # noqa: E402

METHODS = ("full", "l2", "grafting", "random-mask", "magnitude-mask", "nrca", "spider", "mi-consistency")
PAPER_NAMES = {"full": "Full FT", "l2": "L2-Reg", "grafting": "Grafting", "random-mask": "Ran Mask",
               "magnitude-mask": "Mag Mask", "nrca": "NRCA", "spider": "SPIDER", "mi-consistency": "MI-Consistency"}
ATTENTION_METHODS = ("full", "nrca")


def run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    with log.open("a") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")


def train_all(out: Path, seeds, methods, extra) -> dict:
    seconds = {}
    for seed in seeds:
        for method in methods:
            folder = out / f"seed{seed}" / method
            if (folder / "final").is_dir() and (folder / "eval_noisy.json").is_file():
                continue
            resume = ["--resume"] if (folder / "latest").is_file() else []
            started = time.time()
            run([sys.executable, "train.py", "--seed", str(seed), "--method", method, "--compare", "",
                 "--out-dir", str(folder), *resume, *extra], out / "logs" / f"seed{seed}-{method}.log")
            seconds[f"seed{seed}/{method}"] = time.time() - started
    return seconds


def evaluate_extras(out: Path, seeds) -> None:
    for seed in seeds:
        base = json.loads((out / f"seed{seed}" / "full" / "config.json").read_text())
        zero = out / f"seed{seed}" / "zero-shot"
        if not (zero / "eval_noisy.json").is_file():
            for flags in ([], ["--noisy"]):
                run([sys.executable, "evaluate.py", base["model"], "--data", base["data_dir"], "--out", str(zero),
                     "--max-new-tokens", str(base["eval_max_new_tokens"]), *flags],
                    out / "logs" / f"seed{seed}-zero-shot.log")
        for method in ATTENTION_METHODS:
            folder = out / f"seed{seed}" / method
            if (folder / "final").is_dir() and not (folder / "attention" / "eval_noisy.json").is_file():
                run([sys.executable, "evaluate.py", str(folder), "--noisy", "--attention", "--out",
                     str(folder / "attention")], out / "logs" / f"seed{seed}-{method}-attention.log")


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values) -> str:
    mean, std = mean_std(values)
    return "–" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def final_eval(folder: Path) -> dict:
    points = epoch_evals(folder)
    return points[-1][1] if points else {}


def noisy_eval(folder: Path) -> dict:
    """The final model's scores on delta = 0.5 inputs (train.py's eval_noisy.json), {} when absent."""
    path = folder / "eval_noisy.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def curves(out: Path, seeds, method: str, key: str) -> dict[float, list[float]]:
    by_epoch = {}
    for seed in seeds:
        for epoch, result in epoch_evals(out / f"seed{seed}" / method):
            by_epoch.setdefault(epoch, []).append(result.get(key))
    return dict(sorted(by_epoch.items()))


def acceptance(out: Path, seeds) -> tuple[bool, str]:
    cider, accuracy = curves(out, seeds, "full", "cider"), curves(out, seeds, "full", "accuracy")
    epochs = list(cider)
    means = {e: mean_std(v)[0] for e, v in cider.items()}
    peak = max(epochs, key=lambda e: means[e])
    last = epochs[-1]
    spread = max(mean_std(cider[peak])[1], mean_std(cider[last])[1])
    drop = means[peak] - means[last]
    acc_change = mean_std(accuracy[last])[0] - mean_std(accuracy[peak])[0]
    early = peak <= math.ceil(len(epochs) / 2)
    passed = early and drop > spread and abs(acc_change) <= 5
    text = (f"Full FT over seeds {list(seeds)}: mean CIDEr peaks at epoch {peak:g} ({means[peak]:.2f}; early = epoch "
            f"<= {math.ceil(len(epochs) / 2)}: {'yes' if early else 'no'}), last epoch {means[last]:.2f}: a drop of "
            f"{drop:.2f} against a spread across seeds of {spread:.2f}; multiple-choice accuracy changes by "
            f"{acc_change:+.2f} points from the peak epoch to the last (allowed: 5). Acceptance: "
            f"{'PASSED' if passed else 'FAILED'}")
    per_seed = []  # not part of the criterion: where each seed's own curve peaks, and how far it ends below
    for seed in seeds:
        own = {e: v[0] for e, v in curves(out, [seed], "full", "cider").items()}
        if own:
            top, last_value = max(own, key=own.get), own[max(own)]
            per_seed.append(f"seed {seed}: peak at epoch {top:g} ({own[top]:.1f}), last {last_value:.1f} "
                            f"({last_value - own[top]:+.1f})")
    return passed, text + "\n\nPer seed (not part of the criterion): " + "; ".join(per_seed)


def table4(out: Path, seeds, methods) -> str:
    rows = ["| Methods | testbed captions CIDEr | testbed choice accuracy | AVG | captions all attributes right % | "
            "captions with a fabricated detail % | CIDEr, noisy inputs | accuracy, noisy inputs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def row(name, results, noisy):
        rows.append(f"| {name} | {cell([r.get('cider') for r in results])} | "
                    f"{cell([r.get('accuracy') for r in results])} | {cell([r.get('avg') for r in results])} | "
                    f"{cell([r.get('grounded_all') for r in results])} | "
                    f"{cell([r.get('grounded_fabricated') for r in results])} | "
                    f"{cell([r.get('cider') for r in noisy])} | {cell([r.get('accuracy') for r in noisy])} |")

    zero = [out / f"seed{s}" / "zero-shot" for s in seeds]
    row("Zero-shot", [json.loads((z / "eval.json").read_text()) for z in zero if (z / "eval.json").is_file()],
        [json.loads((z / "eval_noisy.json").read_text()) for z in zero if (z / "eval_noisy.json").is_file()])
    for method in methods:
        folders = [out / f"seed{s}" / method for s in seeds if (out / f"seed{s}" / method / "final").is_dir()]
        name = PAPER_NAMES[method] + ("" if len(folders) == len(seeds) else f" (seeds: {len(folders)} of {len(seeds)})")
        row(name, [final_eval(f) for f in folders], [noisy_eval(f) for f in folders])
    return "\n".join(rows)


def per_epoch_table(out: Path, seeds, methods) -> str:
    lines = ["| Methods | " + " | ".join(f"epoch {e:g} CIDEr / acc / all right %"
                                        for e in curves(out, seeds, methods[0], "cider")) + " |"]
    lines.append("|---" + "|---:" * (lines[0].count("|") - 2) + "|")
    for method in methods:
        done = [s for s in seeds if (out / f"seed{s}" / method / "final").is_dir()]
        cider, accuracy = curves(out, done, method, "cider"), curves(out, done, method, "accuracy")
        grounded = curves(out, done, method, "grounded_all")
        lines.append(f"| {PAPER_NAMES[method]} | " + " | ".join(
            f"{cell(cider[e])} / {cell(accuracy[e])} / {cell(grounded.get(e, []))}" for e in cider) + " |")
    return "\n".join(lines)


def fabrication_table(out: Path, seeds, methods) -> str:
    """The overfitting's mechanism, measured: per epoch, how many of the test captions a model wrote carry
    one of the training captions' ungrounded details (testbed.UNGROUNDED_DETAILS; no test picture or
    reference has one), mean ± std over seeds."""
    lines = []
    for method in methods:
        by_epoch = {}
        for seed in seeds:
            for epoch, folder in epoch_folders(out / f"seed{seed}" / method).items():
                predictions = folder / "predictions_caption.jsonl"
                if predictions.is_file():
                    written = read_predictions(predictions).values()
                    fabricated = sum(any(d in caption for d in testbed.UNGROUNDED_DETAILS) for caption in written)
                    by_epoch.setdefault(epoch, []).append(fabricated)
        if by_epoch:
            if not lines:
                lines = ["| Methods | " + " | ".join(f"epoch {e}" for e in sorted(by_epoch)) + " |",
                         "|---" + "|---:" * len(by_epoch) + "|"]
            lines.append(f"| {PAPER_NAMES[method]} | " + " | ".join(cell(v) for _, v in sorted(by_epoch.items()))
                         + " |")
    return "\n".join(lines)


def attention_table(out: Path, seeds) -> str:
    lines = ["| Methods | system (all) | prompt (all) | visual (all) | system (mid) | prompt (mid) | visual (mid) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for method in ATTENTION_METHODS:
        results = [json.loads(p.read_text()) for s in seeds
                   if (p := out / f"seed{s}" / method / "attention" / "eval_noisy.json").is_file()]
        cells = [cell([100 * r[f"attention_caption_{part}_{span}"] for r in results])
                 for span in ("all", "mid") for part in ("system", "prompt", "visual")]
        lines.append(f"| {PAPER_NAMES[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def confidence_table(out: Path, seeds) -> str:
    """NRCA's per-step diagnostics, averaged per epoch for each seed (a diverging seed would hide in a mean
    over seeds): I, I~ and the share of the open samples with I~ > I."""
    lines = ["| epoch | " + " | ".join(f"seed {s}: I / I~ / share I~ > I" for s in seeds) + " |",
             "|---:" + "|---:" * len(seeds) + "|"]
    by_epoch = {}
    for seed in seeds:
        path = out / f"seed{seed}" / "nrca" / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.is_file() else []:
            step = json.loads(line)
            if "step" in step and "confidence" in step:
                by_epoch.setdefault(math.ceil(step["epoch"] - 1e-9), {}).setdefault(seed, []).append(step)
    for epoch, per_seed in sorted(by_epoch.items()):
        cells = [" / ".join(f"{statistics.fmean(s[k] for s in per_seed[seed]):.3f}"
                            for k in ("confidence", "noisy_confidence", "noisy_above_clean"))
                 if seed in per_seed else "–" for seed in seeds]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(out: Path, seeds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    panels = (("cider", "captions: CIDEr x100 (open-response)"),
              ("grounded_all", "captions: all attributes right % (grounding.py)"),
              ("accuracy", "multiple choice: accuracy % (fixed-choice)"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for colour, method in (("tab:blue", "full"), ("tab:orange", "nrca")):
            points = curves(out, seeds, method, key)
            xs = list(points)
            means = [mean_std(points[e])[0] for e in xs]
            stds = [mean_std(points[e])[1] for e in xs]
            ax.plot(xs, means, marker="o", color=colour, label=f"{PAPER_NAMES[method]} (mean ± std)")
            ax.fill_between(xs, [m - s for m, s in zip(means, stds, strict=True)],
                            [m + s for m, s in zip(means, stds, strict=True)], color=colour, alpha=0.15)
            for seed in seeds:  # each seed thin: a mean over a diverging seed and two others shows neither
                per_seed = curves(out, [seed], method, key)
                ax.plot(list(per_seed), [v[0] for v in per_seed.values()], color=colour, lw=0.8, ls="--", alpha=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Fig. 1 on the testbed: mean ± std over seeds {list(seeds)}, each seed dashed", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "fig1_curves.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key in zip(axes, ("cider", "grounded_all", "accuracy"), strict=True):
        for i, method in enumerate(("full", "nrca")):
            scores = [(final_eval(f), noisy_eval(f)) for f in (out / f"seed{s}" / method for s in seeds)]
            clean = mean_std([c.get(key) for c, _ in scores])
            noisy = mean_std([n.get(key) for _, n in scores])
            ax.bar([i - 0.2, i + 0.2], [clean[0], noisy[0]], 0.38, yerr=[clean[1], noisy[1]],
                   color=["tab:blue", "tab:orange"], label=["clean", "noisy (delta 0.5)"] if i == 0 else None)
            for n, (c, noisy_scores) in enumerate(scores):  # each seed: its clean and noisy score joined by a line
                if c.get(key) is not None and noisy_scores.get(key) is not None:
                    ax.plot([i - 0.2, i + 0.2], [c[key], noisy_scores[key]], color="black", marker=".", lw=0.8,
                            label="one seed" if i == 0 and n == 0 else None)
        ax.set_xticks([0, 1], [PAPER_NAMES["full"], PAPER_NAMES["nrca"]])
        ax.set_title({"cider": "CIDEr x100", "grounded_all": "captions all attributes right %",
                      "accuracy": "accuracy %"}[key], fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 3 on the testbed: final models on clean vs noisy inputs", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "fig3_clean_vs_noisy.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/testbed", help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--report-only", action="store_true", help="only build the tables and figures")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out).resolve()
    started = time.time()
    if not args.report_only:
        seconds = train_all(out, args.seeds, args.methods, extra)
        evaluate_extras(out, args.seeds)
        timing = out / "seconds.json"
        old = json.loads(timing.read_text()) if timing.is_file() else {}
        timing.write_text(json.dumps({**old, **seconds}, indent=1))
    methods = [m for m in METHODS if m in args.methods]
    ran = [m for m in methods if any((out / f"seed{s}" / m / "final").is_dir() for s in args.seeds)]
    passed, verdict = acceptance(out, args.seeds)
    gates = []
    for seed in args.seeds:
        config = json.loads((out / f"seed{seed}" / "full" / "config.json").read_text())
        rows = json.loads((Path(config["model"]).parent / f"gates-world{testbed.WORLD_VERSION}.json").read_text())
        gates.append(f"seed {seed}: " + "; ".join(f"{r['gate']} {r['value']:.1f} % (needs >= {r['threshold']:.1f})"
                                                 for r in rows))
    timing = {}  # each run's training + per-epoch evaluation time, from its folder (config.json to eval_noisy.json)
    for seed in args.seeds:
        for method in ran:
            folder = out / f"seed{seed}" / method
            if (folder / "eval_noisy.json").is_file():
                timing[f"seed{seed}/{method}"] = ((folder / "eval_noisy.json").stat().st_mtime
                                                  - (folder / "config.json").stat().st_mtime)
    report = "\n\n".join([
        "## Gates (base model, downstream multiple-choice test split; threshold = chance + 30, clean - 10)",
        "\n".join(gates),
        "## Acceptance of the testbed (Full FT only)", verdict,
        f"## Table 4 layout: last epoch, mean ± std over seeds {args.seeds}", table4(out, args.seeds, methods),
        "## Fig. 1 data: every epoch, CIDEr / accuracy, mean ± std", per_epoch_table(out, args.seeds, ran),
        "## Test captions (of the split's records) with an ungrounded detail from the training captions, per epoch",
        fabrication_table(out, args.seeds, ran),
        "## Table 1: attention of the first generated token on noisy captioning inputs, % (mean ± std)",
        attention_table(out, args.seeds),
        "## NRCA diagnostics per epoch (Eq. 5b): mean clean / noisy confidence of the open samples, per seed",
        confidence_table(out, args.seeds),
        "training time per run (s, incl. per-epoch evaluation): "
        + json.dumps({k: round(v) for k, v in timing.items()}),
        f"wall time of this invocation: {time.time() - started:.0f} s"])
    plots(out, args.seeds)
    (out / "results.md").write_text(report + "\n")
    print(report)
    print(f"\nwritten: {out / 'results.md'}, {out / 'fig1_curves.png'}, {out / 'fig3_clean_vs_noisy.png'}")
    if not passed:
        print("note: the testbed's acceptance criterion was not met on these seeds (see above)")


if __name__ == "__main__":
    import cli

    cli.run(main)
