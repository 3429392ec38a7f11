"""What the `scripts/bench_*.py` benchmarks share: the device and its measured peaks, timing, result files.

Every figure is reported against peaks measured in the same run (a large device-to-device copy for
bandwidth, a large bf16 matmul for throughput), never against datasheet numbers. Results go to
`benchmarks/results/<gpu-name>/<benchmark>.{json,csv,png}` in the format benchmarks/README.md describes.

GPU time is scarce, so a benchmark must not lose a run to one bad measurement or a time limit: `Results`
rewrites its files after every addition and records a failed measurement instead of stopping. `--smoke`
runs a benchmark at toy sizes, on the CPU when there is no GPU, to check the harness itself (the test
suite does); its figures mean nothing and say so in the results' device name.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import re
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import TTLError
from .fileio import atomic_write, write_json

PLOT_EVERY_S = 20.0
# Warm-up before timing lasts at least this long (Triton's do_bench default): a few calls of a 50-us kernel
# after seconds of host work (a torch.compile of the previous baseline) would be timed at an idle GPU's clocks
WARMUP_S = 0.025
ROW_FIELDS = ("impl", "pass", "shape", "dtype", "ms", "gbs", "tflops", "frac_of_peak", "tokens_per_s", "mfu",
              "peak_mem_mb")
ROW_FIGURES = ROW_FIELDS[ROW_FIELDS.index("ms"):]  # the measured numbers: ms, then those a benchmark may leave None


@dataclass(frozen=True)
class BenchDevice:
    """Where a benchmark runs, the copy bandwidth and bf16 matmul rate measured there at its start, and how
    it times: CUDA events on a GPU, the host clock in a CPU smoke run."""

    device: torch.device
    name: str
    smoke: bool
    bandwidth_gbs: float = float("nan")
    bf16_tflops: float = float("nan")

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], Any], warmup: int = 10, reps: int = 50, max_seconds: float = 2.0) -> float:
        """Median milliseconds of `fn()`. After a first untimed call (compilation, autotuning) and a timed
        one to estimate the cost, `warmup` calls (more if they take under WARMUP_S) warm up and up to `reps`
        are timed, fewer when they would take longer than `max_seconds` (warm-up at most a quarter of it; at
        least 5 timed, or `reps` if that is less). On a GPU each run is timed with CUDA events after an L2
        flush (256 MB read), so no input comes from a warm cache; a read, not a write, so the flush leaves no
        dirty lines whose write-back the timed call would pay (up to 50 MB on an H100). The flush also keeps
        the GPU busy while the host enqueues the timed call, so a call made of one launch (a CUDA graph
        replay) is timed without its launch latency."""
        if self.smoke:
            warmup, reps = 1, 2
        fn()
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        estimate = max(time.perf_counter() - start, 1e-6)
        for _ in range(min(max(warmup, int(WARMUP_S / estimate)), int(max_seconds / 4 / estimate))):
            fn()
        reps = max(min(reps, 5), min(reps, int(max_seconds / estimate)))
        flush = torch.empty(256 * 2**20 if self.cuda else 0, dtype=torch.int8, device=self.device)
        times = []
        for _ in range(reps):
            flush.sum()
            if self.cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                begin_s = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin_s) * 1e3)
        return statistics.median(times)

    def graph_replay(self, fn: Callable[[], Any]) -> Callable[[], Any] | None:
        """`fn` captured in a CUDA graph, as a replay callable, so timing sees the kernels and not the
        Python and launch overhead around them (a memory-bound kernel on 25 MB runs in ~12 us, about what
        one autograd Function call costs on the host); None on the CPU or when `fn` cannot be captured
        (a host sync, say), which the caller then times as it is."""
        if not self.cuda:
            return None
        stream = torch.cuda.current_stream()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graph capture asks
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
        except Exception as e:  # noqa: BLE001 - any capture failure means: time it without a graph
            reason = (str(e).splitlines() or [""])[0][:120]
            print(f"no CUDA graph ({type(e).__name__}: {reason}): timing eagerly")
            # a capture invalidated by an error makes torch.cuda.graph's exit raise in capture_end before it
            # restores the stream: its capture stream would stay current for every later measurement
            torch.cuda.set_stream(stream)
            torch.cuda.synchronize()
            return None
        return graph.replay

    def peak_memory_mb(self, fn: Callable[[], Any]) -> float | None:
        """Extra device memory (MB) `fn()` allocates at its peak over what was allocated before it ran;
        None on the CPU, which keeps no such statistic."""
        if not self.cuda:
            fn()
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    def kernel_profile(self, fn: Callable[[], Any], calls: int = 2, top: int = 15) -> dict[str, Any]:
        """Where the device time of `fn()` goes, for notes on a missed goal: `kernel_ms`, the kernel time per
        call of `fn` (well under its wall time means the GPU waits on the host), and `top`, the kernels with
        the most device time over `calls` calls (after one untimed call), each with its launches and
        milliseconds per call and its share of all kernel time. CPU operators in a smoke run."""
        from torch.profiler import ProfilerActivity, profile

        fn()
        self.sync()
        with profile(activities=[ProfilerActivity.CUDA if self.cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fn()
            self.sync()
        kind = "cuda" if self.cuda else "cpu"
        # user-annotated ranges (optimizer steps, compiled graphs) span kernels already counted
        events = [e for e in prof.key_averages()
                  if e.device_type.name.lower() == kind and not getattr(e, "is_user_annotation", False)]
        times = {e.key: (e.self_device_time_total if self.cuda else e.self_cpu_time_total) for e in events}
        total = sum(times.values())
        ranked = sorted(events, key=lambda e: -times[e.key])[:top]
        return {"kernel_ms": total / 1e3 / calls,
                "top": [{"kernel": e.key[:120], "launches": e.count / calls, "ms": times[e.key] / 1e3 / calls,
                         "share": times[e.key] / max(total, 1e-9)} for e in ranked]}

    def measure_peaks(self) -> BenchDevice:
        """This device with its copy bandwidth (bytes read plus written of a large device-to-device copy)
        and bf16 matmul rate (a large square product on random data) measured now."""
        size, n = (2**24, 256) if self.smoke else (2**30, 8192)
        src = torch.randint(0, 255, (size,), dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        a, b = (torch.randn(n, n, device=self.device, dtype=torch.bfloat16) for _ in range(2))
        # half a second of matmuls first: an idle GPU's clocks take a while to reach the rate it sustains,
        # and a low peak would flatter every fraction measured against it
        self.keep_busy(lambda: a @ b, 0.0 if self.smoke else 0.5)
        copy_ms = self.time_ms(lambda: dst.copy_(src), warmup=5, reps=20)
        matmul_ms = self.time_ms(lambda: a @ b, warmup=5, reps=20)
        return BenchDevice(self.device, self.name, self.smoke, 2 * size / (copy_ms * 1e-3) / 1e9,
                           2 * n**3 / (matmul_ms * 1e-3) / 1e12)

    def keep_busy(self, fn: Callable[[], Any], seconds: float) -> None:
        """Call `fn` for about `seconds` of wall time."""
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(10):
                fn()
            self.sync()

    def describe(self) -> str:
        """One line: the device and the copy bandwidth and bf16 matmul rate measured on it."""
        return f"{self.name}: copy {self.bandwidth_gbs:.0f} GB/s, bf16 matmul {self.bf16_tflops:.1f} TFLOP/s measured"


def positive_int(text: str) -> int:
    """An argparse type for counts (batch sizes, steps, tokens): a 0 or negative one is a usage error at once,
    not a failure after the device's peaks were measured."""
    refused = argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    try:
        value = int(text)
    except ValueError:
        raise refused from None
    if value < 1:
        raise refused
    return value


def add_run_size_arguments(parser: argparse.ArgumentParser, quick: str,
                           smoke: str = "toy sizes, CPU allowed: checks the harness only") -> None:
    """The options every benchmark script takes: `--quick` (a shorter run, as the `quick` help says), `--smoke`
    (the harness on toy sizes, CPU allowed) and `--out` (the results root)."""
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--smoke", action="store_true", help=smoke)
    parser.add_argument("--out", default="benchmarks/results", help="results root (default benchmarks/results)")


def open_device(benchmark: str, smoke: bool = False) -> BenchDevice:
    """The CUDA device with its peaks measured; without CUDA, a clear `TTLError`, or the CPU for a smoke run."""
    if torch.cuda.is_available():
        device, name = torch.device("cuda"), torch.cuda.get_device_name()
    elif smoke:
        device, name = torch.device("cpu"), "cpu"
    else:
        raise TTLError(f"{benchmark} measures GPU speed and needs a CUDA GPU; none is available here "
                       f"(--smoke checks the harness on the CPU)")
    device = BenchDevice(device, f"{name} (smoke run: figures mean nothing)" if smoke else name, smoke)
    device = device.measure_peaks()
    print(device.describe())
    return device


def row(impl: str, pass_: str, shape: dict[str, Any], dtype: str, ms: float, **figures: Any) -> dict[str, Any]:
    """One result row with every field of benchmarks/README.md's results format (missing figures are None)."""
    unknown = set(figures) - set(ROW_FIELDS)
    if unknown:
        raise ValueError(f"unknown result fields: {sorted(unknown)}")
    return {"impl": impl, "pass": pass_, "shape": shape, "dtype": dtype, "ms": ms,
            **{k: figures.get(k) for k in ROW_FIGURES[1:]}}


def print_profiles(profiles: dict[str, dict], top: int = 8) -> None:
    """`BenchDevice.kernel_profile` results by configuration (each with its measured `wall_ms` per call):
    kernel time against wall time (the rest is the GPU waiting on the host) and the kernels that take most."""
    for name, p in profiles.items():
        print(f"\n{name}: kernels {p['kernel_ms']:.2f} ms of {p['wall_ms']:.2f} ms per call")
        for k in p["top"][:top]:
            print(f"  {k['share']:6.1%} {k['ms']:8.3f} ms {k['launches']:6.0f}x  {k['kernel'][:90]}")


def dtype_name(dtype: torch.dtype) -> str:
    """The short dtype name results use: bf16, fp16, fp32."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def cell(value: float | None, spec: str) -> str:
    """`value` formatted by `spec` for a printed table, or '-' when there is no figure."""
    return "-" if value is None else format(value, spec)


@dataclass
class Results:
    """The rows of one results file, `<out_root>/<device>/<benchmark>.{json,csv,png}`, rewritten after every
    `add` so a run cut off by a time limit keeps what it measured. `attempt` records a failed measurement
    (a baseline missing a feature, an out-of-memory) and carries on; a smoke run raises instead, since
    finding such failures before GPU time is spent is what it is for."""

    benchmark: str
    out_root: Path
    device: BenchDevice
    plot_metric: str = "frac_of_peak"
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. the block shapes an autotuner chose
    last_plot: float = field(default=0.0, init=False)

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Append rows and rewrite the files; the plot too every PLOT_EVERY_S seconds (a time limit's kill
        leaves a recent one), not every time (a plot takes a fraction of a second)."""
        self.rows += rows
        self.write(plot=time.monotonic() - self.last_plot >= PLOT_EVERY_S)

    def attempt(self, what: dict[str, Any], fn: Callable[[], Any]) -> Any | None:
        """`fn()`, or None after recording its exception with `what` (impl, shape) it was measuring."""
        if self.device.smoke:
            return fn()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - any failure of one measurement must not end the run
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.failures.append({**what, "error": f"{type(e).__name__}: {first_line}"[:300]})
            print(f"FAILED {what}: {type(e).__name__}: {first_line[:200]}")
            traceback.print_exc()
            if self.device.cuda:
                torch.cuda.empty_cache()
            return None

    def close(self) -> int:
        """Write the files with the plot; exit status 1 when any measurement failed, else 0."""
        path = self.write(plot=True)
        print(f"wrote {path}" + (f" ({len(self.failures)} failed measurements)" if self.failures else ""))
        return 1 if self.failures else 0

    def write(self, plot: bool) -> Path:
        """Write the rows as JSON and CSV (and the plot, with `plot`) under the device's folder; returns the JSON."""
        import triton

        # smoke runs get their own folder ("<gpu>-smoke", "cpu-smoke"), never mixed with real figures
        slug = re.sub(r"[^a-z0-9]+", "-", self.device.name.split(" (")[0].lower()).strip("-")
        out = Path(self.out_root) / (f"{slug}-smoke" if self.device.smoke else slug)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / f"{self.benchmark}.json", {
            "benchmark": self.benchmark, "device": self.device.name, "torch": torch.__version__,
            "triton": triton.__version__, "date": datetime.date.today().isoformat(),
            "measured_bandwidth_gbs": round(self.device.bandwidth_gbs, 1),
            "measured_bf16_tflops": round(self.device.bf16_tflops, 1),
            "rows": self.rows, "failures": self.failures, "notes": self.notes,
        })

        def write_csv(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
                writer.writeheader()
                for r in self.rows:
                    writer.writerow({**r, "shape": json.dumps(r["shape"], sort_keys=True)})

        atomic_write(out / f"{self.benchmark}.csv", write_csv)
        if plot and self.rows:
            _plot(out / f"{self.benchmark}.png", self.benchmark, self.rows, self.plot_metric)
            self.last_plot = time.monotonic()
        return out / f"{self.benchmark}.json"


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
        if subset:
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
