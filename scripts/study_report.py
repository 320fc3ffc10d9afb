"""Every table of the two testbed studies, computed from their committed raw results alone (results/*.jsonl: one
JSON line per run, written by `testbed_study.py collect` and `gap_study.py collect`), so that every figure in the
README can be recomputed from the repository without running anything:

    python scripts/study_report.py                      # -> runs/study_report/report.md (+ fig1_val_curves.png)
    python scripts/study_report.py --results results --out runs/study_report

The rules (divergence, paired bootstrap, the gap study's premise and verdicts) are the pre-registered ones of
scripts/testbed_study.py and scripts/gap_study.py, imported from there (one direction: this file imports them,
they never import it). Runs not in the files are left out, and a table says how many seeds it has.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gap_study  # noqa: E402
import testbed_study as study  # noqa: E402
from testbed_study import REPO  # noqa: E402

METRICS = (("cider", "CIDEr"), ("accuracy", "accuracy"), ("grounded_all", "all attributes right %"),
           ("grounded_fabricated", "fabricated detail %"), ("grounded_detail_word", "a detail's word %"))
PAIRED = (("grounded_all", "all right"), ("grounded_fabricated", "fabricated"), ("accuracy", "accuracy"),
          ("cider", "CIDEr"))


def load(path: Path) -> list[dict]:
    """The JSON lines of one results file ([] when absent); a bad line is named."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number}: not JSON ({error})") from None
            if not isinstance(record, dict) or "arm" not in record or "seed" not in record:
                raise ValueError(f"{path} line {number}: not a run's record (a JSON object with 'arm' and 'seed', "
                                 "as `collect` writes)")
            records.append(record)
    return records


def by_seed(records: list[dict], arm: str) -> dict[int, dict]:
    return {r["seed"]: r for r in records if r["arm"] == arm}


def final(record: dict, split: str = "test") -> dict:
    return record.get(f"{split}_final") or {}


def mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f}"


def scored(record: dict, split: str) -> bool:
    """A run with scores on the split (a non-finite run has none, a base that missed its gate neither)."""
    result = final(record, split)
    return bool(result) and "nonfinite" not in result


def paired(found: dict[int, dict], reference: dict[int, dict], key: str, split: str = "test"):
    """Per-seed difference found - reference on `key` over the seeds both scored: (mean, low, high, n) or None."""
    common = [s for s in found if s in reference and scored(found[s], split) and scored(reference[s], split)
              and final(found[s], split).get(key) is not None and final(reference[s], split).get(key) is not None]
    if len(common) < 2:
        return None
    mean, low, high = study.paired_bootstrap([final(found[s], split)[key] for s in common],
                                             [final(reference[s], split)[key] for s in common])
    return mean, low, high, len(common)


def interval(result) -> str:
    return "–" if result is None else f"{result[0]:+.1f} [{result[1]:+.1f}, {result[2]:+.1f}]"


def diverged_count(found: dict[int, dict]) -> str:
    judged = [r for r in found.values() if r.get("diverged") is not None]
    return f"{sum(r['diverged'] for r in judged)}/{len(judged)}"


def arm_table(rows: list[tuple[str, dict, dict]], split: str = "test") -> str:
    """rows: (label, {seed: record}, {seed: reference record}, or {} for none: the reference row itself). Mean ± std
    of each score, the divergence count and the paired difference against the reference (95 % bootstrap)."""
    lines = ["| arm | seeds | diverged | " + " | ".join(label for _, label in METRICS) + " | "
             + " | ".join(f"Δ {label} vs Full FT [95 % CI]" for _, label in PAIRED) + " |",
             "|---|---:|---:|" + "---:|" * (len(METRICS) + len(PAIRED))]
    for label, found, reference in rows:
        if not found:
            continue
        values = [r for r in found.values() if scored(r, split)]
        cells = [mean_std(final(r, split).get(key) for r in values) for key, _ in METRICS]
        pairs = [interval(paired(found, reference, key, split)) if reference else "–" for key, _ in PAIRED]
        lines.append(f"| {label} | {len(found)} | {diverged_count(found)} | " + " | ".join(cells + pairs) + " |")
    return "\n".join(lines)


def seed_cell(record: dict | None, split: str = "test") -> str:
    if record is None:
        return "–"
    result = final(record, split)
    if "nonfinite" in result:
        return "non-finite loss **div**"
    if not result:
        return "no scores"
    text = " / ".join("?" if result.get(k) is None else f"{result[k]:.0f}" for k in ("cider", "grounded_all",
                                                                                       "accuracy"))
    return text + (" **div**" if record.get("diverged") else "")


def per_seed_table(rows: list[tuple[str, dict]], seeds, split: str = "test") -> str:
    """Every seed's last-epoch CIDEr / all-right / accuracy, a diverged run marked: nothing hides in a mean."""
    lines = ["| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    for label, found in rows:
        if found:
            lines.append(f"| {label} | " + " | ".join(seed_cell(found.get(s), split) for s in seeds) + " |")
    return "\n".join(lines)


def confidence_row(found: dict[int, dict], seeds) -> list[str]:
    """Per seed: NRCA's mean clean confidence I of the open samples, first epoch → last (the mean share of open
    samples with I~ > I over the epochs)."""
    row = []
    for seed in seeds:
        epochs = found[seed].get("training", []) if seed in found else []
        if not epochs or "confidence" not in epochs[0]:
            row.append("–")
            continue
        above = statistics.fmean(e["noisy_above_clean"] for e in epochs)
        row.append(f"{epochs[0]['confidence']:.2f} → {epochs[-1]['confidence']:.2f} ({above:.2f})")
    return row


def confidence_table(rows: list[tuple[str, dict]], seeds) -> str:
    lines = ["| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    for label, found in rows:
        row = confidence_row(found, seeds)
        if any(cell != "–" for cell in row):
            lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def curve_table(rows: list[tuple[str, dict]]) -> str:
    """Per-epoch validation scores, mean ± std over seeds."""
    epochs = range(1, max((len(r["val_per_epoch"]) for _, found in rows for r in found.values()), default=0) + 1)
    if not epochs:
        return "(no per-epoch evaluation)"
    lines = ["| arm | metric | " + " | ".join(f"epoch {e}" for e in epochs) + " |", "|---|---|" + "---:|" * len(epochs)]
    for label, found in rows:
        for key, name in METRICS:
            lines.append(f"| {label} | {name} | " + " | ".join(
                mean_std(r["val_per_epoch"][e - 1].get(key) for r in found.values() if len(r["val_per_epoch"]) >= e)
                for e in epochs) + " |")
    return "\n".join(lines)


def swing_table(rows: list[tuple[str, dict]]) -> str:
    """How much each metric moves from one epoch to the next within a run (mean over runs that did not diverge of
    the mean absolute change, as a share of the metric's mean): the phrasing lottery, measured."""
    keys = METRICS[:3]
    lines = ["| arm | " + " | ".join(label for _, label in keys) + " |", "|---|---:|---:|---:|"]
    for label, found in rows:
        shares = {key: [] for key, _ in keys}
        for record in found.values():
            points = record["val_per_epoch"]
            if len(points) < 2 or record.get("diverged"):
                continue
            for key in shares:
                values = [p.get(key) for p in points]
                if None not in values and statistics.fmean(values) > 0:
                    shares[key].append(statistics.fmean(abs(b - a) for a, b in pairwise(values))
                                       / statistics.fmean(values))
        if any(shares.values()):
            lines.append(f"| {label} | " + " | ".join(
                f"{100 * statistics.fmean(v):.1f} %" if v else "–" for v in shares.values()) + " |")
    return "\n".join(lines)


def timing(records: list[dict]) -> str:
    """Where the time went: each base's two stages, and per arm kind the wall seconds of a run."""
    bases = {}
    for r in records:
        if r.get("base", {}).get("seconds"):
            bases[(r["seed"], r.get("base_noise_max_delta"))] = r["base"]["seconds"]
    lines = []
    if bases:
        lines.append(f"base models ({len(bases)}, 1 thread): stage 1 (vision tower alone) "
                     f"{mean_std(b.get('vision_tower') for b in bases.values())} s, stage 2 (every part) "
                     f"{mean_std(b.get('pretraining') for b in bases.values())} s")
    for method in ("full", "nrca"):
        mine = [r for r in records if r.get("method") == method and r.get("train_seconds") is not None]
        if mine:
            lines.append(f"{method}: optimizer steps {mean_std(r['train_seconds'] for r in mine)} s, per-epoch "
                         f"evaluations {mean_std(r.get('eval_seconds') for r in mine)} s per run ({len(mine)} runs, "
                         "1 thread)")
    walls = [r["seconds"] for r in records if r.get("seconds") is not None]
    if walls:
        lines.append(f"{len(walls)} runs timed, wall per run (training, evaluations, loads; a base's first run builds "
                     f"it): {mean_std(walls)} s; {sum(walls) / 3600:.2f} process-hours, 2 processes side by side")
    return "\n".join(f"- {line}" for line in lines)


# ---------------------------------------------------------------------------------------------------------------
# The first study (scripts/testbed_study.py): what its committed raw results hold


def first_study(records: list[dict]) -> list[str]:
    if not records:
        return ["## First study: no raw results"]
    seeds = sorted({r["seed"] for r in records})
    full, nrca = by_seed(records, study.FULL.name), by_seed(records, study.NRCA.name)
    variants = [(f"NRCA, {v} (beyond the paper)", by_seed(records, study.cell("nrca", lam=2.0,
                                                                             nrca_alignment=v).name))
                for v in study.VARIANTS]
    headline = [("Full FT", full), ("NRCA", nrca)] + [v for v in variants if v[1]]
    others = sorted({r["arm"] for r in records} - {study.FULL.name, study.NRCA.name}
                    - {study.cell("nrca", lam=2.0, nrca_alignment=v).name for v in study.VARIANTS})
    sections = [
        f"## First study, part 1: Full FT vs NRCA at the paper's settings (test split, last epoch, seeds "
        f"{seeds[0]}-{seeds[-1]})" if seeds else "## First study: no raw results",
        arm_table([(label, found, {} if label == "Full FT" else full) for label, found in headline]),
        "Per seed (CIDEr / all right % / accuracy; **div**: diverged by the fixed rule):",
        per_seed_table(headline, seeds),
        "NRCA's mean clean confidence I of the open samples, first epoch → last (mean share of open samples with "
        "I~ > I):",
        confidence_table([row for row in headline if row[0] != "Full FT"], seeds),
        "Per-epoch validation scores (Fig. 1 on the testbed), mean ± std over seeds:",
        curve_table(headline[:2]),
        "Epoch-to-epoch movement within a run (mean |change| / mean level, runs that did not diverge):",
        swing_table(headline[:2]),
    ]
    if others:
        sections += ["Other arms of the first study in the raw results (their part's split, last epoch):",
                     arm_table([(arm, by_seed(records, arm), {}) for arm in others],
                               split="val")]
    return sections


# ---------------------------------------------------------------------------------------------------------------
# The gap study (scripts/gap_study.py): its pre-registered tables and verdicts


def gap_of(record: dict, delta: float) -> dict:
    return record.get("base", {}).get("gap", {}).get(f"{delta:g}") or {}


def premise_met(record: dict) -> bool | None:
    """Does the run's base meet Appendix C's premise at the run's delta (share above <= PREMISE_SHARE)?"""
    row = gap_of(record, record.get("delta") or 0.5)
    share = row.get("share_noisy_above_clean")
    return None if share is None else share <= gap_study.PREMISE_SHARE


def fisher_two_sided(a: int, b: int, c: int, d: int) -> float:
    """Fisher's exact test on [[a, b], [c, d]]: the probability, with the margins fixed, of a table as or less
    likely than this one (hypergeometric)."""
    row1, col1, n = a + b, a + c, a + b + c + d

    def p(x):
        return math.comb(col1, x) * math.comb(n - col1, row1 - x) / math.comb(n, row1)

    observed = p(a)
    return min(1.0, sum(p(x) for x in range(max(0, row1 + col1 - n), min(row1, col1) + 1)
                        if p(x) <= observed * (1 + 1e-9)))


def base_table(records: list[dict]) -> str:
    """H1: per dial, the bases' gates and their confidence gap at each delta, mean ± std over seeds."""
    lines = ["| base dial D | bases | accuracy clean % | accuracy at delta 0.5 % | "
             + " | ".join(f"I / I~ / share I~ > I at delta {d:g}" for d in gap_study.GAP_DELTAS) + " |",
             "|---:|---:|---:|---:|" + "---|" * len(gap_study.GAP_DELTAS)]
    for dial in gap_study.DIALS:
        bases = {r["seed"]: r for r in records if r.get("dial") == dial and r.get("base", {}).get("gap")}
        if not bases:
            continue
        gates = [r["base"]["gates"] for r in bases.values()]
        cells = []
        for delta in gap_study.GAP_DELTAS:
            rows = [gap_of(r, delta) for r in bases.values()]

            def stat(key, rows=rows):
                values = [row[key] for row in rows if row.get(key) is not None]
                return f"{statistics.fmean(values):.3f}" if values else "–"
            shares = [row["share_noisy_above_clean"] for row in rows if row.get("share_noisy_above_clean") is not None]
            cells.append(f"{stat('clean_confidence')} / {stat('noisy_confidence')} / "
                         f"{statistics.fmean(shares):.2f} ± {statistics.stdev(shares) if len(shares) > 1 else 0:.2f}")
        lines.append(f"| {dial:g} | {len(bases)} | {mean_std(g['sees']['value'] for g in gates)} | "
                     f"{mean_std(g['noisy view keeps the picture']['value'] for g in gates)} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def mean_share(records: list[dict], dial: float, delta: float = 0.5) -> float | None:
    shares = {r["seed"]: gap_of(r, delta).get("share_noisy_above_clean") for r in records if r.get("dial") == dial}
    values = [v for v in shares.values() if v is not None]
    return statistics.fmean(values) if values else None


def verdict_h1(records: list[dict]) -> str:
    means = [mean_share(records, dial) for dial in gap_study.DIALS]
    if None in means:
        return "H1: not all dials measured"
    holds = all(a < b for a, b in pairwise(means))
    return ("H1 (the dial moves the gap): mean share above at delta 0.5 = "
            + ", ".join(f"{m:.2f} (D = {d:g})" for d, m in zip(gap_study.DIALS, means, strict=True))
            + f": {'holds' if holds else 'does not hold'} (needs D = 0 < 0.3 < 0.6).")


def paper_runs(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("method") == "nrca" and r.get("nrca_alignment") == "paper"
            and not r.get("base_gate_failed") and r.get("diverged") is not None]


def verdict_h2(records: list[dict]) -> tuple[str, str]:
    runs = [r for r in paper_runs(records) if premise_met(r) is not None]
    met = [r for r in runs if premise_met(r)]
    broken = [r for r in runs if not premise_met(r)]
    d_met, d_broken = sum(r["diverged"] for r in met), sum(r["diverged"] for r in broken)
    table = ["| NRCA (Eq. 5b) arm | runs | mean share above at its delta | premise met in | diverged |",
             "|---|---:|---:|---:|---:|"]
    for arm in sorted({r["arm"] for r in runs}):
        mine = [r for r in runs if r["arm"] == arm]
        share = statistics.fmean(gap_of(r, r["delta"])["share_noisy_above_clean"] for r in mine)
        table.append(f"| {arm} | {len(mine)} | {share:.2f} | {sum(premise_met(r) for r in mine)}/{len(mine)} | "
                     f"{sum(r['diverged'] for r in mine)}/{len(mine)} |")
    if len(met) < 5 or len(broken) < 5:
        verdict = (f"H2 (divergence follows the gap): untestable: {len(met)} runs meet the premise, {len(broken)} "
                   f"do not (each group needs >= 5); diverged {d_met}/{len(met)} and {d_broken}/{len(broken)}.")
    else:
        rate_met, rate_broken = d_met / len(met), d_broken / len(broken)
        p = fisher_two_sided(d_met, len(met) - d_met, d_broken, len(broken) - d_broken)
        supported = rate_met <= rate_broken / 2
        verdict = (f"H2 (divergence follows the gap): premise met: {d_met}/{len(met)} diverged "
                   f"({100 * rate_met:.0f} %); premise broken: {d_broken}/{len(broken)} ({100 * rate_broken:.0f} %); "
                   f"Fisher's exact p = {p:.3g}: {'supported' if supported else 'not supported'} (needs the first "
                   "rate at most half the second).")
    return verdict, "\n".join(table)


def verdict_h3(records: list[dict]) -> str:
    parts = []
    holds = True
    for dial in gap_study.DIALS:
        mine = [r for r in records if r.get("dial") == dial and r.get("nrca_alignment") == "hinge"
                and r.get("diverged") is not None]
        if not mine:
            return "H3: not all dials have hinge runs"
        n = sum(r["diverged"] for r in mine)
        holds &= n <= 1
        parts.append(f"{n}/{len(mine)} at D = {dial:g}")
    return f"H3 (the hinge is stable): diverged {', '.join(parts)}: {'holds' if holds else 'does not hold'} " \
           "(needs at most 1 of 10 at every D)."


def verdict_h4(records: list[dict]) -> tuple[str, int | None]:
    shares = {dial: mean_share(records, dial) for dial in gap_study.DIALS}
    if None in shares.values():
        return "H4: not all dials measured", None
    dial = min(shares, key=shares.get)
    full = by_seed(records, f"base{dial:g}_{study.FULL.name}")
    lines = [f"H4 (where the premise holds, does NRCA help?): the premise dial is D = {dial:g} (lowest mean share "
             f"above at delta 0.5, {shares[dial]:.2f}, from the base measurements alone)."]
    for label, arm in (("NRCA (Eq. 5b)", study.NRCA.name), ("NRCA hinge", study.NRCA.name + "_hinge")):
        found = by_seed(records, f"base{dial:g}_{arm}")
        fabricated, grounded = paired(found, full, "grounded_fabricated"), paired(found, full, "grounded_all")
        if fabricated is None or grounded is None:
            lines.append(f"- {label}: fewer than 2 paired seeds")
            continue
        reading = ["reduces fabrication" if fabricated[2] < 0 else "does not reduce fabrication",
                   "keeps grounding" if grounded[1] > -5 else "does not keep grounding"]
        if grounded[1] > 0:
            reading.append("improves grounding")
        if grounded[2] < 0:
            reading.append("loses grounding")
        lines.append(f"- {label}: fabricated {interval(fabricated)}, all right {interval(grounded)} (paired vs Full "
                     f"FT, {grounded[3]} seeds): {', '.join(reading)}.")
    return "\n".join(lines), dial


def gap_study_sections(records: list[dict]) -> list[str]:
    if not records:
        return ["## Gap study: no raw results"]
    seeds = sorted({r["seed"] for r in records})
    failed = sorted({(r["seed"], r.get("dial")) for r in records if r.get("base_gate_failed")})
    h2, h2_table = verdict_h2(records)
    h4, _ = verdict_h4(records)
    rows = []
    for _, dial, c in gap_study.arms():
        found = by_seed(records, c.name)
        full = {} if c.method == "full" else by_seed(records, f"base{dial:g}_{study.FULL.name}")
        rows.append((c.name.replace("_lr-1e-3", ""), found, full))
    return [
        f"## Gap study (seeds {seeds[0]}-{seeds[-1]}, {len(records)} runs)",
        "Bases that missed the 'sees' gate (left out): " + (", ".join(f"seed {s} D = {d:g}" for s, d in failed)
                                                           if failed else "none"),
        "### The bases: gates (test split) and confidence gap on the 500 training captions (H1)",
        base_table(records),
        verdict_h1(records),
        "### Every arm (test split, last epoch; paired against Full FT on the same base)",
        arm_table(rows),
        "### H2: NRCA's divergence and the premise",
        h2_table,
        h2,
        "### H3",
        verdict_h3(records),
        "### H4",
        h4,
        "### Per seed (CIDEr / all right % / accuracy, test split)",
        per_seed_table([(label, found) for label, found, _ in rows], seeds),
        "### NRCA's clean confidence during fine-tuning, first epoch → last (mean share I~ > I)",
        confidence_table([(label, found) for label, found, _ in rows if "nrca" in label], seeds),
        "### Where the time went",
        timing(records),
    ]


def instrument_table(data_dir: Path) -> str:
    """What CIDEr measures on the testbed, without any model: captions written from each test picture's scene in
    each of the five reference phrasings (every fact right), then the same with the scene's fabricated detail
    appended, then with the colour wrong."""
    import metrics
    import testbed

    testbed.ensure_world(data_dir, seed=0)
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


def plot_curves(records: list[dict], path: Path) -> None:
    """Fig. 1 on the testbed: every seed's validation curve of Full FT and NRCA (first study)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("cider", "CIDEr x100"), ("grounded_all", "all attributes right %"),
            ("grounded_fabricated", "fabricated detail %"), ("accuracy", "multiple choice accuracy %"))
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.3))
    arms = (("Full FT", study.FULL.name, "tab:blue"), ("NRCA", study.NRCA.name, "tab:orange"))
    for ax, (key, title) in zip(axes, keys, strict=True):
        for name, arm, colour in arms:
            for n, record in enumerate(by_seed(records, arm).values()):
                points = record["val_per_epoch"]
                ax.plot(range(1, len(points) + 1), [p.get(key) for p in points], color=colour, lw=0.8, alpha=0.6,
                        label=name if n == 0 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("validation split, one line per seed (first study, part 1)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: Path, out: Path, instrument: bool = True) -> str:
    """OUT/report.md (and OUT/fig1_val_curves.png with the first study's results), also printed. A --results folder
    holding neither study's file, or a --out that is a file, is named before anything is computed; a study whose
    file is missing has a section saying so."""
    paths = {name: results / name for name in (study.RESULTS.name, gap_study.RESULTS.name)}
    if not results.is_dir():
        raise FileNotFoundError(f"--results {results}: no such folder (the studies' raw results, "
                                f"{' and '.join(paths)}; default {REPO / 'results'})")
    if not any(path.is_file() for path in paths.values()):
        raise FileNotFoundError(f"--results {results}: holds neither {' nor '.join(paths)} (written by "
                                "`testbed_study.py collect` and `gap_study.py collect`)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file; expected a folder (report.md and fig1_val_curves.png go there)")
    first, second = (load(path) for path in paths.values())
    sections = []
    if instrument:
        sections += ["## The instrument: CIDEr of captions written from the scene (seed 0's test split, no model)",
                     instrument_table(REPO / "data" / "testbed-seed0")]
    for path, title, records, section in ((paths[study.RESULTS.name], "First study", first, first_study),
                                          (paths[gap_study.RESULTS.name], "Gap study", second, gap_study_sections)):
        sections += section(records) if path.is_file() else [f"## {title}: no raw results ({path} not found)"]
    report = "\n\n".join(sections) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report)
    if first:
        plot_curves(first, out / "fig1_val_curves.png")
    print(report)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(REPO / "results"), help="folder of the studies' JSON lines")
    parser.add_argument("--out", default=str(REPO / "runs" / "study_report"), help="where report.md goes")
    parser.add_argument("--no-instrument", action="store_true", help="skip the instrument table (it needs the "
                                                                     "seed-0 world and java for CIDEr)")
    args = parser.parse_args(argv)
    write_report(Path(args.results), Path(args.out), instrument=not args.no_instrument)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    import cli

    cli.run(main)
