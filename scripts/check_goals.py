"""Judge one GPU's benchmark results against the speed goals of issue 10, as a Markdown table.

  python scripts/check_goals.py benchmarks/results/<gpu-name> [--json FILE]

Reads the `rms_norm`, `rotary`, `cross_entropy`, `attention`, `train` and `generate` results a GPU run wrote
and prints, per goal, the figure measured, the target and whether it was met ("not measured" when the run
lacks the shape or the baseline the goal compares against, e.g. Liger-Kernel not installed). Every figure
comes from one run, so ratios compare implementations measured side by side. Exits 0 whatever the verdicts:
the table is for `benchmarks/README.md` and the notes, not a gate.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ttl_core.cli import run_cli
from ttl_core.errors import TTLError
from ttl_core.fileio import write_json

RMS_NORM_BASELINES = ("liger", "compile", "F.rms_norm", "torch")


@dataclass
class Verdict:
    goal: str
    measured: str
    target: str
    met: bool | None  # None: not measured


def load_rows(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Rows of every results JSON in `folder`, by benchmark name (bf16 rows only: the goals are bf16)."""
    if not folder.is_dir():
        raise TTLError(f"no results folder {folder}")
    rows = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise TTLError(f"{path} is not valid JSON ({e})") from None
        rows[data.get("benchmark", path.stem)] = [r for r in data.get("rows", []) if r.get("dtype") == "bf16"]
    if not rows:
        raise TTLError(f"{folder} holds no benchmark results (*.json)")
    return rows


def select(rows: list[dict], impl: str, pass_: str, where: Callable[[dict], bool] = lambda shape: True) -> list[dict]:
    return [r for r in rows if r["impl"] == impl and r["pass"] == pass_ and where(r["shape"])]


def fraction_goal(goal: str, rows: list[dict], pass_: str, where: Callable[[dict], bool], floor: float) -> Verdict:
    """The lowest fraction of the measured peak over ttl's rows of `pass_` that `where` selects."""
    chosen = select(rows, "ttl", pass_, where)
    if not chosen:
        return Verdict(goal, "-", f">= {floor:.0%}", None)
    worst = min(chosen, key=lambda r: r["frac_of_peak"])
    return Verdict(goal, f"{worst['frac_of_peak']:.1%} (worst: {shape_text(worst['shape'])})", f">= {floor:.0%}",
                   worst["frac_of_peak"] >= floor)


def speed_ratio_goal(goal: str, rows: list[dict], pass_: str, where: Callable[[dict], bool],
                     baselines: tuple[str, ...], ties_allowed: bool = False) -> Verdict:
    """ttl faster than every baseline on every selected shape (or as fast, with `ties_allowed`): the worst
    ratio of ttl's time to the fastest baseline's on the same shape. A baseline with no row at all (not
    installed, say) leaves the goal not measured, though the ratio against the others is still shown."""
    target = f"{'<=' if ties_allowed else '<'} 1.00x of the fastest baseline"
    missing = [b for b in baselines if not select(rows, b, pass_, where)]
    worst, worst_shape = 0.0, None
    for r in select(rows, "ttl", pass_, where):
        best = min((b["ms"] for name in baselines for b in select(rows, name, pass_) if b["shape"] == r["shape"]),
                   default=None)
        if best is not None and r["ms"] / best > worst:
            worst, worst_shape = r["ms"] / best, r["shape"]
    if worst_shape is None:
        return Verdict(goal, "-", target, None)
    measured = f"{worst:.2f}x (worst: {shape_text(worst_shape)})" + (f"; {', '.join(missing)} not measured"
                                                                      if missing else "")
    return Verdict(goal, measured, target, None if missing else worst <= 1.0 if ties_allowed else worst < 1.0)


def shape_text(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items() if k != "unfused_logits_grad_mb")


def judge(rows: dict[str, list[dict]]) -> list[Verdict]:
    norm, rotary = rows.get("rms_norm", []), rows.get("rotary", [])
    ce, attention = rows.get("cross_entropy", []), rows.get("attention", [])
    train, gen = rows.get("train", []), rows.get("generate", [])
    large_norm = lambda s: 2048 <= s["hidden"] <= 8192 and s["rows"] >= 16384  # noqa: E731
    goal_ce = lambda s: (s.get("tokens"), s.get("hidden"), s.get("vocab")) == (16384, 4096, 128256)  # noqa: E731
    goal_attention = lambda s: s["seq"] == 2048 and s["head_dim"] == 64 and s["causal"]  # noqa: E731
    verdicts = [
        fraction_goal("RMSNorm fwd, hidden 2048-8192, >= 16k rows: fraction of copy bandwidth", norm, "fwd",
                      large_norm, 0.90),
        fraction_goal("RMSNorm fwd+bwd, same shapes", norm, "fwd+bwd", large_norm, 0.80),
    ]
    for pass_ in ("fwd", "fwd+bwd"):
        verdicts.append(speed_ratio_goal(f"RMSNorm {pass_}, hidden 768-16384: ttl time / fastest baseline", norm,
                                         pass_, lambda s: 768 <= s["hidden"] <= 16384, RMS_NORM_BASELINES))
    verdicts.append(fraction_goal("Rotary fwd+bwd, >= 16k tokens: fraction of copy bandwidth", rotary, "fwd+bwd",
                                  lambda s: s["tokens"] >= 16384, 0.85))
    verdicts.append(fraction_goal("Fused linear CE fwd+bwd, 16k x 4096 x 128256: fraction of bf16 matmul peak", ce,
                                  "fwd+bwd", goal_ce, 0.65))
    verdicts.append(flce_memory(ce, goal_ce))
    verdicts.append(speed_ratio_goal("Fused linear CE fwd+bwd, same shape: ttl time / Liger", ce, "fwd+bwd", goal_ce,
                                     ("liger",)))
    verdicts.append(speed_ratio_goal("FlashAttention fwd+bwd, seq 2048, d64, causal: ttl time / SDPA flash",
                                     attention, "fwd+bwd", goal_attention, ("sdpa_flash",), ties_allowed=True))
    verdicts += training_goals(train) + generation_goals(gen)
    return verdicts


def flce_memory(rows: list[dict], where: Callable[[dict], bool]) -> Verdict:
    """The fused loss's forward + backward peak beyond the hidden and weight gradients it must return
    (bf16, (tokens + vocab) x hidden x 2 bytes), against the unfused logits and their gradient."""
    goal = "Fused linear CE: extra peak memory (beyond the gradients) / unfused logits + gradient"
    target = "<= 1/8 (12.5%)"
    chosen = [r for r in select(rows, "ttl", "fwd+bwd", where) if r["peak_mem_mb"] is not None]
    if not chosen:
        return Verdict(goal, "-", target, None)
    shape = chosen[0]["shape"]
    extra_mb = chosen[0]["peak_mem_mb"] - (shape["tokens"] + shape["vocab"]) * shape["hidden"] * 2 / 2**20
    share = extra_mb / shape["unfused_logits_grad_mb"]
    return Verdict(goal, f"{share:.1%} ({extra_mb:.0f} MB)", target, share <= 1 / 8)


def training_goals(rows: list[dict]) -> list[Verdict]:
    """MFU of ttl's best batch; tokens/s against transformers at each batch both ran (the worst ratio)."""
    goal_shape = lambda s: s["preset"] == "ttl-160m" and s["seq"] == 2048  # noqa: E731
    ttl = select(rows, "ttl", "train_step", goal_shape)
    best = max(ttl, key=lambda r: r["tokens_per_s"], default=None)
    measured = best is not None and best["mfu"] is not None
    mfu = Verdict("Training ttl-160m, seq 2048, bf16: MFU (published peak)",
                  f"{best['mfu']:.1%} ({best['tokens_per_s']:,.0f} tok/s, batch {best['shape']['batch']})"
                  if measured else "-", ">= 50%", best["mfu"] >= 0.5 if measured else None)
    ratios = [(r["tokens_per_s"] / h["tokens_per_s"], r["shape"]["batch"]) for r in ttl
              for h in select(rows, "hf", "train_step", goal_shape) if h["shape"] == r["shape"]]
    worst = min(ratios, default=None)
    versus_hf = Verdict("Training: ttl tokens/s / transformers (SDPA)",
                        "-" if worst is None else f"{worst[0]:.2f}x (batch {worst[1]})", ">= 2.00x",
                        None if worst is None else worst[0] >= 2.0)
    return [mfu, versus_hf]


def generation_goals(rows: list[dict]) -> list[Verdict]:
    """Batch 1 decoding: ttl's tokens/s against transformers' dynamic cache and its static cache + compile."""
    goal_shape = lambda s: s["batch"] == 1 and s.get("preset") == "ttl-160m"  # noqa: E731
    ttl = select(rows, "ttl", "decode", goal_shape)
    verdicts = []
    for impl, floor, label, name in (("hf", 10.0, ">= 10.00x", "dynamic cache"),
                                     ("hf_static_compile", 1.0, "> 1.00x", "static cache + compile")):
        base = select(rows, impl, "decode", goal_shape)
        goal = f"Generation ttl-160m, batch 1: ttl tokens/s / transformers {name}"
        if not ttl or not base:
            verdicts.append(Verdict(goal, "-", label, None))
            continue
        ratio = ttl[0]["tokens_per_s"] / base[0]["tokens_per_s"]
        measured = f"{ratio:.2f}x ({ttl[0]['tokens_per_s']:,.0f} vs {base[0]['tokens_per_s']:,.0f} tok/s)"
        verdicts.append(Verdict(goal, measured, label, ratio >= floor if floor > 1 else ratio > floor))
    return verdicts


def markdown(verdicts: list[Verdict]) -> str:
    lines = ["| goal | measured | target | met |", "|---|---|---|---|"]
    for v in verdicts:
        verdict = "not measured" if v.met is None else "yes" if v.met else "no"
        lines.append(f"| {v.goal} | {v.measured} | {v.target} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="one GPU's results folder, e.g. benchmarks/results/nvidia-h200")
    parser.add_argument("--json", help="also write the verdicts to this file")
    args = parser.parse_args(argv)
    verdicts = judge(load_rows(Path(args.folder)))
    print(markdown(verdicts))
    if args.json:
        write_json(Path(args.json), [asdict(v) for v in verdicts])
    return 0


if __name__ == "__main__":
    run_cli(main)
