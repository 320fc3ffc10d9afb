"""Bad input on the generic path (issue 30): each case ends with one named error before anything is written or
trained, never a traceback, a destroyed folder or a silently different run. Tiny Qwen2-VL folders from hf_tiny.py;
most cases fail before a model loads, the few that train stop after one step.

Covered:
1. A run never writes into (nor --overwrite deletes) a folder that holds no run, the --model folder or one of its
   own run files (the testbed base beside its vision stage still trains), nor a testbed world into a model folder;
   a file as --out-dir / --data-dir is named; hf_tiny.py refuses a non-empty folder.
2. --resume refuses a changed chat template (.jinja, chat_template.json, inside tokenizer_config.json), tokenizer
   or processor, compares config.json when run.json is missing, and names a damaged run.json / config.json.
5. train.py's and evaluate.py's option ranges (limits, token counts, layer counts, batch sizes, devices) are
   checked before a model loads; evaluate.py names a damaged RUN/config.json or eval.json (`table` too), a model
   folder without data and `score`'s bad prediction lines, each in cli.py's one line with exit 2.
4. A broken model folder (no weights, tokenizer, tokenizer_config.json, processor settings or chat template; a
   config.json with a layer more or less, another intermediate or vocabulary size) is named by load_model, also
   through evaluate.py.
3. An empty data set in a mix (`[]`, or every record skipped) and a bad --test file (a record of any task kind,
   open included; a missing image) are errors before the model loads; a --test image the loaded model's processor
   refuses (Qwen2-VL's aspect ratio) is one before step 1, not at the first epoch's evaluation.
Smaller: --help says --test is required with --train. (The study scripts' row: test_study_scripts_reliability.py.)

    python -m pytest -q tests/test_reliability.py
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import hf_tiny
import run_folder
import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    """A tiny Qwen2-VL folder, never changed by a test (copy it with `model_copy` to change it)."""
    return Path(hf_tiny.write("tiny-qwen2-vl", str(tmp_path_factory.mktemp("model") / "tiny-qwen2-vl")))


def model_copy(qwen: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(qwen, copy)
    return copy


def settings(model, data_dir, out_dir, **overrides):
    """8 records, global batch 4 as two micro-batches of 2, one epoch, no evaluation."""
    base = dict(model=str(model), data_dir=str(data_dir), out_dir=str(out_dir), base_epochs=0, epochs=1,
                batch_size=4, micro_batch_size=2, samples_per_dataset=4, eval_every_epoch=False)
    return train.make_config(**{**base, **overrides})


def folder_state(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)


def error_line(done: subprocess.CompletedProcess) -> str:
    """cli.py's one line of a tool that ended with bad input (exit 2, no traceback)."""
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, done.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 1. A run folder never destroys what is not a run.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_the_model_folder_is_never_the_run_folder(overwrite, qwen, synthetic_data_dir, tmp_path):
    model = model_copy(qwen, tmp_path)
    before = folder_state(model)
    with pytest.raises(run_folder.RunFolderError, match=r"--out-dir .*model is the --model folder"):
        train.main(settings(model, synthetic_data_dir, model, overwrite=overwrite))
    with pytest.raises(run_folder.RunFolderError, match=r"--out-dir .*run is inside the --model folder"):
        train.main(settings(model, synthetic_data_dir, model / "run", overwrite=overwrite))
    assert folder_state(model) == before


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_a_folder_holding_no_run_is_refused(overwrite, qwen, synthetic_data_dir, tmp_path):
    other_model = model_copy(qwen, tmp_path)  # another model folder as --out-dir: its config.json is no TrainConfig
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    for out in (other_model, notes):
        before = folder_state(out)
        with pytest.raises(run_folder.RunFolderError, match=rf"--out-dir {out} is not empty and holds no run of "
                                                            r"train.py \(.*(config.json|todo.txt)"):
            train.main(settings("tiny-llava", synthetic_data_dir, out, overwrite=overwrite))
        assert folder_state(out) == before


def test_a_file_as_out_dir_or_data_dir_and_a_model_folder_as_data_dir_are_named(qwen, synthetic_data_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(run_folder.RunFolderError, match=r"--out-dir .*notes.txt is a file, not a folder"):
        train.main(settings("tiny-llava", synthetic_data_dir, tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match=r"--data-dir .*notes.txt is a file; expected a data folder"):
        settings("tiny-llava", tmp_path / "notes.txt", tmp_path / "run")
    before = folder_state(qwen)
    with pytest.raises(ValueError, match=rf"--data-dir {qwen} is a model folder .*: the testbed world would be "
                                         "written into it"):
        settings(qwen, qwen, tmp_path / "run")
    assert folder_state(qwen) == before and (tmp_path / "notes.txt").read_text() == "keep me"


def test_the_model_as_one_of_the_runs_own_files_is_refused(qwen, synthetic_data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(qwen, run / "final")  # --model RUN/final --out-dir RUN: --overwrite would delete the model
    (run / "config.json").write_text(json.dumps({"method": "nrca", "out_dir": str(run)}))
    with pytest.raises(run_folder.RunFolderError, match=r"--model .*final is one of the run files of --out-dir"):
        train.main(settings(run / "final", synthetic_data_dir, run, overwrite=True))
    assert (run / "final" / "model.safetensors").is_file()


def test_the_testbed_base_still_trains_beside_its_vision_stage(tmp_path, monkeypatch):
    """The embedded default's base run: --model BASE/vision-stage, --out-dir BASE holding it and seconds.json."""
    import testbed

    class Trained(Exception):
        pass

    def train_stub(cfg, *args):
        assert Path(cfg.model) == Path(cfg.out_dir) / "vision-stage" and (Path(cfg.out_dir) / "seconds.json").is_file()
        raise Trained

    root = tmp_path / "world"
    (root / "pretrain").mkdir(parents=True)
    (root / "pretrain" / "train_caption.json").write_text("[]")
    monkeypatch.setattr(testbed, "ensure_world", lambda *args, **kwargs: False)
    monkeypatch.setattr(testbed, "pretrain_vision_tower", lambda *args, **kwargs: 0.0)
    monkeypatch.setattr(train, "_train", train_stub)
    cfg = train.make_config(data_dir=str(root), out_dir=str(tmp_path / "runs" / "nrca"), base_epochs=1)
    with pytest.raises(Trained):  # claimed, not refused
        train.pretrain_base_model(cfg, 0, 1, torch.device("cpu"))


def test_hf_tiny_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    done = tool("hf_tiny.py", "tiny-qwen2-vl", str(tmp_path / "run"))
    assert error_line(done).startswith(f"hf_tiny.py: error: {tmp_path / 'run'} exists and is not an empty folder")
    assert (tmp_path / "run" / "config.json").read_text() == "{}"


# ---------------------------------------------------------------------------------------------
# 2. --resume fingerprints everything that shapes a training sequence; damaged run files are named.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped(qwen, synthetic_data_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(model, run): NRCA on a copy of the tiny Qwen2-VL, stopped with a checkpoint after step 1 of 2."""
    root = tmp_path_factory.mktemp("stopped")
    model = model_copy(qwen, root)
    run = root / "run"
    assert train.main(settings(model, synthetic_data_dir, run, stop_at_step=1)) == {"stopped_at_step": 1}
    return model, run


def resumable(stopped, tmp_path) -> tuple[Path, Path]:
    """A copy of the stopped model and run to change and resume (the run's model path may change on resume)."""
    model, run = tmp_path / "model", tmp_path / "run"
    shutil.copytree(stopped[0], model)
    shutil.copytree(stopped[1], run)
    return model, run


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def swap_two_tokens(tokenizer: dict) -> None:
    """Another tokenizer of the same size: the ids of two BPE tokens exchanged."""
    vocab = tokenizer["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]


TERSE = hf_tiny.QWEN_TEMPLATE.replace("You are a helpful assistant.", "You are terse.")  # a template that works


@pytest.mark.parametrize("change, named", [
    (lambda m: (m / "chat_template.jinja").write_text((m / "chat_template.jinja").read_text().replace(
        "You are a helpful assistant.", "You are terse.")), r"files \['chat_template.jinja'\] differ"),
    (lambda m: edit_json(m / "tokenizer_config.json", lambda c: c.update(chat_template=TERSE)),
     r"files \['tokenizer_config.json'\] differ"),
    (lambda m: (m / "chat_template.json").write_text(json.dumps({"chat_template": TERSE})),
     r"files \['chat_template.json'\] new"),
    (lambda m: edit_json(m / "processor_config.json", lambda c: c["image_processor"].update(merge_size=1)),
     r"files \['processor_config.json'\] differ"),
    (lambda m: edit_json(m / "tokenizer.json", swap_two_tokens), r"files \['tokenizer.json'\] differ"),
], ids=["chat_template.jinja", "template-in-tokenizer_config", "chat_template.json", "processor", "tokenizer"])
def test_resume_refuses_a_changed_template_tokenizer_or_processor(change, named, stopped, synthetic_data_dir,
                                                                   tmp_path):
    model, run = resumable(stopped, tmp_path)
    change(model)
    with pytest.raises(run_folder.RunFolderError, match=rf"starting model: .* at the start, .* now; {named}"):
        train.main(settings(model, synthetic_data_dir, run, resume=True))
    assert (run / "latest").read_text() == "checkpoint-1"


def test_resume_without_run_json_compares_config_json(stopped, synthetic_data_dir, tmp_path):
    model, run = resumable(stopped, tmp_path)
    (run / "run.json").unlink()  # a run of an older train.py
    with pytest.raises(run_folder.RunFolderError, match=r"method: 'nrca' at the start, 'full' now"):
        train.main(settings(model, synthetic_data_dir, run, resume=True, method="full"))
    (run / "config.json").unlink()  # nothing left to compare: a note, as before
    cfg = settings(model, synthetic_data_dir, run, resume=True)
    run_folder.check_resume(run, cfg, train.training_sources(cfg), 2)


def test_a_run_started_before_templates_were_hashed_resumes(stopped, synthetic_data_dir, tmp_path, capsys):
    model, run = resumable(stopped, tmp_path)
    edit_json(run / "run.json", lambda r: (r.pop("model_suffixes"), r["model"].pop("chat_template.jinja")))
    capsys.readouterr()
    train.main(settings(model, synthetic_data_dir, run, resume=True, eval_every_epoch=True, eval_limit=1,
                        eval_max_new_tokens=2))  # not "files ['chat_template.jinja'] new"
    assert (run / "final").is_dir()
    closing = capsys.readouterr().out.splitlines()[-1]  # Table 1's attention shares are not offered for Qwen2-VL
    assert closing == f"model: {run / 'final'}; more: python evaluate.py {run} [--noisy]"


@pytest.mark.parametrize("file, text, named", [
    ("run.json", "{", r"run.json: not valid JSON \(line 1, column 2: Expecting property name"),
    ("run.json", "[]", r"run.json: holds a JSON list, expected the object train.py writes"),
    ("run.json", '{"config": {}, "model": {}, "data": []}', r"run.json: its config has no 'model'"),
    ("config.json", "{", r"config.json: not valid JSON"),
    ("config.json", '"nrca"', r"config.json: holds a JSON str"),
], ids=["run.json-truncated", "run.json-list", "run.json-edited", "config.json-truncated", "config.json-str"])
def test_damaged_run_files_are_named(file, text, named, stopped, synthetic_data_dir, tmp_path):
    model, run = resumable(stopped, tmp_path)
    if file == "config.json":
        (run / "run.json").unlink()  # config.json is what --resume reads then
    (run / file).write_text(text)
    cfg = settings(model, synthetic_data_dir, run, resume=True)
    with pytest.raises(run_folder.RunFolderError, match=named):
        run_folder.check_resume(run, cfg, train.training_sources(cfg), 2)


def test_a_damaged_run_json_ends_train_py_with_one_line(stopped, synthetic_data_dir, tmp_path):
    model, run = resumable(stopped, tmp_path)
    (run / "run.json").write_text("{")
    done = tool("train.py", "--model", str(model), "--data-dir", str(synthetic_data_dir), "--out-dir", str(run),
                "--epochs", "1", "--batch-size", "4", "--micro-batch-size", "2", "--samples-per-dataset", "4",
                "--no-eval-every-epoch", "--resume")
    assert error_line(done) == f"train.py: error: {run / 'run.json'}: not valid JSON (line 1, column 2: " \
                                          "Expecting property name enclosed in double quotes); the file is truncated " \
                                          "or was edited: restore it, or start a new run (another --out-dir, or " \
                                          "--overwrite)"


# ---------------------------------------------------------------------------------------------
# 5. Every option range checked before a model loads; evaluate.py's errors in cli.py's one line.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, named", [
    ("--eval-limit", "-1", r"--eval-limit -1: expected >= 0 \(0: all records\)"),
    ("--eval-max-new-tokens", "0", "--eval-max-new-tokens 0: expected >= 1"),
    ("--tune-last-layers", "-5", r"--tune-last-layers -5: expected -1 \(all\) or >= 0 \(0: the connector alone\)"),
    ("--samples-per-dataset", "0", "--samples-per-dataset 0: expected >= 1, or all"),
    ("--min-open-tokens", "0", "--min-open-tokens 0: expected >= 1"),
    ("--reg-lam", "-1", "--reg-lam -1.0: expected >= 0"),
    ("--mi-pgd-steps", "-1", "--mi-pgd-steps -1: expected >= 0"),
    ("--weight-decay", "-0.1", "--weight-decay -0.1: expected >= 0"),
])
def test_train_option_ranges(flag, value, named):
    with pytest.raises(ValueError, match=rf"^{named}$"):
        train.parse_config([flag, value])


@pytest.fixture(scope="module")
def evaluate_main():
    import evaluate
    import models

    def main(argv):
        def no_loading(*args, **kwargs):
            raise AssertionError("a model loaded before the options were checked")

        real, models.load_model = models.load_model, no_loading
        try:
            return evaluate.main(argv)
        finally:
            models.load_model = real

    return main


@pytest.mark.parametrize("options, named", [
    (["--limit", "-1"], r"--limit -1: expected >= 0 \(0: all records\)"),
    (["--batch-size", "0"], "--batch-size 0: expected >= 1"),
    (["--max-new-tokens", "-3"], "--max-new-tokens -3: expected >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: expected >= 1"),
    (["--delta", "1.5"], r"--delta 1.5: expected in \[0, 1\]"),
    (["--device", "meta"], "--device meta: expected cpu or cuda"),
    (["--device", "nonsense"], "--device 'nonsense': not a device"),
    (["--out", __file__], f"--out {__file__} is a file; expected a folder"),
])
def test_evaluate_option_ranges(options, named, evaluate_main, qwen, synthetic_data_dir):
    with pytest.raises(ValueError, match=rf"^{named}"):
        evaluate_main([str(qwen), "--data", str(synthetic_data_dir), *options])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_evaluate_on_cuda_without_cuda_is_named(evaluate_main, qwen, synthetic_data_dir):
    with pytest.raises(ValueError, match=r"^--device cuda: CUDA is not available here"):
        evaluate_main([str(qwen), "--data", str(synthetic_data_dir), "--device", "cuda"])


@pytest.mark.parametrize("text, named", [
    ("{", r"config.json: not valid JSON \(line 1, column 2"),
    ("[1, 2]", r"config.json: holds a JSON list, expected an object"),
])
def test_evaluate_names_a_damaged_run_config(text, named, evaluate_main, tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.json").write_text(text)
    with pytest.raises(ValueError, match=named):
        evaluate_main([str(run)])


@pytest.mark.parametrize("file, text, named", [
    ("eval.json", '{"cider": ', r"eval.json: not valid JSON \(line 1, column 11"),
    ("eval.json", "[]", "eval.json: holds a JSON list, expected an object"),
    ("config.json", "{", r"config.json: not valid JSON \(line 1, column 2"),
    ("config.json", "[1]", "config.json: holds a JSON list, expected an object"),
])
def test_table_names_damaged_run_files(file, text, named, tmp_path):
    import evaluate

    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"cider": 10.0, "accuracy": 50.0, "avg": 30.0}))
    (run / "config.json").write_text(json.dumps({"method": "nrca", "out_dir": str(run)}))
    (run / file).write_text(text)
    with pytest.raises(ValueError, match=named) as error:
        evaluate.main(["table", str(run)])
    assert str(error.value).startswith(f"{run / file}: ")


def test_evaluate_a_model_folder_without_data_is_one_line(qwen):
    done = tool("evaluate.py", str(qwen))
    assert error_line(done) == f"evaluate.py: error: no test data: pass --data DIR or --test TASK:NAME=PATH ({qwen} " \
                               "has no config.json with data_dir)"


SCORE_REFERENCES = [{"id": f"img{k}", "image": f"img{k}.png", "references": ["a red circle"],
                     "conversations": [{"from": "human", "value": "<image>\nDescribe."}]} for k in (1, 2)]


@pytest.mark.parametrize("lines, named", [
    (['{"id": "img1", "prediction": "a"}', '{"id": "img1", "prediction": "b"}'], "line 2: duplicate id 'img1'"),
    (['{"id": "img1", "prediction": "a"}', "not json"], r"line 2: not JSON \(Expecting value at column 1\)"),
    (['{"id": "img1"}'], "line 1: needs 'id' and 'prediction'"),
    (['[{"id": "img1", "prediction": "a"}, {"id": "img2", "prediction": "b"}]'], "a JSON array; expected JSON lines"),
    (["[", '{"id": "img1", "prediction": "a"}', "]"], "a JSON array; expected JSON lines"),
    (['{"id": "img1", "prediction": 5}'], r"line 1: 'prediction' is a int \(5\), expected the model's text"),
    (['{"id": ["img1"], "prediction": "a"}'], "line 1: 'id' is a list, expected a string or number"),
], ids=["duplicate-id", "not-json", "no-prediction", "json-array", "json-array-multiline", "prediction-int", "id-list"])
def test_score_names_bad_predictions(lines, named, tmp_path):
    import evaluate

    (tmp_path / "refs.json").write_text(json.dumps(SCORE_REFERENCES))
    (tmp_path / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"predictions.jsonl:? {named}"):
        evaluate.main(["score", str(tmp_path / "predictions.jsonl"), str(tmp_path / "refs.json")])


def test_score_bad_input_is_one_line_with_exit_2(tmp_path):
    (tmp_path / "refs.json").write_text(json.dumps(SCORE_REFERENCES))
    (tmp_path / "predictions.jsonl").write_text('{"id": "img1", "prediction": 5}\n')
    done = tool("evaluate.py", "score", str(tmp_path / "predictions.jsonl"), str(tmp_path / "refs.json"))
    assert error_line(done) == f"evaluate.py: error: {tmp_path / 'predictions.jsonl'} line 1: 'prediction' is a int " \
                               "(5), expected the model's text"


# ---------------------------------------------------------------------------------------------
# 4. Broken model folders named: one line, before or instead of transformers' own failure.
# ---------------------------------------------------------------------------------------------
def more_layers(config: dict) -> None:
    text = config["text_config"]
    text.update(num_hidden_layers=text["num_hidden_layers"] + 1, layer_types=text["layer_types"] + ["full_attention"])


@pytest.mark.parametrize("change, named", [
    (lambda m: (m / "model.safetensors").unlink(), r"has no weights \(model.safetensors or "),
    (lambda m: (m / "tokenizer.json").unlink(), r"has no tokenizer \(tokenizer.json or "),
    (lambda m: (m / "tokenizer_config.json").unlink(), r"has no tokenizer settings \(tokenizer_config.json\)"),
    (lambda m: (m / "processor_config.json").unlink(),
     r"has no image processor settings \(processor_config.json or preprocessor_config.json\)"),
    (lambda m: (m / "chat_template.jinja").unlink(), r"has no chat template \(chat_template.jinja, "),
    (lambda m: edit_json(m / "config.json", more_layers),
     r"config.json does not match its weights: 12 tensors missing from the weights \(they would start random\): "
     r"model.language_model.layers.3."),
    (lambda m: edit_json(m / "config.json", lambda c: c["text_config"].update(num_hidden_layers=4)),
     r"transformers cannot load the model in .*: Class validation error .*`num_hidden_layers` \(4\) must be equal "
     r"to the number of `layer_types` \(3\)"),
    (lambda m: edit_json(m / "config.json", lambda c: c["text_config"].update(num_hidden_layers=2, layer_types=[
        "full_attention"] * 2)), r"config.json does not match its weights: 12 tensors in the weights but not in the "
                                 r"model config.json describes: model.language_model.layers.2."),
    (lambda m: edit_json(m / "config.json", lambda c: c["text_config"].update(intermediate_size=96)),
     r"config.json does not match its weights: 9 tensors of another shape in the weights: "
     r"model.language_model.layers.0.mlp.down_proj.weight"),
    (lambda m: edit_json(m / "config.json", lambda c: c["text_config"].update(vocab_size=600)),
     r"config.json does not match its weights: 2 tensors of another shape"),
], ids=["no-weights", "no-tokenizer.json", "no-tokenizer_config", "no-processor_config", "no-chat-template",
        "one-layer-more", "layer-count-without-types", "one-layer-less", "intermediate-size", "vocab-size"])
def test_broken_model_folders_are_named(change, named, qwen, tmp_path):
    import cli
    import models

    model = model_copy(qwen, tmp_path)
    change(model)
    with pytest.raises((ValueError, FileNotFoundError), match=named) as error:
        models.load_model(str(model))
    assert str(error.value).startswith("load_model: ") and str(model) in str(error.value)
    assert cli.is_bad_input(error.value)  # train.py / evaluate.py: one line, exit 2


def test_evaluate_names_a_run_whose_final_model_lost_its_tokenizer(qwen, synthetic_data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(qwen, run / "final")
    (run / "final" / "tokenizer.json").unlink()
    (run / "config.json").write_text(json.dumps({"method": "nrca", "out_dir": str(run),
                                                 "data_dir": str(synthetic_data_dir)}))
    assert error_line(tool("evaluate.py", str(run))).startswith(f"evaluate.py: error: load_model: {run / 'final'} "
                                                                "has no tokenizer (tokenizer.json or ")


# ---------------------------------------------------------------------------------------------
# 3 (part). Bad data named before step 1: an empty data set, a bad --test file.
# ---------------------------------------------------------------------------------------------
def test_an_empty_data_file_in_a_mix_is_an_error(synthetic_data_dir, tmp_path):
    import data

    choice = ("q", str(synthetic_data_dir / "train_choice.json"), "choice")
    for text in ("[]", " [ ]\n", ""):
        (tmp_path / "empty.json").write_text(text)
        with pytest.raises(data.DataError, match=rf"{tmp_path / 'empty.json'}: (an empty JSON list|empty file)"):
            data.mix_datasets([("c", str(tmp_path / "empty.json"), "caption"), choice])
    (tmp_path / "bad.json").write_text(json.dumps([{"id": 1, "image": "a.png", "conversations": []}]))
    with pytest.raises(data.DataError, match=r"dataset 'c' \(.*bad.json\): no usable record, all 1 skipped as bad"):
        data.mix_datasets([("c", str(tmp_path / "bad.json"), "caption"), choice], skip_bad_records=True)


@pytest.mark.parametrize("change, named", [
    (lambda records: records[1].update(answer="Z"),
     r"test_choice.json record 1 \(id 'synthetic-test-00001-choice'\): answer 'Z' is not among its 4 options"),
    (lambda records: records[2].update(image="images/missing.png"),
     r"--test choice:q record 'synthetic-test-00002-choice': image .*images/missing.png does not exist"),
], ids=["bad-answer", "missing-image"])
def test_a_bad_test_file_is_named_before_training(change, named, synthetic_data_dir, tmp_path, monkeypatch):
    import models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded (training started) before the --test files were checked")

    records = json.loads((synthetic_data_dir / "test_choice.json").read_text())
    change(records)
    test = tmp_path / "test_choice.json"
    test.write_text(json.dumps(records))
    monkeypatch.setattr(models, "load_model", no_loading)
    cfg = settings("tiny-llava", synthetic_data_dir, tmp_path / "run", eval_every_epoch=True,
                   image_folder=str(synthetic_data_dir),
                   train=[f"caption:c={synthetic_data_dir / 'train_caption.json'}",
                          f"choice:q={synthetic_data_dir / 'train_choice.json'}"],
                   test=[f"caption:c={synthetic_data_dir / 'test_caption.json'}", f"choice:q={test}"])
    with pytest.raises((ValueError, FileNotFoundError), match=named):
        train.main(cfg)


def test_a_bad_open_test_file_is_named_before_training(synthetic_data_dir, tmp_path, monkeypatch):
    """The open task kind too: an open test record without an answer is named before the model loads."""
    import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded before --test was read"))
    records = json.loads((synthetic_data_dir / "test_caption.json").read_text())
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}]
    test = tmp_path / "test_open.json"
    test.write_text(json.dumps([{"id": r["id"], "image": r["image"], "conversations": turns} for r in records]))
    cfg = settings("tiny-llava", synthetic_data_dir, tmp_path / "run", eval_every_epoch=True,
                   image_folder=str(synthetic_data_dir), test=[f"open:o={test}"],
                   train=[f"caption:c={synthetic_data_dir / 'train_caption.json'}"])
    with pytest.raises(ValueError, match=r"test_open.json record 0 .*open records need 'references'"):
        train.main(cfg)


def test_a_test_image_the_processor_refuses_is_named_before_step_1(qwen, synthetic_data_dir, tmp_path):
    """A 2000 x 3 picture in --test: Qwen2-VL's smart_resize refuses it (aspect ratio over 200). It used to stop the
    run at the first epoch's evaluation, after training; now it is named once the model has loaded, before step 1."""
    from PIL import Image

    records = json.loads((synthetic_data_dir / "test_choice.json").read_text())
    Image.new("RGB", (2000, 3)).save(tmp_path / "wide.png")
    records[1]["image"] = str(tmp_path / "wide.png")
    test = tmp_path / "test_choice.json"
    test.write_text(json.dumps(records))
    run = tmp_path / "run"
    cfg = settings(qwen, synthetic_data_dir, run, eval_every_epoch=True, eval_limit=2,
                   image_folder=str(synthetic_data_dir), test=[f"choice:q={test}"],
                   train=[f"choice:q={synthetic_data_dir / 'train_choice.json'}"])
    with pytest.raises(ValueError, match=r"--test choice:q record 'synthetic-test-00001-choice': image .*wide.png "
                                         r"\(2000 x 3\): the Qwen2VLImageProcessor.* refuses it"):
        train.main(cfg)
    assert not (run / "metrics.jsonl").is_file() or "step" not in (run / "metrics.jsonl").read_text()


def test_help_says_test_is_required_with_train():
    """--help no longer says --test defaults to the synthetic split: with --train it is required."""
    text = " ".join(next(a.help for a in train.build_parser()._actions if "--test" in a.option_strings).split())
    assert "required with --train" in text and "synthetic" not in text


def test_evaluate_names_a_test_image_the_processor_refuses(qwen, synthetic_data_dir, tmp_path):
    """`evaluate.py MODEL --test ...` with a 2000 x 3 picture on Qwen2-VL: one line naming the test record (was the
    processor's traceback)."""
    from PIL import Image

    records = json.loads((synthetic_data_dir / "test_choice.json").read_text())[:2]
    Image.new("RGB", (2000, 3)).save(tmp_path / "wide.png")
    records[1]["image"] = str(tmp_path / "wide.png")
    test = tmp_path / "test_choice.json"
    test.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"test record 'synthetic-test-00001-choice' \(choice\): .*refused the "
                                         r"record's image\(s\) \[\(2000, 3\)\]: absolute aspect ratio"):
        evaluate.main([str(qwen), "--test", f"choice:q={test}", "--image-folder", str(synthetic_data_dir),
                       "--max-new-tokens", "2"])


def test_a_wide_training_image_is_named_before_step_1_or_skipped(qwen, synthetic_data_dir, tmp_path):
    """A 2000 x 3 picture in --train on Qwen2-VL: --check-images names it before step 1 (the processor's own rule on
    its header); with --skip-bad-records it is left out there and counted in run.json."""
    from PIL import Image

    records = json.loads((synthetic_data_dir / "train_choice.json").read_text())[:8]
    Image.new("RGB", (2000, 3)).save(tmp_path / "wide.png")
    records[3]["image"] = str(tmp_path / "wide.png")
    data_file = tmp_path / "train_choice.json"
    data_file.write_text(json.dumps(records))
    common = dict(image_folder=str(synthetic_data_dir), train=[f"choice:q={data_file}"], check_images=True,
                  eval_every_epoch=False, samples_per_dataset=-1)
    with pytest.raises(ValueError, match=r"record 3 \(id '[^']+'\): image .*wide.png \(2000 x 3\): the .*refuses it"):
        train.main(settings(qwen, synthetic_data_dir, tmp_path / "strict", **common))
    run = tmp_path / "lenient"
    train.main(settings(qwen, synthetic_data_dir, run, skip_bad_records=True, **common))
    skipped = json.loads((run / "run.json").read_text())["skipped_before_step_1"]
    assert sum(skipped.values()) == 1 and "refuses it" in next(iter(skipped))
