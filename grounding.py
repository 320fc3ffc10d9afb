"""Grounded caption scores on the testbed: is what a caption says what the picture shows, whatever its phrasing?

CIDEr rewards the references' words. On the testbed the five references of a picture are five phrasings of
one scene, so a caption with every fact right scores 496 to 724 CIDEr depending on the phrasing alone, and a
model's CIDEr moves with the phrasing it happens to prefer at an epoch (README, "The testbed"). These scores
read the scene back from a caption's words and compare it with the scene the test picture was drawn from (the
record's "scene", written by testbed.py), so a change of phrasing leaves them unchanged:

    grounded_{colour,shape,count,position,size}  % of captions that name the drawn value of that attribute and
                                                 no other value of it
    grounded_all            % of captions with all five attributes right: the caption says what is drawn
    grounded_fabricated     % of captions with an ungrounded detail of the training captions
                            (testbed.UNGROUNDED_DETAILS: nothing in any test picture or reference shows one)
    grounded_size_prior     of the captions whose picture contradicts the size prior of its shape in the
                            fine-tuning captions (testbed.SIZE_PRIOR: circles "large", squares and triangles
                            "small"), % that name the prior's size: the language prior winning over the image
    n_grounded              captions scored (those whose test record carries a scene)

Which question each answers: grounded_all whether the model sees (the paper's premise that captioning should
use the picture); grounded_fabricated and grounded_size_prior whether it overfits the fine-tuning captions'
language (the paper's explanation of the open-response drop); CIDEr stays the paper's metric.

Words are matched whole (lower case, punctuation split off): "two" counts, "ones" is not "one"; a shape's
plural is the shape. Not here: captions of other worlds; synonyms the testbed never writes ("crimson").

    python -m pytest -q tests/test_grounding.py
"""

from __future__ import annotations

import re

from testbed import ATTRIBUTES, SIZE_PRIOR, UNGROUNDED_DETAILS

# word -> (attribute, value): every value names itself; shapes also in the plural
WORDS = {value: (kind, value) for kind, values in ATTRIBUTES.items() for value in values}
WORDS |= {value + "s": ("shape", value) for value in ATTRIBUTES["shape"]}


def named_values(caption: str) -> dict[str, set[str]]:
    """The values of each attribute that a caption names: {attribute: {value, ...}}."""
    named = {kind: set() for kind in ATTRIBUTES}
    for word in re.findall(r"[a-z]+", caption.lower()):
        if word in WORDS:
            kind, value = WORDS[word]
            named[kind].add(value)
    return named


def score_caption(caption: str, scene: dict) -> dict:
    """One caption against its scene: {attribute: right?}, "all", "fabricated", and "prior_size_named" (None
    when the picture's size agrees with its shape's prior, so the caption cannot show the prior winning)."""
    named = named_values(caption)
    row = {kind: named[kind] == {scene[kind]} for kind in ATTRIBUTES}
    row["all"] = all(row[kind] for kind in ATTRIBUTES)
    row["fabricated"] = any(detail in caption.lower() for detail in UNGROUNDED_DETAILS)
    prior = SIZE_PRIOR[scene["shape"]]
    row["prior_size_named"] = None if prior == scene["size"] else prior in named["size"]
    return row


def grounded_scores(predictions: dict, scenes: dict) -> dict:
    """Split-level scores (%) of {id: caption} against {id: scene}; ids without a scene are not scored. A rate
    with nothing to count (no picture contradicting the size prior) is None."""
    rows = [score_caption(predictions[key], scene) for key, scene in scenes.items() if key in predictions]
    if not rows:
        return {}
    percent = lambda hits: 100.0 * sum(hits) / len(hits) if hits else None  # noqa: E731
    result = {f"grounded_{kind}": percent([r[kind] for r in rows]) for kind in ATTRIBUTES}
    result["grounded_all"] = percent([r["all"] for r in rows])
    result["grounded_fabricated"] = percent([r["fabricated"] for r in rows])
    result["grounded_size_prior"] = percent([r["prior_size_named"] for r in rows if r["prior_size_named"] is not None])
    result["n_grounded"] = len(rows)
    return result
