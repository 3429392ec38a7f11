"""Smoke run: build a preset model, take a few optimizer steps on random tokens, report loss and speed.

  python scripts/smoke.py [--preset tiny] [--steps 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from ttl_core import LlamaConfig, LlamaForCausalLM
from ttl_core.cli import run_cli
from ttl_core.config import PRESETS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    config = LlamaConfig.from_preset(args.preset)
    model = LlamaForCausalLM(config).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed)
    # one fixed batch: a model that learns must drive its loss down
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(args.device)
    print(f"{args.preset}: {model.num_parameters():,} parameters on {args.device}")
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        print(f"step {step}: loss {loss.item():.4f}  {ids.numel() / elapsed:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    run_cli(main)
