"""Judge one GPU's benchmark results against ttl's speed goals (benchmarks/README.md), as a Markdown table.

  python scripts/check_goals.py benchmarks/results/<gpu-name> [--json FILE]

Reads the `rms_norm`, `rotary`, `cross_entropy`, `attention`, `train` and `generate` results a GPU run wrote
and prints, per goal, the figure measured, the target and whether it was met: "no" as soon as one measured
shape misses, "yes" only when every shape the goal names was measured for ttl and for every baseline it
compares against, else "not measured" (a time limit cut the run, a measurement failed, Liger-Kernel was not
installed), with what is missing beside the figure. Every figure
comes from one run, so ratios compare implementations measured side by side. Exits 0 whatever the verdicts:
the table is for `benchmarks/README.md` and the notes, not a gate.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ttl_core.benchmark import ROW_FIELDS, ROW_FIGURES
from ttl_core.cli import given_path, output_file, run_cli
from ttl_core.errors import TTLError, is_number
from ttl_core.fileio import read_json, write_json

RMS_NORM_BASELINES = ("liger", "compile", "F.rms_norm", "torch")
# the shape entries each benchmark's goals compare as numbers
GOAL_SHAPE_NUMBERS = {"rms_norm": ("rows", "hidden"), "rotary": ("tokens",), "train": ("batch", "seq"),
                      "cross_entropy": ("tokens", "hidden", "vocab", "unfused_logits_grad_mb"), "generate": ("batch",)}


@dataclass
class Verdict:
    goal: str
    measured: str
    target: str
    met: bool | None  # None: not measured


def load_rows(folder: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """Rows of every results JSON in `folder`, by benchmark name (bf16 rows only: the goals are bf16), and
    the measurements each recorded as failed (profiles aside: a failed profile loses no figure)."""
    if not folder.is_dir():
        raise TTLError(f"no results folder {folder}")
    rows, failures = {}, {}
    for path in sorted(folder.glob("*.json")):
        data = read_json(path, TTLError)  # unreadable, not JSON, or not an object: one line naming the file
        if "rows" not in data:  # another tool's JSON (a checkpoint's config): judged, it would look like no results
            raise TTLError(f"{path}: no 'rows' (not a results file the benchmarks write: keep other files out of "
                           "the results folder)")
        for key in ("rows", "failures"):
            if not (isinstance(data.get(key, []), list) and all(isinstance(r, dict) for r in data.get(key, []))):
                raise TTLError(f"{path}: {key!r} must be a list of objects (a results file the benchmarks write)")
        name = data.get("benchmark", path.stem)
        rows[name] = [r for r in data.get("rows", []) if r.get("dtype") == "bf16"]
        for number, r in enumerate(data.get("rows", []), 1):
            if r.get("dtype") == "bf16" and (problem := row_problem(r, GOAL_SHAPE_NUMBERS.get(name, ()))):
                raise TTLError(f"{path}: row {number} {problem} (a results file the benchmarks write)")
        for number, f in enumerate(data.get("failures", []), 1):
            if not (isinstance(f.get("error"), str) and isinstance(f.get("shape", {}), dict)):
                raise TTLError(f"{path}: failure {number} needs an 'error' text and a 'shape' object (a results file "
                               "the benchmarks write)")
        failures[name] = [f for f in data.get("failures", []) if not f.get("profile")]
    if not rows:
        raise TTLError(f"{folder} holds no benchmark results (*.json)")
    return rows, failures


def row_problem(r: dict, shape_numbers: tuple[str, ...]) -> str:
    """What keeps a results row from being judged ('' when nothing does): the goals read every figure of
    ROW_FIELDS and compare the shape's `shape_numbers` as numbers."""
    for key in ROW_FIELDS:
        if key not in r:
            return f"lacks {key!r}"
    if not (isinstance(r["impl"], str) and isinstance(r["pass"], str)):
        return "has an 'impl' or 'pass' that is not text"
    if not isinstance(r["shape"], dict):
        return f"has a 'shape' that is not an object: {r['shape']!r}"
    for key in ROW_FIGURES:
        if not (is_number(r[key]) or (r[key] is None and key != "ms")):
            return f"has {key!r} = {r[key]!r}, not a number"
    # cross-entropy on given logits (no hidden size) is measured beside the fused loss and judged by no goal
    for key in () if r["shape"].get("on_logits") else shape_numbers:
        if not is_number(r["shape"].get(key)):
            return f"has a shape without a number for {key!r}: {r['shape']}"
    return ""


def select(rows: list[dict], impl: str, pass_: str, where: Callable[[dict], bool] = lambda shape: True) -> list[dict]:
    """The rows of implementation `impl` and pass `pass_` whose shape `where` accepts."""
    return [r for r in rows if r["impl"] == impl and r["pass"] == pass_ and where(r["shape"])]


def covers(shape: dict, required: dict) -> bool:
    """Whether a measured shape is the required one (which names only the keys the goal fixes)."""
    return all(shape.get(k) == v for k, v in required.items())


def gaps(rows: list[dict], failures: list[dict], impls: tuple[str, ...], pass_: str,
         required: list[dict]) -> str:
    """'' when every implementation has a row at every required shape, else what is missing (and why, when
    the run recorded the measurement as failed), as a note for the measured column."""
    lost = []
    for shape in required:
        absent = []
        for impl in impls:
            if not any(covers(r["shape"], shape) for r in select(rows, impl, pass_)):
                failed = [f["error"] for f in failures if f.get("impl") == impl and covers(f.get("shape", {}), shape)]
                absent.append(impl + (f" (failed: {failed[0][:60]})" if failed else ""))
        if absent:
            lost.append(f"{shape_text(shape)}: {', '.join(absent)}")
    return f"; not measured: {'; '.join(lost)}" if lost else ""


def fraction_goal(goal: str, rows: list[dict], failures: list[dict], pass_: str, where: Callable[[dict], bool],
                  floor: float, required: list[dict]) -> Verdict:
    """The lowest fraction of the measured peak over ttl's rows of `pass_` that `where` selects. Missed as
    soon as one row misses; met only when every `required` shape was measured."""
    target = f">= {floor:.0%}"
    chosen = select(rows, "ttl", pass_, where)
    missing = gaps(rows, failures, ("ttl",), pass_, required)
    if not chosen:
        return Verdict(goal, "-" + missing, target, None)
    worst = min(chosen, key=lambda r: r["frac_of_peak"])
    met = False if worst["frac_of_peak"] < floor else None if missing else True
    return Verdict(goal, f"{worst['frac_of_peak']:.1%} (worst: {shape_text(worst['shape'])}){missing}", target, met)


def speed_ratio_goal(goal: str, rows: list[dict], failures: list[dict], pass_: str, where: Callable[[dict], bool],
                     baselines: tuple[str, ...], required: list[dict], ties_allowed: bool = False) -> Verdict:
    """ttl faster than every baseline on every selected shape (or as fast, with `ties_allowed`): the worst
    ratio of ttl's time to the fastest baseline's on the same shape. Missed as soon as one shape misses;
    met only when ttl and every baseline were measured at every `required` shape (a baseline that is not
    installed leaves the goal not measured, though the ratio against the others is shown)."""
    target = f"{'<=' if ties_allowed else '<'} 1.00x of the fastest baseline"
    missing = gaps(rows, failures, ("ttl", *baselines), pass_, required)
    worst, worst_shape = 0.0, None
    for r in select(rows, "ttl", pass_, where):
        best = min((b["ms"] for name in baselines for b in select(rows, name, pass_) if b["shape"] == r["shape"]),
                   default=None)
        if best is not None and r["ms"] / best > worst:
            worst, worst_shape = r["ms"] / best, r["shape"]
    if worst_shape is None:
        return Verdict(goal, "-" + missing, target, None)
    missed = worst > 1.0 if ties_allowed else worst >= 1.0
    return Verdict(goal, f"{worst:.2f}x (worst: {shape_text(worst_shape)}){missing}", target,
                   False if missed else None if missing else True)


def shape_text(shape: dict) -> str:
    """A shape as "key=value ..." for a verdict, without the memory figure recorded beside it."""
    return " ".join(f"{k}={v}" for k, v in shape.items() if k != "unfused_logits_grad_mb")


def judge(rows: dict[str, list[dict]], failures: dict[str, list[dict]]) -> list[Verdict]:
    """Every speed goal, each with the shapes it names (at the goals' 16k rows or tokens)."""
    norm, rotary = rows.get("rms_norm", []), rows.get("rotary", [])
    ce, attention = rows.get("cross_entropy", []), rows.get("attention", [])
    train, gen = rows.get("train", []), rows.get("generate", [])
    failed = lambda name: failures.get(name, [])  # noqa: E731
    large_norm = lambda s: 2048 <= s["hidden"] <= 8192 and s["rows"] >= 16384  # noqa: E731
    norm_at = lambda hiddens: [{"rows": 16384, "hidden": h, "residual": False} for h in hiddens]  # noqa: E731
    goal_ce = {"tokens": 16384, "hidden": 4096, "vocab": 128256}
    goal_attention = {"seq": 2048, "head_dim": 64, "causal": True}
    verdicts = [
        fraction_goal("RMSNorm fwd, hidden 2048-8192, >= 16k rows: fraction of copy bandwidth", norm,
                      failed("rms_norm"), "fwd", large_norm, 0.90, norm_at((2048, 4096, 8192))),
        fraction_goal("RMSNorm fwd+bwd, same shapes", norm, failed("rms_norm"), "fwd+bwd", large_norm, 0.80,
                      norm_at((2048, 4096, 8192))),
    ]
    for pass_ in ("fwd", "fwd+bwd"):
        verdicts.append(speed_ratio_goal(f"RMSNorm {pass_}, hidden 768-16384: ttl time / fastest baseline", norm,
                                         failed("rms_norm"), pass_, lambda s: 768 <= s["hidden"] <= 16384,
                                         RMS_NORM_BASELINES, norm_at((768, 1024, 2048, 4096, 8192, 16384))))
    verdicts.append(fraction_goal("Rotary fwd+bwd, >= 16k tokens: fraction of copy bandwidth", rotary,
                                  failed("rotary"), "fwd+bwd", lambda s: s["tokens"] >= 16384, 0.85,
                                  [{"tokens": 16384, "model": "ttl-160m"}]))
    verdicts.append(fraction_goal("Fused linear CE fwd+bwd, 16k x 4096 x 128256: fraction of bf16 matmul peak", ce,
                                  failed("cross_entropy"), "fwd+bwd", lambda s: covers(s, goal_ce), 0.65, [goal_ce]))
    verdicts.append(flce_memory(ce, failed("cross_entropy"), lambda s: covers(s, goal_ce), [goal_ce]))
    verdicts.append(speed_ratio_goal("Fused linear CE fwd+bwd, same shape: ttl time / Liger", ce,
                                     failed("cross_entropy"), "fwd+bwd", lambda s: covers(s, goal_ce), ("liger",),
                                     [goal_ce]))
    verdicts.append(speed_ratio_goal("FlashAttention fwd+bwd, seq 2048, d64, causal: ttl time / SDPA flash",
                                     attention, failed("attention"), "fwd+bwd", lambda s: covers(s, goal_attention),
                                     ("sdpa_flash",), [goal_attention], ties_allowed=True))
    verdicts += training_goals(train, failed("train")) + generation_goals(gen, failed("generate"))
    return verdicts


def flce_memory(rows: list[dict], failures: list[dict], where: Callable[[dict], bool],
                required: list[dict]) -> Verdict:
    """The fused loss's forward + backward peak beyond the hidden and weight gradients it must return
    (bf16, (tokens + vocab) x hidden x 2 bytes), against the unfused logits and their gradient."""
    goal = "Fused linear CE: extra peak memory (beyond the gradients) / unfused logits + gradient"
    target = "<= 1/8 (12.5%)"
    chosen = [r for r in select(rows, "ttl", "fwd+bwd", where) if r["peak_mem_mb"] is not None]
    if not chosen:
        return Verdict(goal, "-" + gaps(rows, failures, ("ttl",), "fwd+bwd", required), target, None)
    shape = chosen[0]["shape"]
    extra_mb = chosen[0]["peak_mem_mb"] - (shape["tokens"] + shape["vocab"]) * shape["hidden"] * 2 / 2**20
    share = extra_mb / shape["unfused_logits_grad_mb"]
    return Verdict(goal, f"{share:.1%} ({extra_mb:.0f} MB)", target, share <= 1 / 8)


def training_goals(rows: list[dict], failures: list[dict] = ()) -> list[Verdict]:
    """MFU of ttl's best batch; tokens/s against transformers at each batch both ran (the worst ratio)."""
    goal_shape = lambda s: s.get("preset") == "ttl-160m" and s["seq"] == 2048  # noqa: E731
    required = [{"preset": "ttl-160m", "seq": 2048}]
    ttl = select(rows, "ttl", "train_step", goal_shape)
    best = max(ttl, key=lambda r: r["tokens_per_s"], default=None)
    measured = best is not None and best["mfu"] is not None
    mfu = Verdict("Training ttl-160m, seq 2048, bf16: MFU (published peak)",
                  f"{best['mfu']:.1%} ({best['tokens_per_s']:,.0f} tok/s, batch {best['shape']['batch']})"
                  if measured else "-" + gaps(rows, failures, ("ttl",), "train_step", required), ">= 50%",
                  best["mfu"] >= 0.5 if measured else None)
    ratios = [(r["tokens_per_s"] / h["tokens_per_s"], r["shape"]["batch"]) for r in ttl
              for h in select(rows, "hf", "train_step", goal_shape) if h["shape"] == r["shape"]]
    worst = min(ratios, default=None)
    versus_hf = Verdict("Training: ttl tokens/s / transformers (SDPA)",
                        "-" + gaps(rows, failures, ("ttl", "hf"), "train_step", required) if worst is None
                        else f"{worst[0]:.2f}x (batch {worst[1]})", ">= 2.00x",
                        None if worst is None else worst[0] >= 2.0)
    return [mfu, versus_hf]


def generation_goals(rows: list[dict], failures: list[dict] = ()) -> list[Verdict]:
    """Batch 1 decoding: ttl's tokens/s against transformers' dynamic cache and its static cache + compile."""
    goal_shape = lambda s: s["batch"] == 1 and s.get("preset") == "ttl-160m"  # noqa: E731
    ttl = select(rows, "ttl", "decode", goal_shape)
    verdicts = []
    for impl, floor, label, name in (("hf", 10.0, ">= 10.00x", "dynamic cache"),
                                     ("hf_static_compile", 1.0, "> 1.00x", "static cache + compile")):
        base = select(rows, impl, "decode", goal_shape)
        goal = f"Generation ttl-160m, batch 1: ttl tokens/s / transformers {name}"
        if not ttl or not base:
            missing = gaps(rows, failures, ("ttl", impl), "decode", [{"preset": "ttl-160m", "batch": 1}])
            verdicts.append(Verdict(goal, "-" + missing, label, None))
            continue
        ratio = ttl[0]["tokens_per_s"] / base[0]["tokens_per_s"]
        measured = f"{ratio:.2f}x ({ttl[0]['tokens_per_s']:,.0f} vs {base[0]['tokens_per_s']:,.0f} tok/s)"
        verdicts.append(Verdict(goal, measured, label, ratio >= floor if floor > 1 else ratio > floor))
    return verdicts


def markdown(verdicts: list[Verdict]) -> str:
    """The verdicts as a Markdown table, one row a goal (met: yes, no, or not measured)."""
    lines = ["| goal | measured | target | met |", "|---|---|---|---|"]
    for v in verdicts:
        verdict = "not measured" if v.met is None else "yes" if v.met else "no"
        lines.append(f"| {v.goal} | {v.measured} | {v.target} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=given_path, help="one GPU's results folder, e.g. benchmarks/results/nvidia-h200")
    parser.add_argument("--json", type=output_file,
                        help="also write the verdicts to this file (outside the results folder: it takes results only)")
    args = parser.parse_args(argv)
    verdicts = judge(*load_rows(Path(args.folder)))
    print(markdown(verdicts))
    if args.json:
        write_json(Path(args.json), [asdict(v) for v in verdicts])
    return 0


if __name__ == "__main__":
    run_cli(main)
