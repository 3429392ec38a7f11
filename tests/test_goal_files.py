"""check_goals.py on the results files the benchmarks write, and on those it cannot judge (corrupt, hand-edited,
or from an older harness): one `error:` line naming the file and what is wrong, never a traceback from deep
inside a goal. Then each goal's floor, and the shapes and pass it reads."""

import json
import time

import pytest
import torch
from helpers import load_script

from ttl_core.benchmark import BenchDevice, Results, row
from ttl_core.cli import run_cli


def judged_with_error(folder, capsys) -> str:
    """check_goals.py's stderr on `folder`, as the script runs it, asserting it ends with the usage status 2."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(load_script("check_goals").main, [str(folder)])
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"{", "not valid JSON"), (b"\xff\xfe", "not valid JSON"), (b"[]", "expected a JSON object, got list"),
    (b'{"rows": "x"}', "'rows' must be a list of objects"), (b'{"rows": [], "failures": [1]}', "'failures' must be"),
])
def test_a_malformed_results_file_is_named_in_one_line(tmp_path, capsys, content, message):
    """A hand-edited or corrupt results file (binary, a list, rows that are not objects) is an `error:` line
    naming it, not an AttributeError or UnicodeDecodeError traceback."""
    (tmp_path / "rms_norm.json").write_bytes(content)
    err = judged_with_error(tmp_path, capsys)
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'rms_norm.json'}: ") and message in err


GOAL_SHAPE = {"rows": 16384, "hidden": 4096, "residual": False}


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("pass"), "'pass'"), (lambda r: r.update(shape="16384x4096"), "'shape'"),
    (lambda r: r.update(ms="1.5"), "'ms'"), (lambda r: r.update(ms=None), "'ms'"), (lambda r: r.update(frac_of_peak=[0.9]), "'frac_of_peak'"),
    (lambda r: r["shape"].pop("hidden"), "'hidden'"), (lambda r: r["shape"].update(rows="16k"), "'rows'"),
])
def test_a_results_row_without_the_fields_the_goals_read_is_named_in_one_line(tmp_path, capsys, change, message):
    """A row missing a field, or holding text where a figure goes (a hand-edited or older results file), is an
    `error:` line naming the file and the field, not a KeyError or TypeError traceback from deep in a goal."""
    bad = row("ttl", "fwd", dict(GOAL_SHAPE), "bf16", 1.0 + torch.rand(()).item(), frac_of_peak=0.95)
    change(bad)
    (tmp_path / "rms_norm.json").write_text(json.dumps({"benchmark": "rms_norm", "rows": [bad], "failures": []}))
    err = judged_with_error(tmp_path, capsys)
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {tmp_path / 'rms_norm.json'}: row 1") and message in err


@pytest.mark.parametrize("failure", [{"impl": "ttl", "shape": GOAL_SHAPE},
                                     {"impl": "ttl", "error": "OOM", "shape": "16384x4096"}])
def test_a_recorded_failure_without_an_error_or_a_shape_object_is_named_in_one_line(tmp_path, capsys, failure):
    rows = [row("ttl", "fwd", GOAL_SHAPE, "bf16", 1.0 + torch.rand(()).item(), frac_of_peak=0.95)]
    (tmp_path / "rms_norm.json").write_text(json.dumps({"benchmark": "rms_norm", "rows": rows, "failures": [failure]}))
    err = judged_with_error(tmp_path, capsys)
    assert err.startswith(f"error: {tmp_path / 'rms_norm.json'}: failure 1 "), err


def test_the_results_files_the_kernel_benchmarks_write_are_judged(tmp_path, monkeypatch):
    """Every shape each kernel family writes (at the sizes of `--quick`) loads and is judged: cross-entropy on
    given logits, a shape without a hidden size beside the fused loss's in cross_entropy.json, once made the
    judge refuse the whole file."""
    kernels, goals = load_script("bench_kernels"), load_script("check_goals")

    def measure(results, impls, make_inputs, row_inputs, shape, dtype, *charges, **kwargs):
        results.add([row("ttl", pass_, shape, "bf16", 1.0, frac_of_peak=0.5, peak_mem_mb=1.0)
                     for pass_ in ("fwd", "fwd+bwd")])

    monkeypatch.setattr(kernels, "measure", measure)
    device = BenchDevice(torch.device("cpu"), "Test GPU", smoke=False, bandwidth_gbs=1.0, bf16_tflops=1.0)
    for family, bench in kernels.FAMILIES.items():
        results = Results(family, tmp_path, device)
        results.last_plot = time.monotonic()  # no plot
        bench("quick", torch.bfloat16, results)
    rows, failures = goals.load_rows(tmp_path / "test-gpu")
    assert sorted(rows) == sorted(kernels.FAMILIES) and any(r["shape"].get("on_logits") for r in rows["cross_entropy"])
    flce = [v for v in goals.judge(rows, failures) if v.goal.startswith("Fused linear CE fwd+bwd, 16k")]
    assert flce[0].met is False and flce[0].measured.startswith("50.0%")
