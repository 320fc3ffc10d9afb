"""Tests for the lazy data path (records.py, loader.py) and the records beyond the paper's two tasks.

Covered: the streaming JSON-list parser equals json.loads across chunk boundaries and names malformed input by
line and column; lazy samples are bit-equal to the eager datasets' (data.MultiTaskDataset, hf_models.HFDataset) on
LLaVA, VILA and a generic family; a text-only record is tokenised as our transcription of LLaVA's preprocess_v1
without an image, and gets CE only under NRCA; multi-image records on Qwen2-VL (Eq. 2 per image) and their
refusals on LLaVA / Idefics3; special-token text, a bad record deep in a large file, a truncated image with
--skip-bad-records (its place gets no label, the run goes on, the skip is counted); a LLaVA-mix-shaped file
(text-only, multi-turn, <image> first or last, an `open` task) trains with NRCA through train.py with loader workers
and gives the same weights as without them; --max-pixels sets Qwen2-VL's pixel budget.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_loader.py
"""

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import preprocess_v1_reference
from PIL import Image
from safetensors.torch import load_file

import data
import evaluate
import hf_models
import hf_tiny
import loader
import models
import nrca
import records
import train
from data import IGNORE_INDEX, DataError


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, indent=1))
    return path


def record(i, question="<image>\nWhat is shown?", answer="two red circles on the left", image="images/train_00000.png",
           **extra):
    out = {"id": str(i), "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
           **extra}
    if image is not None:
        out["image"] = image
    return out


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------
def test_streaming_parser_equals_json_loads_across_chunks(tmp_path, monkeypatch):
    rng = random.Random(0)
    values = [{"id": i, "text": "é" * rng.randrange(40) + "\n" * rng.randrange(2), "n": [1.5, None, True]}
              for i in range(300)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(values, indent=rng.choice([None, 1])), encoding="utf-8")
    for chunk in (7, 64, 1 << 20):  # records cut by chunk ends (also inside a multi-byte character)
        monkeypatch.setattr(records, "_CHUNK", chunk)
        assert list(records.iter_records(path)) == values


def test_a_byte_order_mark_is_skipped(tmp_path):
    values = [{"id": "a", "n": 1}, {"id": "b", "n": 2}]
    (tmp_path / "list.json").write_bytes(records.BOM + json.dumps(values).encode())
    (tmp_path / "lines.jsonl").write_bytes(records.BOM + "\n".join(map(json.dumps, values)).encode())
    assert list(records.iter_records(tmp_path / "list.json")) == list(records.iter_records(tmp_path / "lines.jsonl"))\
        == values


@pytest.mark.parametrize("text", ['[\n {"id": 1},\n {"id": 2,}\n]', '[{"id": 1} {"id": 2}]', '[\n {"id": 1},\n'],
                         ids=["inside-a-record", "between-records", "not-closed"])
def test_streaming_parser_names_line_and_column_as_json_does(tmp_path, monkeypatch, text):
    monkeypatch.setattr(records, "_CHUNK", 5)  # the error lies chunks away from the start
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(DataError, match=rf"bad.json: malformed JSON at line {expected.value.lineno}, column "
                                        rf"{expected.value.colno}:"):
        list(records.iter_records(path))


# ---------------------------------------------------------------------------------------------
# Lazy == eager
# ---------------------------------------------------------------------------------------------
def sources(root: Path):
    return [("caption", "cap", str(root / "train_caption.json")), ("choice", "mc", str(root / "train_choice.json"))]


def assert_same_sample(lazy: dict, eager: dict):
    assert eager.keys() <= lazy.keys() and lazy.keys() - eager.keys() <= {"answer", "references"}  # HFDataset: none
    for key, value in eager.items():
        other = lazy[key]
        if isinstance(value, dict):
            assert value.keys() == other.keys() and all(torch.equal(value[k], other[k]) for k in value), key
        elif torch.is_tensor(value):
            assert value.dtype == other.dtype and torch.equal(value, other), key
        else:
            assert value == other, key


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-vila", "tiny-qwen2-vl"])
def test_lazy_samples_equal_eager(model, synthetic_data_dir, tmp_path):
    mllm = models.load_model(hf_tiny.write(model, str(tmp_path / model)) if model.startswith("tiny-qwen") else model)
    multi = write_json(tmp_path / "multi.json", [
        {"id": f"multi-{i}", "image": "images/train_00001.png", "conversations": [
            {"from": "human", "value": "<image>\nFirst?"}, {"from": "gpt", "value": f"one {i}"},
            {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "two three"}]} for i in range(3)])
    mix = sources(synthetic_data_dir) + [("caption", "multi", str(multi))]
    eager = mllm.dataset(data.mix_datasets([data.Source(n, p, t) for t, n, p in mix], samples_per_dataset=5, seed=3),
                         synthetic_data_dir, max_length=256)
    store = loader.checked_mix(mllm, mix, 5, seed=3, max_length=256)
    lazy = loader.LazySamples(store, synthetic_data_dir, mllm, 256)
    assert len(lazy) == len(eager) == 13
    for i in range(len(eager)):
        assert_same_sample(lazy[i], eager[i])
    padding = lazy[-1 - 4]  # train.py's padding index: record 4, no label
    assert torch.equal(padding["input_ids"], eager[4]["input_ids"]) and (padding["labels"] == IGNORE_INDEX).all()


def test_all_records_and_the_compact_store(synthetic_data_dir):
    store = records.mix(sources(synthetic_data_dir), None, seed=0)
    n = len(json.loads((synthetic_data_dir / "train_caption.json").read_text()))
    assert len(store) == 2 * n and store.nbytes < 400 * len(store)
    ids = [r["id"] for r in store]
    assert len(set(ids)) == len(ids) and store[-1] == store[len(store) - 1]


# ---------------------------------------------------------------------------------------------
# Text-only, open and multi-image records
# ---------------------------------------------------------------------------------------------
def test_text_only_record_is_llavas_preprocess_v1_without_image():
    mllm = models.load_model("tiny-llava")
    tokenizer = mllm.tokenizer
    turns = [("What is two plus two?", "four"), ("And three plus three?", "six")]
    sample = mllm.encode_record([], turns, 512, "t")
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids
    input_ids, labels = preprocess_v1_reference(turns, encode, tokenizer.bos_token_id, tokenizer.eos_token_id, 0,
                                                mllm.image_token_id, with_image=False)
    assert sample["pixel_values"] is None and mllm.image_token_id not in sample["input_ids"].tolist()
    assert sample["input_ids"].tolist() == input_ids and sample["labels"].tolist() == labels


def test_text_only_samples_get_ce_only_under_nrca():
    torch.manual_seed(0)
    n = 6
    nll, confidence = torch.rand(2, n), torch.rand(2, n)
    noisy = torch.rand(2, n)
    mask = torch.ones(2, n, dtype=torch.bool)
    both = nrca.nrca_objective(nll, confidence, noisy, mask, has_image=torch.tensor([True, True]))
    one = nrca.nrca_objective(nll, confidence, noisy, mask, has_image=torch.tensor([True, False]))
    first = nrca.nrca_objective(nll[:1], confidence[:1], noisy[:1], mask[:1])
    assert both.n_open == 2 and one.n_open == 1
    assert torch.allclose(one.ce, both.ce) and torch.allclose(one.alignment, first.alignment)


def mixed_records():
    """LLaVA-mix-shaped records: single- and multi-turn, <image> first or last, text-only."""
    out = []
    for i in range(12):
        kind = i % 4
        question = ["<image>\nWhat colour are the shapes?", "Where are the shapes?\n<image>",
                    "<image>\nDescribe the picture.", "Say the word blue."][kind]
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": ["red", "on the left", "two small "
                                                                                  "circles", "blue"][kind]}]
        if kind == 2:
            turns += [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "two"}]
        item = {"id": f"mix-{i}", "conversations": turns}
        if kind != 3:
            item["image"] = f"images/train_{i:05d}.png"
        out.append(item)
    return out


def test_llava_mix_trains_with_nrca_workers_equal_no_workers(synthetic_data_dir, tmp_path):
    mix = write_json(tmp_path / "mix.json", mixed_records())
    test = write_json(tmp_path / "test_open.json", [record(f"t{i}", question="<image>\nWhat colour are the shapes?",
                                                           answer="red", image=f"images/test_{i:05d}.png")
                                                    for i in range(2)])
    weights = {}
    for workers in (0, 2):
        out = tmp_path / f"run{workers}"
        result = train.main(train.make_config(
            model="tiny-llava", train=[f"open:mix={mix}", f"choice:mc={synthetic_data_dir / 'train_choice.json'}"],
            test=[f"open:t={test}"], image_folder=str(synthetic_data_dir), out_dir=str(out), base_epochs=0,
            epochs=1, batch_size=8, micro_batch_size=4, samples_per_dataset=8, method="nrca", num_workers=workers,
            eval_max_new_tokens=3, max_length=256))
        assert result["n_open_answers"] == 2 and 0 <= result["open_exact_match"] <= 100
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps if "step" in s] == [1, 2]
        weights[workers] = load_file(str(out / "checkpoint-2" / "trainable.safetensors"))
    assert all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    store = records.mix([("open", "mix", str(mix))], None)
    assert sum(not r["image"] for r in store) == 3 and {r["turns"][0][0] for r in store} >= {
        "Where are the shapes?", "Say the word blue."}  # prompts as written, <image> removed wherever it was


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return hf_tiny.write("tiny-qwen2-vl", str(tmp_path_factory.mktemp("qwen") / "q"))


@pytest.fixture(scope="module")
def qwen(qwen_folder):
    return models.load_model(qwen_folder)


def test_multi_image_and_text_only_train_on_qwen(qwen_folder, synthetic_data_dir, tmp_path):
    """Two-image, one-image and text-only records through train.py on Qwen2-VL with NRCA, then evaluate.py."""
    two = [{"id": f"two-{i}", "image": [f"images/train_{i:05d}.png", f"images/train_{i + 1:05d}.png"],
            "conversations": [{"from": "human", "value": "Is <image> the same as <image>?"},
                              {"from": "gpt", "value": "no, they differ"}]} for i in range(4)]
    path = write_json(tmp_path / "mix.json", two + mixed_records()[:4])
    test = write_json(tmp_path / "test.json", [record("t", answer="red", image="images/test_00000.png")])
    out = tmp_path / "run"
    result = train.main(train.make_config(
        model=str(qwen_folder), train=[f"open:mix={path}"], test=[f"open:t={test}"],
        image_folder=str(synthetic_data_dir), out_dir=str(out), epochs=1, batch_size=4, micro_batch_size=4,
        samples_per_dataset=-1, method="nrca", eval_max_new_tokens=3))
    assert result["n_open_answers"] == 1
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "step" in s] == [1, 2] and all(s["n_open"] >= 0 for s in steps if "step" in s)
    assert evaluate.main([str(out), "--test", f"open:t={test}", "--image-folder", str(synthetic_data_dir), "--limit",
                          "1", "--max-new-tokens", "2"])["n_open_answers"] == 1


def test_multi_image_on_qwen_noise_per_image_and_refusals(qwen, synthetic_data_dir, tmp_path):
    from noise import noisy_pixel_values

    images = [Image.new("RGB", (56, 56), (230, 230, 230)), Image.new("RGB", (84, 56), (20, 20, 20))]
    sample = qwen.encode_record(images, [("Compare <image> with <image>.", "red then blue")], 1024, "r")
    pixels = sample["pixel_values"]
    assert pixels["image_grid_thw"].shape[0] == 2
    image_pad = qwen.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = (pixels["image_grid_thw"].prod(-1) // 4).tolist()  # merge 2 x 2
    assert int((sample["input_ids"] == image_pad).sum()) == sum(counts)
    noisy = noisy_pixel_values(pixels, qwen.model.config, delta=1.0, generator=torch.Generator().manual_seed(0))
    first = counts[0] * 4  # patches of image 1: its own mean and std (Eq. 2a) whatever image 2 holds
    clean = pixels["pixel_values"]
    assert float(clean[:first].mean() - clean[first:].mean()) > 2  # pooled statistics would pull both to the middle
    for part in (slice(0, first), slice(first, None)):
        assert abs(float(noisy["pixel_values"][part].mean() - clean[part].mean())) < 0.1
    with pytest.raises(DataError, match="llava takes one image per sample"):
        models.load_model("tiny-llava").encode_record(images, [("<image> <image>", "x")], 512, "r")
    with pytest.raises(DataError, match="r: 1 '<image>' placeholder.*2 image"):
        records.structure({"id": "r", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image> and?"}, {"from": "gpt", "value": "x"}]}, "r")


def test_structural_pass_names_bad_records_before_step_1(qwen, tmp_path):
    good = [record(i) for i in range(5000)]
    bad = good[:4321] + [record("deep", question="<image>\nHi <|image_pad|>")] + good[4321:]
    path = write_json(tmp_path / "big.json", bad)
    with pytest.raises(DataError, match=r"big.json: record 4321 \(id 'deep'\): the question of exchange 1 contains "
                                        r"the special token '<\|image_pad\|>'"):
        records.mix([("open", "big", str(path))], None, forbidden=records.special_tokens(qwen.tokenizer))
    skipped = records.Skipped()
    store = records.mix([("open", "big", str(path))], None, skip_bad_records=True, skipped=skipped,
                        forbidden=records.special_tokens(qwen.tokenizer))
    assert len(store) == 5000 and len(skipped) == 1 and "special token" in next(iter(skipped.summary()))
    reply = write_json(tmp_path / "reply.json", [record(0, answer="see <image>")])
    with pytest.raises(DataError, match=r"reply turn 1 holds an '<image>' placeholder"):
        records.mix([("open", "r", str(reply))], None)
    empty = write_json(tmp_path / "empty_reply.json", [record(0, answer="  ")])
    with pytest.raises(DataError, match="the answer turn is empty"):
        records.mix([("open", "e", str(empty))], None)


def test_truncated_image_skipped_while_loading(synthetic_data_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(folder / f"{i}.png")
    (folder / "2.png").write_bytes((folder / "2.png").read_bytes()[:60])  # header fine, pixels cut
    path = write_json(tmp_path / "t.json", [record(i, image=f"images/{i}.png") for i in range(4)])
    mllm = models.load_model("tiny-llava")
    store = records.mix([("caption", "t", str(path))], None)
    strict = loader.LazySamples(store, tmp_path, mllm, 256)
    index = next(i for i in range(4) if store[i]["id"] == "2")
    with pytest.raises(DataError, match=r"t: record 2 \(id '2'\): image .*2.png cannot be read"):
        strict[index]
    lenient = loader.LazySamples(store, tmp_path, mllm, 256, skip_bad_records=True)
    item = lenient[index]
    assert "cannot be read" in item["skipped"] and (item["labels"] == IGNORE_INDEX).all()
    batch = loader.collate_loaded(mllm)([lenient[i] for i in range(4)])
    assert len(batch["skipped"]) == 1 and batch["pixel_values"].shape[0] == 4


@pytest.fixture
def own_budget(qwen):
    """The module's Qwen2-VL with its processor's own pixel budget restored after the test."""
    size = qwen.processor.image_processor.size
    yield qwen
    qwen.processor.image_processor.size = size


def test_max_pixels_sets_qwens_budget(own_budget, tmp_path):
    qwen = own_budget
    image = Image.new("RGB", (560, 560), (0, 0, 0))
    before = qwen.processed_prompt(qwen.render([("What?", None)]), image)["pixel_values"]["image_grid_thw"]
    import hf_models

    patch = qwen.processor.image_processor.patch_size
    budget = int(before.prod()) * patch * patch // 2  # half the pixels the processor's own budget gives
    hf_models.set_resolution(qwen, max_pixels=budget)
    after = qwen.processed_prompt(qwen.render([("What?", None)]), image)["pixel_values"]["image_grid_thw"]
    assert int(after.prod()) * patch * patch <= budget < int(before.prod()) * patch * patch
    with pytest.raises(ValueError, match="llava resizes every image to a fixed size"):
        hf_models.set_resolution(models.load_model("tiny-llava"), max_pixels=1000)
    wide = Image.new("RGB", (2000, 3), (0, 0, 0))
    with pytest.raises(DataError, match="r: the .*Processor refused the record's image"):
        qwen.encode_record([wide], [("What?", "x")], 1024, "r")
    # --check-images: the processor's own rule on every header, before step 1
    (tmp_path / "images").mkdir()
    wide.save(tmp_path / "images" / "wide.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "ok.png")
    path = write_json(tmp_path / "w.json", [record(0, image="images/ok.png"), record(1, image="images/wide.png")])
    store = records.mix([("open", "w", str(path))], None)
    with pytest.raises(DataError, match=r"w: record 1 \(id '1'\): image .*wide.png \(2000 x 3\): the "
                                        r".*refuses it: absolute aspect ratio must be smaller than 200"):
        records.check_images(store, tmp_path, False, records.Skipped(), size_error=qwen.image_size_error)
    skipped = records.Skipped()
    kept = records.check_images(store, tmp_path, True, skipped, size_error=qwen.image_size_error)
    assert [r["id"] for r in kept] == ["0"] and len(skipped) == 1


def test_image_tokens_from_the_header_equal_the_processors(qwen):
    """HFMLLM.image_tokens (what --check-images reads from a header) on Qwen2-VL and Qwen2.5-VL, by smart_resize's
    grid without a picture, against the processor's own expansion of a real one."""
    for mllm in (qwen, hf_tiny.build("qwen2_5_vl")):
        image_token = mllm.model.config.image_token_id
        for size in [(32, 32), (560, 560), (640, 480), (1000, 37), (3000, 2000), (57, 911), (9, 9)]:
            ids = mllm.processed_prompt(mllm.render([("What?", None)]), Image.new("RGB", size))["input_ids"]
            assert mllm.image_tokens(*size) == int((ids == image_token).sum()), (mllm.model.config.model_type, size)
        assert mllm.max_image_tokens == mllm.image_tokens(32, 32)  # the tiny processors' budget: 1024 pixels
        with pytest.raises(DataError, match="a 2000 x 3 picture: the .* refuses it: absolute aspect ratio"):
            mllm.image_tokens(2000, 3)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "idefics3"])
def test_check_images_names_a_record_with_no_room_before_step_1(family, qwen, tmp_path):
    """--check-images on a generic family: a record whose first prompt (its pictures' tokens from their headers)
    leaves no room for an answer token within --max-length is named before step 1, or skipped and counted; at one
    token more it passes. Each record is tried at its own limit, so a bound that undercounted would let one
    through (a bound 9 tokens lower does)."""
    mllm = qwen if family == "qwen2_vl" else hf_tiny.build(family)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, size in [("big", (640, 480)), ("small", (9, 9)), ("thin", (1000, 37))]:
        Image.new("RGB", size, (90, 20, 20)).save(folder / f"{name}.png")
    rows = [record("one", image="images/big.png"), record("tiny", image="images/small.png"),
            record("long", question="<image>\n" + "Qu'y a-t-il à gauche ? " * 12, image="images/thin.png"),
            record("text", question="Name a colour.", image=None),
            record("bytes", question="<image>\n" + "éàü" * 5, image="images/big.png")]  # a token per byte here
    if family in hf_models.MULTI_IMAGE:
        rows.append({**record("two", question="<image> left, <image> right: which is red?"),
                     "image": ["images/big.png", "images/thin.png"]})
    path = write_json(tmp_path / "q.json", rows)
    store = records.mix([("open", "q", str(path))], None)
    prompt_length = {}
    for item in store:
        images = [Image.open(tmp_path / image).convert("RGB") for image in item["image"]]
        text, _ = mllm.conversation([tuple(turn) for turn in item["turns"]], "t", n_images=len(images))
        prompt_length[item["id"]] = len(mllm.processed_prompt(text, images)["input_ids"])
    for item in store:
        fits = loader.generic_length_check(mllm, prompt_length[item["id"]] + 1, tmp_path)
        assert fits(item, [Image.open(tmp_path / image).size for image in item["image"]]) is None
    shortest = min(prompt_length.values())
    with pytest.raises(DataError, match="no usable record"):  # the shortest prompt's limit: none fits
        records.check_images(store, tmp_path, True, records.Skipped(),
                             length_error=loader.generic_length_check(mllm, shortest, tmp_path))
    for victim, limit in prompt_length.items():
        if limit == shortest:
            continue
        skipped = records.Skipped()
        check = loader.generic_length_check(mllm, limit, tmp_path)
        kept = records.check_images(store, tmp_path, True, skipped, length_error=check)
        too_long = sorted(name for name, length in prompt_length.items() if length >= limit)
        assert sorted(set(prompt_length) - {r["id"] for r in kept}) == too_long and victim in too_long
        assert len(skipped) == len(too_long)
        if len(too_long) == 1:
            with pytest.raises(DataError, match=rf"q: record \d+ \(id '{victim}'\): the prompt is {limit} tokens and "
                                                rf"leaves no room for an answer token within max_length={limit}"):
                records.check_images(store, tmp_path, False, records.Skipped(), length_error=check)
    assert loader.generic_length_check(models.load_model("tiny-llava"), 256, tmp_path) is None


def test_open_test_split_exact_match(tmp_path):
    from metrics import exact_match, normalise_answer

    assert normalise_answer("Two dogs.") == "2 dogs" and normalise_answer("The 3.5 m pole!") == "3.5 m pole"
    scores = exact_match({"a": "two", "b": "A cat", "c": "no"}, {"a": ["2"], "b": ["cat", "kitten"], "c": ["yes"]})
    assert scores["per_id"] == {"a": True, "b": True, "c": False} and abs(scores["exact_match"] - 200 / 3) < 1e-9
    split = evaluate.validate_test_records([record("q", answer="Yes")], "open")
    assert split[0]["references"] == ["Yes"]


def test_a_record_failing_in_a_worker_is_named_in_one_line(synthetic_data_dir, tmp_path):
    """With --num-workers 2 a truncated image stops the run with the worker's one-line error (the DataLoader wraps it
    in the worker's traceback); train.py's command line prints it as `train.py: error: ...`, exit 2."""
    import subprocess
    import sys

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(folder / f"{i}.png")
    (folder / "2.png").write_bytes((folder / "2.png").read_bytes()[:60])
    path = write_json(tmp_path / "t.json", [record(i, image=f"images/{i}.png") for i in range(4)])
    mllm = models.load_model("tiny-llava")
    dataset = loader.LazySamples(records.mix([("caption", "t", str(path))], None), tmp_path, mllm, 256)
    with pytest.raises(DataError, match=r"^t: record 2 \(id '2'\): image .*2.png cannot be read"):
        list(loader.batch_loader(dataset, [[0, 1], [2, 3]], mllm, num_workers=2))
    out = subprocess.run([sys.executable, str(Path(train.__file__)), "--train", f"caption:t={path}", "--image-folder",
                          str(tmp_path), "--base-epochs", "0", "--no-eval-every-epoch", "--num-workers", "2",
                          "--batch-size", "4", "--micro-batch-size", "2", "--out-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, env={**__import__("os").environ, "TQDM_DISABLE": "1"})
    assert out.returncode == 2 and "train.py: error: t: record 2 (id '2'): image" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("model, extra", [("tiny-llava", ["--fsdp"]), ("tiny-qwen2-vl", [])],
                         ids=["llava-fsdp", "qwen2-vl-ddp"])
def test_text_only_micro_batches_on_two_gloo_ranks(model, extra, tmp_path):
    """Half the records text-only, one sample per rank and step: some steps one rank has a picture and the other
    none. train.anchored_to_pictures runs the tower and connector on a blank picture there; without it DDP stops
    ("parameters that were not used") and FSDP2 hangs. Both ranks end with the same weights."""
    from conftest import torchrun_train

    (tmp_path / "images").mkdir()
    mix = []
    for i in range(8):
        turns = [{"from": "human", "value": "Say blue." if i % 2 else "<image>\nWhat colour?"},
                 {"from": "gpt", "value": "blue blue" if i % 2 else "a red one"}]
        mix.append({"id": f"r{i}", "conversations": turns})
        if i % 2 == 0:
            Image.new("RGB", (32, 32), (200, 10 * i, 10)).save(tmp_path / "images" / f"{i}.png")
            mix[-1]["image"] = f"images/{i}.png"
    path = write_json(tmp_path / "mix.json", mix)
    folder = hf_tiny.write(model, str(tmp_path / "model")) if model.startswith("tiny-qwen") else model
    rank0, rank1 = torchrun_train(tmp_path, [
        "--model", str(folder), "--train", f"open:m={path}", "--image-folder", str(tmp_path), "--samples-per-dataset",
        "all", "--base-epochs", "0", "--epochs", "1", "--no-eval-every-epoch", "--batch-size", "2",
        "--micro-batch-size", "1", "--out-dir", str(tmp_path / "run"), "--method", "nrca", *extra])
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
