"""Shared pytest setup: one BLAS thread per process (2-core CI, bit-exact CPU comparisons) and a small
synthetic data set written once per session."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported by any test module

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
    """data.make_synthetic with 24 training and 4 test images (caption + choice record each)."""
    import data

    root = tmp_path_factory.mktemp("synthetic")
    data.make_synthetic(root, n_train=24, n_test=4)
    return root


def run_on_gloo_ranks(worker, world: int, *args):
    """Run `worker(rank, world, *args)` in `world` spawned processes joined by a gloo process group."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_rank, args=(worker, world, port, args), nprocs=world)


def _gloo_rank(rank, worker, world, port, args):
    import faulthandler
    import gc
    import sys

    import torch
    import torch.distributed as dist

    faulthandler.enable(all_threads=True)  # a C++ abort in a rank prints where each Python thread stood
    torch.set_num_threads(1)  # the ranks share the cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
        dist.barrier()  # no rank tears gloo down while another still has messages in flight to it
    finally:
        gc.collect()  # DDP / FSDP2 wrappers left in reference cycles let go of the group while it is alive
        dist.destroy_process_group()
    # The worker's checks have all passed. Leave without interpreter finalisation: in one CI run a rank
    # died in C++ after its work ("terminate called without an active exception", SIGABRT; not seen in
    # 100+ runs of that test here, loaded or not), which points at gloo's threads and objects torn down
    # in static-destructor order.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


TRAIN_DRIVER = '''
import sys
import torch
import train

out_prefix = sys.argv[1]
save_final_model = train.save_final_model


def capture(mllm, fsdp_units, folder, rank, **kwargs):
    weights = {n: train.full_tensor(p.detach()).clone() for n, p in mllm.model.named_parameters() if p.requires_grad}
    torch.save(weights, f"{out_prefix}.rank{rank}.pt")
    return save_final_model(mllm, fsdp_units, folder, rank, **kwargs)


train.save_final_model = capture
train.main(train.parse_config(sys.argv[2:]))
'''


def torchrun_train(tmp_path, arguments: list[str]) -> list[dict]:
    """`torchrun --nproc_per_node 2 train.py ARGUMENTS` on CPU (gloo, one thread per rank), through a driver that
    makes every rank save the trainable tensors it holds at the end (FSDP2: all-gathered from the shards).
    Returns each rank's {name: tensor}."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    repo = Path(__file__).resolve().parents[1]
    driver = tmp_path / "driver.py"
    driver.write_text(TRAIN_DRIVER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
               str(tmp_path / "weights"), *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [torch.load(tmp_path / f"weights.rank{r}.pt") for r in range(2)]


def wrap_up_down(model, mode: str):
    """A two-layer test model (`up`, `down`) under FSDP2 (each layer sharded) or DDP; returns the module to call."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    if mode == "fsdp":
        fully_shard(model.up)
        fully_shard(model.down)
        return model
    return DistributedDataParallel(model)


# Text a test SentencePiece model is trained on: the vicuna_v1 template's words and some runs of spaces.
SENTENCEPIECE_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: two red circles on the left",
    "USER: And what colour is it? ASSISTANT: The answer is B.",
    "What  is   that?    Indented  code\n    here and   there",
    "café naïve über 東京 1234 5678 numbers 3.14",
] * 20


def write_sentencepiece_folder(folder, tokenizer_config: dict | None = None):
    """A Llama-like SentencePiece model (BPE, byte fallback, identity normalisation, dummy prefix, spaces kept,
    digits split; <unk>=0, <s>=1, </s>=2), trained here in ~20 ms, written as `folder/tokenizer.model` with a
    VILA-style `tokenizer_config.json` (no tokenizer.json). The whitespace-run pieces ("▁▁", "▁▁▁▁") get the
    lowest score, as an extra space is a rare merge in a large vocabulary: SentencePiece merges by piece
    score, so "What  is" -> [▁What, ▁, ▁is], while a merge list ordered by piece id (transformers 5's
    conversion) merges "▁▁" first -> [▁What, ▁▁, is]. Returns the sentencepiece.SentencePieceProcessor."""
    import io
    import json
    import os

    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCEPIECE_CORPUS), model_writer=buffer, vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto.FromString(buffer.getvalue())
    lowest = min(piece.score for piece in proto.pieces) - 1
    for piece in proto.pieces:
        if len(piece.piece) > 1 and set(piece.piece) == {"\u2581"}:
            piece.score = lowest
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(proto.SerializeToString())
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
              "model_max_length": 4096, "padding_side": "right"}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({**config, **(tokenizer_config or {})}, f)
    return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())


def preprocess_v1_reference(turns, encode, bos_id: int, eos_id: int, num_image_tokens: int, image_token_id: int,
                            with_image: bool = True):
    """Our transcription of LLaVA's `preprocess_v1` + `tokenizer_image_token` (haotian-liu/LLaVA 44e0562,
    2023-10-05, llava/train/train.py and llava/mm_utils.py) for one record with an image, followed by the
    expansion of the image slot to num_image_tokens positions labelled -100 (the model's
    prepare_inputs_labels_for_multimodal). turns: [(question, answer), ...]; encode(text) -> ids of text
    holding no special token, without bos (the slow LlamaTokenizer: `sp.encode`).

    1. vicuna_v1 prompt: system + " " + "USER: <image>\\n{q1}" + " " + "ASSISTANT: {a1}" + "</s>" +
       "USER: {q2}" + " " + "ASSISTANT: {a2}" + "</s>" ...
    2. tokenizer(text) = [bos] + encode of each stretch between "</s>" (eos in between); tokenizer_image_token
       tokenizes each stretch between "<image>" that way, keeps the first bos, drops the others and puts one
       image slot between stretches.
    3. Labels: a copy of the ids; position 0 masked; for each round (the text between "</s>"), split at
       " ASSISTANT: ": round length = len(tokenizer_image_token(round)) (its bos stands for its "</s>"),
       instruction length = len(tokenizer_image_token(round up to and including " ASSISTANT: ")) - 2 (bos and
       the trailing space's token) is masked; everything after the last round masked; if the rounds do not add
       up to the sequence length the whole sample is masked ("tokenization mismatch").
    with_image=False: a text-only record, preprocess_v1's has_image=False branch: no "<image>\\n", and
    `tokenizer` where it calls `tokenizer_image_token` (the same function on a text without "<image>")."""
    ignore = -100

    def tokenizer(text):
        ids = [bos_id]
        for k, stretch in enumerate(text.split("</s>")):
            ids += ([eos_id] if k else []) + (encode(stretch) if stretch else [])
        return ids

    def tokenizer_image_token(text):
        ids = [bos_id]
        for k, stretch in enumerate(text.split("<image>")):
            ids += ([image_token_id] if k else []) + tokenizer(stretch)[1:]
        return ids

    conversation = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions. ")
    for k, (question, answer) in enumerate(turns):
        image = "<image>\n" if k == 0 and with_image else ""  # has_image False: LLaVA's tokenizer(), no image
        conversation += f"USER: {image}{question} ASSISTANT: {answer}</s>"
    input_ids = tokenizer_image_token(conversation)
    labels = list(input_ids)
    position = 1
    labels[0] = ignore
    for round_text in conversation.split("</s>"):
        if round_text == "":
            break
        parts = round_text.split(" ASSISTANT: ")
        if len(parts) != 2:
            break
        instruction = len(tokenizer_image_token(parts[0] + " ASSISTANT: ")) - 2
        for i in range(position, min(position + instruction, len(labels))):
            labels[i] = ignore
        position += len(tokenizer_image_token(round_text))
    labels[position:] = [ignore] * (len(labels) - position)
    if position != len(input_ids):
        labels = [ignore] * len(labels)
    if with_image:
        slot = input_ids.index(image_token_id)
        input_ids[slot:slot + 1] = [image_token_id] * num_image_tokens
        labels[slot:slot + 1] = [ignore] * num_image_tokens
    return input_ids, labels
