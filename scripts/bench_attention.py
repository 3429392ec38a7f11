"""Benchmark attention on a CUDA GPU: our Triton FlashAttention against SDPA's flash and cuDNN backends and
flash-attn (when installed), forward and forward + backward, bf16.

  python scripts/bench_attention.py [--quick] [--smoke] [--dtype bfloat16] [--out DIR]

Sequence lengths 512..8192, head_dim 64 and 128, batch sized so batch·seq = 16k tokens and 2048 / head_dim
heads (a 2048-wide model), causal and not; the goal's shape (seq 2048, head_dim 64, causal) comes first.
TFLOP/s counts 4·seq²·dim per (batch, head) forward (2.5x more backward) and half of that when causal; the
fraction is of the bf16 matmul rate measured in the same run. Writes
benchmarks/results/<gpu>/attention.{json,csv,png}, rewritten after every shape. Needs CUDA (`--smoke`: toy
sizes, CPU allowed, a check of the harness).
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ttl_kernels import flash_attention
from ttl_kernels.flash_attention import autotuned_configs
from ttl_core.attention import flash_attn_module
from ttl_core.benchmark import BenchDevice, Results, add_run_size_arguments, dtype_name, open_device, row
from ttl_core.cli import refuse_ignored, run_cli

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENS = {"full": 16384, "quick": 16384, "smoke": 64}
WIDTH = {"full": 2048, "quick": 2048, "smoke": 64}  # model width: heads = WIDTH / head_dim


def sdpa(backend: SDPBackend) -> Callable:
    """Attention in the flash-attn layout by torch's SDPA, held to its `backend` (flash, cuDNN or math)."""
    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=causal).transpose(1, 2)
    return run


def implementations(dev: BenchDevice) -> dict[str, Callable]:
    """ttl's kernel and the baselines this device has: SDPA's fused backends exist on CUDA only."""
    impls = {"ttl": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)}
    if dev.cuda:
        impls |= {"sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
        module = flash_attn_module()
        if module is not None:
            impls["flash_attn"] = lambda q, k, v, causal: module.flash_attn_func(q, k, v, causal=causal)
    else:
        impls["sdpa_math"] = sdpa(SDPBackend.MATH)
    return impls


def time_impl(dev: BenchDevice, impl: str, fn: Callable, shape: dict, dtype: torch.dtype,
              untimed_graphs: list[dict]) -> list[dict]:
    """Rows for one implementation's forward and forward + backward on fresh random q, k, v, timed as CUDA
    graph replays (a pass that cannot be captured is timed as it is and listed in `untimed_graphs`)."""
    batch, seq, heads, dim, causal = (shape[k] for k in ("batch", "seq", "heads", "head_dim", "causal"))
    q, k, v = (torch.randn(batch, seq, heads, dim, device=dev.device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    fwd_flops = 4 * batch * heads * seq * seq * dim * (0.5 if causal else 1.0)

    def forward():
        return fn(q, k, v, causal)

    def forward_backward():
        torch.autograd.grad(fn(q, k, v, causal), (q, k, v), grad)

    rows = []
    for pass_, run, flops in (("fwd", forward, fwd_flops), ("fwd+bwd", forward_backward, 3.5 * fwd_flops)):
        replay = dev.graph_replay(run)
        ms = dev.time_ms(replay or run, warmup=5, reps=20)
        if dev.cuda and replay is None:
            untimed_graphs.append({"impl": impl, "pass": pass_, "shape": shape})
        achieved = flops / (ms * 1e-3) / 1e12
        rows.append(row(impl, pass_, shape, dtype_name(dtype), ms, tflops=achieved,
                        frac_of_peak=achieved / dev.bf16_tflops, peak_mem_mb=dev.peak_memory_mb(run)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_size_arguments(parser, quick="seq 2048 only, head_dim 64, causal")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="q, k, v dtype (default %(default)s)")
    args = parser.parse_args(argv)
    refuse_ignored(parser, args, "--smoke", "--quick")
    dev = open_device("bench_attention", args.smoke)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    dtype = DTYPES[args.dtype]
    configs = {"full": [(2048, 64, True)] + [(s, d, c) for d in (64, 128) for c in (True, False)
                                             for s in (512, 1024, 2048, 4096, 8192) if (s, d, c) != (2048, 64, True)],
               "quick": [(2048, 64, True)], "smoke": [(17, 16, True), (32, 16, False)]}[mode]
    results = Results("attention", args.out, dev, plot_metric="tflops")
    print(f"{'seq':>6} {'dim':>4} {'causal':>6} {'pass':<8} {'impl':<11} {'ms':>8} {'TFLOP/s':>8} {'of peak':>8} "
          f"{'/ ttl':>6}")
    for seq, dim, causal in configs:
        shape = {"seq": seq, "head_dim": dim, "causal": causal, "batch": max(1, TOKENS[mode] // seq),
                 "heads": WIDTH[mode] // dim}
        rows = []
        for impl, fn in implementations(dev).items():  # each written at once: a time limit may cut the next
            impl_rows = results.attempt({"impl": impl, "shape": shape}, lambda: time_impl(
                dev, impl, fn, shape, dtype, results.notes.setdefault("timed_without_cuda_graph", []))) or []
            results.notes["autotuned_configs"] = autotuned_configs()
            results.add(impl_rows)
            rows += impl_rows
        ttl_ms = {r["pass"]: r["ms"] for r in rows if r["impl"] == "ttl"}
        for r in rows:
            print(f"{seq:>6} {dim:>4} {causal!s:>6} {r['pass']:<8} {r['impl']:<11} {r['ms']:>8.3f} {r['tflops']:>8.1f} "
                  f"{r['frac_of_peak']:>8.1%} {r['ms'] / ttl_ms.get(r['pass'], float('nan')):>6.2f}")
    return results.close()


if __name__ == "__main__":
    run_cli(main)
