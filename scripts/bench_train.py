"""Training throughput and MFU of the ttl-160m shape (seq 2048, bf16 autocast, fused AdamW) on one GPU: ttl
(Triton kernels, fused linear cross-entropy, compiled blocks) against transformers' LlamaForCausalLM (SDPA),
and Liger-Kernel's patched transformers model when importable, with the same optimizer and batch, in one run.
Two ttl variants show where its speed comes from: "ttl-eager" (no compilation) and "ttl-inductor" (compiled
blocks on the PyTorch references, fused by torch.compile, instead of our kernels). Two more time Muon:
"ttl-muon" (ttl's step with train.optimizer = "muon") and "hf-muon" (transformers' model with torch.optim.Muon
on its projection matrices and the same fused AdamW on the rest), each with its optimizer.step() also timed alone
(JSON `notes.optimizer_steps`: its share of the step, the Newton-Schulz cost) beside ttl's AdamW.

  python scripts/bench_train.py [--preset ttl-160m] [--batch 4 16] [--steps 20] [--quick] [--smoke] [--out DIR]

Each configuration's kernels are profiled over two more steps (JSON `notes.kernel_profiles`): where a
goal is missed, that says where the time went. MFU counts 6N + 12·L·d·T FLOPs per token (N without the
input embedding table; not Muon's Newton-Schulz matmuls) against both the published bf16 peak of the device and
the matmul throughput measured in the same run. Needs CUDA (`--smoke`: the tiny preset at seq 64, CPU allowed, a
check of the harness). --quick and --smoke fix the sizes: a --batch or --steps (or with --smoke, --preset) given
too is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time
from typing import Callable

import torch

from ttl_core import LlamaConfig, LlamaForCausalLM
from ttl_core.benchmark import (BenchDevice, Results, add_run_size_arguments, cell, open_device, positive_int,
                                print_profiles, row)
from ttl_core.cli import refuse_ignored, run_cli
from ttl_core.config import PRESETS
from ttl_core.distributed import World
from ttl_core.muon import TorchMuonAndAdamW, is_hf_projection
from ttl_core.metrics import flops_per_token, peak_tflops
from ttl_core.run_config import TrainConfig
from ttl_core.optim import build_optimizer
from ttl_core.step import train_step


Step = Callable[[torch.Tensor], float]
# the configurations whose optimizer.step() is also timed alone: Muon's two and the AdamW they are compared with
OPTIMIZER_TIMED = ("ttl", "ttl-muon", "hf-muon")


def ttl_step(config: LlamaConfig, train: TrainConfig, compile_blocks: bool, device: torch.device,
             inductor_blocks: bool = False) -> tuple[Step, torch.optim.Optimizer]:
    """ttl's own training step (the one `ttl_core.train` runs) on a fresh random-init model, and its optimizer.
    With `inductor_blocks`, the compiled blocks run the PyTorch references of RMSNorm, rotary and SwiGLU, which
    torch.compile fuses with its own generated kernels, instead of our Triton kernels (the LM head's fused
    cross-entropy stays): which of the two a compiled block should use is what that comparison decides."""
    model = LlamaForCausalLM(config).to(device).train()
    if inductor_blocks:
        for module in model.backbone.layers.modules():
            if hasattr(module, "kernel_backend"):
                module.kernel_backend = "torch"
    if compile_blocks:
        for block in model.backbone.layers:
            block.compile()
    optimizer = build_optimizer(model, train, device)
    world = World(0, 1, device)

    def step(ids: torch.Tensor) -> float:
        return train_step(model, optimizer, [{"input_ids": ids, "targets": ids.roll(-1, 1)}], train, world,
                          train.lr, None)[0]
    return step, optimizer


def hf_step(config: LlamaConfig, train: TrainConfig, liger: bool,
            device: torch.device) -> tuple[Step, torch.optim.Optimizer] | None:
    """transformers' LlamaForCausalLM (SDPA attention) with the same optimizer settings and autocast, and its
    optimizer; with `train.optimizer` "muon", torch.optim.Muon on its projection matrices and ttl's AdamW (fused
    on CUDA) on the rest, as ttl's Muon groups them."""
    import transformers

    if liger:
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except ImportError:
            return None
        apply_liger_kernel_to_llama()
    hf_config = transformers.LlamaConfig(**config.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hf_config).to(device).train()
    if train.optimizer == "muon":  # build_optimizer's AdamW over the parameters Muon does not take
        # kept by name ('.' is no key for a module): train.no_decay exempts the norms by their names
        rest = torch.nn.ParameterDict({name.replace(".", "/"): p for name, p in model.named_parameters()
                                       if not is_hf_projection(name)})
        adamw = build_optimizer(rest, dataclasses.replace(train, optimizer="adamw"), device)
        optimizer = TorchMuonAndAdamW(model, train, adamw)
    else:
        optimizer = build_optimizer(model, train, device)

    def step(ids: torch.Tensor) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        # the norm alone, as ttl's step takes it without clipping (grad_clip 0): clip_grad_norm_ with an infinite
        # bound would also rescale every gradient by 1, a pass over all of them that ttl's step does not make
        torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step, optimizer


def measure(dev: BenchDevice, step: Step, batch: int, seq: int, vocab: int,
            steps: int) -> tuple[float, float | None]:
    """(mean ms per optimizer step after 3 warm-up steps, peak memory MB or None) on random tokens."""
    ids = [torch.randint(0, vocab, (batch, seq), device=dev.device) for _ in range(4)]
    for i in range(3):  # compilation and autotuning happen here
        step(ids[i % 4])
    dev.sync()
    if dev.cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        step(ids[i % 4])
    dev.sync()
    ms = (time.perf_counter() - start) * 1e3 / steps
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if dev.cuda else None
    return ms, peak_mb


def optimizer_ms(dev: BenchDevice, optimizer: torch.optim.Optimizer) -> float:
    """Median ms of `optimizer.step()` alone, on fresh random gradients (its cost does not depend on their values:
    Newton-Schulz runs a fixed number of iterations), which it leaves zeroed."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.randn_like(param)
    ms = dev.time_ms(optimizer.step, warmup=3, reps=20)
    optimizer.zero_grad(set_to_none=True)
    return ms


def ratio(value: float, base: float | None) -> float | None:
    """`value` / `base`, or None without a `base` (its measurement failed, or a time limit cut it off)."""
    return value / base if base else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with the options a run size (--smoke, --quick) would ignore refused."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model shape (default ttl-160m)")
    parser.add_argument("--batch", type=positive_int, nargs="+",
                        help="sequences of 2048 tokens per step (default 4 16)")
    parser.add_argument("--steps", type=positive_int, help="timed optimizer steps per configuration (default 20)")
    add_run_size_arguments(parser, quick="batch 16 only, 5 timed steps",
                           smoke="tiny preset, seq 64, CPU allowed: checks the harness only")
    args = parser.parse_args(argv)
    refuse_ignored(parser, args, "--smoke", "--quick", "--preset", "--batch", "--steps")
    refuse_ignored(parser, args, "--quick", "--batch", "--steps")
    return args


def main(argv: list[str] | None = None) -> int:
    """Time every configuration at every batch size, print the table and write the results."""
    args = parse_args(argv)
    dev = open_device("bench_train", args.smoke)
    preset, seq, batches, steps = ("tiny", 64, [2], 2) if args.smoke else (
        (args.preset or "ttl-160m", 2048, [16], 5) if args.quick else
        (args.preset or "ttl-160m", 2048, args.batch or [4, 16], args.steps or 20))
    torch.backends.cuda.matmul.allow_tf32 = True
    published = peak_tflops(dev.name) if dev.cuda else None
    config = LlamaConfig.from_preset(preset)
    with torch.device("meta"):
        flops = flops_per_token(LlamaForCausalLM(config).num_parameters(exclude_embedding=True),
                                config.num_hidden_layers, config.hidden_size, seq)
    train = TrainConfig(seq_len=seq, lr=6e-4, weight_decay=0.01, no_decay=[], grad_clip=0.0, dtype="bfloat16")
    muon = dataclasses.replace(train, optimizer="muon")
    impls = {"ttl": lambda: ttl_step(config, train, True, dev.device),
             "ttl-muon": lambda: ttl_step(config, muon, True, dev.device),
             "ttl-eager": lambda: ttl_step(config, train, False, dev.device),
             "ttl-inductor": lambda: ttl_step(config, train, True, dev.device, inductor_blocks=True),
             "hf": lambda: hf_step(config, train, False, dev.device),
             "liger": lambda: hf_step(config, train, True, dev.device),
             "hf-muon": lambda: hf_step(config, muon, False, dev.device)}
    print(f"{flops / 1e9:.3f} GFLOP per token")
    print(f"{'impl':<13} {'batch':>5} {'ms/step':>9} {'tokens/s':>10} {'MFU':>6} {'of measured':>11} {'peak MB':>9} "
          f"{'/ hf':>6} {'/ ttl':>6}")
    results = Results("train", args.out, dev, plot_metric="tokens_per_s")
    tokens_per_s_of, optimizer_ms_of = {}, {}  # by (impl, batch): what the ratios are against
    # hf first (the ratios are against it), then ttl (both training goals), so a time limit cuts the
    # comparisons rather than a goal's figure; Muon next, against ttl's AdamW; liger after hf-muon, because its
    # patch changes transformers for good, and before ttl's diagnostic variants, which it leaves alone
    for impl in ("hf", "ttl", "ttl-muon", "hf-muon", "liger", "ttl-eager", "ttl-inductor"):
        for batch in batches:
            shape = {"preset": preset, "batch": batch, "seq": seq}
            step, optimizer = results.attempt({"impl": impl, "shape": shape}, impls[impl]) or (None, None)
            measured = step and results.attempt({"impl": impl, "shape": shape},
                                                lambda step=step: measure(dev, step, batch, seq, config.vocab_size,
                                                                          steps))
            if measured:
                ms, peak_mb = measured
                tokens_per_s = batch * seq / (ms * 1e-3)
                achieved = flops * tokens_per_s / 1e12
                mfu = achieved / published if published else None
                tokens_per_s_of[impl, batch] = tokens_per_s
                results.add([row(impl, "train_step", shape, "bf16", ms, tflops=achieved,
                                  frac_of_peak=achieved / dev.bf16_tflops, tokens_per_s=tokens_per_s, mfu=mfu,
                                  peak_mem_mb=peak_mb)])
                print(f"{impl:<13} {batch:>5} {ms:>9.1f} {tokens_per_s:>10,.0f} {cell(mfu, '6.1%'):>6} "
                      f"{achieved / dev.bf16_tflops:>11.1%} {cell(peak_mb, '9.0f'):>9} "
                      f"{cell(ratio(tokens_per_s, tokens_per_s_of.get(('hf', batch))), '6.2f'):>6} "
                      f"{cell(ratio(tokens_per_s, tokens_per_s_of.get(('ttl', batch))), '6.2f'):>6}")
                # where the device time of two more steps goes; apart, so a profiler failure keeps the timing
                ids = torch.randint(0, config.vocab_size, (batch, seq), device=dev.device)
                profile = results.attempt({"impl": impl, "shape": shape, "profile": True},
                                          lambda step=step: dev.kernel_profile(lambda: step(ids)))
                if profile:
                    results.notes.setdefault("kernel_profiles", {})[f"{impl} batch {batch}"] = {"wall_ms": ms,
                                                                                                 **profile}
                opt_ms = impl in OPTIMIZER_TIMED and results.attempt(
                    {"impl": impl, "shape": shape, "optimizer_step": True},
                    lambda optimizer=optimizer: optimizer_ms(dev, optimizer))
                if opt_ms:
                    optimizer_ms_of[impl, batch] = opt_ms
                    versus_ttl = ratio(opt_ms, optimizer_ms_of.get(("ttl", batch)))
                    results.notes.setdefault("optimizer_steps", {})[f"{impl} batch {batch}"] = {
                        "optimizer_ms": opt_ms, "share_of_step": opt_ms / ms, "optimizer_ms_vs_ttl": versus_ttl,
                        "tokens_per_s_vs_ttl": ratio(tokens_per_s, tokens_per_s_of.get(("ttl", batch)))}
                    print(f"{'':<19} optimizer.step {opt_ms:.2f} ms: {opt_ms / ms:.1%} of the step, "
                          f"{cell(versus_ttl, '.2f')}x ttl's AdamW step")
            del step, optimizer
            gc.collect()
            if dev.cuda:
                torch.cuda.empty_cache()
            torch._dynamo.reset()
    print_profiles(results.notes.get("kernel_profiles", {}))
    return results.close()


if __name__ == "__main__":
    run_cli(main)
