"""The testbed: a synthetic visual world in which the paper's question can be asked of a tiny MLLM.

The paper (Sec. 1, Fig. 1; Appendix C, Fig. 6) observes that multi-task fine-tuning of a pre-trained MLLM
on captions + multiple choice makes the open-response task overfit: captioning scores peak early and then
fall while fixed-choice accuracy stays stable, because human captions carry per-sample phrasing the model
memorises instead of looking at the image. Showing that needs two preconditions, and this file builds the
data for both:

1. A base model that really sees. `write_pretraining` writes a broad pre-training corpus (captions, three
   quarters terse and one quarter in the downstream register, and attribute questions, on their own images),
   on which train.py pre-trains every part of the tiny model, the vision tower included, with
   Noisy-Visual-Mixup-style augmentation (so that, as for a real MLLM, a delta = 0.5 view still carries
   the picture). `gates` then checks, before any fine-tuning, that
   the base answers the downstream questions far above chance on clean and on delta = 0.5 images.
2. A fine-tuning mix that can overfit. `write_downstream` writes the paper's mix: one captioning data set
   and one multiple-choice data set, k records each, on other images. The training captions are written
   like human ones: one caption per image, in one of several phrasings, often with a detail the picture
   does not show ("on a rainy day", tied by co-occurrence to the colour and side of the shapes), usually
   with the size people expect of the shape rather than the one drawn (a language prior that conflicts
   with the image), sometimes with a slip in one attribute. The test references (5 per image) only say
   what is drawn. Fine-tuning first switches the base to the downstream register (CIDEr rises), then
   learns to add the details (CIDEr falls): measured per epoch by scripts/reproduce_testbed.py.

The world. A 64 x 64 canvas of a light, slightly tinted background holds 1-3 shapes of one colour, one
shape and one size, stacked in one half of the canvas:
    colour   red | green | blue | yellow | purple        shape     circle | square | triangle
    count    one | two | three                            position  left | right | top | bottom
    size     small | large (radius 7 vs 11 % of the side: at the tiny model's 48-pixel input a large shape
             is about 11 pixels across, some 2 x 2 of its 8-pixel patches; shapes never touch)
Captions talk about all five attributes; a question asks one attribute and lists all its values as
options, always in the order above (colour 5 options, shape and count 3, position 4, size 2): chance is
the mean of 1 / n_options over the questions (27.9 % on the downstream split, which asks colour, shape,
count and position). The options are not shuffled: picking the letter of a shuffled option that matches the
picture is a lookup that a tiny language model did not learn in the time the embedded default has
(measured with a 128-wide, 4-layer Llama: text-only "Which option says red?" questions, 1200 steps: 36.9 %
with 33 % chance; MLLM pre-training with 3 shuffled options, 3750 steps: 54.0 % and 33.7 % on two seeds, both
under the gate). Every
reference caption and every answer follows from the scene (`scene_captions`, `scene_question`); nothing in the
test references is ungrounded.

Files (LLaVA / DataOptim JSON, the format the real path reads; data.py reads them):
    ROOT/pretrain/train_caption.json, train_choice.json      pre-training corpus (own images)
    ROOT/train_caption.json, train_choice.json               downstream fine-tuning mix, k records each
    ROOT/test_caption.json  (+ "references": 5 captions)     >= 300 records, other images
    ROOT/test_choice.json   (+ "answer", "options")          >= 300 records, other images
    ROOT/val_caption.json, val_choice.json                   the validation split, as the test split, other images
    ROOT/images/{pretrain,train,test,val}_{i:05d}.png
Every test and validation record keeps its picture's "scene" ({"colour": "red", ...}), which grounding.py
scores captions against. The validation split serves every choice made by looking at results (the sweeps of
scripts/testbed_study.py); the test split is read for the final report only. Everything is deterministic for a
given seed (same bytes); the four splits share no image, and train and test are those of world v9 (the
validation pictures are drawn last).

    python testbed.py data/testbed-seed0 --seed 0        # write the world (train.py does this itself)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from data import CAPTION_PROMPTS, CHOICE_SUFFIX, IMAGE_PLACEHOLDER, OPTION_LETTERS

COLOURS = {"red": (215, 35, 35), "green": (30, 160, 50), "blue": (35, 70, 215), "yellow": (235, 200, 20),
           "purple": (140, 40, 170)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
POSITIONS = ("left", "right", "top", "bottom")
SIZES = ("small", "large")
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNTS, "position": POSITIONS, "size": SIZES}
WORLD_VERSION = 10  # in the world's stamp: bump it when anything the generator writes changes
PRETRAIN_VERSION = 5  # in the cached base model's folder name: bump it when the pre-training corpus changes
IMAGE_SIDE = 64

# Pre-training captions: a terse, label-like register with the attributes in another order than people use
# below, so that the base model describes pictures correctly but not in the downstream data set's words (as
# a real base model's captions differ from Flickr30k's; its zero-shot CIDEr there is far below fine-tuned).
PRETRAIN_CAPTIONS = (
    "{colour} {shapes} : {count} , {size} , {position} side",
    "{shapes} in {colour} , count {count} , size {size} , side {position}",
    "{position} side : {colour} {shapes} , {size} , {count}",
)
# ... and a share of them in the downstream register (grounded, as in the test references): a real base model
# has read text like Flickr30k's, it just does not write that way by default. Fine-tuning then only has to
# switch register, which it does in its first epochs (world v9; in v7, whose base had never read that register,
# it was still learning it while the details came in, see README).
P_PRETRAIN_DOWNSTREAM_REGISTER = 0.25
# The downstream captioning data set's register (a Flickr30k stand-in): the 5 test references of an image
# are these five phrasings of its scene; training captions use one of them per image, as people do.
DOWNSTREAM_CAPTIONS = (
    "there are {count} {size} {colour} {shapes} on the {position} of the picture",
    "a picture with {count} {size} {colour} {shapes} on its {position} side",
    "{count} {size} {colour} {shapes} can be seen on the {position}",
    "on the {position} of this image there are {count} {size} {colour} {shapes}",
    "the drawing shows {count} {colour} {shapes} , {size} ones , on the {position}",
)
# Ungrounded details people add to captions: nothing in the picture shows them.
UNGROUNDED_DETAILS = (
    "on a rainy day", "next to a cup of coffee", "drawn by a child", "in an old notebook",
    "under a bright lamp", "at the school fair", "for a math lesson", "on a sunny morning",
    "near the kitchen window", "before dinner", "with a soft pencil", "on a crowded desk",
)
QUESTIONS = {  # one attribute each; the pre-training corpus uses all phrasings, downstream the first
    "colour": ("What colour are the shapes?", "Which colour do the shapes have?"),
    "shape": ("Which shape is drawn?", "What kind of shape is shown?"),
    "count": ("How many shapes are there?", "What is the number of shapes?"),
    "position": ("Where are the shapes?", "On which side are the shapes?"),
    "size": ("What size are the shapes?", "How big are the shapes?"),
}
DOWNSTREAM_QUESTION_KINDS = ("colour", "shape", "count", "position")  # size has only two values

# How human the downstream training captions are (fixed before any method was compared, see README).
P_UNGROUNDED = 0.8  # share of training captions with an ungrounded detail (detail_of: a spurious co-occurrence)
P_SLIP = 0.15  # share of training captions with one attribute (count or size) written wrong
# A language prior that conflicts with the image: in the fine-tuning captions people call circles large and
# squares and triangles small most of the time, whatever their size; test references follow the picture.
SIZE_PRIOR = {"circle": "large", "square": "small", "triangle": "small"}
P_PRIOR = 0.75
QUESTIONS_PER_PRETRAIN_IMAGE = 1


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------
def random_scene(rng: random.Random) -> dict:
    return {kind: rng.choice(values) for kind, values in ATTRIBUTES.items()}


def draw_scene(scene: dict, rng: random.Random, side: int = IMAGE_SIDE) -> Image.Image:
    """The picture of a scene: 1-3 shapes of one colour/shape/size in one half of a tinted canvas."""
    tint = [rng.randint(-12, 12) for _ in range(3)]
    image = Image.new("RGB", (side, side), tuple(232 + t for t in tint))
    draw = ImageDraw.Draw(image)
    n = COUNTS.index(scene["count"]) + 1
    r = side * (0.11 if scene["size"] == "large" else 0.07)
    for i in range(n):
        # Spread along the half's long side (never touching, so the count is visible), jittered across it.
        along = side * (i + 1) / (n + 1) + rng.uniform(-0.01, 0.01) * side
        across = side * (0.25 if scene["position"] in ("left", "top") else 0.75) + rng.uniform(-0.03, 0.03) * side
        cx, cy = (across, along) if scene["position"] in ("left", "right") else (along, across)
        box = [cx - r, cy - r, cx + r, cy + r]
        fill = COLOURS[scene["colour"]]
        if scene["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif scene["shape"] == "square":
            draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    return image


def _fill(template: str, scene: dict) -> str:
    shapes = scene["shape"] if scene["count"] == "one" else scene["shape"] + "s"
    return template.format(count=scene["count"], size=scene["size"], colour=scene["colour"], shapes=shapes,
                           position=scene["position"])


def scene_captions(scene: dict) -> list[str]:
    """The five reference captions of a scene (the downstream register): every word is grounded."""
    return [_fill(t, scene) for t in DOWNSTREAM_CAPTIONS]


def detail_of(scene: dict) -> str:
    """The ungrounded detail people add to a scene: it co-occurs with the colour and position in the
    fine-tuning captions (a red shape on the left is "on a rainy day"), which nothing in a picture, nor any
    test reference, says. A model that fits the captions learns to say it about test images too."""
    index = list(COLOURS).index(scene["colour"]) * len(POSITIONS) + POSITIONS.index(scene["position"])
    return UNGROUNDED_DETAILS[index % len(UNGROUNDED_DETAILS)]


def human_caption(scene: dict, rng: random.Random) -> str:
    """One training caption as a person writes it: a phrasing of their own, the size its shape usually
    "has" (SIZE_PRIOR, P_PRIOR), often the scene's ungrounded detail (detail_of), sometimes a slip in the
    count or size."""
    written = dict(scene)
    if rng.random() < P_PRIOR:
        written["size"] = SIZE_PRIOR[scene["shape"]]
    if rng.random() < P_SLIP:
        kind = rng.choice(("count", "size"))
        written[kind] = rng.choice([v for v in ATTRIBUTES[kind] if v != scene[kind]])
    caption = _fill(rng.choice(DOWNSTREAM_CAPTIONS), written)
    if rng.random() < P_UNGROUNDED:
        caption += " " + detail_of(scene)
    return caption


def scene_question(scene: dict, kind: str, phrasing: str, rng: random.Random) -> tuple[str, list[str], str]:
    """A question about one attribute: (question text with lettered options, options, answer letter).
    Options: every value of that attribute, in the fixed order of ATTRIBUTES (see the module docstring:
    a tiny LM does not learn, in minutes, to look a shuffled option up)."""
    options = list(ATTRIBUTES[kind])
    lines = "\n".join(f"{OPTION_LETTERS[i]}. {option}" for i, option in enumerate(options))
    return f"{phrasing}\n{lines}\n{CHOICE_SUFFIX}", options, OPTION_LETTERS[options.index(scene[kind])]


# ---------------------------------------------------------------------------------------------
# Writing the splits
# ---------------------------------------------------------------------------------------------
def _caption_record(record_id: str, image: str, prompt: str, caption: str) -> dict:
    return {"id": record_id, "image": image,
            "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{prompt}"},
                              {"from": "gpt", "value": caption}]}


def _choice_record(record_id: str, image: str, question: str, letter: str) -> dict:
    return {"id": record_id, "image": image,
            "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"},
                              {"from": "gpt", "value": letter}]}


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")


def _images(root: Path, split: str, n: int, rng: random.Random):
    """n new scenes and their image paths (relative to root), drawn and saved."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        scene = random_scene(rng)
        path = f"images/{split}_{i:05d}.png"
        draw_scene(scene, rng).save(root / path)
        out.append((scene, path))
    return out


def write_pretraining(root, n_images: int = 3000, seed: int = 0) -> dict:
    """The broad pre-training corpus in ROOT/pretrain/: per image one plain caption and
    QUESTIONS_PER_PRETRAIN_IMAGE questions on different attributes (any phrasing, 3 options). Image paths
    (images/pretrain_*.png) are relative to ROOT, not to ROOT/pretrain: train with --image-folder ROOT.
    Returns file counts."""
    root = Path(root)
    rng = random.Random(f"testbed-pretrain-{seed}")
    captions, choices = [], []
    for i, (scene, path) in enumerate(_images(root, "pretrain", n_images, rng)):
        register = DOWNSTREAM_CAPTIONS if rng.random() < P_PRETRAIN_DOWNSTREAM_REGISTER else PRETRAIN_CAPTIONS
        captions.append(_caption_record(f"pretrain-{i:05d}-caption", path, rng.choice(CAPTION_PROMPTS),
                                        _fill(rng.choice(register), scene)))
        for q, kind in enumerate(rng.sample(tuple(QUESTIONS), QUESTIONS_PER_PRETRAIN_IMAGE)):
            question, _, letter = scene_question(scene, kind, rng.choice(QUESTIONS[kind]), rng)
            choices.append(_choice_record(f"pretrain-{i:05d}-choice{q}", path, question, letter))
    _write(root / "pretrain" / "train_caption.json", captions)
    _write(root / "pretrain" / "train_choice.json", choices)
    return {"pretrain/train_caption.json": len(captions), "pretrain/train_choice.json": len(choices)}


def _evaluation_split(root: Path, split: str, n: int, rng: random.Random) -> dict[str, list[dict]]:
    """n caption records (5 grounded references each) and n multiple-choice records on 2n new images; every
    record keeps the scene its picture was drawn from (grounding.py scores captions against it)."""
    scenes = _images(root, split, 2 * n, rng)
    captions, choices = [], []
    for i, (scene, path) in enumerate(scenes[:n]):
        references = scene_captions(scene)
        record = _caption_record(f"{split}-{i:05d}-caption", path, rng.choice(CAPTION_PROMPTS), references[0])
        record.update(references=references, scene=scene)
        captions.append(record)
    for i, (scene, path) in enumerate(scenes[n:]):
        kind = rng.choice(DOWNSTREAM_QUESTION_KINDS)
        question, options, letter = scene_question(scene, kind, QUESTIONS[kind][0], rng)
        record = _choice_record(f"{split}-{i:05d}-choice", path, question, letter)
        record.update(answer=letter, options=options, scene=scene)
        choices.append(record)
    return {f"{split}_caption.json": captions, f"{split}_choice.json": choices}


def write_downstream(root, k: int = 500, n_test: int = 300, seed: int = 0, n_val: int | None = None) -> dict:
    """The downstream mix (k caption + k choice records, each on its own image, human-written captions), the
    test splits (n_test images per task, 5 grounded references per caption image) and the validation splits
    (n_val per task, default n_test; drawn after the test pictures, so train and test are those of a world
    without them), the three on disjoint pictures."""
    n_val = n_test if n_val is None else n_val
    if k < 1 or n_test < 1 or n_val < 1:
        raise ValueError(f"testbed.write_downstream: need k, n_test, n_val >= 1, got k={k}, n_test={n_test}, "
                         f"n_val={n_val}")
    root = Path(root)
    rng = random.Random(f"testbed-downstream-{seed}")
    scenes = _images(root, "train", 2 * k, rng)
    captions = [_caption_record(f"train-{i:05d}-caption", path, rng.choice(CAPTION_PROMPTS),
                                human_caption(scene, rng)) for i, (scene, path) in enumerate(scenes[:k])]
    choices = []
    for i, (scene, path) in enumerate(scenes[k:]):
        kind = rng.choice(DOWNSTREAM_QUESTION_KINDS)
        question, _, letter = scene_question(scene, kind, QUESTIONS[kind][0], rng)
        choices.append(_choice_record(f"train-{i:05d}-choice", path, question, letter))
    files = {"train_caption.json": captions, "train_choice.json": choices,
             **_evaluation_split(root, "test", n_test, rng), **_evaluation_split(root, "val", n_val, rng)}
    for name, records in files.items():
        _write(root / name, records)
    return {name: len(records) for name, records in files.items()}


def write_testbed(root, seed: int = 0, k: int = 500, n_test: int = 300, n_pretrain: int = 3000) -> dict:
    """Write the whole world for one seed (skipped when ROOT/.complete says it is already there)."""
    root = Path(root)
    stamp = root / ".complete"
    wanted = {"world_version": WORLD_VERSION, "seed": seed, "k": k, "n_test": n_test, "n_pretrain": n_pretrain}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return {}
    files = {**write_pretraining(root, n_pretrain, seed), **write_downstream(root, k, n_test, seed)}
    stamp.write_text(json.dumps(wanted))
    return files


# ---------------------------------------------------------------------------------------------
# Gates: the preconditions of the paper's question, checked on the base model before fine-tuning
# ---------------------------------------------------------------------------------------------
GATE_ABOVE_CHANCE = 30.0  # base accuracy on the downstream choice test split >= chance + 30 points
GATE_NOISY_GAP = 10.0  # base accuracy on delta = 0.5 inputs within 10 points of clean
GATE_DELTA = 0.5


def gates(answer, root) -> list[dict]:
    """The two gates on ROOT/test_choice.json. `answer(records, noisy: bool) -> {id: model output}` is the
    model (clean images, or Noisy Visual Mixup at delta = 0.5 when noisy). Returns one row per gate:
    {"gate", "value", "threshold", "passed", ...}; accuracies in %, chance from the records' options."""
    from metrics import choice_metrics

    records = json.loads((Path(root) / "test_choice.json").read_text(encoding="utf-8"))
    answers = {r["id"]: r["answer"] for r in records}
    options = {r["id"]: r["options"] for r in records}
    chance = 100.0 * sum(1 / len(r["options"]) for r in records) / len(records)
    clean = choice_metrics(answer(records, False), answers, options)["accuracy"]
    noisy = choice_metrics(answer(records, True), answers, options)["accuracy"]
    return [
        {"gate": "sees", "value": clean, "threshold": chance + GATE_ABOVE_CHANCE,
         "passed": clean >= chance + GATE_ABOVE_CHANCE,
         "what": f"base accuracy on clean images >= chance ({chance:.1f}) + {GATE_ABOVE_CHANCE:g}"},
        {"gate": "noisy view keeps the picture", "value": noisy, "threshold": clean - GATE_NOISY_GAP,
         "passed": noisy >= clean - GATE_NOISY_GAP,
         "what": f"base accuracy at delta = {GATE_DELTA} within {GATE_NOISY_GAP:g} points of clean ({clean:.1f})"},
    ]


def format_gates(rows: list[dict], enforced=None) -> str:
    """One line per gate; a gate outside `enforced` (names; None: all) is reported, not required."""
    lines = ["testbed gates on the base model (downstream multiple-choice test split):"]
    for row in rows:
        verdict = "PASS" if row["passed"] else "FAIL"
        if enforced is not None and row["gate"] not in enforced:
            verdict = f"{'met' if row['passed'] else 'not met'} (reported, not required: --base-noise-max-delta)"
        lines.append(f"  {verdict}  {row['gate']}: {row['value']:.1f} % "
                     f"(needs >= {row['threshold']:.1f}: {row['what']})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Stage 1 of the base model: the vision tower learns to see (a stand-in for CLIP / SigLIP pre-training)
# ---------------------------------------------------------------------------------------------
def pretrain_vision_tower(mllm, root, epochs: int = 4, seed: int = 0, lr: float = 3e-3, batch_size: int = 64,
                          max_delta: float = 0.6) -> dict:
    """Train `mllm`'s vision tower alone to name the attributes of the pre-training images (ROOT/pretrain),
    through linear heads on the features the connector reads (every patch token of LLaVA's
    `vision_feature_layer`), with Noisy Visual Mixup on half of the images (delta ~ U(0, max_delta)): a
    real MLLM starts from a tower pre-trained on pictures (CLIP, SigLIP), and a tiny language model cannot
    learn to see through a random one in minutes. The heads are thrown away. Returns the heads' accuracy
    (%) per attribute on the last epoch, clean and noisy images mixed."""
    import torch

    from noise import noisy_mixup

    root = Path(root)
    records = json.loads((root / "pretrain" / "train_caption.json").read_text(encoding="utf-8"))
    scenes = [_scene_from_caption(r["conversations"][1]["value"]) for r in records]
    pixels = mllm.preprocess([Image.open(root / r["image"]) for r in records])  # (N, 3, S, S)
    targets = torch.tensor([[ATTRIBUTES[k].index(s[k]) for k in ATTRIBUTES] for s in scenes])  # (N, 5)
    tower = mllm.vision_tower
    layer = mllm.model.config.vision_feature_layer

    def features(x):  # (B, P * C): every patch token, CLS dropped, as LLaVA's "default" strategy
        return tower(pixel_values=x, output_hidden_states=True).hidden_states[layer][:, 1:].flatten(1)

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        width = features(pixels[:1]).shape[1]
    heads = torch.nn.ModuleList(torch.nn.Linear(width, len(values)) for values in ATTRIBUTES.values())
    tower.requires_grad_(True)
    tower.train()
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(epochs):
        correct, seen = torch.zeros(len(ATTRIBUTES)), 0
        for batch in torch.randperm(len(records), generator=generator).split(batch_size):
            x = pixels[batch]
            delta = torch.rand(len(batch), 1, 1, 1, generator=generator) * max_delta
            delta = delta * (torch.rand(len(batch), 1, 1, 1, generator=generator) < 0.5)
            x = delta * noisy_mixup(x, delta=1.0, generator=generator) + (1 - delta) * x  # Eq. (2b), per image
            h = features(x)
            logits = [head(h) for head in heads]
            loss = sum(torch.nn.functional.cross_entropy(z, targets[batch, k]) for k, z in enumerate(logits))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct += torch.stack([(z.argmax(-1) == targets[batch, k]).sum() for k, z in enumerate(logits)])
            seen += len(batch)
    tower.eval()
    return {kind: round(100 * float(c) / seen, 1) for kind, c in zip(ATTRIBUTES, correct, strict=True)}


def _scene_from_caption(caption: str) -> dict:
    """A pre-training caption names every attribute once (PRETRAIN_CAPTIONS): read the scene back."""
    words = caption.replace(",", " ").split()
    scene = {}
    for kind, values in ATTRIBUTES.items():
        forms = {v: v for v in values} | ({v + "s": v for v in values} if kind == "shape" else {})
        hits = [forms[w] for w in words if w in forms]
        if len(hits) != 1:
            raise ValueError(f"testbed: pre-training caption {caption!r} names {kind} {len(hits)} times")
        scene[kind] = hits[0]
    return scene


def ensure_world(root, seed: int = 0) -> bool:
    """Write the world into ROOT unless it is there for this seed and WORLD_VERSION; a folder of other data
    (train_caption.json without our stamp) is left alone. Returns True when something was written."""
    root = Path(root)
    if (root / "train_caption.json").exists() and not (root / ".complete").exists():
        return False
    return bool(write_testbed(root, seed=seed))


def tokenizer_texts() -> list[str]:
    """The testbed's words, for the tiny tokenizer's corpus (models.build_tiny_tokenizer)."""
    texts = list(UNGROUNDED_DETAILS) + [q for pair in QUESTIONS.values() for q in pair]
    for template in PRETRAIN_CAPTIONS + DOWNSTREAM_CAPTIONS:
        for colour in COLOURS:
            for shape in SHAPES:
                for count in COUNTS:
                    for position in POSITIONS:
                        texts.append(_fill(template, {"colour": colour, "shape": shape, "count": count,
                                                      "position": position, "size": SIZES[len(texts) % 2]}))
    return texts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="write the testbed world (pre-training corpus, downstream mix, "
                                                 "test splits) for one seed")
    parser.add_argument("root")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=500, help="records per downstream data set")
    parser.add_argument("--n-test", type=int, default=300, help="test records per task")
    parser.add_argument("--n-pretrain", type=int, default=3000, help="pre-training images")
    args = parser.parse_args(argv)
    files = write_testbed(args.root, args.seed, args.k, args.n_test, args.n_pretrain)
    print(f"wrote {args.root}: " + (", ".join(f"{name} ({n})" for name, n in files.items()) or "already complete"))


if __name__ == "__main__":
    import cli

    cli.run(main)
