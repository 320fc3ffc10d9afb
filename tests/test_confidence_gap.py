"""confidence_gap.py (evaluate.py confidence-gap) on a tiny model, and the base-noise dial of the testbed's base
stage (train.py --base-noise-max-delta, methods.NoisyAugmentedPretraining).

    python -m pytest -q tests/test_confidence_gap.py
"""

import json
from types import SimpleNamespace

import pytest
import torch

import confidence_gap
import data
import evaluate
import models
import testbed
import train
from methods import NoisyAugmentedPretraining


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return models.load_model("tiny-llava")


def test_gap_on_a_tiny_model(tiny, synthetic_data_dir):
    """Values are probabilities; delta = 0 is the clean picture bit for bit (I~ = I, nobody above); a larger delta
    changes I~; multiple-choice answers (a letter + end token) are never open."""
    sources = [("caption", "c", str(synthetic_data_dir / "train_caption.json")),
               ("choice", "q", str(synthetic_data_dir / "train_choice.json"))]
    result = confidence_gap.measure(tiny, sources, synthetic_data_dir, deltas=(0.0, 0.5, 1.0), limit=10,
                                    batch_size=4, progress=False)
    caption, choice = result["tasks"]["c"]["deltas"], result["tasks"]["q"]["deltas"]
    assert caption["0"]["n_open"] == 10 and caption["0"]["n_records"] == 10
    assert choice["0.5"]["n_open"] == 0 and choice["0.5"]["clean_confidence"] is None
    assert caption["0"]["noisy_confidence"] == caption["0"]["clean_confidence"]
    assert caption["0"]["share_noisy_above_clean"] == 0.0
    for row in caption.values():
        assert 0 <= row["clean_confidence"] <= 1 and 0 <= row["noisy_confidence"] <= 1
        assert 0 <= row["share_noisy_above_clean"] <= 1
        assert row["clean_confidence"] == caption["0"]["clean_confidence"]  # the clean branch does not depend on delta
    assert caption["1"]["noisy_confidence"] != caption["1"]["clean_confidence"]
    assert "| c | caption | 0.5 | 10 |" in confidence_gap.format_gap(result)


def test_gap_share_counted_by_hand(tiny, synthetic_data_dir):
    """The tool's share equals a per-sample count of I~ > I done here from NRCA's own two-branch forward."""
    from methods import NRCA, model_forward
    from nrca import sample_confidences

    records = data.mix_datasets([data.Source("c", str(synthetic_data_dir / "train_caption.json"), "caption")],
                                samples_per_dataset=8, seed=0)
    dataset = tiny.dataset(records, synthetic_data_dir, 2048)
    gap = confidence_gap.confidence_gap(tiny, dataset, deltas=(0.7,), batch_size=8, progress=False)[0.7]
    batch = tiny.collate([dataset[i] for i in range(len(dataset))])
    generator = torch.Generator().manual_seed(confidence_gap.NOISE_SEED * 1_000_003 + 0)  # the tool's first batch
    from noise import noisy_pixel_values

    noisy = noisy_pixel_values(batch["pixel_values"], tiny.model.config, delta=0.7, generator=generator)
    method = NRCA(SimpleNamespace(delta=0.7), tiny, [])
    with torch.no_grad():
        (confidence, _, mask), (noisy_confidence, _, _) = method.two_branch_stats(model_forward(tiny.model), batch,
                                                                                 noisy)
    clean_mean, noisy_mean, is_open = sample_confidences(confidence, noisy_confidence, mask)
    above = sum(bool(noisy_mean[i] > clean_mean[i]) for i in range(len(records)) if is_open[i])
    assert gap["n_open"] == int(is_open.sum()) == 8
    assert gap["share_noisy_above_clean"] == pytest.approx(above / 8)
    assert gap["clean_confidence"] == pytest.approx(float(clean_mean.mean()), rel=1e-5)


def test_gap_command_writes_its_file_and_names_bad_input(tmp_path, synthetic_data_dir):
    result = evaluate.main(["confidence-gap", "tiny-llava", "--data", str(synthetic_data_dir), "--limit", "4",
                            "--delta", "0.5", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "confidence_gap.json").read_text())
    assert written["tasks"].keys() == result["tasks"].keys() and written["deltas"] == [0.5]
    with pytest.raises(ValueError, match="--limit 0"):
        evaluate.main(["confidence-gap", "tiny-llava", "--data", str(synthetic_data_dir), "--limit", "0"])
    with pytest.raises(FileNotFoundError, match="train_caption.json does not exist"):
        evaluate.main(["confidence-gap", "tiny-llava", "--data", str(tmp_path / "nothing")])
    with pytest.raises(ValueError, match="--delta 1.5"):
        evaluate.main(["confidence-gap", "tiny-llava", "--data", str(synthetic_data_dir), "--delta", "1.5",
                       "--limit", "2"])


def test_base_noise_dial_reaches_the_base_stage():
    """D = 0: every view the base pre-trains on is the clean picture, bit for bit; D = 0.6 (the first study's base)
    changes about half of them; the draws are the same, so D only scales them."""
    pixels = torch.rand(16, 3, 8, 8)
    seen = {}
    for dial in (0.0, 0.6):
        method = NoisyAugmentedPretraining(SimpleNamespace(base_noise_max_delta=dial), None, [])

        def token_stats(forward, batch, pixel_values=None, dial=dial):
            seen[dial] = pixel_values
            mask = torch.ones(16, 3, dtype=torch.bool)
            return None, torch.ones(16, 3), mask

        method.token_stats = token_stats
        method.loss(None, {"pixel_values": pixels, "noise_seed": 7})
    assert torch.equal(seen[0.0], pixels)
    changed = (seen[0.6] != pixels).flatten(1).any(1)
    assert 2 <= int(changed.sum()) <= 14


def test_base_noise_dial_flag_and_gates_report():
    assert train.parse_config(["--base-noise-max-delta", "0"]).base_noise_max_delta == 0.0
    assert train.parse_config([]).base_noise_max_delta == train.BASE_NOISE_MAX_DELTA_DEFAULT == 0.6
    with pytest.raises(ValueError, match="--base-noise-max-delta 1.5"):
        train.parse_config(["--base-noise-max-delta", "1.5"])
    rows = [{"gate": "sees", "value": 90.0, "threshold": 58.0, "passed": True, "what": "w"},
            {"gate": "noisy view keeps the picture", "value": 40.0, "threshold": 80.0, "passed": False, "what": "w"}]
    enforced = testbed.format_gates(rows, {"sees"})
    assert "PASS  sees" in enforced and "not met (reported, not required" in enforced
    assert "FAIL  noisy view" in testbed.format_gates(rows)


def test_gap_on_open_records_leaves_text_only_out(tiny, synthetic_data_dir, tmp_path):
    """An `open` file (prompts as written) with text-only records: those have no noisy view, so they are not counted
    as open samples (as NRCA gives them CE only); the records with a picture are."""
    import json

    records = [{"id": f"i{i}", "image": f"images/train_{i:05d}.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the picture."},
        {"from": "gpt", "value": "there are two small red circles on the left"}]} for i in range(4)]
    records += [{"id": f"t{i}", "conversations": [{"from": "human", "value": "Name three colours."},
                                                  {"from": "gpt", "value": "red, green and blue"}]} for i in range(2)]
    path = tmp_path / "open.json"
    path.write_text(json.dumps(records))
    result = confidence_gap.measure(tiny, [("open", "o", str(path))], synthetic_data_dir, limit=10, batch_size=3,
                                    progress=False)
    row = result["tasks"]["o"]["deltas"]["0.5"]
    assert row["n_open"] == 4 and row["n_records"] == 6
