"""Every script in scripts/ answers --help (and so at least imports and parses)."""

import pytest
from helpers import ROOT, run_script

SCRIPTS = sorted(p.stem for p in (ROOT / "scripts").glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_help(name):
    run = run_script(name, "--help", timeout=120)
    assert run.returncode == 0, run.stderr
    assert "usage:" in run.stdout


def test_benchmarks_refuse_clearly_without_cuda():
    import torch

    from ttl_core.benchmark import require_cuda, row

    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="needs a CUDA GPU"):
            require_cuda("bench_x")
    r = row("ttl", "fwd", {"rows": 4096}, "bf16", 1.5, gbs=100.0)
    assert list(r) == ["impl", "pass", "shape", "dtype", "ms", "gbs", "tflops", "frac_of_peak", "tokens_per_s",
                       "mfu", "peak_mem_mb"]
    assert r["gbs"] == 100.0 and r["tflops"] is None
