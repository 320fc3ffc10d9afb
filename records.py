"""Training records at scale: the structural pass over LLaVA / DataOptim files, the multi-task mix (paper Sec. 4.1)
and a compact store of what was drawn. What train.py reads before step 1; loader.py turns a record into a sample
on the fly.

- Files: a JSON list or JSON lines, parsed record by record (`iter_records`: the file's text and one record at
  a time are in memory, never every record's objects), errors with line and column.
- The structural pass (`scan_file`) checks what is cheap for every record before step 1: an object with an id;
  `image` a path, a list of paths (several images) or absent (text-only); turns from human / gpt alternating,
  ending with gpt; as many `<image>` placeholders in human turns as images, none in a reply; no empty reply;
  no special token of the model's tokenizer written in the text (it would be read as a control token:
  `special_tokens`). A bad record is named by file, index and id; with skip_bad_records it is left out and
  counted per reason. With check_images every image's header is opened too (worker processes).
- Task kinds: "caption" and "choice" are the paper's two tasks, their single-turn, one-image prompts rewritten as
  in Sec. 4.1 (one of five caption instructions; the choice suffix); "open" keeps every prompt as written (VQA,
  instructions); NRCA's open / fixed split then follows the answer's length, as in the released code. Multi-turn,
  text-only and multi-image records are kept as written whatever their task.
- The mix: k records per file drawn with a generator seeded by (seed, name), exactly as data.mix_datasets draws
  them (`data.draw`), so a lazy run trains on the same samples as an eager one; k = None takes all of them.
- The store (`CompactRecords`): the drawn records as one bytes buffer (each record `marshal`-ed: Python's own
  serialisation of plain values, ~1 us each way; the buffer never leaves the process and its workers) plus an
  int64 offset array.
  About the records' own size, two Python objects per rank however many records; DataLoader workers forked from
  a rank share it copy-on-write (no per-record refcount to touch). A record comes back as a dict: {"id", "image"
  (list of paths, [] for text-only), "turns" ([[question, answer], ...]), "task", "source", "references"}.

Not here: tokenisation, image loading, max_length (loader.py); the eager datasets (data.py, hf_models.py).

    python -c "import records; print(len(records.mix([('caption', 'c', 'data/testbed-seed0/train_caption.json')])))"
"""

from __future__ import annotations

import functools
import json
import logging
import marshal
import multiprocessing
import os
import random
import re
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data import (
    IMAGE_PLACEHOLDER,
    DataError,
    conversation_turns,
    draw,
    open_image,
    paper_question,
)

KINDS = ("caption", "choice", "open")  # --train KIND:NAME=PATH
log = logging.getLogger("nrca.records")
_CHUNK = 1 << 24  # characters read at a time while parsing a JSON list
BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark


# ---------------------------------------------------------------------------------------------
# Parsing, one record at a time
# ---------------------------------------------------------------------------------------------
def iter_records(path) -> iter:
    """The records of a JSON list or JSON lines file, one at a time. DataError for a file that is not UTF-8,
    empty, malformed (line and column), one JSON object that is not a record, or an empty list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"records file {path} does not exist")
    with path.open("rb") as f:
        head = f.read(4096)
    first = head.removeprefix(BOM).lstrip()[:1]  # a byte-order mark (Windows editors write one) is skipped
    if first == b"[":
        yield from _iter_json_list(path)
    else:
        yield from _iter_json_lines(path, first)


def _decode(raw: bytes, path: Path, line_offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1 + line_offset
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(f"{path}: not UTF-8 text: byte 0x{raw[error.start]:02x} at line {line}, column {column} "
                        f"({error.reason}); save the file as UTF-8") from None


def _iter_json_list(path: Path):
    """A JSON list parsed element by element (json's raw_decode) over a text read in chunks: what has been parsed is
    dropped, so memory holds one chunk and one record, not the file."""
    import codecs

    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8-sig")()  # -sig: drops a BOM
    text, position, done = "", 0, False
    line_offset, column_offset = 0, 0  # lines and columns dropped before `text`, for error positions

    def more() -> bool:  # drop what is parsed, append the next chunk; False at the end of the file
        nonlocal text, position, line_offset, column_offset, done
        if done:
            return False
        dropped = text[:position]
        if "\n" in dropped:
            line_offset += dropped.count("\n")
            column_offset = len(dropped) - dropped.rfind("\n") - 1
        else:
            column_offset += len(dropped)
        text, position = text[position:], 0
        raw = f.read(_CHUNK)
        try:
            text += utf8.decode(raw, final=not raw)
        except UnicodeDecodeError:
            f.seek(0)
            _decode(f.read(), path)  # names the line and column
            raise
        done = not raw
        return True

    def skip_space() -> None:
        nonlocal position
        while True:
            while position < len(text) and text[position] in " \t\r\n":
                position += 1
            if position < len(text) or not more():
                return

    def malformed(message: str, at: int):
        before = text.rfind("\n", 0, at)
        line = line_offset + text.count("\n", 0, at) + 1
        column = at - before if before >= 0 else column_offset + at + 1
        return DataError(f"{path}: malformed JSON at line {line}, column {column}: {message}")

    with path.open("rb") as f:
        more()
        skip_space()
        position += 1  # "["
        skip_space()
        if position < len(text) and text[position] == "]":
            raise DataError(f"{path}: an empty JSON list (no records)")
        while True:
            skip_space()
            while True:
                try:
                    record, position = decoder.raw_decode(text, position)
                    break
                except json.JSONDecodeError as error:  # malformed, or a record cut by the chunk's end
                    if not more():
                        raise malformed(error.msg, error.pos) from None
            yield record
            skip_space()
            if position >= len(text):
                raise malformed("the list is not closed (expected ',' or ']')", position)
            if text[position] == "]":
                break
            if text[position] != ",":
                raise malformed("Expecting ',' delimiter", position)
            position += 1
        position += 1
        skip_space()
        if position < len(text):
            raise malformed("Extra data", position)


def _iter_json_lines(path: Path, first: bytes):
    count = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw.removeprefix(BOM) if lineno == 1 else raw, path, line_offset=lineno - 1)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if count == 0 and first == b"{":
                    _refuse_one_object(path)
                raise DataError(f"{path}: malformed JSON at line {lineno}, column {error.colno}: {error.msg} "
                                "(read as JSON lines: one record per line)") from None
            if count == 0 and isinstance(record, dict) and not {"id", "image", "conversations"} & record.keys():
                raise DataError(f"{path}: holds one JSON object (keys {sorted(record)[:5]}), expected a JSON list of "
                                "records [{...}, ...] or JSON lines (one record per line)")
            count += 1
            yield record
    if count == 0:
        raise DataError(f"{path}: empty file (expected a JSON list or JSON lines)")


def _refuse_one_object(path: Path) -> None:
    """A pretty-printed single JSON object (several lines) is neither a list nor JSON lines: say so."""
    try:
        whole = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return
    if isinstance(whole, dict):
        raise DataError(f"{path}: holds one JSON object (keys {sorted(whole)[:5]}), expected a JSON list of "
                        "records [{...}, ...] or JSON lines (one record per line)")


# ---------------------------------------------------------------------------------------------
# The compact store
# ---------------------------------------------------------------------------------------------
class CompactRecords:
    """Records marshal-ed into one bytes buffer + int64 offsets (module docstring)."""

    def __init__(self):
        self._buffer, self._offsets = bytearray(), array("q", [0])
        self.n_truncated = 0  # records that will be cut to max_length (records.mix's check)

    def append(self, record: dict) -> None:
        self._buffer += marshal.dumps(record)
        self._offsets.append(len(self._buffer))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        index %= len(self)
        return marshal.loads(self._buffer[self._offsets[index]:self._offsets[index + 1]])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return len(self._buffer) + self._offsets.itemsize * len(self._offsets)


# ---------------------------------------------------------------------------------------------
# The structural pass
# ---------------------------------------------------------------------------------------------
@dataclass
class Skipped:
    """Records left out by skip_bad_records: a count per reason and the first messages."""

    counts: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(message)
        log.warning("skipping bad record: %s", message)

    def __len__(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict:
        return dict(sorted(self.counts.items()))


def reason_of(message: str) -> str:
    """A short, stable reason for a skip count: the message without file, record and quoted values."""
    text = re.sub(r"^.*?\(id [^)]*\)[^:]*: ", "", message)
    text = re.sub(r"\S*/\S*", "PATH", text)  # file paths
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\d+", "_", text)
    return text[:100]


def special_tokens(tokenizer) -> tuple[str, ...]:
    """The special-token texts a record may not contain: the tokenizer's own (bos, eos, pad, unk, added control
    tokens such as <|image_pad|> or <|im_end|>), longest first; the image placeholder is allowed."""
    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            names.add(str(token))
    names.discard(IMAGE_PLACEHOLDER)
    return tuple(sorted((n for n in names if n), key=len, reverse=True))


@functools.cache
def _pattern(tokens: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(token) for token in tokens))


def structure(record, where: str, forbidden: tuple[str, ...] = ()) -> tuple[list[str], list[tuple[str, str]]]:
    """A record's images (paths, [] for text-only) and its exchanges; DataError naming what is wrong."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if record.get("id") is None or str(record["id"]) == "":
        raise DataError(f"{where}: missing 'id'")
    image = record.get("image")
    if image is None:
        images = []
    elif isinstance(image, str) and image:
        images = [image]
    elif isinstance(image, list) and image and all(isinstance(i, str) and i for i in image):
        images = list(image)
    else:
        raise DataError(f"{where}: 'image' must be an image path, a non-empty list of paths, or absent (a text-only "
                        f"record), got {image!r:.80}")
    turns = conversation_turns(record, where, n_images=len(images))
    if forbidden:
        pattern = _pattern(forbidden)
        for k, (question, answer) in enumerate(turns):
            for role, text in (("question", question), ("answer", answer)):
                hit = pattern.search(text)
                if hit:
                    hit = hit.group(0)
                    raise DataError(f"{where}: the {role} of exchange {k + 1} contains the special token {hit!r}, "
                                    "which the tokenizer would read as a control token; remove it from the text")
    return images, turns


def scan_file(path, task: str, name: str, skip_bad_records: bool, skipped: Skipped,
              forbidden: tuple[str, ...] = ()) -> CompactRecords:
    """Every record of one file through `structure`: the good ones, compact, in file order."""
    store = CompactRecords()
    for index, record in enumerate(iter_records(path)):
        where = f"{path}: record {index} (id {record.get('id') if isinstance(record, dict) else None!r})"
        try:
            images, turns = structure(record, where, forbidden)
        except DataError as error:
            if not skip_bad_records:
                raise
            skipped.add(reason_of(str(error)), str(error))
            continue
        kept = {"id": str(record["id"]), "image": images, "turns": turns, "task": task, "source": name,
                "index": index}
        if record.get("references"):
            kept["references"] = record["references"]
        store.append(kept)
    return store


def mix(sources, samples_per_dataset: int | None = 10_000, seed: int = 0, skip_bad_records: bool = False,
        skipped: Skipped | None = None, forbidden: tuple[str, ...] = (), check=None) -> CompactRecords:
    """The multi-task mix (paper Sec. 4.1) of (task, name, path) sources as a CompactRecords store: per file, the
    structural pass, then k records drawn as data.mix_datasets draws them (k = None: all), prompts rewritten for
    the paper's single-turn, one-image caption and choice records. Dataset order, then draw order.
    `check(images, turns, where)`, when given, runs on every drawn record (loader.vicuna_length_check: DataError
    for a record too long, else whether it will be truncated); the store's `n_truncated` counts the latter."""
    skipped = Skipped() if skipped is None else skipped
    out, names = CompactRecords(), set()
    for task, name, path in sources:
        if task not in KINDS:
            raise ValueError(f"dataset {name!r} ({path}): task must be one of {KINDS}, got {task!r}")
        if name in names:
            raise ValueError(f"dataset name {name!r} appears twice in the mix")
        names.add(name)
        before = len(skipped)
        store = scan_file(path, task, name, skip_bad_records, skipped, forbidden)
        if not len(store):  # every record skipped: the task would silently leave the mix
            raise DataError(f"dataset {name!r} ({path}): no usable record, all {len(skipped) - before} skipped as bad "
                            f"(first: {skipped.examples[0] if skipped.examples else '-'})")
        rng = random.Random(f"{seed}/{name}")  # as data.mix_datasets
        for index in draw(len(store), samples_per_dataset, rng, f"dataset {name} ({path})"):
            record = store[index]
            if len(record["turns"]) == 1 and len(record["image"]) == 1 and task != "open":
                (question, answer), = record["turns"]
                record["turns"] = [(paper_question(task, question, rng), answer)]
            if check is not None:
                try:
                    out.n_truncated += check(record["image"], record["turns"],
                                             f"{path}: record {record['index']} (id {record['id']!r})")
                except DataError as error:
                    if not skip_bad_records:
                        raise
                    skipped.add(reason_of(str(error)), str(error))
                    continue
            out.append(record)
    if not len(out):
        raise DataError(f"no usable record in the mix: all {len(skipped)} skipped as bad (first: "
                        f"{skipped.examples[0] if skipped.examples else '-'})")
    return out


def record_where(record: dict) -> str:
    """How a stored record is named: its dataset, its index in that file and its id."""
    return f"{record['source']}: record {record['index']} (id {record['id']!r})"


def check_image(path: Path, where: str, size_error=None) -> tuple[int, int]:
    """An image's header opens (data.open_image) and, with `size_error(width, height)` (the processor's own rule,
    HFMLLM.image_size_error), its size is one the processor takes; its (width, height), or DataError /
    FileNotFoundError naming `where`."""
    width, height = open_image(path, where, header_only=True)
    problem = size_error(width, height) if size_error else None
    if problem:
        raise DataError(f"{where}: image {path} ({width} x {height}): {problem}")
    return width, height


_IMAGE_CHECK = None  # (store, folder, size_error, length_error) for check_images' forked worker processes


def _check_record_images(index: int) -> str | None:
    """Why record `index`'s images fail --check-images, or None (runs in a forked worker: reads _IMAGE_CHECK)."""
    store, folder, size_error, length_error = _IMAGE_CHECK
    record = store[index]
    try:
        sizes = [check_image(folder / image, record_where(record), size_error) for image in record["image"]]
    except (DataError, FileNotFoundError) as error:
        return str(error)
    return length_error(record, sizes) if length_error else None


def check_images(store: CompactRecords, image_folder, skip_bad_records: bool, skipped: Skipped,
                 workers: int | None = None, size_error=None, length_error=None) -> CompactRecords:
    """--check-images: every image's header opened, in `workers` forked processes (default: the CPUs this process
    may use; opening a header is Python work, so threads would queue on the GIL); a missing or unreadable image,
    one whose size `size_error(width, height)` refuses (the processor's own rule, HFMLLM.image_size_error), or a
    record `length_error(record, sizes)` names (its images' sizes known: loader.generic_length_check) stops the run
    naming its record, or with skip_bad_records the record is left out and counted. The workers only read files
    (no CUDA), so forking a process that holds a model is safe."""
    global _IMAGE_CHECK
    workers = workers or len(os.sched_getaffinity(0))
    _IMAGE_CHECK = (store, Path(image_folder), size_error, length_error)
    try:
        progress = dict(total=len(store), unit="record", desc="--check-images", disable=len(store) < 10_000,
                        dynamic_ncols=True)
        if workers < 2 or len(store) < 2_000:
            problems = [_check_record_images(i) for i in tqdm(range(len(store)), **progress)]
        else:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                problems = list(tqdm(pool.imap(_check_record_images, range(len(store)), chunksize=512), **progress))
    finally:
        _IMAGE_CHECK = None
    if not any(problems):
        return store
    first = next(p for p in problems if p)
    if not skip_bad_records:
        raise DataError(first) if "does not exist" not in first else FileNotFoundError(first)
    kept = CompactRecords()
    kept.n_truncated = store.n_truncated
    for index, problem in enumerate(problems):
        if problem:
            skipped.add(reason_of(problem), problem)
        else:
            kept.append(store[index])
    if not len(kept):
        raise DataError(f"no usable record: every image failed its check (first: {first})")
    return kept
