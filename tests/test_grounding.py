"""grounding.py: phrasing-invariant caption scores against the scene a test picture was drawn from, and the
testbed's validation split.

    python -m pytest -q tests/test_grounding.py
"""

import itertools
import json

import pytest

import evaluate
import grounding
import testbed

# Two small circles contradict the size prior of circles ("large" in the fine-tuning captions).
SCENE = {"colour": "red", "shape": "circle", "count": "two", "position": "left", "size": "small"}


def test_every_reference_phrasing_scores_all_right():
    for caption in testbed.scene_captions(SCENE):  # five phrasings, one scene
        row = grounding.score_caption(caption, SCENE)
        assert row["all"] and not row["fabricated"] and row["prior_size_named"] is False, caption


def test_one_wrong_attribute_is_named_and_only_that_one():
    row = grounding.score_caption("there are two small blue circles on the left of the picture", SCENE)
    assert not row["colour"] and not row["all"]
    assert all(row[kind] for kind in ("shape", "count", "position", "size"))


def test_two_values_of_one_attribute_are_wrong_and_a_missing_one_too():
    row = grounding.score_caption("two small red circles on the left or the right", SCENE)
    assert not row["position"]
    assert not grounding.score_caption("two red circles on the left", SCENE)["size"]  # size not said


def test_fabricated_detail_and_prior_driven_size_error():
    caption = "a picture with two large red circles on its left side on a rainy day"
    row = grounding.score_caption(caption, SCENE)
    assert row["fabricated"] and row["prior_size_named"] is True and not row["size"]
    assert row["colour"] and row["shape"] and row["count"] and row["position"]
    # A picture that agrees with its shape's prior cannot show the prior winning: not counted.
    agreeing = {**SCENE, "size": "large"}
    assert grounding.score_caption(caption, agreeing)["prior_size_named"] is None


def test_words_match_whole():
    # "ones" is not the count "one", "large" inside "enlarged" is not a size.
    row = grounding.score_caption("the drawing shows two red circles , small ones , on the left", SCENE)
    assert row["all"]
    assert grounding.named_values("an enlarged red drawing")["size"] == set()


def test_every_scene_every_phrasing_scores_all_right():
    """All 360 scenes of the world, each in the five reference phrasings and the three pre-training ones: every
    attribute right, no detail; the same caption with its scene's detail appended stays all right and counts as
    fabricated and as a detail word (the detail costs once, not also an attribute)."""
    for values in itertools.product(*testbed.ATTRIBUTES.values()):
        scene = dict(zip(testbed.ATTRIBUTES, values, strict=True))
        pretrain = [testbed._fill(t, scene) for t in testbed.PRETRAIN_CAPTIONS]
        for caption in testbed.scene_captions(scene) + pretrain:
            row = grounding.score_caption(caption, scene)
            assert row["all"] and not row["fabricated"] and not row["detail_word"], caption
            detailed = grounding.score_caption(caption + " " + testbed.detail_of(scene), scene)
            assert detailed["all"] and detailed["fabricated"] and detailed["detail_word"], caption


def test_a_negated_value_is_not_named():
    # The negator takes back the first value word within 3 words: "not blue", "no large", "not on the right".
    assert grounding.score_caption("two small red circles , not blue ones , on the left", SCENE)["all"]
    assert grounding.score_caption("two small red circles on the left and not on the right", SCENE)["all"]
    assert grounding.score_caption("two red circles on the left , no large ones but small", SCENE)["all"]
    assert grounding.named_values("the circles aren't blue")["colour"] == set()  # "n't" is "not"
    assert grounding.named_values("never purple, without a green border")["colour"] == set()
    # Only the first value after it, and not across punctuation or beyond 3 words.
    assert grounding.named_values("no large red circles")["colour"] == {"red"}
    assert grounding.named_values("no , blue")["colour"] == {"blue"}
    assert grounding.named_values("not that one but the blue")["colour"] == {"blue"}  # "one" is taken back


def test_digits_and_number_words_are_counts_and_the_article_is_not():
    assert grounding.score_caption("2 small red circles on the left", SCENE)["all"]
    assert grounding.named_values("a single red circle")["count"] == {"one"}
    assert grounding.named_values("a pair of red circles")["count"] == {"two"}
    assert grounding.named_values("3 squares")["count"] == {"three"}
    # "a" is never "one": the reference "a picture with two ..." names two only.
    assert grounding.named_values("a picture with two small red circles on its left side")["count"] == {"two"}
    # A count no picture has makes the count wrong, even next to the right one.
    assert not grounding.score_caption("4 small red circles on the left", SCENE)["count"]
    assert not grounding.score_caption("two small red circles on the left , or 12", SCENE)["count"]
    assert not grounding.score_caption("two or four small red circles on the left", SCENE)["count"]


def test_synonyms_of_one_value():
    assert grounding.score_caption("two tiny red circles on the left", SCENE)["all"]
    assert grounding.score_caption("two little red circular shapes on the left", SCENE)["all"]
    big = grounding.score_caption("two big red circles on the left", SCENE)
    assert not big["size"] and big["prior_size_named"] is True  # "big" is the prior's "large"
    assert grounding.named_values("huge violet triangular shapes in the upper half")["size"] == {"large"}
    assert grounding.named_values("huge violet triangular shapes in the upper half")["colour"] == {"purple"}
    assert grounding.named_values("huge violet triangular shapes in the upper half")["shape"] == {"triangle"}
    assert grounding.named_values("huge violet triangular shapes in the upper half")["position"] == {"top"}
    assert grounding.named_values("in the lower part")["position"] == {"bottom"}
    # Still whole words: "bigger" is no size, "ones" no count.
    assert grounding.named_values("bigger ones")["size"] == set() == grounding.named_values("ones")["count"]


def test_attribute_words_in_a_detail_phrase_are_the_details():
    """NRCA's broken details: the attribute word inside belongs to the detail, which counts once (detail word)."""
    row = grounding.score_caption("two small red circles on the left near the right of the school", SCENE)
    assert row["all"] and row["detail_word"] and not row["fabricated"]  # broken: no whole detail
    right = {**SCENE, "position": "right"}
    row = grounding.score_caption("two small red circles on the right of the picture near the right of the school",
                                  right)
    assert row["all"] and row["detail_word"]
    # The comma ends the phrase: "side left" is the caption's position.
    assert grounding.named_values("two small red circles on the kitchen ones , side left")["position"] == {"left"}
    # The phrase starts at the lead nearest the noun, so a position before the detail is read.
    row = grounding.score_caption("two small red circles on the right near the kitchen window", SCENE)
    assert not row["position"] and row["fabricated"] and row["detail_word"]
    # An adjective of a detail starts no phrase: the colour after it is read, and it is a detail word.
    row = grounding.score_caption("on the left , two small bright red circles", SCENE)
    assert row["all"] and row["detail_word"]
    # A detail's function words alone are no detail word (the first study's post-hoc count counted them).
    assert not grounding.has_detail_word("two small red circles near the left of the picture")
    assert grounding.has_detail_word("TWO SMALL RED CIRCLES ON THE SCHOOL.")


def test_compounds_name_each_part_and_agreement_is_not_graded():
    # Hyphenated or not, "top left" names two sides; the picture has one.
    for caption in ("two small red circles in the top-left corner", "two small red circles in the top left"):
        assert grounding.named_values(caption)["position"] == {"top", "left"}
        assert not grounding.score_caption(caption, SCENE)["position"]
    assert grounding.score_caption("two small red circles on the left-hand side", SCENE)["all"]
    # Number agreement is grammar, not a fact about the picture: the facts said are right, so it passes.
    assert grounding.score_caption("two small red circle on the left", SCENE)["all"]
    assert grounding.score_caption("one small red circles on the left", {**SCENE, "count": "one"})["all"]


def test_split_scores_by_hand():
    """Four captions of SCENE: all right; colour wrong; prior size + detail; empty.
    all right 1/4 = 25 %; colour right 2/4 = 50 % (b and d not); shape, count, position 3/4 = 75 % (d not);
    size right 2/4 = 50 % (c and d not); fabricated 1/4 = 25 % and detail word 1/4 = 25 % (c: "rainy", "day");
    size prior named 1/4 = 25 % (every picture contradicts the prior)."""
    predictions = {"a": "there are two small red circles on the left of the picture",
                   "b": "there are two small blue circles on the left of the picture",
                   "c": "two large red circles can be seen on the left on a rainy day", "d": ""}
    scores = grounding.grounded_scores(predictions, dict.fromkeys(predictions, SCENE))
    assert scores == {"grounded_colour": 50.0, "grounded_shape": 75.0, "grounded_count": 75.0,
                      "grounded_position": 75.0, "grounded_size": 50.0, "grounded_all": 25.0,
                      "grounded_fabricated": 25.0, "grounded_detail_word": 25.0, "grounded_size_prior": 25.0,
                      "n_grounded": 4}
    # Rephrasing every caption leaves every score unchanged (CIDEr would not).
    rephrased = {"a": "on the left of this image there are two small red circles",
                 "b": "a picture with two small blue circles on its left side",
                 "c": "the drawing shows two red circles , large ones , on the left on a rainy day", "d": ""}
    assert grounding.grounded_scores(rephrased, dict.fromkeys(rephrased, SCENE)) == scores
    assert grounding.grounded_scores({}, {"a": SCENE}) == {}


def test_validation_and_test_splits_share_no_picture(tmp_path):
    files = testbed.write_downstream(tmp_path, k=6, n_test=5, seed=3, n_val=4)
    assert files["val_caption.json"] == 4 and files["test_caption.json"] == 5
    images = {}
    for name in files:
        images[name] = {r["image"] for r in json.loads((tmp_path / name).read_text())}
    val = images["val_caption.json"] | images["val_choice.json"]
    test = images["test_caption.json"] | images["test_choice.json"]
    train = images["train_caption.json"] | images["train_choice.json"]
    assert len(val) == 8 and len(test) == 10 and not val & test and not val & train and not test & train
    # Deterministic per seed, and train + test do not depend on the validation split's size.
    again = tmp_path / "again"
    testbed.write_downstream(again, k=6, n_test=5, seed=3, n_val=2)
    for name in ("train_caption.json", "test_caption.json", "test_choice.json"):
        assert (again / name).read_bytes() == (tmp_path / name).read_bytes()
    # Every evaluation record keeps its scene, and its references are that scene's.
    for record in json.loads((tmp_path / "val_caption.json").read_text()):
        assert record["references"] == testbed.scene_captions(record["scene"])


def test_evaluation_reads_the_validation_split_and_scores_grounding(tmp_path):
    testbed.write_downstream(tmp_path, k=2, n_test=2, seed=0, n_val=3)
    splits = evaluate.resolve_splits(tmp_path, split="val")
    assert [(task, name) for task, name, _ in splits] == [("caption", "val_caption"), ("choice", "val_choice")]
    with pytest.raises(ValueError, match="evaluation split 'dev'"):
        evaluate.resolve_splits(tmp_path, split="dev")
    records = evaluate.load_test_split(tmp_path / "val_caption.json", "caption")
    by_id = {r["id"]: {"prediction": r["references"][2]} for r in records}
    scores = evaluate._score_task("caption", records, by_id, bleu=False, rouge=False, meteor=False, match_text=True)
    assert scores["grounded_all"] == 100.0 and scores["grounded_fabricated"] == 0.0 and scores["n_grounded"] == 3
