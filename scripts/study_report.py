"""The testbed study's report (scripts/testbed_study.py report): its tables, figures and timings from the run
folders, written to OUT/results.md and OUT/fig1_val_curves.png. Reads only what the
study's pre-registration names: the test split for parts 1, 3 and 4's final rows, the validation split for the
curves, the map and the selection. Parts that have not run are left out, and a part with missing seeds says how
many it has.

    python scripts/testbed_study.py report --out runs/study
"""

from __future__ import annotations

import json
import math
import statistics
from itertools import pairwise
from pathlib import Path

import testbed_study as study
from testbed_study import REPO

from reporting import epoch_evals

METRICS = (("cider", "CIDEr"), ("accuracy", "accuracy"), ("grounded_all", "all attributes right %"),
           ("grounded_fabricated", "fabricated detail %"), ("grounded_size_prior", "size-prior errors %"))
PAIRED = (("cider", "CIDEr"), ("grounded_all", "all right"), ("grounded_fabricated", "fabricated"),
          ("accuracy", "accuracy"))


def mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f}"


def results(out: Path, cell: study.Cell, seeds, split: str) -> dict[int, dict]:
    """{seed: last-epoch scores} of the seeds that finished, on the test or the validation split."""
    read = study.final_test if split == "test" else study.final_val
    found = {}
    for seed in seeds:
        result = read(study.run_folder(out, study.Job(cell, seed, False, False)))
        if result:
            found[seed] = result
    return found


def rows_with_pairs(out: Path, cells: list[tuple[str, study.Cell]], seeds, split: str) -> str:
    """Each cell's mean ± std and divergence rate, and its paired difference against Full FT (95 % bootstrap)."""
    header = "| method | seeds | diverged | " + " | ".join(label for _, label in METRICS) + " | " + " | ".join(
        f"Δ {label} vs Full FT [95 % CI]" for _, label in PAIRED) + " |"
    lines = [header, "|---|---:|---:|" + "---:|" * (len(METRICS) + len(PAIRED))]
    full = results(out, study.FULL, seeds, split)
    zero = [json.loads(p.read_text()) for seed in seeds
            if (p := out / f"seed{seed}" / "zero-shot" / split / "eval.json").is_file()]
    if zero:  # the base before fine-tuning: a reference row, no pairing
        lines.append(f"| zero-shot base | {len(zero)} | {sum(study.diverged(r) for r in zero)}/{len(zero)} | "
                     + " | ".join([mean_std(r.get(key) for r in zero) for key, _ in METRICS] + ["–"] * len(PAIRED))
                     + " |")
    for name, cell in cells:
        found = results(out, cell, seeds, split)
        if not found:
            continue
        cells_ = [mean_std(r.get(key) for r in found.values()) for key, _ in METRICS]
        pairs = []
        for key, _ in PAIRED:
            common = [s for s in found if s in full and found[s].get(key) is not None and full[s].get(key) is not None]
            if cell == study.FULL or len(common) < 2:
                pairs.append("–")
                continue
            mean, low, high = study.paired_bootstrap([found[s][key] for s in common], [full[s][key] for s in common])
            pairs.append(f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]")
        n_diverged = sum(study.diverged(r) for r in found.values())
        lines.append(f"| {name} | {len(found)} | {n_diverged}/{len(found)} | " + " | ".join(cells_ + pairs) + " |")
    return "\n".join(lines)


def seed_cell(result: dict | None) -> str:
    if result is None:
        return "–"
    if "nonfinite" in result:
        return "non-finite loss **div**"
    keys = ("cider", "grounded_all", "accuracy")
    text = " / ".join("?" if result.get(k) is None else f"{result[k]:.0f}" for k in keys)
    return text + (" **div**" if study.diverged(result) else "")


def finished_curve(out: Path, cell: study.Cell, seed: int) -> list[dict]:
    """A finished run's per-epoch validation scores ([] for a run still training or without them)."""
    folder = study.run_folder(out, study.Job(cell, seed, True, False))
    if not (folder / "final").is_dir() or not (folder / "metrics.jsonl").is_file():
        return []
    return [result for _, result in epoch_evals(folder)]


def finished_metrics(out: Path, cell: study.Cell, seed: int) -> list[dict]:
    """A finished run's metrics.jsonl records, steps and evaluations ([] while it trains or when absent)."""
    metrics = study.run_folder(out, study.Job(cell, seed, False, False)) / "metrics.jsonl"
    if not metrics.is_file() or not (metrics.parent / "final").is_dir():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def per_seed_table(out: Path, cells: list[tuple[str, study.Cell]], seeds, split: str) -> str:
    """Every seed's last-epoch CIDEr / all-right / accuracy, a diverged run marked: nothing hides in a mean."""
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    for name, cell in cells:
        found = results(out, cell, seeds, split)
        if found:
            lines.append(f"| {name} | " + " | ".join(seed_cell(found.get(s)) for s in seeds) + " |")
    return "\n".join(lines)


def curve_table(out: Path, cells: list[tuple[str, study.Cell]], seeds) -> str:
    """Per-epoch validation scores, mean ± std over seeds: CIDEr swings, grounding does not (or does)."""
    curves = {name: [finished_curve(out, cell, seed) for seed in seeds] for name, cell in cells}
    epochs = range(1, max((len(c) for runs in curves.values() for c in runs), default=0) + 1)
    if not epochs:
        return "(no finished run)"
    lines = ["| method | metric | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
             "|---|---|" + "---:|" * len(epochs)]
    for name, runs in curves.items():
        for key, label in METRICS:
            lines.append(f"| {name} | {label} | " + " | ".join(
                mean_std(run[e - 1].get(key) for run in runs if len(run) >= e) for e in epochs) + " |")
    return "\n".join(lines)


def swing_table(out: Path, cells: list[tuple[str, study.Cell]], seeds) -> str:
    """How much each metric moves from one epoch to the next within a run (mean over runs of the mean absolute
    change, as a share of the metric's mean): the phrasing lottery, measured."""
    lines = ["| method | " + " | ".join(label for _, label in METRICS[:3]) + " |", "|---|---:|---:|---:|"]
    for name, cell in cells:
        shares = {key: [] for key, _ in METRICS[:3]}
        for seed in seeds:
            points = finished_curve(out, cell, seed)
            if len(points) < 2 or study.diverged(points[-1]):
                continue
            for key in shares:
                values = [p.get(key) for p in points]
                if None in values:
                    continue
                level = statistics.fmean(values)
                if level > 0:
                    shares[key].append(statistics.fmean(abs(b - a) for a, b in pairwise(values)) / level)
        if any(shares.values()):
            lines.append(f"| {name} | " + " | ".join(
                f"{100 * statistics.fmean(v):.1f} %" if v else "–" for v in shares.values()) + " |")
    return "\n".join(lines)


def map_table(out: Path) -> str:
    lines = ["| cell | lr LLM / connector | lam | seeds | diverged | CIDEr | accuracy | all right % | fabricated % |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    cells = [(arm, m, 2.0) for arm in study.LR_ARMS for m in ("full", "nrca")]
    cells += [("lr-1e-3", "nrca", lam) for lam in study.MAP_LAMS]
    for arm, method, lam in cells:
        cell = study.cell(method, arm, **({"lam": lam} if method == "nrca" else {}))
        found = results(out, cell, study.MAP_SEEDS, "val")
        if not found:
            continue
        llm, connector = study.LR_ARMS[arm]
        lines.append(f"| {cell.name} | {llm:g} / {connector:g} | {f'{lam:g}' if method == 'nrca' else '–'} | "
                     f"{len(found)} | {sum(study.diverged(r) for r in found.values())}/{len(found)} | "
                     + " | ".join(mean_std(r.get(k) for r in found.values())
                                  for k in ("cider", "accuracy", "grounded_all", "grounded_fabricated")) + " |")
    return "\n".join(lines)


def budget_table(out: Path) -> str:
    lines = ["| method | setting | chosen on validation | selection score (val, seeds 0-1) | test seeds | diverged | "
             "CIDEr | accuracy | all right % | fabricated % |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    try:
        report_cells = set(study.budget_report_cells(out))
    except RuntimeError:
        return "(the selection runs of part 4 are not all done)"
    for method in study.OWN_GRID:
        grid = [c for c in study.budget_cells() if c.method == method]
        for c in grid:
            val = results(out, c, study.SELECTION_SEEDS, "val")
            score = study.selection_score(list(val.values())) if val else math.nan
            chosen = c in report_cells and (c != grid[0] or len([g for g in grid if g in report_cells]) == 1)
            test = results(out, c, study.BUDGET_TEST_SEEDS, "test") if c in report_cells else {}
            cells = [mean_std(r.get(k) for r in test.values())
                     for k in ("cider", "accuracy", "grounded_all", "grounded_fabricated")] if test else ["–"] * 4
            diverged = f"{sum(study.diverged(r) for r in test.values())}/{len(test)}" if test else "–"
            lines.append(f"| {method} | {c.name}{' (paper)' if c == grid[0] else ''} | {'yes' if chosen else ''} | "
                         f"{score:.1f} | {len(test) or '–'} | {diverged} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing(out: Path) -> str:
    bases = [json.loads(p.read_text()) for p in sorted(out.glob("seed*/base-*/seconds.json"))]
    lines = []
    if bases:
        lines.append(f"base model per seed ({len(bases)} seeds, 1 thread): stage 1 (vision tower alone) "
                     f"{mean_std(b.get('vision_tower') for b in bases)} s, stage 2 (every part) "
                     f"{mean_std(b.get('pretraining') for b in bases)} s")
    for name, cell in (("Full FT", study.FULL), ("NRCA", study.NRCA)):
        train, evaluation = [], []
        for seed in study.SEEDS:
            entries = finished_metrics(out, cell, seed)
            if entries:
                train.append(sum(e.get("seconds", 0) for e in entries if "step" in e))
                evaluation.append(sum(e.get("seconds", 0) for e in entries if "eval" in e))
        if train:
            lines.append(f"{name}, one run (315 steps, 1 thread): optimizer steps {mean_std(train)} s, 5 validation "
                         f"evaluations (300 captions + 300 questions each) {mean_std(evaluation)} s")
    seconds = out / "seconds.json"
    if seconds.is_file():
        walls = json.loads(seconds.read_text())
        first = {k: v for k, v in walls.items() if k.endswith(study.FULL.name)}  # each seed's first run: its base too
        rest = [v for k, v in walls.items() if k not in first]
        lines.append(f"{len(walls)} runs of the study timed (wall per run: training, evaluations, model loads, process "
                     f"start): Full FT at the paper's settings, the first run of each seed, base included "
                     f"{mean_std(first.values())} s; every other run {mean_std(rest)} s; "
                     f"{sum(walls.values()) / 3600:.2f} process-hours in all, 2 processes side by side")
    return "\n".join(f"- {line}" for line in lines)


def instrument_table(data_dir: Path) -> str:
    """What CIDEr measures on the testbed, without any model: captions written from each test picture's scene in
    each of the five reference phrasings (every fact right), then the same with the scene's fabricated detail
    appended, then with the colour wrong. All facts right can score anything from the lowest to the highest
    phrasing's CIDEr; one appended detail costs more than any phrasing."""
    import metrics
    import testbed

    records = json.loads((data_dir / "test_caption.json").read_text())
    references = {r["id"]: r["references"] for r in records}

    def cider(captions):
        return 100 * metrics.caption_metrics(captions, references, bleu=False, rouge=False)["cider"]

    def wrong_colour(scene):
        colours = list(testbed.COLOURS)
        return {**scene, "colour": colours[(colours.index(scene["colour"]) + 1) % len(colours)]}

    lines = ["| caption written from the scene | every fact right | + its fabricated detail | colour wrong |",
             "|---|---:|---:|---:|"]
    for j, template in enumerate(testbed.DOWNSTREAM_CAPTIONS):
        right = {r["id"]: testbed.scene_captions(r["scene"])[j] for r in records}
        detail = {r["id"]: right[r["id"]] + " " + testbed.detail_of(r["scene"]) for r in records}
        wrong = {r["id"]: testbed.scene_captions(wrong_colour(r["scene"]))[j] for r in records}
        lines.append(f"| phrasing {j + 1}: \"{template}\" | {cider(right):.1f} | {cider(detail):.1f} | "
                     f"{cider(wrong):.1f} |")
    return "\n".join(lines)


def detail_words() -> set[str]:
    """Post hoc (added after reading NRCA's captions, see the report): the words of the training captions'
    fabricated details that no grounded caption uses. NRCA's captions carry broken details ("near the right of
    the school", "on the kitchen ones") that grounded_fabricated, which looks for whole details, misses."""
    import testbed

    grounded = {w for t in testbed.DOWNSTREAM_CAPTIONS + testbed.PRETRAIN_CAPTIONS for w in t.split()}
    grounded |= {v for values in testbed.ATTRIBUTES.values() for v in values} | {s + "s" for s in testbed.SHAPES}
    return {w for detail in testbed.UNGROUNDED_DETAILS for w in detail.split()} - grounded


def detail_word_table(out: Path, cells, seeds) -> str:
    """% of test captions (last epoch) with any word of a fabricated detail, whole or broken: mean ± std."""
    words = detail_words()
    lines = ["| method | test captions with a detail's word % | with a whole detail % (grounded_fabricated) |",
             "|---|---:|---:|"]
    for name, cell in cells:
        rates, whole = [], []
        for seed in seeds:
            folder = study.run_folder(out, study.Job(cell, seed, False, True))
            path = folder / "test" / "predictions_caption.jsonl"
            if (folder / "final").is_dir() and path.is_file():
                captions = [json.loads(line)["prediction"] for line in path.read_text().splitlines() if line.strip()]
                rates.append(100 * sum(bool(words & set(c.lower().split())) for c in captions) / len(captions))
                whole.append(study.final_test(folder).get("grounded_fabricated"))
        if rates:
            lines.append(f"| {name} | {mean_std(rates)} | {mean_std(whole)} |")
    return "\n".join(lines)


def confidence_table(out: Path, cells, seeds) -> str:
    """Eq. (5b) made visible: each run's mean clean confidence I of the open samples over the steps of its first
    and its last epoch (train.py logs it per step), and the share of steps' open samples with I~ > I."""
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    for name, cell in cells:
        row = []
        for seed in seeds:
            steps = [e for e in finished_metrics(out, cell, seed) if "step" in e and "confidence" in e]
            if not steps:
                row.append("–")
                continue
            last = max(math.ceil(e["epoch"] - 1e-9) for e in steps)
            first = [e["confidence"] for e in steps if e["epoch"] <= 1 + 1e-9]
            final = [e["confidence"] for e in steps if math.ceil(e["epoch"] - 1e-9) == last]
            above = statistics.fmean(e["noisy_above_clean"] for e in steps)
            row.append(f"{statistics.fmean(first):.2f} → {statistics.fmean(final):.2f} ({above:.2f})")
        if any(cell_ != "–" for cell_ in row):
            lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_curves(out: Path, cells, seeds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("cider", "CIDEr x100"), ("grounded_all", "all attributes right %"),
            ("grounded_fabricated", "fabricated detail %"), ("accuracy", "multiple choice accuracy %"))
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.3))
    for ax, (key, title) in zip(axes, keys, strict=True):
        for colour, (name, cell) in zip(("tab:blue", "tab:orange"), cells, strict=False):
            for n, seed in enumerate(seeds):
                points = finished_curve(out, cell, seed)
                if points:
                    ax.plot(range(1, len(points) + 1), [r.get(key) for r in points], color=colour, lw=0.8,
                            alpha=0.6, label=name if n == 0 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"validation split, every seed ({len(seeds)}) one line: CIDEr swings with the phrasing, the grounded "
                 "scores say what was drawn", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "fig1_val_curves.png", dpi=110)
    plt.close(fig)


def write_report(out: Path) -> str:
    headline = [("Full FT", study.FULL), ("NRCA", study.NRCA)]
    variants = [(f"NRCA, {v} (beyond the paper)", study.cell("nrca", lam=2.0, nrca_alignment=v))
                for v in study.VARIANTS]
    sections = [
        "## The instrument: CIDEr of captions written from the scene (seed 0's test split, no model)",
        instrument_table(REPO / "data" / "testbed-seed0"),
        "## 1. Full FT vs NRCA at the paper's settings, and 3. the variants beyond the paper (test split, last epoch)",
        rows_with_pairs(out, headline + variants, study.SEEDS, "test"),
        "Per seed (CIDEr / all right % / accuracy, test split, last epoch; **div**: diverged by the fixed rule):",
        per_seed_table(out, headline + variants, study.SEEDS, "test"),
        "NRCA's mean clean confidence I of the open samples, first epoch → last epoch (share of open samples with "
        "I~ > I over all steps), per seed:",
        confidence_table(out, [c for c in headline + variants if c[1].method == "nrca"], study.SEEDS),
        "Post hoc (defined after reading NRCA's captions): test captions with any word of a fabricated detail:",
        detail_word_table(out, headline + variants, study.SEEDS),
        "## Per-epoch validation scores (Fig. 1 on the testbed), mean ± std over seeds",
        curve_table(out, headline, study.SEEDS),
        "Epoch-to-epoch movement within a run (mean |change| / mean level, runs that did not diverge):",
        swing_table(out, headline, study.SEEDS),
        "## 2. Stability map (validation split, last epoch, seeds 0-4)",
        map_table(out),
        "## 4. Equal tuning budget (selection on validation seeds 0-1; test seeds 0-4 for the paper's and the "
        "chosen setting)",
        budget_table(out),
        "## Where the time goes",
        timing(out),
    ]
    report = "\n\n".join(sections) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(report)
    plot_curves(out, headline, study.SEEDS)
    print(report)
    return report
