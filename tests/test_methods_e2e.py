"""End-to-end: every method of `methods.METHODS` through train.py's one training loop (issue 7's "runs a few
steps on tiny-llava and tiny-vila, and under 2-rank torchrun on CPU").

In process: `train.main(train.make_config(method=X, ...))` for 3 optimizer steps (batch 4 = 2 micro-batches
of 2) on a 12-record synthetic mix, on both tiny architectures: finite losses in metrics.jsonl, the
trainable weights moved, and for the mask methods the masked elements are bit-identical to w0.

Distributed: ONE `python -m torch.distributed.run --standalone --nproc_per_node 2` launch on CPU/gloo runs
this file as a driver (see `driver` at the bottom) that calls `train.main` once per method inside one
process group (see `driver` for why it is not re-created per run). DDP: both ranks end with
bit-identical trainable weights. FSDP2 (`--fsdp`) with magnitude-mask: on every rank the masked elements
of its shards equal w0, and the gathered checkpoint keeps the top-50% |w0| of every tensor at w0.

The method object train.main builds is captured by wrapping `train.get_method`, which is how the tests see
masks and w0 without changing train.py.
Run: `TRITON_INTERPRET=1 python -m pytest -q tests/test_methods_e2e.py` (about 25 s on 2 CPU cores).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import baselines  # noqa: E402
import data  # noqa: E402
import methods  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402

ALL_METHODS = sorted(methods.METHODS)
STEPS = 3  # 12 records / batch 4
DDP_METHODS = ALL_METHODS
FSDP_METHODS = ["magnitude-mask"]


def config(method: str, model: str, data_dir, out_dir, micro_batch_size: int = 2, **overrides):
    """The tiny-run settings shared by the in-process tests and the torchrun driver."""
    return train.make_config(method=method, model=model, base_epochs=0, eval_every_epoch=False,
                             data_dir=str(data_dir), out_dir=str(out_dir), samples_per_dataset=6, epochs=1,
                             batch_size=4, micro_batch_size=micro_batch_size, max_length=128, **overrides)


def capture_methods(store: list):
    """A stand-in for train.get_method that records each built method and its starting local weights."""
    original = methods.get_method

    def get_method(name):
        cls = original(name)

        def build(cfg, mllm, named_params):
            method = cls(cfg, mllm, named_params)
            w0 = {n: baselines.local_part(p).detach().clone() for n, p in method.named_params}
            store.append((method, w0))
            return method

        return build

    return get_method


def local_weights(method) -> dict:
    return {n: baselines.local_part(p).detach().clone() for n, p in method.named_params}


def step_records(out_dir) -> list[dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "step" in r]


def check_masks_hold(method, w0: dict, where: str):
    """Masked elements bit-identical to w0; the mask keeps half of the elements."""
    weights = local_weights(method)
    for (name, _), mask in zip(method.named_params, method.masks, strict=True):
        assert torch.equal(weights[name][mask], w0[name][mask]), f"{where}: masked elements of {name} moved"
    assert 0.4 < method.kept_fraction() < 0.6, f"{where}: mask keeps {method.kept_fraction():.3f}, expected ~0.5"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-data")
    data.make_synthetic(root, n_train=16, n_test=4)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-llava", "tiny-vila"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_method_trains_a_few_steps(method, model, synthetic, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(train, "get_method", capture_methods(built))
    out_dir = tmp_path / method
    train.main(config(method, model, synthetic, out_dir))

    records = step_records(out_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in records), records
    assert (out_dir / "final" / "config.json").is_file()
    (method_object, w0), = built
    assert isinstance(method_object, methods.get_method(method))
    weights = local_weights(method_object)
    assert any(not torch.equal(weights[n], w0[n]) for n in w0), f"{method} on {model}: no trainable weight moved"
    if method in ("random-mask", "magnitude-mask"):
        check_masks_hold(method_object, w0, f"{method} on {model}")


@pytest.fixture(scope="module")
def torchrun_result(synthetic, tmp_path_factory):
    """One 2-rank launch: every DDP method, then magnitude-mask under FSDP2."""
    out = tmp_path_factory.mktemp("e2e-torchrun")
    runs = [f"{m}:ddp" for m in DDP_METHODS] + [f"{m}:fsdp" for m in FSDP_METHODS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).resolve()), str(synthetic), str(out), *runs]
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", DDP_METHODS)
def test_ddp_ranks_end_with_identical_weights(method, torchrun_result):
    run = torchrun_result / f"{method}-ddp"
    records = step_records(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in records), records
    rank0, rank1 = (torch.load(run / f"rank{r}.pt") for r in (0, 1))
    assert rank0["checks"] == rank1["checks"] == {"moved": True, "masks_hold": True}
    assert rank0["weights"].keys() == rank1["weights"].keys() and rank0["weights"]
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), f"{method}: ranks differ on {name}"


@pytest.mark.slow
def test_fsdp_magnitude_mask_holds_on_every_rank(torchrun_result):
    run = torchrun_result / "magnitude-mask-fsdp"
    for r in (0, 1):
        saved = torch.load(run / f"rank{r}.pt")
        assert saved["sharded"], "expected DTensor parameters under --fsdp"
        assert saved["checks"] == {"moved": True, "masks_hold": True}, f"rank {r}: {saved['checks']}"
    # The gathered checkpoint (all shards): the top half of |w0| of every tensor is still w0.
    final = load_file(str(run / (run / "latest").read_text().strip() / "trainable.safetensors"))
    start = dict(models.load_model("tiny-llava").model.named_parameters())
    assert final
    moved = False
    for name, value in final.items():
        w0 = start[name].detach().float()
        mask = baselines.top_magnitude_mask(w0, 0.5)
        assert torch.equal(value[mask], w0[mask]), f"checkpoint: masked elements of {name} moved"
        moved = moved or not torch.equal(value[~mask], w0[~mask])
    assert moved, "no unmasked element trained under --fsdp"


def driver(data_dir: str, out: str, runs: list[str]) -> None:
    """Run under torchrun: train.main per "METHOD:ddp|fsdp", save this rank's weights and checks.

    train.main destroys the process group when it ends. Re-creating it in the same torchrun launch is racy:
    the new default group rendezvouses under the same store prefix ("default_pg/0/") in torchrun's agent
    store, so a fast rank can read a slow rank's stale gloo address (seen here as "Connection reset by
    peer" or a hang). One group, created here and kept across runs, avoids that; train.main's
    init_distributed uses an existing group as is."""
    dist.init_process_group("gloo")
    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda *args, **kwargs: None  # train.main's teardown: keep the group
    try:
        for run in runs:
            train_one(data_dir, out, run)
    finally:
        dist.destroy_process_group = destroy
        destroy()


def train_one(data_dir: str, out: str, run: str) -> None:
    """One run of the driver; this rank's trainable weights and mask checks go to OUT/METHOD-MODE/rankR.pt."""
    method, mode = run.split(":")
    built = []
    train.get_method = capture_methods(built)
    out_dir = Path(out) / f"{method}-{mode}"
    train.main(config(method, "tiny-llava", data_dir, out_dir, micro_batch_size=2, fsdp=mode == "fsdp"))
    (method_object, w0), = built
    weights = local_weights(method_object)
    checks = {"moved": any(not torch.equal(weights[n], w0[n]) for n in w0), "masks_hold": True}
    if isinstance(method_object, baselines.MaskTuning):
        checks["masks_hold"] = all(torch.equal(weights[n][m], w0[n][m])
                                   for (n, _), m in zip(method_object.named_params, method_object.masks,
                                                        strict=True))
    sharded = any(hasattr(p, "to_local") for _, p in method_object.named_params)
    torch.save({"weights": weights, "checks": checks, "sharded": sharded},
               out_dir / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    driver(sys.argv[1], sys.argv[2], sys.argv[3:])


@pytest.mark.parametrize("method", ["mi-consistency", "nrca"])
def test_an_epoch_ending_in_padding_items(method, synthetic, tmp_path):
    """10 records at batch 4: the third step holds 2 epoch-padding items (labels all -100). Each method must
    train through them (modality interference raised 'needs image tokens and answer tokens' on them)."""
    cfg = config(method, "tiny-llava", synthetic, tmp_path / "run", micro_batch_size=4)
    train.main(dataclasses.replace(cfg, samples_per_dataset=5))
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "step" in s] == [1, 2, 3]
