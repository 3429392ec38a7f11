"""Benchmark attention on a CUDA GPU: our Triton FlashAttention against SDPA's flash and cuDNN backends and
flash-attn (when installed), forward and forward + backward, bf16.

  python scripts/bench_attention.py [--quick] [--dtype bfloat16] [--out DIR]

Sequence lengths 512..8192, head_dim 64 and 128, batch sized so batch·seq = 16k tokens and 2048 / head_dim
heads (a 2048-wide model), causal and not. TFLOP/s counts 4·seq²·dim per (batch, head) forward (2.5x more
backward) and half of that when causal; the fraction is of the bf16 matmul rate measured in the same run.
Writes benchmarks/results/<gpu>/attention.{json,csv,png}. Needs CUDA.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import flash_attention
from ttl_core.attention import flash_attn_module
from ttl_core.benchmark import (measure_bf16_tflops, measure_copy_bandwidth_gbs, peak_memory_mb, require_cuda, row,
                                time_ms, write_results)
from ttl_core.cli import run_cli

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"bfloat16": "bf16", "float16": "fp16"}
TOKENS = 16384


def sdpa(backend: SDPBackend) -> Callable:
    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=causal).transpose(1, 2)
    return run


def implementations() -> dict[str, Callable]:
    impls = {"ttl": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal),
             "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    module = flash_attn_module()
    if module is not None:
        impls["flash_attn"] = lambda q, k, v, causal: module.flash_attn_func(q, k, v, causal=causal)
    return impls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seq 2048 only, head_dim 64, causal")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--out", default="benchmarks/results", help="results root (default benchmarks/results)")
    args = parser.parse_args(argv)
    require_cuda("bench_attention")
    dtype = DTYPES[args.dtype]
    bandwidth, tflops_peak = measure_copy_bandwidth_gbs(), measure_bf16_tflops()
    print(f"{torch.cuda.get_device_name()}: bf16 matmul {tflops_peak:.0f} TFLOP/s measured")
    configs = ([(2048, 64, True)] if args.quick else
               [(s, d, c) for d in (64, 128) for c in (True, False) for s in (512, 1024, 2048, 4096, 8192)])
    rows = []
    print(f"{'seq':>6} {'dim':>4} {'causal':>6} {'pass':<8} {'impl':<11} {'ms':>8} {'TFLOP/s':>8} {'of peak':>8} {'/ ttl':>6}")
    for seq, dim, causal in configs:
        batch, heads = TOKENS // seq, 2048 // dim
        fwd_flops = 4 * batch * heads * seq * seq * dim * (0.5 if causal else 1.0)
        ttl_ms = {}
        for impl, fn in implementations().items():
            q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=dtype, requires_grad=True)
                       for _ in range(3))
            grad = torch.randn_like(q)
            try:
                fn(q, k, v, causal)
            except RuntimeError as e:  # e.g. no cuDNN attention for this shape or build
                print(f"{seq:>6} {dim:>4} {causal!s:>6} skip     {impl:<11} ({str(e).splitlines()[0][:60]})")
                continue

            def forward():
                return fn(q, k, v, causal)

            def forward_backward():
                torch.autograd.grad(fn(q, k, v, causal), (q, k, v), grad)

            for pass_, run, flops in (("fwd", forward, fwd_flops), ("fwd+bwd", forward_backward, 3.5 * fwd_flops)):
                ms = time_ms(run, warmup=5, reps=20)
                achieved = flops / (ms * 1e-3) / 1e12
                if impl == "ttl":
                    ttl_ms[pass_] = ms
                rows.append(row(impl, pass_, {"seq": seq, "head_dim": dim, "causal": causal, "batch": batch,
                                              "heads": heads}, SHORT[args.dtype],
                                ms, tflops=achieved, frac_of_peak=achieved / tflops_peak,
                                peak_mem_mb=peak_memory_mb(run)))
                ratio = ms / ttl_ms[pass_] if pass_ in ttl_ms else float("nan")
                print(f"{seq:>6} {dim:>4} {causal!s:>6} {pass_:<8} {impl:<11} {ms:>8.3f} {achieved:>8.1f} "
                      f"{achieved / tflops_peak:>8.1%} {ratio:>6.2f}")
    print(f"wrote {write_results('attention', rows, args.out, bandwidth, tflops_peak, plot_metric='tflops')}")
    return 0


if __name__ == "__main__":
    run_cli(main)
