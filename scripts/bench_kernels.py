"""Benchmark ttl's Triton kernels against PyTorch eager, torch.compile, F.rms_norm and Liger-Kernel on a CUDA GPU.

  python scripts/bench_kernels.py [--only rms_norm rotary swiglu cross_entropy] [--quick] [--dtype bfloat16] [--out DIR]

For each kernel family, the forward (as in training: inputs require grad; for the fused linear
cross-entropy, whose training forward already computes both gradients, the loss alone, as in evaluation:
no_grad on inputs that do not require grad) and the forward + backward, over rows (tokens) 4096..65536, the
goals' shapes first: median ms of CUDA graph replays (kernel time without the host's Python and launch
overhead; CUDA events, L2 flushed), GB/s of the bytes a fused kernel must move (counted per family below;
every implementation is charged the same bytes, so GB/s compares like ms does), that as a fraction of the
copy bandwidth measured in the same run (for the matmul-bound fused linear cross-entropy: TFLOP/s as a
fraction of the measured bf16 matmul rate), and peak extra memory. Prints a table and writes
benchmarks/results/<gpu>/<family>.{json,csv,png}, rewritten after every shape. Needs CUDA; `--quick` runs a
few sizes only; `--smoke` checks the harness at toy sizes (on the CPU with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F

from ttl_kernels import (apply_rotary, apply_rotary_reference, cross_entropy, cross_entropy_reference,
                     fused_linear_cross_entropy, rms_norm, rms_norm_reference, swiglu, swiglu_reference)
from ttl_core.benchmark import BenchDevice, Results, add_run_size_arguments, cell, dtype_name, open_device, row
from ttl_core.cli import refuse_ignored, run_cli

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ROWS = {"full": (4096, 16384, 65536), "quick": (16384,), "smoke": (48, 80)}


GOAL_ROWS = 16384  # the row count the speed goals name (benchmarks/README.md); measured first


def liger(module: str, name: str) -> Callable | None:
    """A Liger-Kernel autograd Function's `apply`, or None when liger_kernel is missing or fails to import
    (a baseline absent, not a benchmark lost)."""
    try:
        return getattr(__import__(f"liger_kernel.ops.{module}", fromlist=[name]), name).apply
    except Exception as e:  # noqa: BLE001 - a Triton version clash raises more than ImportError
        if not isinstance(e, ImportError):
            print(f"liger_kernel.ops.{module} does not import ({type(e).__name__}: {e}): no Liger baseline")
        return None


def compile_once_per_width() -> None:
    """torch.compile set-up for the baselines: the row dimension is marked dynamic (`inputs_for`), every
    other dimension stays static without dynamo turning it dynamic on its own once a second width appears,
    and the recompile limit is raised so every width of a family keeps its own compiled graph; each width
    then compiles once, whatever order the shapes come in."""
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.recompile_limit = 256


def goal_rows_first(mode: str) -> tuple[int, ...]:
    """The row counts `mode` measures, the goals' first, so that a time limit cuts the others."""
    return tuple(sorted(ROWS[mode], key=lambda rows: rows != GOAL_ROWS))


def time_passes(dev: BenchDevice, impl: str, fn: Callable, tensors: tuple, shape: dict, dtype: torch.dtype,
                fwd_bytes: int, bwd_bytes: int, fwd_flops: float, bwd_flops: float,
                untimed_graphs: list[dict], forward_grad: bool = True) -> list[dict]:
    """Rows for one implementation's forward (without `forward_grad`: under no_grad, on detached inputs, as an
    evaluation gives them; Liger decides from `requires_grad` whether to compute gradients) and forward + backward
    (gradients of the inputs that require grad), timed as CUDA graph replays (kernel time, no host
    overhead; a pass that cannot be captured is timed as it is and listed in `untimed_graphs`). With FLOP
    counts (matmul-bound kernels) the fraction of peak is of the measured matmul rate, otherwise of the
    copy bandwidth."""
    leaves = [t for t in tensors if t.requires_grad]
    outs = fn(*tensors)
    grads = [torch.randn_like(o) for o in (outs if isinstance(outs, tuple) else (outs,))]
    # the outputs hold their autograd graph and its saved tensors (8 GB of float32 log-probabilities for the eager
    # cross-entropy at the goal's shape): not to be kept through the captures and timings below
    del outs

    detached = tuple(t.detach() for t in tensors)

    def forward():
        if forward_grad:
            return fn(*tensors)
        with torch.no_grad():
            return fn(*detached)

    def forward_backward():
        result = fn(*tensors)
        torch.autograd.grad(result if isinstance(result, tuple) else (result,), leaves, grads)

    rows = []
    for pass_, run, nbytes, flops in (("fwd", forward, fwd_bytes, fwd_flops),
                                      ("fwd+bwd", forward_backward, fwd_bytes + bwd_bytes, fwd_flops + bwd_flops)):
        replay = dev.graph_replay(run)
        ms = dev.time_ms(replay or run)
        if dev.cuda and replay is None:
            untimed_graphs.append({"impl": impl, "pass": pass_, "shape": shape})
        # a graph pins its private memory pool while it lives; released here, the pool is freed when the next
        # capture begins (torch.cuda.graph empties the allocator's cache) or when the eager run below runs short
        del replay
        gbs = nbytes / (ms * 1e-3) / 1e9
        tflops = flops / (ms * 1e-3) / 1e12 if flops else None
        rows.append(row(impl, pass_, shape, dtype_name(dtype), ms, gbs=gbs, tflops=tflops,
                        frac_of_peak=tflops / dev.bf16_tflops if flops else gbs / dev.bandwidth_gbs,
                        peak_mem_mb=dev.peak_memory_mb(run)))
    return rows


def measure(results: Results, impls: dict[str, Callable | None], make_inputs: Callable, row_inputs: tuple[int, ...],
            shape: dict, dtype: torch.dtype, fwd_bytes: int, bwd_bytes: int, fwd_flops: float = 0.0,
            bwd_flops: float = 0.0, forward_grad: bool = True) -> None:
    """Time every available implementation on fresh inputs from `make_inputs()` and add its rows; one
    implementation failing (recorded in the results) does not stop the others. `row_inputs` are the
    positions of the inputs whose first dimension is the row (token) count."""
    # torch.compile last: its compilation is the slowest set-up, and a step cut off by the suite's time limit
    # should lose it rather than a baseline a goal names (Liger, F.rms_norm); rows are written as they come
    for impl in sorted(impls, key=lambda name: name == "compile"):
        fn = impls[impl]
        if fn is not None:
            results.add(results.attempt({"impl": impl, "shape": shape}, lambda: time_passes(
                results.device, impl, fn, inputs_for(impl, make_inputs, row_inputs), shape, dtype, fwd_bytes, bwd_bytes,
                fwd_flops, bwd_flops, results.notes.setdefault("timed_without_cuda_graph", []), forward_grad)) or [])


def inputs_for(impl: str, make_inputs: Callable, row_inputs: tuple[int, ...]) -> tuple:
    """Fresh inputs; for torch.compile the leading (rows or batch) dimension is marked dynamic, so one
    compilation per width serves every row count (see `compile_once_per_width`) while the reduction width
    stays static, as compile prefers."""
    tensors = make_inputs()
    if impl == "compile":
        for i in row_inputs:
            torch._dynamo.mark_dynamic(tensors[i], 0)
    return tensors


def unfused(norm: Callable) -> Callable:
    """A norm without a residual input, given one by a separate add (what a model does without fusion)."""
    def fn(x, w, r=None):
        if r is None:
            return norm(x, w)
        h = x + r
        return norm(h, w), h
    return fn


def with_liger_fused_add(norm: Callable | None, fused_add: Callable | None, eps: float) -> Callable | None:
    """Liger's RMSNorm, with its fused residual-add Function for the residual rows when this version has one."""
    if norm is None:
        return None
    if fused_add is None:
        return unfused(lambda x, w: norm(x, w, eps))
    return lambda x, w, r=None: norm(x, w, eps) if r is None else fused_add(x, r, w, eps)


def bench_rms_norm(mode: str, dtype: torch.dtype, results: Results) -> None:
    """RMSNorm with and without the fused residual add, hidden 768..16384. The goals' shapes come first
    (16k rows without a residual, hidden 2048-8192 leading), so a run cut short keeps what they judge."""
    device, eps = results.device.device, 1e-5
    hiddens = {"full": (2048, 4096, 8192, 768, 1024, 16384), "quick": (4096, 768), "smoke": (40,)}[mode]
    ref = torch.compile(rms_norm_reference)
    impls = {
        "ttl": lambda x, w, r=None: rms_norm(x, w, eps, residual=r),
        "torch": lambda x, w, r=None: rms_norm_reference(x, w, eps, r),
        "compile": lambda x, w, r=None: ref(x, w, eps, r),
        "F.rms_norm": unfused(lambda x, w: F.rms_norm(x, x.shape[-1:], w, eps)),
        "liger": with_liger_fused_add(liger("rms_norm", "LigerRMSNormFunction"),
                                      liger("fused_add_rms_norm", "LigerFusedAddRMSNormFunction"), eps),
    }
    for rows in goal_rows_first(mode):
        for residual in (False, True):
            for hidden in hiddens:
                def make_inputs():
                    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
                    w = torch.randn(hidden, device=device, dtype=dtype, requires_grad=True)
                    return (x, w, torch.randn_like(x, requires_grad=True)) if residual else (x, w)

                # fwd reads x (and the residual), writes y (and x + residual); bwd reads dy, the saved
                # x + residual (and its gradient) and writes dx, which is also the residual's gradient
                tensor = rows * hidden * dtype.itemsize
                fwd_bytes, bwd_bytes = (4 * tensor, 4 * tensor) if residual else (2 * tensor, 3 * tensor)
                shape = {"rows": rows, "hidden": hidden, "residual": residual}
                measure(results, impls, make_inputs, (0, 2) if residual else (0,), shape, dtype, fwd_bytes, bwd_bytes)


def bench_rotary(mode: str, dtype: torch.dtype, results: Results) -> None:
    """Rotary embedding of q and k as separate projections give them (transformers' layout: Liger copies q and k
    cut from a fused qkv projection before its in-place kernel, ttl's kernel reads them in place), with per-token
    (batch, seq, dim) angles."""
    liger_rope = liger("rope", "LigerRopeFunction")
    device = results.device.device
    seq = 16 if mode == "smoke" else 2048
    heads = {"full": {"ttl-160m": (12, 12, 64), "ttl-460m": (16, 16, 64), "llama3-8b": (32, 8, 128)},
             "quick": {"ttl-160m": (12, 12, 64), "llama3-8b": (32, 8, 128)},
             "smoke": {"toy-gqa": (4, 2, 16)}}[mode]
    impls = {
        "ttl": apply_rotary,
        "torch": apply_rotary_reference,
        "compile": torch.compile(apply_rotary_reference),
        # Liger takes (batch, heads, seq, dim) and returns that layout: the transposed view of each projection that
        # transformers gives it, which it transposes back to contiguous (batch, seq, heads, dim) rows without a copy
        "liger": liger_rope and (lambda q, k, cos, sin: liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)),
    }
    for tokens in goal_rows_first(mode):
        for name, (n_heads, n_kv, dim) in heads.items():
            batch = tokens // seq

            def make_inputs():
                q, k = (torch.randn(batch, seq, n, dim, device=device, dtype=dtype, requires_grad=True)
                        for n in (n_heads, n_kv))
                # each frequency twice, as transformers builds them (Liger reads the first half only)
                angles = (torch.rand(batch, seq, dim // 2, device=device) * 6.3).repeat(1, 1, 2)
                return q, k, angles.cos().to(dtype), angles.sin().to(dtype)

            # each pass reads q, k, cos, sin and writes q, k (or their gradients)
            nbytes = tokens * (2 * (n_heads + n_kv) * dim + 2 * dim) * dtype.itemsize
            shape = {"tokens": tokens, "model": name, "heads": n_heads, "kv_heads": n_kv, "head_dim": dim}
            measure(results, impls, make_inputs, (0, 1, 2, 3), shape, dtype, nbytes, nbytes)


def bench_swiglu(mode: str, dtype: torch.dtype, results: Results) -> None:
    """SwiGLU on separate gate and up tensors (transformers' layout; Liger copies strided halves of a fused
    projection before its kernel, ttl's kernel reads them in place)."""
    device = results.device.device
    impls = {"ttl": swiglu, "torch": swiglu_reference, "compile": torch.compile(swiglu_reference),
             "liger": liger("swiglu", "LigerSiLUMulFunction")}
    for rows in goal_rows_first(mode):
        for inter in {"full": (3072, 4096, 8192, 14336), "quick": (3072, 14336), "smoke": (40,)}[mode]:
            def make_inputs():
                return tuple(torch.randn(rows, inter, device=device, dtype=dtype, requires_grad=True)
                             for _ in range(2))

            # fwd reads gate, up and writes the product; bwd reads its gradient, gate, up and writes two
            tensor = rows * inter * dtype.itemsize
            measure(results, impls, make_inputs, (0, 1), {"rows": rows, "intermediate": inter}, dtype, 3 * tensor,
                    5 * tensor)


def loss_only(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Liger's loss Functions return the loss alone or (loss, z_loss) depending on the version."""
    return out[0] if isinstance(out, tuple) else out


def eager_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What transformers does: the full logits, upcast to float32, then cross-entropy."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets)


def bench_cross_entropy(mode: str, dtype: torch.dtype, results: Results) -> None:
    """Fused linear cross-entropy (LM head + loss, fwd 2·N·d·V FLOPs, bwd 4·N·d·V) and cross-entropy on
    given logits (GB/s). The shape records the unfused logits + gradient bytes, the memory fusion avoids.
    The goal's shape (16k tokens x 4096 x 128256) comes first, so a run cut short still has it."""
    liger_flce = liger("fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")
    liger_ce = liger("cross_entropy", "LigerCrossEntropyFunction")
    device = results.device.device
    sizes = {"full": [(16384, 4096, 128256)] + [(t, d, v) for v in (32000, 128256) for d in (768, 2048, 4096)
                                                 for t in (4096, 16384) if (t, d, v) != (16384, 4096, 128256)],
             "quick": [(16384, 4096, 128256), (8192, 768, 32000)],
             "smoke": [(48, 40, 1003)]}[mode]
    impls = {"ttl": fused_linear_cross_entropy, "torch": eager_linear_cross_entropy,
             "compile": torch.compile(eager_linear_cross_entropy),
             "liger": liger_flce and (lambda h, w, t: loss_only(liger_flce(h, w, t)))}
    for tokens, hidden, vocab in sizes:

        def make_inputs():
            h = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
            w = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_()
            return h, w, torch.randint(0, vocab, (tokens,), device=device)

        flops = 2 * tokens * hidden * vocab
        unfused_bytes = 2 * tokens * vocab * dtype.itemsize
        shape = {"tokens": tokens, "hidden": hidden, "vocab": vocab,
                 "unfused_logits_grad_mb": round(unfused_bytes / 2**20, 1)}
        # bytes: hidden and weight read, gradients written; the logits themselves never reach memory
        tensor_bytes = (tokens + vocab) * hidden * dtype.itemsize
        # the fwd row is the loss alone (no_grad, detached inputs): with grad, ttl's and Liger's forward already
        # computes both gradients (all 6·N·d·V FLOPs), so a 2·N·d·V charge would read 3x low
        measure(results, impls, make_inputs, (0, 2), shape, dtype, tensor_bytes, tensor_bytes, fwd_flops=flops,
                bwd_flops=2 * flops, forward_grad=False)
    logit_sizes = {"full": [(t, v) for v in (32000, 128256) for t in (4096, 16384)], "quick": [(8192, 128256)],
                   "smoke": [(48, 1003)]}[mode]
    logit_impls = {"ttl": cross_entropy, "torch": lambda x, t: F.cross_entropy(x.float(), t),
                   "compile": torch.compile(cross_entropy_reference),
                   "liger": liger_ce and (lambda x, t: loss_only(liger_ce(x, t, None)))}
    for tokens, vocab in logit_sizes:

        def make_logits():
            x = torch.randn(tokens, vocab, device=device, dtype=dtype, requires_grad=True)
            return x, torch.randint(0, vocab, (tokens,), device=device)

        logits_bytes = tokens * vocab * dtype.itemsize  # fwd reads the logits, bwd writes their gradient
        measure(results, logit_impls, make_logits, (0, 1), {"tokens": tokens, "vocab": vocab, "on_logits": True}, dtype,
                logits_bytes, logits_bytes)


# in the order of the speed goals (benchmarks/README.md), so a run cut short by a time limit loses the least
FAMILIES = {"rms_norm": bench_rms_norm, "rotary": bench_rotary, "cross_entropy": bench_cross_entropy,
            "swiglu": bench_swiglu}


def print_table(family: str, rows: list[dict]) -> None:
    """One line per measurement, with its time over ttl's on the same shape and pass."""
    ttl_ms = {(str(r["shape"]), r["pass"]): r["ms"] for r in rows if r["impl"] == "ttl"}
    print(f"\n{family}")
    print(f"{'shape':<58} {'pass':<8} {'impl':<11} {'ms':>9} {'GB/s':>8} {'of peak':>8} {'peak MB':>9} {'/ ttl':>7}")
    for r in rows:
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        ratio = r["ms"] / ttl_ms.get((str(r["shape"]), r["pass"]), float("nan"))
        print(f"{shape:<58} {r['pass']:<8} {r['impl']:<11} {r['ms']:>9.4f} {r['gbs']:>8.0f} "
              f"{r['frac_of_peak']:>8.1%} {cell(r['peak_mem_mb'], '9.1f'):>9} {ratio:>7.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(FAMILIES), help="kernel families to run (default: all)")
    add_run_size_arguments(parser, quick="a few sizes only (a check in about a minute)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="activation dtype (default %(default)s)")
    args = parser.parse_args(argv)
    refuse_ignored(parser, args, "--smoke", "--quick")
    dev = open_device("bench_kernels", args.smoke)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    compile_once_per_width()
    status = 0
    for family in args.only or FAMILIES:
        results = Results(family, args.out, dev)
        FAMILIES[family](mode, DTYPES[args.dtype], results)
        print_table(family, results.rows)
        status |= results.close()
    return status


if __name__ == "__main__":
    run_cli(main)
