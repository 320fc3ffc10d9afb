"""Every @triton.jit kernel of the repository compiled ahead of time for real GPUs, on a machine without one.

The other tests run the kernels in Triton's interpreter, which accepts programs the compiler rejects and
says nothing of registers, spills or vector width. Here the compiler itself (triton.compile and the ptxas
the triton wheel carries) builds each kernel to a cubin for sm_80, sm_90 and sm_100, for fp16 / bf16 /
fp32 logits and vocabularies 32000, 128256 and 151936, with the specialisation the JIT would apply on a
GPU: the launch arguments are those our own launch wrappers (`_forward`, `_backward`) pass for a
contiguous (B, T, V) tensor, bound by Triton's own binder (stride 1 becomes a constant; pointers and
strides divisible by 16 are marked so). On that path it asserts, with `cuobjdump` on the cubin:
  - no local memory (no register spills), and
  - 128-bit global loads (LDG.E.128) in the forward and backward kernels: the logits are read with
    full-width vector loads (a scalar load cannot be 128-bit, so these are the row-block loads).
Each kernel is also compiled without any specialisation, to show what the 128-bit loads rest on.

The vocabulary is a runtime argument (not a tl.constexpr): the JIT's key holds only whether it is
divisible by 16 (all three are) and the block size / warps it selects (the same 4096 / 8 for all three),
so the three vocabularies share one binary per (kernel, arch, dtype). The test derives that from the
JIT's own key rather than assuming it, and compiles once per distinct key.

Skipped, with the reason, only where the triton wheel carries no ptxas (or no cuobjdump beside it).
The compilation runs in a subprocess without TRITON_INTERPRET (CI sets it, and triton.jit reads it at
import: interpreted kernels cannot be compiled).

    python -m pytest -q -s tests/test_kernel_compile.py   # -s shows the register / load-width table
    python tests/test_kernel_compile.py                    # the table alone (bench/gpu_check.sh runs this)
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90, 100)
DTYPES = ("float16", "bfloat16", "float32")
VOCABS = (32000, 128256, 151936)
ROWS = (2, 3)  # (B, T): 6 rows, a count not divisible by 16 (the JIT then assumes nothing of it)


def nvidia_tool(name: str) -> str | None:
    """Path of a tool the triton wheel carries (triton.knobs finds it), or None."""
    import triton

    try:
        return getattr(triton.knobs.nvidia, name.replace("-", "_")).path
    except (AttributeError, RuntimeError):
        return None


def jit_functions_in_repository() -> dict[str, str]:
    """{function name: its source} of every @triton.jit function in the repository's own .py files."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text()
        if any(part.startswith(".") for part in path.relative_to(ROOT).parts) or "triton.jit" not in text:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and any("triton.jit" in ast.unparse(d) for d in node.decorator_list):
                found[node.name] = ast.get_source_segment(text, node)
    return found


# ----------------------------------------------------------------------------------------------
# The compiler side: runs in a subprocess without TRITON_INTERPRET (main() below)
# ----------------------------------------------------------------------------------------------
def captured_launches(dtype, vocab: int) -> dict:
    """{kernel name: (JITFunction, args, kwargs)} exactly as confidence_kernel's launch wrappers pass them
    for a contiguous (B, T, V) logits tensor (CPU tensors stand in; only their strides and addresses are read)."""
    import torch

    import confidence_kernel

    launches = {}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches[self.kernel.__name__] = (self.kernel, args, kwargs)
            return launch

    kernels = {name: getattr(confidence_kernel, name) for name in ("_forward_kernel", "_backward_kernel")}
    try:
        for name, kernel in kernels.items():
            setattr(confidence_kernel, name, Recorder(kernel))
        logits = torch.zeros(*ROWS, vocab, dtype=dtype)  # (B, T, V) contiguous
        rows = logits.shape[0] * logits.shape[1]
        targets = torch.zeros(rows, dtype=torch.int64)  # (N,)
        confidence, _, row_max, row_sum = confidence_kernel._forward(logits, targets, -100)
        confidence_kernel._backward(logits, targets, confidence, row_max, row_sum, torch.ones(rows),
                                    torch.ones(rows), -100)
    finally:
        for name, kernel in kernels.items():
            setattr(confidence_kernel, name, kernel)
    return launches


def jit_specialisation(kernel, args, kwargs, backend):
    """(signature, constexprs, attrs, options) as JITFunction.run derives them on a GPU, from Triton's own binder."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialisation, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound_args, specialisation, options)


def unspecialised(kernel, signature, constexprs):
    """The same kernel with nothing known of its runtime arguments (as do_not_specialize on every argument
    would give): integer arguments stay i32 (stride 1 is not a constant), no pointer or stride is aligned."""
    kept = {key: value for key, value in constexprs.items() if kernel.params[key[0]].is_constexpr}
    signature = {name: ("i32" if kind == "constexpr" and not kernel.params[i].is_constexpr else kind)
                 for i, (name, kind) in enumerate(signature.items())}
    return signature, kept, {}


def load_widths(sass: str) -> list[int]:
    """Bit widths of the global loads (LDG) in cuobjdump -sass: .128 / .64, .U16 / .S16 = 16, .U8 = 8, else 32."""
    widths = []
    for opcode in re.findall(r"\bLDG(?:\.[A-Z0-9_]+)+", sass):
        parts = opcode.split(".")[1:]
        sizes = [int(p) for p in parts if p.isdigit()]
        small = [int(p[1:]) for p in parts if re.fullmatch(r"[US](8|16)", p)]
        widths.append(sizes[-1] if sizes else small[-1] if small else 32)
    return widths


def inspect_cubin(cubin: bytes, workdir: Path, stem: str) -> dict:
    """Registers, local memory bytes and global load widths of one compiled kernel (cuobjdump)."""
    path = workdir / f"{stem}.cubin"
    path.write_bytes(cubin)
    cuobjdump = nvidia_tool("cuobjdump")
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                           check=True).stdout
    sass = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "local_bytes": int(re.search(r"LOCAL:(\d+)", usage).group(1)),
            "stack_bytes": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "load_widths": sorted(set(load_widths(sass)), reverse=True)}


def compile_all(workdir: Path) -> list[dict]:
    """One row per (kernel, arch, dtype, JIT key): the vocabularies sharing that key, and both compilations."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    rows, done = [], {}
    for arch in ARCHS:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        for dtype_name in DTYPES:
            for vocab in VOCABS:
                for name, (kernel, args, kwargs) in captured_launches(getattr(torch, dtype_name), vocab).items():
                    options, signature, constexprs, attrs = jit_specialisation(kernel, args, kwargs, backend)
                    key = (name, arch, dtype_name, repr(signature), repr(constexprs), repr(attrs), repr(options))
                    if key in done:  # the same binary as a vocabulary already compiled
                        done[key]["vocabularies"].append(vocab)
                        continue
                    stem = f"{name}-sm{arch}-{dtype_name}-{len(rows)}"
                    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                              options=options.__dict__)
                    plain = triton.compile(ASTSource(kernel, *unspecialised(kernel, signature, constexprs)),
                                           target=target, options=options.__dict__)
                    row = {"kernel": name, "arch": arch, "dtype": dtype_name, "vocabularies": [vocab],
                           "num_warps": options.num_warps, "constexprs": {kernel.arg_names[k[0]]: v
                                                                          for k, v in constexprs.items()},
                           "aligned_16": [kernel.arg_names[k[0]] for k, v in attrs.items()
                                          if ["tt.divisibility", 16] in v],
                           **inspect_cubin(compiled.asm["cubin"], workdir, stem),
                           "unspecialised_load_widths": inspect_cubin(plain.asm["cubin"], workdir,
                                                                      stem + "-plain")["load_widths"]}
                    done[key] = row
                    rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    import triton

    lines = [f"triton {triton.__version__}, ptxas {nvidia_tool('ptxas')}; logits (B, T, V) = ({ROWS[0]}, {ROWS[1]}, V) "
             "contiguous, the JIT's specialisation (stride_col = 1 constant, pointers / strides / V divisible by 16)",
             "load widths: 128 = the logits' row blocks; 64 = the int64 target; 16 / 32 = one logit or a per-row "
             "float (scalars)",
             "| kernel | arch | logits | vocabularies (one binary) | warps | registers | local memory | "
             "global load widths (bits) | without specialisation |",
             "|---|---|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | sm_{r['arch']} | {r['dtype']} | {', '.join(map(str, r['vocabularies']))} | "
                     f"{r['num_warps']} | {r['registers']} | {r['local_bytes']} B | "
                     f"{', '.join(map(str, r['load_widths']))} | "
                     f"{', '.join(map(str, r['unspecialised_load_widths']))} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="compile every Triton kernel for sm_80/90/100 and print the table")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    sys.path.insert(0, str(ROOT))
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # the default the JIT uses
    with tempfile.TemporaryDirectory() as workdir:
        rows = compile_all(Path(workdir))
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


# ----------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The rows of compile_all, computed once in a subprocess without TRITON_INTERPRET and a fresh Triton cache."""
    for tool in ("ptxas", "ptxas-blackwell", "cuobjdump"):
        if nvidia_tool(tool) is None:
            pytest.skip(f"this triton wheel carries no {tool} (triton/backends/nvidia/bin): nothing to compile with")
    tmp = tmp_path_factory.mktemp("kernel_compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")  # really compile, every run
    done = subprocess.run([sys.executable, __file__, "--json", str(tmp / "rows.json")], capture_output=True,
                          text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    print("\n" + done.stdout)  # the register / load-width table (pytest -s shows it)
    return json.loads((tmp / "rows.json").read_text())


def test_every_kernel_in_the_repository_is_compiled(compiled):
    found = jit_functions_in_repository()
    kernels = {r["kernel"] for r in compiled}
    # A @triton.jit function that is no kernel here must be a helper that a compiled kernel calls (inlined).
    sources = "".join(found.get(k, "") for k in kernels)
    helpers = {name for name in found if name not in kernels and re.search(rf"\b{name}\(", sources)}
    assert set(found) == kernels | helpers, (
        f"@triton.jit functions neither compiled here nor called by a compiled kernel: "
        f"{sorted(set(found) - kernels - helpers)}; add their launch to captured_launches")
    assert kernels == {"_forward_kernel", "_backward_kernel"} and helpers == {"_row_pointer"}


def test_every_arch_dtype_and_vocabulary_is_covered(compiled):
    covered = {(r["kernel"], r["arch"], r["dtype"], v) for r in compiled for v in r["vocabularies"]}
    wanted = {(k, a, d, v) for k in ("_forward_kernel", "_backward_kernel") for a in ARCHS for d in DTYPES
              for v in VOCABS}
    assert covered == wanted
    # The vocabulary reaches the binary only through the JIT key (V % 16 == 0, BLOCK_V, num_warps): one binary
    # serves all three here. Should that change (a constexpr V, a per-V heuristic), the rows split and the
    # assertions below still hold for every one of them.
    assert all(sorted(r["vocabularies"]) == sorted(VOCABS) for r in compiled), compiled


def test_the_contiguous_path_gets_the_jit_specialisation(compiled):
    for r in compiled:
        assert r["constexprs"] == {"stride_col": 1, "BLOCK_V": 4096}, r
        pointers = {"logits_ptr", "grad_logits_ptr"} if r["kernel"] == "_backward_kernel" else {"logits_ptr"}
        assert pointers | {"stride_inner", "vocab_size"} <= set(r["aligned_16"]), r


def test_no_local_memory_no_spills(compiled):
    spilled = [(r["kernel"], r["arch"], r["dtype"], r["local_bytes"], r["stack_bytes"]) for r in compiled
               if r["local_bytes"] or r["stack_bytes"]]
    assert not spilled, f"local memory / stack (register spills): {spilled}"


def test_128_bit_global_loads_on_the_contiguous_path(compiled):
    narrow = [(r["kernel"], r["arch"], r["dtype"], r["load_widths"]) for r in compiled if 128 not in r["load_widths"]]
    assert not narrow, f"no 128-bit global load (the logits are read in narrower pieces): {narrow}"
    # What the 128-bit loads rest on: without the specialisation the compiler cannot prove alignment.
    assert all(128 not in r["unspecialised_load_widths"] for r in compiled), compiled


if __name__ == "__main__":
    main()
