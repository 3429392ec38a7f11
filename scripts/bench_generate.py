"""Benchmark ttl's generate() against transformers' generate() on the same weights on a CUDA GPU.

  python scripts/bench_generate.py [--quick] [--smoke] [--batches 1 8 64] [--prompt 128] [--new-tokens 256] [--out DIR]

Random ttl-160m-shaped weights in bf16, saved once in the Hugging Face layout and loaded by both libraries.
Greedy decoding of random prompts with EOS disabled, so every implementation produces exactly --new-tokens
tokens per row: ttl with its decode step in a CUDA graph ("ttl") and without ("ttl_nograph"); transformers
with its dynamic cache ("hf") and with a static cache, which its generate() compiles with
torch.compile(mode="reduce-overhead") ("hf_static_compile"). Each figure is the median of whole generate()
calls after a first, untimed one, prefill included; transformers' compiled graphs and ttl's captured CUDA graph
are made by that first call and reused by later calls of the same shape, so neither counts. Reports ms per call,
ms per token step, tokens/s over the batch, and GB/s of the bytes decoding must read (every weight once per
step plus each row's cached keys and values) as a fraction of the copy bandwidth measured in the same run,
and the extra device memory of the first (cold) call; ttl's call at the smallest batch is also profiled
(JSON `notes.kernel_profiles`: its kernel time against its wall time).
Writes benchmarks/results/<gpu>/generate.{json,csv,png}, rewritten after every measurement. Needs CUDA
(`--smoke`: the tiny preset, CPU allowed, a check of the harness; it fixes every size, so a size option given
with it is refused).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Callable

import torch

from ttl_core.benchmark import (BenchDevice, Results, add_run_size_arguments, cell, open_device, positive_int,
                                print_profiles, row)
from ttl_core.cli import refuse_ignored, run_cli
from ttl_core.config import PRESETS, LlamaConfig
from ttl_core.generate import generate
from ttl_core.hf import load_pretrained, save_pretrained
from ttl_core.model import LlamaForCausalLM


def hf_model(path: str, device: torch.device) -> torch.nn.Module | None:
    """transformers' Llama from the saved directory, or None (with a note) when transformers is missing."""
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: measuring ttl only")
        return None
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None  # every call runs the full length, as ttl's does
    return model.to(device).eval()


def decode_bytes(model: LlamaForCausalLM, batch: int, prompt: int, new: int) -> int:
    """Bytes a generate() call must read: all weights but the embedding table at each step, and at step t the
    keys and values of prompt + t positions per row, all in the model's dtype (the cache's)."""
    config, element = model.config, model.lm_head.weight.element_size()
    weights = model.num_parameters(exclude_embedding=True) * element
    per_position = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * element
    cached_positions = sum(prompt + t for t in range(new))
    return new * weights + batch * per_position * cached_positions


def bench(path: str, preset: str, batches: list[int], hf_static_batches: list[int], prompt: int, new: int,
          results: Results, reps: int) -> None:
    """Every implementation at every batch size, batch by batch from the smallest (the speed goals' shape,
    so a run cut short by a time limit loses the other batches rather than it); within a batch, the
    implementations the goals compare come first."""
    dev = results.device
    ours = load_pretrained(path, dtype=torch.bfloat16, device=dev.device)
    hf = hf_model(path, dev.device)
    # greedy, EOS-blind and one sequence a prompt whatever a generation_config.json says, as the timed shape
    # (batch, prompt + new) assumes
    greedy = {"max_new_tokens": new, "do_sample": False, "eos_token_id": [], "num_return_sequences": 1}
    impls = {
        "ttl": lambda ids, mask: generate(ours, ids, mask, **greedy),
        "ttl_nograph": lambda ids, mask: generate(ours, ids, mask, **greedy, cuda_graph=False),
    }
    if hf is not None:
        impls["hf"] = lambda ids, mask: hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        impls["hf_static_compile"] = lambda ids, mask: hf.generate(ids, attention_mask=mask, max_new_tokens=new,
                                                                   do_sample=False, cache_implementation="static")
    goal_order = ("ttl", "hf", "hf_static_compile", "ttl_nograph")
    jobs = [(batch, impl) for batch in sorted(batches) for impl in sorted(impls, key=goal_order.index)
            if impl != "hf_static_compile" or batch in hf_static_batches]
    for batch, impl in jobs:
        gen = torch.Generator(device=dev.device).manual_seed(batch)
        ids = torch.randint(4, ours.config.vocab_size, (batch, prompt), device=dev.device, generator=gen)
        mask = torch.ones_like(ids)
        shape = {"preset": preset, "batch": batch, "prompt": prompt, "new_tokens": new}
        measured = results.attempt({"impl": impl, "shape": shape}, lambda: time_generate(
            dev, impl, lambda: impls[impl](ids, mask), (batch, prompt + new), reps))
        if measured:
            ms, memory = measured
            gbs = decode_bytes(ours, batch, prompt, new) / (ms * 1e-3) / 1e9
            results.add([row(impl, "decode", shape, "bf16", ms, gbs=gbs, frac_of_peak=gbs / dev.bandwidth_gbs,
                             tokens_per_s=batch * new / (ms * 1e-3), peak_mem_mb=memory)])
            if impl == "ttl" and batch == min(batches):  # the goal's shape: is decoding bound by the host?
                profile = results.attempt({"impl": impl, "shape": shape, "profile": True},
                                          lambda: dev.kernel_profile(lambda: impls[impl](ids, mask), calls=1))
                if profile:
                    profiles = results.notes.setdefault("kernel_profiles", {})
                    profiles[f"{impl} batch {batch}"] = {"wall_ms": ms, **profile}


def time_generate(dev: BenchDevice, impl: str, fn: Callable[[], torch.Tensor], expected_shape: tuple[int, int],
                  reps: int) -> tuple[float, float | None]:
    """(median ms per call, extra memory MB of the first, cold call), after checking the output's shape.
    Whole generate() calls take seconds for transformers: the cold call (compilation, graph capture) is the
    only warm-up, then `reps` calls are timed on the host clock, which is exact enough at that length."""
    first = {}
    memory = dev.peak_memory_mb(lambda: first.update(out=fn()))  # the first call allocates its caches
    if tuple(first["out"].shape) != expected_shape:
        raise RuntimeError(f"{impl} returned shape {tuple(first['out'].shape)}, expected {expected_shape}")
    times = []
    for _ in range(reps):
        dev.sync()
        start = time.perf_counter()
        fn()
        dev.sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), memory


def print_table(rows: list[dict]) -> None:
    """One line per measurement, with ttl's speed-up over it on the same shape."""
    ttl_ms = {str(r["shape"]): r["ms"] for r in rows if r["impl"] == "ttl"}
    print(f"\n{'batch':>5} {'impl':<18} {'ms/call':>9} {'ms/token':>9} {'tokens/s':>10} {'GB/s':>7} {'of copy':>8} "
          f"{'peak MB':>8} {'ttl speed-up':>12}")
    for r in rows:
        s = r["shape"]
        print(f"{s['batch']:>5} {r['impl']:<18} {r['ms']:>9.1f} {r['ms'] / s['new_tokens']:>9.3f} "
              f"{r['tokens_per_s']:>10.0f} {r['gbs']:>7.0f} {r['frac_of_peak']:>8.1%} "
              f"{cell(r['peak_mem_mb'], '8.0f'):>8} "
              f"{r['ms'] / ttl_ms.get(str(s), float('nan')):>11.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=positive_int, nargs="+", help="batch sizes (default 1 8 64; --quick: 1 64)")
    parser.add_argument("--prompt", type=positive_int, help="prompt tokens per row (default 128)")
    parser.add_argument("--new-tokens", type=positive_int, help="tokens generated per row (default 256; --quick: 64)")
    parser.add_argument("--hf-static-batches", type=positive_int, nargs="+",
                        help="batch sizes at which to run transformers' static cache + compile, whose compilation "
                             "takes minutes per batch size (default: all)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model shape (default ttl-160m)")
    add_run_size_arguments(parser, quick="fewer sizes, tokens and repetitions",
                           smoke="tiny preset, toy sizes, CPU allowed: checks the harness only")
    args = parser.parse_args(argv)
    refuse_ignored(parser, args, "--smoke", "--quick", "--preset", "--batches", "--prompt", "--new-tokens")
    dev = open_device("bench_generate", args.smoke)
    if args.smoke:
        preset, batches, prompt, new = "tiny", [1, 2], 8, 4
    else:
        preset, prompt = args.preset or "ttl-160m", args.prompt or 128
        batches = args.batches or ([1, 64] if args.quick else [1, 8, 64])
        new = args.new_tokens or (64 if args.quick else 256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_preset(preset))
    results = Results("generate", args.out, dev, plot_metric="tokens_per_s")
    with tempfile.TemporaryDirectory() as path:
        save_pretrained(model, path, dtype="bfloat16")
        del model
        bench(path, preset, batches, args.hf_static_batches or batches, prompt, new, results,
              reps=2 if args.quick else 3)
    print_table(results.rows)
    print_profiles(results.notes.get("kernel_profiles", {}))
    return results.close()


if __name__ == "__main__":
    run_cli(main)
