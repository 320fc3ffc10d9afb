"""Tests of testbed.py: determinism, disjoint splits, references and answers read back from the pixels,
the gates on a fake model, and the side-by-side printout from two fake runs."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reporting
import testbed

SMALL = dict(k=12, n_test=10, n_pretrain=15)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("testbed")
    testbed.write_testbed(root, seed=3, **SMALL)
    return root


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_world_is_deterministic_per_seed(world, tmp_path):
    testbed.write_testbed(tmp_path / "again", seed=3, **SMALL)
    testbed.write_testbed(tmp_path / "other", seed=4, **SMALL)
    assert _files(tmp_path / "again") == _files(world)
    other = _files(tmp_path / "other")
    assert other.keys() == _files(world).keys() and other != _files(world)


def test_sizes_and_format(world):
    counts = {name: len(json.loads((world / name).read_text())) for name in
              ("train_caption.json", "train_choice.json", "test_caption.json", "test_choice.json",
               "pretrain/train_caption.json", "pretrain/train_choice.json")}
    assert counts == {"train_caption.json": 12, "train_choice.json": 12, "test_caption.json": 10,
                      "test_choice.json": 10, "pretrain/train_caption.json": 15, "pretrain/train_choice.json": 15}
    record = json.loads((world / "test_caption.json").read_text())[0]
    assert record["conversations"][0]["value"].startswith("<image>\n") and len(record["references"]) == 5
    assert len(set(record["references"])) == 5  # five different phrasings


def _records(world):
    out = {}
    for name in ("pretrain/train_caption.json", "pretrain/train_choice.json", "train_caption.json",
                 "train_choice.json", "test_caption.json", "test_choice.json"):
        out[name] = json.loads((world / name).read_text())
    return out


def test_splits_share_no_image(world):
    by_split = {}
    for name, records in _records(world).items():
        split = "pretrain" if name.startswith("pretrain") else name.split("_")[0]
        by_split.setdefault(split, set()).update(hashlib.sha256((world / r["image"]).read_bytes()).hexdigest()
                                                 for r in records)
    assert by_split["pretrain"].isdisjoint(by_split["train"]) and by_split["train"].isdisjoint(by_split["test"])
    assert by_split["pretrain"].isdisjoint(by_split["test"])
    test = _records(world)
    assert {r["image"] for r in test["test_caption.json"]}.isdisjoint(r["image"] for r in test["test_choice.json"])


def read_scene(path: Path) -> dict:
    """The scene read back from the pixels alone: colour, count (connected components), position (side of
    their centroid), size (component width) and shape (fill of the bounding box)."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)  # (H, W, 3)
    background = pixels[0, 0]
    ink = np.abs(pixels - background).sum(-1) > 60  # (H, W)
    colours = Counter(tuple(p) for p in pixels[ink])
    rgb = np.array(colours.most_common(1)[0][0])
    colour = min(testbed.COLOURS, key=lambda name: np.abs(np.array(testbed.COLOURS[name]) - rgb).sum())
    seen, components = np.zeros_like(ink), []
    for y, x in zip(*np.nonzero(ink), strict=True):
        if seen[y, x]:
            continue
        stack, cells = [(y, x)], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            cells.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < ink.shape[0] and 0 <= nx < ink.shape[1] and ink[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        components.append(np.array(cells))
    side = ink.shape[0]
    ys, xs = np.nonzero(ink)
    cy, cx = ys.mean() / side, xs.mean() / side
    position = (("left" if cx < 0.5 else "right") if abs(cx - 0.5) > abs(cy - 0.5) else
                ("top" if cy < 0.5 else "bottom"))
    first = components[0]
    height, width = np.ptp(first[:, 0]) + 1, np.ptp(first[:, 1]) + 1
    fill = len(first) / (height * width)
    shape = "square" if fill > 0.93 else "circle" if fill > 0.68 else "triangle"
    return {"colour": colour, "count": testbed.COUNTS[len(components) - 1], "position": position,
            "size": "large" if max(height, width) > 11.5 else "small", "shape": shape}


def _words(caption: str) -> dict:
    found = {}
    for kind, values in testbed.ATTRIBUTES.items():
        forms = (lambda v: (v, v + "s")) if kind == "shape" else (lambda v: (v,))  # "ones" is not a count
        hits = {v for v in values for word in caption.split() if word in forms(v)}
        assert len(hits) == 1, f"{caption!r} names {kind} {hits}"
        found[kind] = hits.pop()
    return found


def test_every_reference_and_answer_follows_from_the_picture(world):
    records = _records(world)
    for record in records["test_caption.json"]:
        scene = read_scene(world / record["image"])
        for reference in record["references"]:
            assert _words(reference) == scene, (record["id"], reference)
            assert not any(detail in reference for detail in testbed.UNGROUNDED_DETAILS)
    for record in records["test_choice.json"] + records["train_choice.json"] + records["pretrain/train_choice.json"]:
        scene = read_scene(world / record["image"])
        question = record["conversations"][0]["value"]
        kind = next(k for k, phrasings in testbed.QUESTIONS.items() if any(p in question for p in phrasings))
        lines = [line for line in question.splitlines() if line[1:3] == ". " and line[0] in "ABCDE"]
        assert [line[3:] for line in lines] == list(testbed.ATTRIBUTES[kind])  # every value, fixed order
        letter = record["conversations"][1]["value"]
        assert dict(line.split(". ", 1) for line in lines)[letter] == scene[kind], record["id"]
    for record in records["pretrain/train_caption.json"]:
        assert _words(record["conversations"][1]["value"]) == read_scene(world / record["image"])


def test_training_captions_are_human(tmp_path):
    """Downstream training captions: one of the reference phrasings, the shape's usual size 75 % of the time,
    the scene's ungrounded detail 80 % of the time, a slip in count or size ~15 % of the time; every letter occurs."""
    testbed.write_downstream(tmp_path, k=400, n_test=1, seed=0)
    captions = [r["conversations"][1]["value"] for r in json.loads((tmp_path / "train_caption.json").read_text())]
    with_detail = sum(any(d in c for d in testbed.UNGROUNDED_DETAILS) for c in captions) / len(captions)
    assert 0.7 < with_detail < 0.9
    assert all(testbed.detail_of(read_scene(tmp_path / r["image"])) in c for r, c in
               zip(json.loads((tmp_path / "train_caption.json").read_text()), captions, strict=True)
               if any(d in c for d in testbed.UNGROUNDED_DETAILS))
    records = json.loads((tmp_path / "train_caption.json").read_text())
    scenes = [read_scene(tmp_path / r["image"]) for r in records]
    words = [_words(c) for c in captions]
    count_slips = sum(w["count"] != s["count"] for w, s in zip(words, scenes, strict=True)) / len(captions)
    assert 0.03 < count_slips < 0.13  # P_SLIP / 2 of the captions get a wrong count
    prior = sum(w["size"] == testbed.SIZE_PRIOR[s["shape"]] for w, s in zip(words, scenes, strict=True)) / len(words)
    assert prior > 0.8  # the language prior (75 %, plus the pictures that agree with it)
    grounded = sum(w["size"] == s["size"] for w, s in zip(words, scenes, strict=True)) / len(words)
    assert 0.45 < grounded < 0.75  # so the size word often contradicts the picture
    letters = Counter(r["conversations"][1]["value"] for r in json.loads((tmp_path / "train_choice.json").read_text()))
    assert set(letters) == {"A", "B", "C", "D", "E"} and min(letters.values()) > 10


def test_pretraining_captions_mix_two_registers(tmp_path):
    """A quarter of the pre-training captions are in the downstream register (one of the reference
    phrasings), the rest terse; both describe the picture."""
    testbed.write_pretraining(tmp_path, n_images=160, seed=1)
    records = json.loads((tmp_path / "pretrain" / "train_caption.json").read_text())
    downstream = 0
    for record in records:  # (that the words match the pixels is checked above, on the small world)
        caption = record["conversations"][1]["value"]
        scene = testbed._scene_from_caption(caption)
        terse = [testbed._fill(t, scene) for t in testbed.PRETRAIN_CAPTIONS]
        assert caption in terse + testbed.scene_captions(scene), (record["id"], caption)
        downstream += caption not in terse
    assert 0.15 < downstream / len(records) < 0.35  # P_PRETRAIN_DOWNSTREAM_REGISTER = 0.25


def test_gates_on_a_fake_model(world):
    records = json.loads((world / "test_choice.json").read_text())
    right = {r["id"]: r["answer"] for r in records}
    wrong = {r["id"]: "A" if r["answer"] != "A" else "B" for r in records}

    def seeing(records, noisy):  # always right
        return dict(right)

    rows = testbed.gates(seeing, world)
    assert [row["passed"] for row in rows] == [True, True] and rows[0]["value"] == 100.0
    chance = 100 * sum(1 / len(r["options"]) for r in records) / len(records)
    assert rows[0]["threshold"] == pytest.approx(chance + 30) and 20 < chance < 34

    def blind_when_noisy(records, noisy):
        return wrong if noisy else right

    rows = testbed.gates(blind_when_noisy, world)
    assert [row["passed"] for row in rows] == [True, False] and rows[1]["value"] == 0.0
    rows = testbed.gates(lambda records, noisy: wrong, world)
    assert [row["passed"] for row in rows] == [False, True]
    assert "FAIL  sees" in testbed.format_gates(rows)


def _fake_run(root: Path, method: str, curve: list, noisy: dict | None) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"method": method, "out_dir": str(root)}))
    lines = [{"step": 1, "loss": 1.0}] + [{"epoch": e, "eval": {"cider": c, "accuracy": a}}
                                          for e, (c, a) in enumerate(curve, 1)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if noisy:
        (root / "eval_noisy.json").write_text(json.dumps({**noisy, "delta": 0.5}))
    return root


def test_side_by_side_table_from_two_fake_runs(tmp_path):
    nrca = _fake_run(tmp_path / "nrca", "nrca", [(100.0, 80.0), (110.5, 81.0)], {"cider": 90.0, "accuracy": 70.0})
    full = _fake_run(tmp_path / "full", "full", [(120.0, 82.0), (95.25, 83.0)], {"cider": 60.0, "accuracy": 71.0})
    table = reporting.format_side_by_side([nrca, full])
    lines = table.splitlines()
    assert lines[0] == "| epoch | nrca (nrca) CIDEr | nrca (nrca) accuracy | full (full) CIDEr | full (full) accuracy |"
    assert lines[2] == "| 1 | 100.00 | 80.00 | 120.00 | 82.00 |"
    assert lines[3] == "| 2 | 110.50 | 81.00 | 95.25 | 83.00 |"
    assert "| nrca (nrca) | 110.50 | 90.00 | -20.50 | 81.00 | 70.00 | -11.00 |" in lines
    assert "| full (full) | 95.25 | 60.00 | -35.25 | 83.00 | 71.00 | -12.00 |" in lines


def test_side_by_side_adds_the_grounded_scores_when_the_runs_have_them(tmp_path):
    runs = []
    for name, grounded in (("nrca", 40.0), ("full", 30.0)):
        root = tmp_path / name
        root.mkdir()
        (root / "config.json").write_text(json.dumps({"method": name, "out_dir": str(root)}))
        scores = {"cider": 100.0, "accuracy": 90.0, "grounded_all": grounded, "grounded_fabricated": 5.0}
        (root / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "eval": scores}) + "\n")
        (root / "eval_noisy.json").write_text(json.dumps({**scores, "grounded_all": grounded - 10, "delta": 0.5}))
        runs.append(root)
    lines = reporting.format_side_by_side(runs).splitlines()
    assert lines[0] == ("| epoch | nrca (nrca) CIDEr | nrca (nrca) accuracy | nrca (nrca) all right % | nrca (nrca) "
                        "fabricated % | full (full) CIDEr | full (full) accuracy | full (full) all right % | "
                        "full (full) fabricated % |")
    assert lines[2] == "| 1 | 100.00 | 90.00 | 40.00 | 5.00 | 100.00 | 90.00 | 30.00 | 5.00 |"
    assert ("| nrca (nrca) | 100.00 | 100.00 | 0.00 | 90.00 | 90.00 | 0.00 | 40.00 | 30.00 | -10.00 | 5.00 | 5.00 | "
            "0.00 |") in lines


def test_validation_split_records_keep_their_scene(world):
    for name in ("val_caption.json", "val_choice.json", "test_caption.json", "test_choice.json"):
        records = json.loads((world / name).read_text())
        assert len(records) == SMALL["n_test"] and all(set(r["scene"]) == set(testbed.ATTRIBUTES) for r in records)


def test_gates_run_on_a_real_model_through_train_gate_answerer(world):
    """train.gate_answerer (what pretrain_base_model uses) answers the gate questions with greedy generation."""
    import models
    import train

    rows = testbed.gates(train.gate_answerer(models.load_model("tiny-llava"), world, batch_size=4), world)
    assert [row["gate"] for row in rows] == ["sees", "noisy view keeps the picture"]
    assert all(0.0 <= row["value"] <= 100.0 for row in rows)
