"""Tests of evaluate.py: CIDEr against pycocoevalcap called directly, letter parsing, id checks, the
table and plot commands on fake run folders, and end-to-end evaluation of a tiny model (1 rank and 2
gloo ranks under torchrun). Needs java (PTBTokenizer), like the metric itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data
import evaluate
import metrics
import reporting

REPO = Path(__file__).resolve().parent.parent

# A hand-made caption set: three images with two or three references each.
REFERENCES = {
    "img1": ["A red circle in the top left corner.", "a red round shape at the top left",
             "There is a red circle, top left."],
    "img2": ["Two blue squares on a white background.", "a pair of blue squares"],
    "img3": ["A green triangle.", "one green triangle in the middle of the picture"],
}


def test_cider_equals_pycocoevalcap_called_directly():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    predictions = {"img1": "a red circle at the top left", "img2": "two blue squares.", "img3": "A yellow star!"}
    score, per_id = metrics.cider(predictions, REFERENCES)

    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": v}] for k, v in predictions.items()})
    expected, expected_per_image = Cider().compute_score(gts, res)
    assert score == pytest.approx(float(expected), rel=1e-12)
    for key, value in zip(gts.keys(), expected_per_image, strict=True):
        assert per_id[key] == pytest.approx(float(value), rel=1e-12)
    assert per_id["img3"] == 0.0  # no n-gram in common with its references


def test_perfect_caption_scores_higher_than_wrong():
    perfect = {k: v[0] for k, v in REFERENCES.items()}
    wrong = {"img1": "a dog on a sofa", "img2": "people walking in a park", "img3": "a plate of food"}
    high, _ = metrics.cider(perfect, REFERENCES)
    low, _ = metrics.cider(wrong, REFERENCES)
    assert high > 1.0 > 0.1 > low  # only the word "a" is shared


def test_references_keep_their_structure_and_order_does_not_matter():
    """Matched by id, not position; a comma inside a reference does not split it into two references."""
    predictions = {"img1": "there is a red circle , top left", "img2": "two squares", "img3": "a green triangle"}
    reordered_predictions = dict(reversed(list(predictions.items())))
    reordered_references = dict(reversed(list(REFERENCES.items())))
    a = metrics.caption_metrics(predictions, REFERENCES)
    b = metrics.caption_metrics(reordered_predictions, reordered_references)
    assert a == b
    split = {k: [part for ref in v for part in ref.split(",")] for k, v in REFERENCES.items()}
    assert metrics.cider(predictions, split)[0] != pytest.approx(a["cider"])
    assert 0 < a["bleu4"] <= 1 and 0 < a["rouge_l"] <= 1


def test_id_mismatch_and_empty_prediction_errors_name_the_ids():
    with pytest.raises(ValueError, match=r"without a prediction \['img3'\].*without references \['imgX'\]"):
        metrics.cider({"img1": "a", "img2": "b", "imgX": "c"}, REFERENCES)
    with pytest.raises(ValueError, match="empty prediction for id 'img2'"):
        metrics.cider({"img1": "a red circle", "img2": "  ", "img3": "a triangle"}, REFERENCES)
    with pytest.raises(ValueError, match="references of id 'img1'"):
        metrics.cider({"img1": "a"}, {"img1": "a red circle"})  # a str, not a list of references
    # Generation may legitimately produce nothing: allow_empty scores it 0 and keeps it in the idf.
    score, per_id = metrics.cider({"img1": "a red circle in the top left corner", "img2": "", "img3": "x"},
                                   REFERENCES, allow_empty=True)
    assert per_id["img2"] == 0.0 and score > 0
    with pytest.raises(ValueError, match=r"without a prediction \['q2'\]"):
        metrics.choice_metrics({"q1": "A"}, {"q1": "A", "q2": "B"})


@pytest.mark.parametrize("text, n_options, expected", [
    ("B", 4, "B"), ("B.", 4, "B"), (" C \n", 4, "C"), ("(A)", 4, "A"), ("A)", 4, "A"),
    ("D. a red circle", 4, "D"), ("(C) blue", 4, "C"), ("C: blue", 4, "C"),
    ("The answer is B.", 4, "B"), ("the answer is (C)", 4, "C"), ("Answer: D", 4, "D"), ("Answer:B", 4, "B"),
    ("The correct answer is B because it is blue.", 4, "B"),
    ("b", 4, "B"), ("b.", 4, "B"), ("(d)", 4, "D"),  # a lone lower-case letter cannot be an article
    ("a dog", 4, None), ("A dog is sitting on a mat", 4, None),  # "A" as an article
    ("E", 4, None), ("E. a star", 4, None), ("The answer is E.", 4, None),  # beyond the options
    ("", 4, None), ("AB", 4, None), ("A, B", 4, None), ("I think it is B", 4, "B"), ("BLUE", 4, None),
    ("The answer is a dog.", 4, None), ("B.C", 4, None),
    ("A. B. C.", 4, "A"), ("A.", 1, "A"), ("Z", 26, "Z"),
])
def test_parse_choice(text, n_options, expected):
    assert metrics.parse_choice(text, n_options) == expected


# Model outputs with 4 options (A-D) and the letter each names; None = unparsable (counted wrong).
PARSE_TABLE = [
    # the forms LLaVA-style models write
    ("B", "B"), ("b", "B"), ("B.", "B"), ("(C)", "C"), ("D)", "D"), ("A: red", "A"), ("C. a blue square", "C"),
    ("The answer is B.", "B"), ("The answer is (D).", "D"), ("Answer: C", "C"), ("answer: (a)", "A"),
    ("The correct answer is A, the red circle.", "A"), ("the answer is c.", "C"), ("The answer is d", "D"),
    # markdown, leading phrases, explanations after the letter
    ("**B**", "B"), ("**B.** blue", "B"), ("The answer is **C**.", "C"), ("`A`", "A"), ("__D__", "D"),
    ("Option A", "A"), ("option (B)", "B"), ("Option C: green", "C"), ("Option D is correct.", "D"),
    ("I think B", "B"), ("I think B is right.", "B"), ("I think it is C.", "C"), ("I think the answer is (A)", "A"),
    ("B\n\nBecause the shape has four sides.", "B"), ("C.\nThe circle is green.", "C"), ("  A  \n", "A"),
    ("(B) blue\nIt is the only blue shape.", "B"), ("B\nThe answer is B.", "B"),
    ("The answer is B. The answer is B.", "B"),  # the same letter twice is one answer
    ("The correct option is D.", "D"), ("Answer:B", "B"), ("**A** or **B**? The answer is B.", "B"),
    # conflicting letters: unparsable
    ("The answer is A. The answer is B.", None), ("A. The answer is C.", None), ("B\n\nThe answer is D.", None),
    ("Answer: A\nAnswer: C", None), ("(A) red. The answer is (B).", None),
    ("I think A. The answer is B.", None), ("Option B. The correct answer is C.", None),
    # no letter, an article, a word, beyond the options
    ("", None), ("A dog is sitting on a mat.", None), ("a red circle", None), ("The answer is a dog.", None),
    ("I think A dog is there", None), ("BLUE", None), ("AB", None), ("A, B", None), ("B.C", None),
    ("The answer is E.", None), ("E", None), ("Option E", None), ("I don't know.", None),
    ("The picture shows a blue square.", None), ("It is the third one.", None), ("answer", None),
    ("The answer is Bob.", None),
]


def test_parse_choice_table():
    """At least 50 outputs: the forms of the issue (lower-case "the answer is c.", "**B**", "Option A",
    "I think B", "B\\n\\nBecause ..."), conflicting letters unparsable, articles and words not letters."""
    assert len(PARSE_TABLE) >= 50 and len({text for text, _ in PARSE_TABLE}) == len(PARSE_TABLE)
    wrong = [(text, metrics.parse_choice(text, 4), expected) for text, expected in PARSE_TABLE
             if metrics.parse_choice(text, 4) != expected]
    assert not wrong, "\n".join(f"{text!r}: got {got}, expected {expected}" for text, got, expected in wrong)


def test_test_records_are_single_turn():
    """Evaluation stays single-turn: a test record with a second exchange is an error naming it."""
    turns = [{"from": "human", "value": "<image>\nWhich?\nA. x\nB. y"}, {"from": "gpt", "value": "A"}]
    record = {"id": "q1", "image": "x.png", "answer": "A", "conversations": turns}
    assert evaluate.validate_test_records([record], "choice", "test.json")[0]["question"] == "Which?\nA. x\nB. y"
    with pytest.raises(ValueError, match=r"test.json record 0 \(id 'q1'\): 4 turns; evaluation is single-turn"):
        evaluate.validate_test_records([{**record, "conversations": turns * 2}], "choice", "test.json")


def test_parse_choice_rejects_bad_n_options():
    with pytest.raises(ValueError, match="n_options"):
        metrics.parse_choice("A", 0)


def test_option_text_match_and_choice_metrics():
    options = ["red", "blue circle", "green"]
    assert metrics.match_option_text(" Blue circle. ", options) == "B"
    assert metrics.match_option_text("red", ["red", "Red"]) is None  # ambiguous
    assert metrics.match_option_text("a blue circle", options) is None
    question = "What is it?\nA. red\nB. blue circle\nC. green\nAnswer with the option's letter."
    assert metrics.options_from_question(question) == options
    assert metrics.options_from_question("Q?\nOptions: (A) cat (B) dog food") == ["cat", "dog food"]
    scores = metrics.choice_metrics(
        {"q1": "B", "q2": "blue circle", "q3": "a dog", "q4": "The answer is C.", "q5": "D"},
        {"q1": "B", "q2": "B", "q3": "A", "q4": "A", "q5": "A"},
        {k: options for k in ("q1", "q2", "q3", "q4", "q5")})
    # q1 letter, q2 text match: correct; q3 unparsable; q4 wrong letter; q5 "D" is not among 3 options.
    assert scores["n_correct"] == 2 and scores["accuracy"] == pytest.approx(40.0)
    assert scores["n_unparsable"] == 2 and scores["n_option_text_matched"] == 1
    no_text = metrics.choice_metrics({"q2": "blue circle"}, {"q2": "B"}, {"q2": options}, match_text=False)
    assert no_text["n_correct"] == 0 and no_text["n_unparsable"] == 1


# ---------------------------------------------------------------------------------------------
# table / plot on fake run folders
# ---------------------------------------------------------------------------------------------
def _eval(cider, accuracy, caption="flickr30k", choice="scienceqa"):
    return {"cider": cider, "accuracy": accuracy, "avg": (cider + accuracy) / 2, "caption_dataset": caption,
            "choice_dataset": choice, "n_caption": 3, "n_choice": 3, "n_unparsable": 0}


def _fake_run(root: Path, name: str, method: str, curve: list[tuple[float, float]]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"method": method, "data_dir": "data/synthetic", "out_dir": str(run)}))
    lines = []
    for epoch, (cider, accuracy) in enumerate(curve, 1):
        lines.append({"step": 10 * epoch, "epoch": float(epoch), "loss": 1.0 / epoch})  # a training-step line
        lines.append({"epoch": epoch, "eval": _eval(cider, accuracy)})
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run / "eval.json").write_text(json.dumps(_eval(*curve[-1])))
    return run


def test_table_and_plot_commands_on_two_fake_runs(tmp_path, capsys):
    full_ft = _fake_run(tmp_path, "full_ft", "full_ft", [(70.0, 80.0), (66.0, 88.0), (63.11, 88.31)])
    nrca = _fake_run(tmp_path, "nrca", "nrca", [(72.0, 80.0), (74.0, 83.0), (75.49, 83.85)])
    zero = tmp_path / "zero"
    zero.mkdir()
    (zero / "eval.json").write_text(json.dumps(_eval(25.31, 69.57)))

    table = evaluate.main(["table", str(full_ft), str(nrca), "--zero-shot", str(zero)])
    assert capsys.readouterr().out.strip() == table
    lines = table.splitlines()
    assert lines[0] == "| Methods | flickr30k | scienceqa | AVG |"
    assert lines[2] == "| Zero-shot | 25.31 | 69.57 | 47.44 |"
    assert lines[3] == "| full_ft (full_ft) | 63.11 | **88.31** | 75.71 |"
    assert lines[4] == "| + vs zero-shot | + 37.80 | + 18.74 | + 28.27 |"
    assert lines[5] == "| nrca (nrca) | **75.49** | 83.85 | **79.67** |"
    assert lines[6] == "| + vs zero-shot | + 50.18 | + 14.28 | + 32.23 |"  # ~ the paper's LLaVA "+" row

    out = tmp_path / "figs" / "fig1.png"
    evaluate.main(["plot", str(full_ft), str(nrca), "--out", str(out), "--zero-shot", str(zero)])
    assert out.is_file() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_puts_dataset_pairs_side_by_side():
    table = reporting.format_table(
        [("nrca", _eval(76.0, 90.48)), ("nrca", _eval(122.27, 89.64, caption="coco"))],
        [_eval(55.45, 68.96), _eval(72.57, 68.96, caption="coco")])
    assert table.splitlines()[0] == "| Methods | flickr30k | scienceqa | AVG | coco | scienceqa | AVG |"
    assert "| + vs zero-shot | + 20.55 | + 21.52 | + 21.04 | + 49.70 | + 20.68 |" in table  # paper Table 4, VILA


def test_missing_things_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        evaluate.resolve_checkpoint(str(tmp_path / "does-not-exist"))
    run = _fake_run(tmp_path, "unfinished", "nrca", [(1.0, 2.0)])
    with pytest.raises(FileNotFoundError, match="no final/ model"):
        evaluate.resolve_checkpoint(str(run))
    with pytest.raises(FileNotFoundError, match="no per-epoch evals"):
        reporting.plot_curves([tmp_path], tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="test_caption.json"):
        evaluate.resolve_splits(tmp_path)


def test_table_and_plot_name_a_lost_epoch_evaluation(tmp_path, capsys):
    run = _fake_run(tmp_path, "nrca", "nrca", [(70.0, 80.0), (66.0, 88.0), (63.11, 88.31)])
    (run / "eval.json").unlink()
    (run / "config.json").write_text(json.dumps({"method": "nrca", "epochs": 4, "eval_every_epoch": True}))
    (run / "final").mkdir()  # finished: 4 epochs were trained
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(line for line in lines if '"epoch": 2, "eval"' not in line) + "\n")
    capsys.readouterr()
    evaluate.main(["plot", str(run), "--out", str(tmp_path / "fig1.png")])
    assert f"run {run} has no per-epoch evaluation for epoch(s) [2, 4]" in capsys.readouterr().err
    evaluate.main(["table", str(run)])  # the last evaluation (epoch 3) is not the final model's
    assert "for epoch(s) [2, 4]" in capsys.readouterr().err


def test_score_command_rejects_mismatched_reference_file(tmp_path):
    refs = [{"id": k, "image": f"{k}.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                             {"from": "gpt", "value": v[0]}], "references": v}
            for k, v in REFERENCES.items()]
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    good = [{"id": k, "prediction": v[0]} for k, v in REFERENCES.items()]
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(x) + "\n" for x in good))
    result = evaluate.main(["score", str(tmp_path / "good.jsonl"), str(tmp_path / "refs.json")])
    assert result["cider"] > 100
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(x) + "\n" for x in good[:2]))
    with pytest.raises(ValueError, match=r"without a prediction \['img3'\]"):
        evaluate.main(["score", str(tmp_path / "bad.jsonl"), str(tmp_path / "refs.json")])


def _score_files(tmp_path, predictions: list[str]) -> list[str]:
    refs = [{"id": k, "image": f"{k}.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                             {"from": "gpt", "value": v[0]}], "references": v}
            for k, v in REFERENCES.items()]
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    (tmp_path / "predictions.jsonl").write_text("".join(line + "\n" for line in predictions))
    return ["score", str(tmp_path / "predictions.jsonl"), str(tmp_path / "refs.json")]


def test_score_command_names_the_malformed_line(tmp_path):
    lines = [json.dumps({"id": k, "prediction": v[0]}) for k, v in REFERENCES.items()]
    argv = _score_files(tmp_path, [lines[0], '{"id": "img2", "prediction": "cut short', lines[2]])
    with pytest.raises(ValueError, match=r"predictions.jsonl line 2: not JSON \(Unterminated string"):
        evaluate.main(argv)
    argv = _score_files(tmp_path, [lines[0], '["img2", "a list"]', lines[2]])
    with pytest.raises(ValueError, match=r"predictions.jsonl line 2: needs 'id' and 'prediction'"):
        evaluate.main(argv)


def test_score_command_allow_empty(tmp_path):
    argv = _score_files(tmp_path, [json.dumps({"id": k, "prediction": "" if k == "img2" else v[0]})
                                   for k, v in REFERENCES.items()])
    with pytest.raises(ValueError, match=r"empty prediction for id 'img2'.*evaluate.py score --allow-empty"):
        evaluate.main(argv)
    result = evaluate.main(argv + ["--allow-empty"])  # the empty caption scores 0
    full = evaluate.main(_score_files(tmp_path, [json.dumps({"id": k, "prediction": v[0]})
                                                 for k, v in REFERENCES.items()]))
    assert 0 < result["cider"] < full["cider"]


def test_line_breaks_inside_captions_do_not_shift_captions_between_images():
    plain = {"img1": "a red circle top left", "img2": "two blue squares", "img3": "a green triangle"}
    broken = {"img1": "a red circle\ntop left", "img2": "two blue\u2028squares", "img3": "a green\r\ntriangle"}
    assert metrics.cider(broken, REFERENCES) == metrics.cider(plain, REFERENCES)


# ---------------------------------------------------------------------------------------------
# A tiny model end to end (generation through models.py / data.py)
# ---------------------------------------------------------------------------------------------
def _synthetic_test_split(root: Path, n: int = 5) -> Path:
    """data.py's synthetic set with n test images (one caption and one choice record each)."""
    import data

    data.make_synthetic(root, n_train=1, n_test=n, seed=1)
    return root


@pytest.fixture(scope="module")
def tiny_llava():
    import models

    return models.load_model("tiny-llava")


def test_tiny_model_end_to_end(tmp_path, tiny_llava):
    data_dir = _synthetic_test_split(tmp_path / "data")
    result = evaluate.evaluate_model(tiny_llava, data_dir, out_dir=tmp_path / "run", batch_size=3, max_new_tokens=6,
                                     attention=True)
    assert result["n_caption"] == 5 and result["n_choice"] == 5
    assert result["avg"] == pytest.approx((result["cider"] + result["accuracy"]) / 2)
    assert json.loads((tmp_path / "run" / "eval.json").read_text()) == result
    captions = [json.loads(line) for line in (tmp_path / "run" / "predictions_caption.jsonl").read_text().splitlines()]
    choices = [json.loads(line) for line in (tmp_path / "run" / "predictions_choice.jsonl").read_text().splitlines()]
    assert [c["id"] for c in captions] == [f"synthetic-test-{i:05d}-caption" for i in range(5)]
    assert all(set(c) >= {"id", "prompt", "prediction", "references"} for c in captions)
    assert all(set(c) >= {"id", "prompt", "prediction", "answer"} for c in choices)
    # The stored numbers are recomputed from the stored predictions.
    non_empty = {c["id"]: c["prediction"] for c in captions}
    references = {c["id"]: c["references"] for c in captions}
    score, _ = metrics.cider(non_empty, references, allow_empty=True)
    assert result["cider"] == pytest.approx(100 * score)
    assert result["n_correct"] == sum(c["correct"] for c in choices)
    assert result["n_unparsable"] == sum(c["letter"] is None for c in choices)
    # Table 1: shares of system / prompt / visual tokens sum to 1, for all and for the middle layers.
    for task in ("caption", "choice"):
        for span in ("all", "mid"):
            parts = [result[f"attention_{task}_{part}_{span}"] for part in evaluate.ATTENTION_PARTS]
            assert all(0 < p < 1 for p in parts) and sum(parts) == pytest.approx(1, abs=1e-5)

    noisy = evaluate.evaluate_model(tiny_llava, data_dir, out_dir=tmp_path / "run", batch_size=3, max_new_tokens=6,
                                    noisy=True, noise_seed=3, limit=2, attention=True)
    assert noisy["noisy"] and noisy["n_caption"] == 2
    assert (tmp_path / "run" / "eval_noisy.json").is_file() and (tmp_path / "run" / "eval.json").is_file()
    # The noisy inputs differ from the clean ones, so the first token's attention does too.
    assert noisy["attention_caption_visual_all"] != pytest.approx(result["attention_caption_visual_all"], abs=1e-7)


def test_missing_image_and_bad_records_are_named(tmp_path, tiny_llava):
    data_dir = _synthetic_test_split(tmp_path / "data", n=2)
    (data_dir / "images" / "test_00001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"test record 'synthetic-test-00001-caption' \(caption\): image "
                                                 r".*test_00001.png does not exist"):
        evaluate.evaluate_model(tiny_llava, data_dir, max_new_tokens=2)
    (data_dir / "images" / "test_00001.png").mkdir()
    with pytest.raises(data.DataError, match=r"test_00001.png is a folder, not an image file"):
        evaluate.evaluate_model(tiny_llava, data_dir, max_new_tokens=2)
    (data_dir / "images" / "test_00001.png").rmdir()
    records = json.loads((data_dir / "test_caption.json").read_text())
    records[1]["id"] = records[0]["id"]
    with pytest.raises(ValueError, match="duplicate id 'synthetic-test-00000-caption'"):
        evaluate.evaluate_model(tiny_llava, {"caption": records}, max_new_tokens=2)
    del records[0]["references"]
    with pytest.raises(ValueError, match="'references'"):
        evaluate.evaluate_model(tiny_llava, {"caption": records}, max_new_tokens=2)


def test_two_gloo_ranks_under_torchrun_equal_one_rank(tmp_path, tiny_llava):
    """`torchrun --nproc_per_node 2 evaluate.py` (CPU, gloo): rank r generates records r::2, rank 0 scores
    the gathered union. Same numbers and predictions as one process. Noisy inputs, so the per-record
    noise seed is checked too; batch size 1 so both runs feed each prompt unpadded."""
    data_dir = _synthetic_test_split(tmp_path / "data")
    args = ["tiny-llava", "--data", str(data_dir), "--batch-size", "1", "--max-new-tokens", "5", "--noisy"]
    one = evaluate.main(args + ["--out", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "evaluate.py"), *args, "--out", str(tmp_path / "two")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "eval_noisy.json").read_text())
    assert {k: v for k, v in two.items() if k != "model"} == {k: v for k, v in one.items() if k != "model"}
    for task in ("caption", "choice"):
        name = f"predictions_{task}_noisy.jsonl"
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()


def test_cli_on_a_run_folder_and_data_override(tmp_path, tiny_llava, capsys):
    """`python evaluate.py RUN`: the model from RUN/final, the test split from RUN/config.json's data_dir
    (or --data), eval.json + predictions written into RUN, CIDEr / accuracy / AVG printed."""
    data_dir = _synthetic_test_split(tmp_path / "data", n=3)
    run = tmp_path / "run"
    tiny_llava.save(str(run / "final"))
    config = {"method": "nrca", "data_dir": str(tmp_path / "elsewhere"), "out_dir": str(run), "train": None,
              "eval_max_new_tokens": 3}
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        evaluate.main([str(run)])
    result = evaluate.main([str(run), "--data", str(data_dir)])
    printed = capsys.readouterr().out
    assert "CIDEr" in printed and "accuracy" in printed and "AVG" in printed
    assert result["max_new_tokens"] == 3 and result["model"] == str(run / "final")
    assert json.loads((run / "eval.json").read_text()) == result
    assert (run / "predictions_caption.jsonl").is_file() and (run / "predictions_choice.jsonl").is_file()
    assert "| nrca (run) |" in evaluate.main(["table", str(run)])

    config["train"] = ["caption:flickr30k=/data/f30k.json"]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--test"):
        evaluate.main([str(run)])
