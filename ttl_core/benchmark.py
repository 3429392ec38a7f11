"""What the `scripts/bench_*.py` benchmarks share: CUDA timing, the device's measured peaks, result files.

Every figure is reported against peaks measured in the same run (a large device-to-device copy for
bandwidth, a large bf16 matmul for throughput), never against datasheet numbers. Results go to
`benchmarks/results/<gpu-name>/<benchmark>.{json,csv,png}` in the format of shared/DESIGN.md.
"""

from __future__ import annotations

import csv
import datetime
import json
import re
import statistics
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import TTLError
from .fileio import atomic_write, write_json

ROW_FIELDS = ("impl", "pass", "shape", "dtype", "ms", "gbs", "tflops", "frac_of_peak", "tokens_per_s", "mfu",
              "peak_mem_mb")


def require_cuda(benchmark: str) -> torch.device:
    """The CUDA device, or a clear `TTLError` saying this benchmark needs one."""
    if not torch.cuda.is_available():
        raise TTLError(f"{benchmark} measures GPU speed and needs a CUDA GPU; none is available here")
    return torch.device("cuda")


def time_ms(fn: Callable[[], Any], warmup: int = 10, reps: int = 50) -> float:
    """Median milliseconds of `fn()` over `reps` runs, each timed with CUDA events after an L2 flush
    (256 MB written between runs so no input is served from a warm cache)."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], Any]) -> float:
    """Extra device memory (MB) `fn()` allocates at its peak, over what was allocated before it ran."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure_copy_bandwidth_gbs(size_bytes: int = 2**30) -> float:
    """Achieved bandwidth of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=5, reps=20)
    return 2 * size_bytes / (ms * 1e-3) / 1e9


def measure_bf16_tflops(n: int = 8192) -> float:
    """Achieved throughput of a large square bf16 matmul."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, warmup=5, reps=20)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def row(impl: str, pass_: str, shape: dict[str, Any], dtype: str, ms: float, **figures: Any) -> dict[str, Any]:
    """One result row with every DESIGN.md field present (missing figures are None)."""
    unknown = set(figures) - set(ROW_FIELDS)
    if unknown:
        raise ValueError(f"unknown result fields: {sorted(unknown)}")
    return {"impl": impl, "pass": pass_, "shape": shape, "dtype": dtype, "ms": ms,
            **{k: figures.get(k) for k in ROW_FIELDS[5:]}}


def device_slug() -> str:
    """A folder name for the current GPU, e.g. `nvidia-h100-80gb-hbm3`."""
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def write_results(benchmark: str, rows: list[dict[str, Any]], out_root: str | Path, bandwidth_gbs: float,
                  bf16_tflops: float, plot_metric: str = "frac_of_peak") -> Path:
    """Write `<out_root>/<gpu>/<benchmark>.json`, `.csv` and (with matplotlib) `.png`; returns the JSON path."""
    import triton

    out = Path(out_root) / device_slug()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{benchmark}.json", {
        "benchmark": benchmark, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "date": datetime.date.today().isoformat(),
        "measured_bandwidth_gbs": round(bandwidth_gbs, 1), "measured_bf16_tflops": round(bf16_tflops, 1),
        "rows": rows,
    })

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
            writer.writeheader()
            for r in rows:
                writer.writerow({**r, "shape": json.dumps(r["shape"], sort_keys=True)})

    atomic_write(out / f"{benchmark}.csv", write_csv)
    _plot(out / f"{benchmark}.png", benchmark, rows, plot_metric)
    return out / f"{benchmark}.json"


def _plot(path: Path, title: str, rows: list[dict[str, Any]], metric: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the JSON and CSV hold every figure; the plot is a convenience
    passes = sorted({r["pass"] for r in rows})
    fig, axes = plt.subplots(len(passes), 1, figsize=(12, 3.5 * len(passes)), squeeze=False)
    for ax, pass_ in zip(axes[:, 0], passes):
        subset = [r for r in rows if r["pass"] == pass_ and r.get(metric) is not None]
        labels = list(dict.fromkeys(json.dumps(r["shape"], sort_keys=True) for r in subset))
        for impl in dict.fromkeys(r["impl"] for r in subset):
            points = {json.dumps(r["shape"], sort_keys=True): r[metric] for r in subset if r["impl"] == impl}
            ax.plot([labels.index(k) for k in points], list(points.values()), marker="o", label=impl)
        ax.set_xticks(range(len(labels)), [label.replace('"', "") for label in labels], rotation=30, ha="right",
                      fontsize=6)
        ax.set_title(f"{title}: {pass_}")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
