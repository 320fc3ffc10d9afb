"""Data start-up benchmark: how long train.py takes to reach step 1 on a large mix, and the memory it holds, with
today's lazy path (records.py's structural pass + loader.py's on-the-fly samples) beside the eager path it replaced
(data.mix_datasets + mllm.dataset: every record tokenised up front, one dict per record), on the same files.

Each measurement runs in its own process (max RSS is per process): load the model (tiny-llava, whose fast
byte-level BPE tokenizer is the cheapest there is: a real Llama tokenizer makes the eager path slower still),
build the training set from the files, make the first micro-batch (16 samples). Reported: seconds from the start of
the data work to the first batch (model loading excluded, it is the same for both), the process's max RSS
(ru_maxrss: Python, torch and the model included), and the records kept. `--ranks 2` runs the lazy path as train.py
does on two gloo ranks (torchrun), each rank building its own view, and reports each rank.

    python bench/bench_data.py make /tmp/mix200k --shape issue          # 100k 3-exchange captions + 100k choices
    python bench/bench_data.py make /tmp/mix665k --shape llava665k      # LLaVA-1.5's mix: 665k, multi-turn,
                                                                        # 6 % text-only, <image> first or last
    python bench/bench_data.py run /tmp/mix200k [--paths lazy,eager] [--ranks 2] [--profile]

The files hold a small pool of real PNGs (the records share them): the images' count does not change start-up,
which opens no image but the first batch's unless --check-images.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the a red blue green small large circle square man woman dog cat table street car tree sky water people "
         "sitting standing holding looking near next to on in with of and is are two three white black wooden "
         "building picture shows there background front left right top bottom color shape number what where how "
         "many which does this image describe detail").split()


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def make(out: Path, shape: str, seed: int = 0, n_images: int = 64) -> dict:
    """Write the benchmark's files: images/ (a pool of PNGs) and the JSON list(s) train.py reads."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    rng = random.Random(seed)
    for i in range(n_images):
        Image.new("RGB", (64, 48), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(
            out / "images" / f"{i:03d}.png")
    image = lambda: f"images/{rng.randrange(n_images):03d}.png"
    files = {}

    def write(name: str, records) -> None:
        with (out / name).open("w", encoding="utf-8") as f:
            f.write("[\n")
            for i, record in enumerate(records):
                f.write(("" if i == 0 else ",\n") + json.dumps(record))
            f.write("\n]\n")
        files[name] = (out / name).stat().st_size

    if shape == "issue":  # 100k three-exchange caption records + 100k choice records
        def captions():
            for i in range(100_000):
                turns = []
                for k in range(3):
                    question = ("<image>\n" if k == 0 else "") + sentence(rng, 6)
                    turns += [{"from": "human", "value": question}, {"from": "gpt", "value": sentence(rng, 14)}]
                yield {"id": f"cap-{i}", "image": image(), "conversations": turns}

        def choices():
            for i in range(100_000):
                options = "\n".join(f"{letter}. {rng.choice(WORDS)}" for letter in "ABCD")
                yield {"id": f"mc-{i}", "image": image(), "conversations": [
                    {"from": "human", "value": f"<image>\n{sentence(rng, 8)}\n{options}"},
                    {"from": "gpt", "value": rng.choice("ABCD")}]}

        write("captions.json", captions())
        write("choices.json", choices())
    elif shape == "llava665k":  # one file shaped like llava_v1_5_mix665k.json
        def mixture():
            for i in range(665_000):
                text_only = rng.random() < 0.06
                turns = []
                for k in range(rng.choice((1, 1, 2, 3, 4, 6, 8))):
                    question = sentence(rng, rng.randint(4, 14))
                    if k == 0 and not text_only:
                        question = f"<image>\n{question}" if rng.random() < 0.8 else f"{question}\n<image>"
                    turns += [{"from": "human", "value": question},
                              {"from": "gpt", "value": sentence(rng, rng.choice((1, 3, 12, 30)))}]
                record = {"id": f"r{i}", "conversations": turns}
                if not text_only:
                    record["image"] = image()
                yield record

        write("mix665k.json", mixture())
    else:
        raise ValueError(f"--shape {shape!r}: issue or llava665k")
    return files


def train_specs(folder: Path) -> list[str]:
    if (folder / "mix665k.json").is_file():
        return [f"open:llava665k={folder / 'mix665k.json'}"]
    return [f"caption:captions={folder / 'captions.json'}", f"choice:choices={folder / 'choices.json'}"]


def measure(folder: Path, path: str, profile: bool = False) -> dict:
    """One measurement in this process (see the module docstring)."""
    import torch

    import data
    import loader
    import models
    import train

    torch.set_num_threads(1)
    cfg = train.make_config(model="tiny-llava", train=train_specs(folder), samples_per_dataset=-1,
                            eval_every_epoch=False, base_epochs=0, max_length=512, image_folder=str(folder),
                            out_dir=str(folder / "runs" / "bench"))
    mllm = models.load_model(cfg.model)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    started = time.perf_counter()
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    if path == "lazy":
        dataset = train.build_dataset(cfg, mllm, rank, world)
        batches = train.epoch_batches(len(dataset), 0, cfg, rank, world)
        first = next(iter(loader.batch_loader(dataset, batches[:1], mllm, 0)))
    else:
        sources = train.training_sources(cfg)
        mixed = data.mix_datasets([data.Source(name=n, path=p, task=("choice" if t == "choice" else "caption"))
                                   for t, n, p in sources], samples_per_dataset=10**9, seed=cfg.seed,
                                  skip_bad_records=True)  # eager refuses text-only records: skipped
        dataset = mllm.dataset(mixed, str(folder), cfg.max_length, skip_bad_records=True)
        batches = train.epoch_batches(len(dataset), 0, cfg, rank, world)
        first = train.load_batch(dataset, batches[0], mllm, torch.device("cpu"))
    seconds = time.perf_counter() - started
    if profile:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(18)
    if world > 1:
        torch.distributed.destroy_process_group()
    return {"path": path, "rank": rank, "ranks": world, "records": len(dataset), "batch": len(first["ids"]),
            "seconds_to_first_batch": round(seconds, 2),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def run(folder: Path, paths: list[str], ranks: int, profile: bool) -> list[dict]:
    results = []
    for path in paths:
        script = [str(Path(__file__).resolve()), "measure", str(folder), "--path", path] + (
            ["--profile"] if profile else [])
        command = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port=29577"]
                   if ranks > 1 else [sys.executable]) + script
        out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if out.returncode:
            raise SystemExit(f"bench_data: {path} failed:\n{out.stderr[-3000:]}")
        if profile:
            print(out.stderr[-6000:], file=sys.stderr)
        results += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    maker = commands.add_parser("make", help="write the benchmark's data set")
    maker.add_argument("out", type=Path)
    maker.add_argument("--shape", default="issue", choices=("issue", "llava665k"))
    runner = commands.add_parser("run", help="measure lazy and eager side by side")
    runner.add_argument("folder", type=Path)
    runner.add_argument("--paths", default="lazy,eager", help="comma-separated: lazy, eager")
    runner.add_argument("--ranks", type=int, default=1, help="torchrun processes (gloo) for each path")
    runner.add_argument("--profile", action="store_true", help="print where the time goes (cProfile)")
    one = commands.add_parser("measure", help="(internal) one measurement in this process")
    one.add_argument("folder", type=Path)
    one.add_argument("--path", choices=("lazy", "eager"), required=True)
    one.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "make":
        files = make(args.out, args.shape)
        print(f"wrote {args.out}: " + ", ".join(f"{name} ({size / 2**20:.0f} MiB)" for name, size in files.items()))
    elif args.command == "measure":
        print(json.dumps(measure(args.folder, args.path, args.profile)))
    else:
        results = run(args.folder, args.paths.split(","), args.ranks, args.profile)
        print("| path | ranks | rank | records | seconds to the first batch | max RSS (MB) |\n"
              "|---|---:|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['path']} | {r['ranks']} | {r['rank']} | {r['records']} | {r['seconds_to_first_batch']} | "
                  f"{r['max_rss_mb']} |")
        by_path = {r["path"]: r for r in results if r["rank"] == 0}
        if {"lazy", "eager"} <= by_path.keys():
            lazy, eager = by_path["lazy"], by_path["eager"]
            print(f"eager / lazy: {eager['seconds_to_first_batch'] / lazy['seconds_to_first_batch']:.1f}x the time, "
                  f"{eager['max_rss_mb'] / lazy['max_rss_mb']:.1f}x the memory")


if __name__ == "__main__":
    main()
