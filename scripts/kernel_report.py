"""Compile every Triton kernel for a GPU on a machine without one, and report what the compiler made of it.

  python scripts/kernel_report.py [--arch 90] [--json FILE]

Reading the compiler's output costs no GPU time: per kernel and specialization it prints the registers per
thread, the stack (local memory: register spills), the shared memory, the matrix instructions (HGMMA is
Hopper's warpgroup MMA, HMMA the older per-warp one) and the 128-bit global loads and stores that
memory-bound kernels need. It runs the kernels' own launch wrappers, forward and backward, on small CPU
tensors at the model's and the benchmarks' widths, with Triton's active driver replaced by one that only
names the target, so every launch compiles with Triton's own specialization and options instead of running.
It also traces a decoder block with torch.compile's front end, for inference and training, and counts the
graph breaks. Exits 1 when a kernel fails to compile or needs more shared memory than the GPU has, or when the
compiled block breaks.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # kernels must be compiled JIT functions, not interpreted ones

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from ttl_core.cli import output_file, run_cli  # noqa: E402
from ttl_core.errors import TTLError  # noqa: E402
from ttl_core.fileio import write_json  # noqa: E402

SHARED_MEMORY_KB = {90: 227, 80: 163, 89: 99}  # per block, opt-in maximum
SASS_COUNTS = {"hgmma": r"\bHGMMA\.", "hmma": r"\bHMMA\.", "ldg128": r"\bLDG\.E[.A-Z]*\.128\b",
               "stg128": r"\bSTG\.E[.A-Z]*\.128\b", "local_ld_st": r"\b(?:LDL|STL)\b"}


class CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: names the target and a device 0, so launches compile."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def is_active(self) -> bool:
        return True


def capture_compilations(arch: int) -> list[tuple[str, dict, object]]:
    """Route every kernel launch to a compile (Triton's warm-up path) and collect (name, specialization,
    compiled kernel) for each distinct compilation."""
    driver.set_active(CompileOnlyDriver(arch))
    compiled, seen = [], set()
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        constexprs = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
        key = (self.fn.__name__, json.dumps(constexprs, sort_keys=True, default=str), kernel.hash)
        if key not in seen:
            seen.add(key)
            compiled.append((self.fn.__name__, constexprs, kernel))
        return kernel

    JITFunction.run = compile_only
    return compiled


def exercise_kernels() -> None:
    """Forward and backward of every kernel family at the widths the model and the benchmarks use."""
    from ttl_kernels import (apply_rotary_qkv, cross_entropy, flash_attention, fused_linear_cross_entropy, rms_norm,
                             rotary_into_cache, swiglu)

    # Triton for CPU tensors: the dispatcher asks for the interpreter flag, which is read at call time; the
    # attention kernels' interpreter-only upcast of their dots stays off, as on a GPU
    os.environ["TRITON_INTERPRET"], os.environ["TTL_KERNELS"] = "1", "triton"
    attention = importlib.import_module("ttl_kernels.flash_attention")
    attention.interpreting = lambda: False
    bf16 = torch.bfloat16

    def backward(*outputs: torch.Tensor) -> None:
        torch.autograd.backward([o.float().sum() for o in outputs])

    for hidden in (768, 2048, 4096, 8192, 16384):
        x = torch.randn(32, hidden, dtype=bf16, requires_grad=True)
        w = torch.randn(hidden, dtype=bf16, requires_grad=True)
        backward(rms_norm(x, w))
        backward(*rms_norm(x, w, residual=torch.randn_like(x, requires_grad=True)))
        # as in autocast training: an fp32 weight and residual stream, bf16 sublayer output and normed output
        residual = torch.randn(32, hidden, requires_grad=True)
        backward(*rms_norm(x, w.detach().float().requires_grad_(), residual=residual, out_dtype=bf16))
    for heads, kv_heads, dim in ((12, 12, 64), (32, 8, 128)):  # as the model calls them: training, then decoding
        qkv = torch.randn(2, 16, heads + 2 * kv_heads, dim, dtype=bf16, requires_grad=True)
        cos, sin = torch.randn(2, 16, dim, dtype=bf16), torch.randn(2, 16, dim, dtype=bf16)
        backward(*apply_rotary_qkv(qkv, cos, sin, kv_heads)[:2])
        k_cache, v_cache = (torch.zeros(8, kv_heads, 64, dim, dtype=bf16).transpose(1, 2) for _ in range(2))
        with torch.no_grad():
            rotary_into_cache(qkv[:, :1].repeat(4, 1, 1, 1), cos[:, :1].repeat(4, 1, 1), sin[:, :1].repeat(4, 1, 1),
                              k_cache, v_cache, torch.tensor([5]))
    for inter in (3072, 14336):
        backward(swiglu(torch.randn(16, 2 * inter, dtype=bf16, requires_grad=True)))  # as the model calls it
    for hidden, vocab in ((768, 32000), (4096, 128256)):
        h = torch.randn(64, hidden, dtype=bf16, requires_grad=True)
        weight = (torch.randn(vocab, hidden) / hidden**0.5).to(bf16).requires_grad_()
        targets = torch.randint(0, vocab, (64,))
        backward(fused_linear_cross_entropy(h, weight, targets))
        backward(cross_entropy(torch.randn(64, vocab, dtype=bf16, requires_grad=True), targets))
    # every autotuning candidate of the attention kernels, each put first in turn (the one used untuned)
    configs = attention.CONFIGS
    for heads, kv_heads, dim in ((12, 12, 64), (8, 2, 64), (32, 8, 128)):  # ttl-160m, GQA, llama3-8b-like
        for candidate in range(max(len(by_dim[dim]) for by_dim in configs.values())):
            for by_dim in configs.values():
                by_dim[dim].insert(0, by_dim[dim].pop(candidate % len(by_dim[dim])))
            for causal in (True, False):
                q = torch.randn(1, 130, heads, dim, dtype=bf16, requires_grad=True)
                k, v = (torch.randn(1, 130, kv_heads, dim, dtype=bf16, requires_grad=True) for _ in range(2))
                backward(flash_attention(q, k, v, causal=causal))


def count_graph_breaks() -> dict[str, dict]:
    """How torch.compile sees a decoder block running the Triton kernels and our attention, for inference and
    for training: the graphs its forward traces into and the breaks between them (each break splits the compiled
    block and runs the code between the pieces eagerly). torch.compile treats Triton launches as kernels only
    when it believes a GPU is present, hence the patched check. Inference is traced with fake CUDA tensors. A
    training trace also speculates each autograd Function's backward, and a CPU build of torch cannot give fake
    CUDA tensors a gradient, so it runs on CPU tensors that the dispatcher sends to the compiled kernels (whose
    launches only compile here)."""
    import torch.utils._triton as torch_triton
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ttl_core import LlamaConfig
    from ttl_core.model import Block

    def explain(block: Block, device: str) -> dict:
        x, residual = (torch.randn(2, 64, config.hidden_size, device=device, dtype=torch.bfloat16,
                                   requires_grad=torch.is_grad_enabled()) for _ in range(2))
        cos, sin = (torch.randn(2, 64, config.head_dim, device=device, dtype=torch.bfloat16) for _ in range(2))
        explained = torch._dynamo.explain(block)(x, residual, cos, sin, None)
        torch._dynamo.reset()
        return {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
                "reasons": [b.reason.splitlines()[0] for b in explained.break_reasons]}

    torch_triton.has_triton = lambda *args, **kwargs: True  # torch 2.15 added an include_cpu argument
    config = LlamaConfig.from_preset("tiny", kernels="triton", attention="triton")
    os.environ.pop("TRITON_INTERPRET", None)
    with torch.device("meta"):
        block = Block(config, 0).to(torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        inference = explain(block.to_empty(device="cuda"), "cuda")
    # the flag is read at call time, the kernels were decorated without it: CPU tensors reach compiled kernels
    os.environ["TRITON_INTERPRET"] = "1"
    importlib.import_module("ttl_kernels.flash_attention").interpreting = lambda: False
    training = explain(Block(config, 0).to(torch.bfloat16), "cpu")
    return {"inference": inference, "training": training}


def inspect(kernel: triton.compiler.CompiledKernel, tools: Path) -> dict:
    """Registers, stack bytes and SASS instruction counts of a compiled kernel, read with cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([tools / "cuobjdump", "--dump-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "stack_bytes": int(re.search(r"STACK:(\d+)", usage).group(1)),
            **{name: len(re.findall(pattern, sass)) for name, pattern in SASS_COUNTS.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_MEMORY_KB),
                        help="compute capability x10 (default 90: H100/H200)")
    parser.add_argument("--json", type=output_file, help="also write the rows to this file")
    args = parser.parse_args(argv)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "cuobjdump").exists():  # checked first: compiling every kernel takes minutes
        raise TTLError(f"kernel_report reads the compiled kernels with cuobjdump, which this triton lacks ({tools})")
    compiled = capture_compilations(args.arch)
    exercise_kernels()
    rows, too_big = [], []
    for name, constexprs, kernel in compiled:
        shared_kb = kernel.metadata.shared / 1024
        rows.append({"kernel": name, "constexprs": constexprs, "num_warps": kernel.metadata.num_warps,
                     "num_stages": kernel.metadata.num_stages, "shared_kb": round(shared_kb, 1),
                     **inspect(kernel, tools)})
        if shared_kb > SHARED_MEMORY_KB[args.arch]:
            too_big.append(name)
    print(f"triton {triton.__version__}, sm_{args.arch}: {len(rows)} compilations")
    print(f"{'kernel':<22} {'warps':>5} {'stages':>6} {'smem KB':>7} {'regs':>4} {'stack':>5} {'HGMMA':>5} {'HMMA':>5} "
          f"{'LDG128':>6} {'STG128':>6}  constexprs")
    for r in sorted(rows, key=lambda r: r["kernel"]):
        consts = " ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k not in ("num_warps", "num_stages"))
        print(f"{r['kernel']:<22} {r['num_warps']:>5} {r['num_stages']:>6} {r['shared_kb']:>7.1f} {r['registers']:>4} "
              f"{r['stack_bytes']:>5} {r['hgmma']:>5} {r['hmma']:>5} {r['ldg128']:>6} {r['stg128']:>6}  {consts}")
    compiled_block = count_graph_breaks()
    for mode, trace in compiled_block.items():
        print(f"torch.compile of a decoder block (Triton kernels and attention), {mode}: {trace['graphs']} graph(s), "
              f"{trace['graph_breaks']} break(s)" + "".join(f"\n  {r}" for r in trace["reasons"]))
    if args.json:
        write_json(Path(args.json), {"triton": triton.__version__, "arch": args.arch, "rows": rows,
                                     "compiled_block": compiled_block})
    if too_big:
        print(f"over the {SHARED_MEMORY_KB[args.arch]} KB of shared memory: {sorted(set(too_big))}")
    return 1 if too_big or any(trace["graph_breaks"] for trace in compiled_block.values()) else 0


if __name__ == "__main__":
    run_cli(main)
