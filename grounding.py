"""Grounded caption scores on the testbed: is what a caption says what the picture shows, whatever its phrasing?

CIDEr rewards the references' words. On the testbed the five references of a picture are five phrasings of
one scene, so a caption with every fact right scores 496 to 724 CIDEr depending on the phrasing alone, and a
model's CIDEr moves with the phrasing it happens to prefer at an epoch (README, "The testbed"). These scores
read the scene back from a caption's words and compare it with the scene the test picture was drawn from (the
record's "scene", written by testbed.py), so a change of phrasing leaves them unchanged:

    grounded_{colour,shape,count,position,size}  % of captions that name the drawn value of that attribute and
                                                 no other value of it
    grounded_all            % of captions with all five attributes right: the caption says what is drawn
    grounded_fabricated     % of captions with a whole ungrounded detail of the training captions
                            (testbed.UNGROUNDED_DETAILS: nothing in any test picture or reference shows one)
    grounded_detail_word    % of captions with any word of DETAIL_WORDS (the details' nouns and adjectives):
                            whole details and broken ones ("near the right of the school"); the first
                            study's post-hoc count, made a score here (has_detail_word)
    grounded_size_prior     of the captions whose picture contradicts the size prior of its shape in the
                            fine-tuning captions (testbed.SIZE_PRIOR: circles "large", squares and triangles
                            "small"), % that name the prior's size: the language prior winning over the image
    n_grounded              captions scored (those whose test record carries a scene)

Which question each answers: grounded_all whether the model sees (the paper's premise that captioning should
use the picture); grounded_fabricated, grounded_detail_word and grounded_size_prior whether it overfits the
fine-tuning captions' language (the paper's explanation of the open-response drop); CIDEr stays the paper's
metric.

How a caption is read (words(), named_values()):
- Words. Lower case; "n't" is "not"; a hyphen splits a word into its parts ("top-left" is "top left",
  "light-blue" is "light blue"); punctuation marks are words of their own. Words are matched whole: "ones"
  is not "one", "enlarged" is not "large"; a shape's plural is the shape.
- Values and synonyms. Every value names itself; SYNONYMS adds the few words that can only mean one value
  of this world: big/huge -> large, little/tiny -> small, violet -> purple, circular -> circle,
  triangular -> triangle, upper -> top, lower -> bottom. Counts: the digits 1, 2, 3 and "single" -> one,
  "pair" -> two. Any other number ("four", "7") is a count no picture has, so it makes the count wrong. The
  article "a"/"an" is never "one" ("a picture with two ..." names two).
- Negation. A negator (not, no, never, without) takes back the first value word within NEGATION_REACH = 3
  words after it, unless a punctuation mark comes first: "not blue", "no large", "not on the left" name
  nothing; "no large red circles" still names red and circle (only the first value is taken back).
- Details. Words that belong to a detail phrase are the detail's, not the scene's. A detail phrase runs from
  a detail's lead word (DETAIL_LEADS, the first words of the details: on, near, next, under, at, for, before,
  with, in, drawn) to a noun of a detail (DETAIL_NOUNS: day, cup, coffee, child, notebook, lamp, school,
  fair, math, lesson, morning, kitchen, window, dinner, pencil, desk) at most DETAIL_REACH = 5 words later,
  from the lead word nearest before that noun, with no punctuation mark between. Whole details are such
  phrases, and so are NRCA's broken ones: in "two small red circles on the left near the right of the school"
  the position is left ("right" lies in "near ... school"), so the caption is penalised once, as a detail
  word, not twice; in "on the kitchen ones , side left" it is left (the comma ends the phrase); in "on the
  left near the kitchen window" it is left (the phrase starts at "near", the nearest lead). grounded_fabricated
  stays "a whole detail" (as in the first study, so its numbers stay comparable); grounded_detail_word is the
  wider count. DETAIL_WORDS leaves out the details' function words (to, at, near, ...) and "drawn", which the
  first study's post-hoc count counted: "near the right of the picture" alone is no detail word.
- One value per attribute. The world has one side (one colour, ...) per picture: a caption naming two,
  "left or right", "top-left", "top left", has that attribute wrong.
- Agreement is grammar, not a fact about the picture: "two small red circle" and "one red circles" pass.
  The scorer grades what a caption says is drawn, and number agreement says nothing a count word does not.

Not handled: captions of other worlds; synonyms the testbed never writes and those that could mean two
values ("crimson", "round", "above"); "one" as a pronoun ("a red one") reads as the count; negation of a whole
phrase beyond its first value; a detail's adjective said of the drawing ("bright red circles") counts as a
detail word (it starts no phrase, so the colour is still read); sentences about something other than the
picture ("a square would be blue").

    python -m pytest -q tests/test_grounding.py
"""

from __future__ import annotations

import re

from testbed import ATTRIBUTES, DOWNSTREAM_CAPTIONS, PRETRAIN_CAPTIONS, SIZE_PRIOR, UNGROUNDED_DETAILS

# Words that can only mean one value of this world (a shape's plural is added below).
SYNONYMS = {"big": "large", "huge": "large", "little": "small", "tiny": "small", "violet": "purple",
            "circular": "circle", "triangular": "triangle", "upper": "top", "lower": "bottom",
            "1": "one", "2": "two", "3": "three", "single": "one", "pair": "two"}
# Counts no picture has: naming one makes the count wrong (any run of digits too, see value_of).
OTHER_COUNTS = ("four", "five", "six", "seven", "eight", "nine", "ten")

# word -> (attribute, value): every value names itself; shapes also in the plural; then the synonyms
WORDS = {value: (kind, value) for kind, values in ATTRIBUTES.items() for value in values}
WORDS |= {value + "s": ("shape", value) for value in ATTRIBUTES["shape"]}
WORDS |= {word: WORDS[value] for word, value in SYNONYMS.items()}
WORDS |= {word: ("count", word) for word in OTHER_COUNTS}

NEGATORS = frozenset({"not", "no", "never", "without"})
NEGATION_REACH = 3  # a negator takes back the first value word at most this many words after it

# The words of the details that no reference or pre-training caption uses, less the function words that link
# a detail to the caption (and "drawn", which any caption of a drawing may say): their nouns and adjectives.
_REFERENCE_WORDS = {w for template in DOWNSTREAM_CAPTIONS + PRETRAIN_CAPTIONS for w in template.split()} | set(WORDS)
_DETAIL_LINKS = {"an", "at", "before", "by", "drawn", "for", "near", "next", "to", "under"}
DETAIL_WORDS = frozenset({w for d in UNGROUNDED_DETAILS for w in d.split()} - _REFERENCE_WORDS - _DETAIL_LINKS)
# A detail phrase ends at a noun: an adjective alone ("bright red circles") is a detail word but starts no phrase.
DETAIL_NOUNS = DETAIL_WORDS - {"bright", "crowded", "old", "rainy", "soft", "sunny"}
DETAIL_LEADS = frozenset(detail.split()[0] for detail in UNGROUNDED_DETAILS)
DETAIL_REACH = 5  # a detail noun at most this many words after its lead word ("next to a cup of coffee")


def words(caption: str) -> list[str]:
    """A caption's words: lower case, "n't" -> "not", hyphenated words split, punctuation marks kept as words."""
    text = caption.lower().replace("n't", " not").replace("n\u2019t", " not").replace("-", " ")
    return re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", text)


def value_of(word: str) -> tuple[str, str] | None:
    """(attribute, value) a word names, or None; digits other than 1-3 are counts no picture has."""
    if word.isascii() and word.isdigit() and word not in WORDS:
        return ("count", word)
    return WORDS.get(word)


def _is_punctuation(word: str) -> bool:
    return re.fullmatch(r"[a-z0-9]+", word) is None


def detail_positions(caption_words: list[str]) -> set[int]:
    """Positions of the words that belong to a detail phrase: from the lead word nearest before a detail noun
    (at most DETAIL_REACH words before it, no punctuation mark between) to that noun."""
    inside = set()
    for end, word in enumerate(caption_words):
        if word in DETAIL_NOUNS:
            for start in range(end - 1, max(-1, end - 1 - DETAIL_REACH), -1):
                if _is_punctuation(caption_words[start]):
                    break
                if caption_words[start] in DETAIL_LEADS:
                    inside.update(range(start, end + 1))
                    break
    return inside


def negated_positions(caption_words: list[str]) -> set[int]:
    """Positions of the value words a negator takes back: the first within NEGATION_REACH words after it, if no
    punctuation mark comes first."""
    negated = set()
    for start, word in enumerate(caption_words):
        if word in NEGATORS:
            for i in range(start + 1, min(start + 1 + NEGATION_REACH, len(caption_words))):
                if _is_punctuation(caption_words[i]):
                    break
                if value_of(caption_words[i]) is not None:
                    negated.add(i)
                    break
    return negated


def named_values(caption: str) -> dict[str, set[str]]:
    """The values of each attribute that a caption names: {attribute: {value, ...}}, read by the rules of the
    module docstring (synonyms and numbers, no negated value, no word of a detail phrase)."""
    caption_words = words(caption)
    skipped = detail_positions(caption_words) | negated_positions(caption_words)
    named = {kind: set() for kind in ATTRIBUTES}
    for i, word in enumerate(caption_words):
        found = value_of(word)
        if found is not None and i not in skipped:
            named[found[0]].add(found[1])
    return named


def has_detail_word(caption: str) -> bool:
    """Whether a caption says any word of a detail (DETAIL_WORDS), whole detail or broken."""
    return not DETAIL_WORDS.isdisjoint(words(caption))


def score_caption(caption: str, scene: dict) -> dict:
    """One caption against its scene: {attribute: right?}, "all", "fabricated" (a whole detail), "detail_word"
    (any word of a detail), and "prior_size_named" (None when the picture's size agrees with its shape's
    prior, so the caption cannot show the prior winning)."""
    named = named_values(caption)
    row = {kind: named[kind] == {scene[kind]} for kind in ATTRIBUTES}
    row["all"] = all(row[kind] for kind in ATTRIBUTES)
    row["fabricated"] = any(detail in caption.lower() for detail in UNGROUNDED_DETAILS)
    row["detail_word"] = has_detail_word(caption)
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
    result["grounded_detail_word"] = percent([r["detail_word"] for r in rows])
    result["grounded_size_prior"] = percent([r["prior_size_named"] for r in rows if r["prior_size_named"] is not None])
    result["n_grounded"] = len(rows)
    return result
