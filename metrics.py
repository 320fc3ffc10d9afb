"""Scores of the paper's two task kinds (Sec. 4.1): CIDEr for captions, top-1 accuracy for multiple choice.

- Captioning (open-response): `cider` / `caption_metrics` score greedy captions against all references of
  each image with pycocoevalcap's `PTBTokenizer` + `Cider`. That `Cider` class *is* CIDEr-D (Vedantam et
  al., 2015): tf-idf weighted 1..4-gram vectors without stemming, the candidate's n-gram counts clipped at
  the reference's, a Gaussian length penalty exp(-(l_hyp - l_ref)^2 / (2 * 6^2)), averaged over references
  and n, times 10; document frequencies come from the references of the set being scored (a score depends
  on the whole set). Returned on pycocoevalcap's scale; the paper's tables print it x100 (76.00 = 0.76).
  Optional BLEU-4, ROUGE-L, METEOR. `COCOEvalCap.evaluate()` is never called (its SPICE step downloads).
- Multiple choice (fixed-choice): `parse_choice` reads the option letter a model wrote; when none can be
  read, `match_option_text` does IconQA-style exact matching of the answer text against one option;
  `choice_metrics` counts the rest as wrong and unparsable.
- Open answers (VQA, instructions: train.py's `open` task): `exact_match` of VQA-style normalised text
  (`normalise_answer`), beside CIDEr against the same references.

Predictions are always matched to references / answers by id (`check_matching_ids`), never by position.
Used by evaluate.py (generation + command line) and its `score` command; no model code here.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Control characters and Unicode line/paragraph separators become spaces before java's PTBTokenizer
# (-preserveLines) sees them: a line break inside a caption would shift every following caption onto the
# wrong image, and other control characters (random-weight models emit them) are "untokenizable".
_LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# What java's PTBTokenizer writes to stderr on every call, which tells our user nothing: a character it drops
# ("WARNING: Untokenizable: ? (U+E000, decimal: 57344)" after java.util.logging's "<date> <time>
# edu.stanford.nlp.process.PTBLexer next" line) and its speed. Everything else it writes is shown.
_TOKENIZER_CHATTER = re.compile(r"^(?:WARNING: Untokenizable: .*|.* edu\.stanford\.nlp\.process\.PTBLexer next"
                                r"|PTBTokenizer tokenized \d+ tokens at [\d.]+ tokens per second\.)$")


# ---------------------------------------------------------------------------------------------
# Captioning metrics
# ---------------------------------------------------------------------------------------------
def check_matching_ids(what: str, predictions: dict, expected: dict, expected_name: str, lacking: str) -> None:
    """Predictions are matched to references/answers by id, never by position: the id sets must be equal."""
    missing = sorted(set(expected) - set(predictions), key=str)
    extra = sorted(set(predictions) - set(expected), key=str)
    if missing or extra:
        raise ValueError(f"{what}: prediction ids do not match {expected_name} ids: {len(missing)} {expected_name} "
                         f"id(s) without a prediction {missing[:10]}, {len(extra)} prediction id(s) without "
                         f"{lacking} {extra[:10]}")
    if not predictions:
        raise ValueError(f"{what}: no predictions to score")


def _check_caption_inputs(predictions: dict, references: dict, allow_empty: bool) -> None:
    """Ids must match exactly (never by position); predictions non-empty strings; references non-empty lists."""
    if not isinstance(predictions, dict) or not isinstance(references, dict):
        raise TypeError(f"caption metrics: predictions and references must be dicts keyed by id, got "
                        f"{type(predictions).__name__} and {type(references).__name__}")
    check_matching_ids("caption metrics", predictions, references, "reference", "references")
    for key, prediction in predictions.items():
        if not isinstance(prediction, str):
            raise TypeError(f"caption metrics: prediction of id {key!r} must be a str, got {type(prediction).__name__}")
        if not allow_empty and not prediction.strip():
            raise ValueError(f"caption metrics: empty prediction for id {key!r} (pass allow_empty=True, or "
                             "`evaluate.py score --allow-empty`, to score empty captions as 0)")
    for key, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, (list, tuple)) or not refs:
            raise ValueError(f"caption metrics: references of id {key!r} must be a non-empty list of str, got {refs!r}")
        for ref in refs:
            if not isinstance(ref, str) or not ref.strip():
                raise ValueError(f"caption metrics: reference of id {key!r} is empty or not a str: {ref!r}")


def ptb_tokenize(captions: dict) -> dict:
    """{key: [caption, ...]} -> {key: [tokenized lower-case caption without punctuation, ...]} with
    pycocoevalcap's PTBTokenizer (one java call). Empty captions stay empty strings."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    cleaned = {key: [_LINE_BREAKS.sub(" ", c).strip() for c in caps] for key, caps in captions.items()}
    to_tokenize = {key: [{"caption": c} for c in caps] for key, caps in cleaned.items() if any(caps)}
    with _without_tokenizer_chatter():
        tokenized = PTBTokenizer().tokenize(to_tokenize) if to_tokenize else {}
    out = {}
    for key, caps in cleaned.items():
        got = tokenized.get(key, [""] * len(caps))
        if len(got) != len(caps):
            raise RuntimeError(f"PTBTokenizer returned {len(got)} captions for key {key!r}, expected {len(caps)}")
        out[key] = got
    return out


@contextlib.contextmanager
def _without_tokenizer_chatter():
    """Collect what is written to file descriptor 2 (java's stderr is ours: pycocoevalcap does not capture it) and
    write it back afterwards without the _TOKENIZER_CHATTER lines; java's errors and anything else still show."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to redirect
        yield
        return
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not _TOKENIZER_CHATTER.match(line.rstrip("\r\n")))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]], bleu: bool = True,
                    rouge: bool = True, meteor: bool = False, allow_empty: bool = False) -> dict:
    """Score captions against references, matched by id. Returns raw pycocoevalcap scores (CIDEr on its
    own scale, e.g. 0.76; multiply by 100 for the paper's tables):
    {"cider", "cider_per_id": {id: score}, ["bleu4"], ["rouge_l"], ["meteor"]}.

    Empty predictions raise ValueError naming the id unless allow_empty=True, which scores them 0
    (an empty candidate has no n-grams) while their references still count in CIDEr's idf."""
    from pycocoevalcap.cider.cider import Cider

    _check_caption_inputs(predictions, references, allow_empty)
    ids = sorted(predictions, key=str)
    both = ptb_tokenize({**{("prediction", i): [predictions[i]] for i in ids},
                         **{("references", i): list(references[i]) for i in ids}})
    res = {i: both[("prediction", i)] for i in ids}  # {id: [candidate]}
    gts = {i: both[("references", i)] for i in ids}  # {id: [reference, ...]}
    score, per_image = Cider().compute_score(gts, res)
    out = {"cider": float(score), "cider_per_id": {i: float(s) for i, s in zip(ids, per_image, strict=True)}}
    if bleu:
        from pycocoevalcap.bleu.bleu import Bleu

        out["bleu4"] = float(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    if rouge:
        from pycocoevalcap.rouge.rouge import Rouge

        out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:
            del scorer
    return out


def cider(predictions: dict[str, str], references: dict[str, list[str]],
          allow_empty: bool = False) -> tuple[float, dict[str, float]]:
    """CIDEr-D (pycocoevalcap `Cider`, see the module docstring) of captions against all references of
    each image, after PTB tokenisation. Returns (corpus score, {id: per-image score}) on pycocoevalcap's
    scale (x100 for the paper's tables). Ids must match exactly; an empty prediction is an error."""
    out = caption_metrics(predictions, references, bleu=False, rouge=False, allow_empty=allow_empty)
    return out["cider"], out["cider_per_id"]


# ---------------------------------------------------------------------------------------------
# Multiple-choice metrics
# ---------------------------------------------------------------------------------------------
# A whole line that is only a letter: "B", "B.", "B)", "B:", "(B)"; lower case accepted here only ("b"),
# because a lone letter cannot be the article "a".
_BARE_LETTER = re.compile(r"^(?:\(([A-Za-z])\)|([A-Za-z])[.):]?)$")
# A capital letter with its option text: "B. a red circle", "B) ...", "B: ...", "(B) ...". "A dog" is
# not an answer (article), nor is "B.C".
_LETTER_WITH_TEXT = re.compile(r"^(?:\(([A-Z])\)|([A-Z])[.):])\s+\S")
# What may follow a letter named in a sentence: the end, punctuation, or a word that goes on about it
# ("I think B is right"); "I think A dog ..." names no option.
_AFTER_LETTER = r"(?=\s*$|\s*[.,;:!?)\]]|\s+(?:is|was|because|since|as)\b)"
# "The answer is B.", "the correct answer is (C)", "Answer: D", "the answer is c.", "the correct option is B",
# anywhere in the text; every such statement counts (two different letters -> unparsable). A capital must
# not be followed by another letter ("The answer is Bob"); a lower-case letter must end the sentence
# ("the answer is c." but not "the answer is a dog").
_ANSWER_IS = re.compile(r"(?i:\b(?:answer|option)\s*(?:is\s*:?|:))\s*\(?(?:([A-Z])(?![A-Za-z])|([a-z])"
                        r"(?=\)?\s*(?:$|[.,;:!?\n])))")
# At the start: "Option A", "option (B): red", "I think B", "I think it is B", "I think the answer is (C)".
_LEADING_PHRASE = re.compile(r"^(?:(?i:option)\s*|(?i:i\s+think)\s+(?:(?:it|the\s+answer)\s+is\s+)?)\(?([A-Z])\)?"
                             + _AFTER_LETTER)


def parse_choice(text: str, n_options: int) -> str | None:
    """The option letter a model's answer names, or None (unparsable: counted wrong).

    Markdown emphasis ("**B**", "__B__", "`B`") is dropped first. Accepted:
    - the first line is a letter: bare ("B", "B.", "B)", "(B)", also lower case "b"), so "B\\n\\nBecause ..."
      is B; or a capital with its option text ("B. a red circle", "(B) red", "B) red", "B: red");
    - the text starts "Option A" / "I think B" / "I think it is B" / "I think the answer is (B)";
    - "... answer is B", "Answer: (B)", "the answer is c.", "the correct option is B" anywhere.
    Every form present counts: when they name different letters ("The answer is A. The answer is B.",
    "A. The answer is B") the answer is unparsable, as LLaVA's ScienceQA evaluator (haotian-liu/LLaVA
    44e0562, llava/eval/eval_science_qa.py) fails on more than one "The answer is X." (we accept repeats
    of one letter). The letter must be one of the first `n_options` ("E" with 4 options is None).
    Everything else, e.g. "A dog", "A, B", "BLUE", is None."""
    if not isinstance(text, str):
        raise TypeError(f"parse_choice: text must be a str, got {type(text).__name__}")
    if not isinstance(n_options, int) or not 1 <= n_options <= len(LETTERS):
        raise ValueError(f"parse_choice: n_options must be an int in [1, 26], got {n_options!r}")
    text = re.sub(r"\*\*|__|`", "", text).strip()
    first_line = text.split("\n", 1)[0].strip()
    found = []
    for match in [_BARE_LETTER.match(first_line) or _LETTER_WITH_TEXT.match(text) or _LEADING_PHRASE.match(text),
                  *_ANSWER_IS.finditer(text)]:
        if match is not None:
            found.append(next(g for g in match.groups() if g).upper())
    if len(set(found)) != 1:
        return None  # none, or conflicting letters
    letter = found[0]
    return letter if LETTERS.index(letter) < n_options else None


def _normalise_option(text: str) -> str:
    return " ".join(text.strip().rstrip(".").strip().casefold().split())


def match_option_text(text: str, options: list[str]) -> str | None:
    """IconQA-style exact match: the letter of the one option whose text equals the answer (case,
    surrounding whitespace and a final period ignored), or None when none or several options match."""
    answer = _normalise_option(text)
    if not answer:
        return None
    hits = [LETTERS[i] for i, option in enumerate(options) if _normalise_option(str(option)) == answer]
    return hits[0] if len(hits) == 1 else None


_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s+(.+?)\s*$")


_INLINE_OPTION = re.compile(r"\(([A-Z])\)\s*(.*?)(?=\s*\([A-Z]\)|$)", re.DOTALL)


def options_from_question(question: str) -> list[str]:
    """Options written as consecutive lines "A. text" / "(A) text" / "A) text" starting at A, else inline
    after "Options:" as "(A) text (B) text" (LLaVA's ScienceQA prompt); [] if none."""
    options = []
    for line in question.splitlines():
        match = _OPTION_LINE.match(line)
        if match and match.group(1) == LETTERS[len(options)]:
            options.append(match.group(2))
    if not options and "Options:" in question:
        inline = question.split("Options:", 1)[1].split("\n", 1)[0]
        for letter, text in _INLINE_OPTION.findall(inline):
            if letter != LETTERS[len(options)]:
                break
            options.append(text.strip())
    return options


def choice_metrics(predictions: dict[str, str], answers: dict[str, str],
                   options: dict[str, list[str]] | None = None, match_text: bool = True) -> dict:
    """Top-1 accuracy (%) of letters parsed from predictions against answer letters, matched by id.
    options[id] (list of option texts) sets n_options and allows the exact-text fallback; without
    options any letter A-Z is accepted. Returns accuracy, n_choice, n_correct, n_unparsable,
    n_option_text_matched and per_id {id: {"letter", "correct"}}."""
    check_matching_ids("choice metrics", predictions, answers, "answer", "an answer")
    options = options or {}
    per_id, n_correct, n_unparsable, n_text = {}, 0, 0, 0
    for key in sorted(predictions, key=str):
        answer = str(answers[key]).strip().upper()
        if len(answer) != 1 or answer not in LETTERS:
            raise ValueError(f"choice metrics: answer of id {key!r} must be one letter A-Z, got {answers[key]!r}")
        opts = options.get(key) or []
        letter = parse_choice(predictions[key], len(opts) if opts else len(LETTERS))
        if letter is None and match_text and opts:
            letter = match_option_text(predictions[key], opts)
            n_text += letter is not None
        n_unparsable += letter is None
        correct = letter == answer
        n_correct += correct
        per_id[key] = {"letter": letter, "correct": correct}
    return {"accuracy": 100.0 * n_correct / len(predictions), "n_choice": len(predictions), "n_correct": n_correct,
            "n_unparsable": n_unparsable, "n_option_text_matched": n_text, "per_id": per_id}


# ---------------------------------------------------------------------------------------------
# Open answers (train.py's `open` task): normalised exact match, VQA-style
# ---------------------------------------------------------------------------------------------
NUMBER_WORDS = {word: str(i) for i, word in enumerate("zero one two three four five six seven eight nine ten".split())}
ARTICLES = {"a", "an", "the"}


def normalise_answer(text: str) -> str:
    """VQA-style normalisation: lower case, punctuation dropped (a decimal point kept), number words as digits,
    articles removed, whitespace collapsed. "Two dogs." -> "2 dogs"; "The 3.5 m pole" -> "3.5 m pole"."""
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text.lower())
    text = re.sub(r"[^\w\s.]", " ", text)
    words = [NUMBER_WORDS.get(word, word) for word in text.split() if word not in ARTICLES]
    return " ".join(words)


def exact_match(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """Share (%) of predictions whose normalised text equals one of their references' (normalise_answer), and per
    id whether it does: {"exact_match", "per_id": {id: bool}}."""
    check_matching_ids("exact_match", predictions, references, "references", "a reference")
    per_id = {key: normalise_answer(predictions[key]) in {normalise_answer(r) for r in references[key]}
              for key in references}
    return {"exact_match": 100 * sum(per_id.values()) / max(len(per_id), 1), "per_id": per_id}
