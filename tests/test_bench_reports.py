"""What the benchmarks report beside the rows' timed figures, checked against hand computations on stubbed timings:
the ratios their printed tables show, the optimizer-step notes of bench_train, and kernel_report's instruction
counts, shared-memory bound and exit status (what a GPU session reads and commits, run there once)."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import load_script

from ttl_core import benchmark
from ttl_core.benchmark import row


def last_column(printed: str, rows: int) -> list[str]:
    """The last cell of each of the `rows` last lines of a printed table."""
    return [line.split()[-1] for line in printed.strip().splitlines()[-rows:]]


def test_kernel_table_shows_each_time_over_ttls_on_the_same_shape_and_pass(capsys):
    """ttl 1 ms forward, 4 ms forward + backward; Liger 2 and 6 ms: 2.00x and 1.50x ttl's time, each pass against
    ttl's same pass (against its forward, Liger's fwd+bwd would read 6.00x)."""
    shape = {"rows": 16384, "hidden": 4096, "residual": False}
    rows = [row(impl, pass_, shape, "bf16", ms, gbs=1.0, frac_of_peak=0.5, peak_mem_mb=1.0)
            for impl, pass_, ms in (("ttl", "fwd", 1.0), ("ttl", "fwd+bwd", 4.0), ("liger", "fwd", 2.0),
                                    ("liger", "fwd+bwd", 6.0))]
    load_script("bench_kernels").print_table("rms_norm", rows)
    assert last_column(capsys.readouterr().out, 4) == ["1.00", "1.00", "2.00", "1.50"]


def test_generation_table_shows_ms_per_token_and_ttls_speed_up(capsys):
    """A 100 ms ttl call and a 1000 ms transformers call of 4 new tokens on 2 rows: 25 and 250 ms a token step (a
    step decodes both rows), and ttl 10x faster than transformers (the baseline's time over ttl's)."""
    shape = {"preset": "ttl-160m", "batch": 2, "prompt": 128, "new_tokens": 4}
    rows = [row(impl, "decode", shape, "bf16", ms, gbs=1.0, frac_of_peak=0.5, tokens_per_s=8 / (ms * 1e-3))
            for impl, ms in (("ttl", 100.0), ("hf", 1000.0))]
    load_script("bench_generate").print_table(rows)
    lines = capsys.readouterr().out.strip().splitlines()[-2:]
    assert [line.split()[3] for line in lines] == ["25.000", "250.000"]
    assert [line.split()[-1] for line in lines] == ["1.00x", "10.00x"]


def test_attention_table_shows_each_time_over_ttls_on_the_same_pass(tmp_path, monkeypatch, capsys):
    """ttl 1 ms forward and 3 ms forward + backward, SDPA 2 and 4.5 ms: 2.00x and 1.50x."""
    attention = load_script("bench_attention")
    device = SimpleNamespace(device=torch.device("cpu"), name="Test GPU", smoke=False, cuda=False,
                             bandwidth_gbs=1.0, bf16_tflops=1.0)
    monkeypatch.setattr(attention, "open_device", lambda name, smoke: device)
    monkeypatch.setattr(benchmark, "_plot", lambda *args: None)
    monkeypatch.setattr(attention, "implementations", lambda dev: {"ttl": None, "sdpa_flash": None})
    times = {("ttl", "fwd"): 1.0, ("ttl", "fwd+bwd"): 3.0, ("sdpa_flash", "fwd"): 2.0, ("sdpa_flash", "fwd+bwd"): 4.5}
    monkeypatch.setattr(attention, "time_impl", lambda dev, impl, fn, shape, dtype, untimed: [
        row(impl, pass_, shape, "bf16", times[impl, pass_], tflops=1.0, frac_of_peak=1.0)
        for pass_ in ("fwd", "fwd+bwd")])
    assert attention.main(["--quick", "--out", str(tmp_path)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\s*2048\s+64\s+True", line)]
    assert [line.split()[-1] for line in printed] == ["1.00", "1.00", "2.00", "1.50"]


def test_optimizer_step_notes_are_shares_and_ratios_against_ttls_adamw(tmp_path, monkeypatch):
    """Steps of 100 ms (ttl, AdamW), 125 ms (ttl-muon) and 400 ms (hf-muon) whose optimizer.step() alone takes 4,
    10 and 20 ms: shares of the step 4%, 8% and 5%; optimizer steps 1x, 2.5x and 5x ttl's AdamW step; tokens/s
    1x, 0.8x and 0.25x ttl's (transformers' own AdamW step, 300 ms, is no note's reference)."""
    script = load_script("bench_train")
    gpu = SimpleNamespace(device=torch.device("cpu"), name="NVIDIA H100 80GB HBM3", smoke=False, cuda=True,
                          bandwidth_gbs=3000.0, bf16_tflops=800.0, sync=lambda: None,
                          kernel_profile=lambda fn: {"kernel_ms": 1.0, "top": []})
    monkeypatch.setattr(script, "open_device", lambda name, smoke: gpu)
    monkeypatch.setattr(benchmark, "_plot", lambda *args: None)
    monkeypatch.setattr(script, "ttl_step", lambda config, train, *args, **kwargs: (f"ttl {train.optimizer}",) * 2)
    monkeypatch.setattr(script, "hf_step", lambda config, train, *args: (f"hf {train.optimizer}",) * 2)
    step_ms = {"ttl adamw": 100.0, "ttl muon": 125.0, "hf muon": 400.0, "hf adamw": 300.0}
    monkeypatch.setattr(script, "measure", lambda dev, step, batch, seq, vocab, steps: (step_ms[step], None))
    optimizer_ms = {"ttl adamw": 4.0, "ttl muon": 10.0, "hf muon": 20.0}
    monkeypatch.setattr(script, "optimizer_ms", lambda dev, optimizer: optimizer_ms[optimizer])
    monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace(allow_tf32=False))  # the script sets it
    assert script.main(["--preset", "tiny", "--batch", "2", "--steps", "1", "--out", str(tmp_path)]) == 0
    notes = json.loads((tmp_path / "nvidia-h100-80gb-hbm3" / "train.json").read_text())["notes"]["optimizer_steps"]
    keys = ("optimizer_ms", "share_of_step", "optimizer_ms_vs_ttl", "tokens_per_s_vs_ttl")
    figures = {name: [notes[f"{name} batch 2"][k] for k in keys] for name in ("ttl", "ttl-muon", "hf-muon")}
    assert figures == {"ttl": pytest.approx([4.0, 0.04, 1.0, 1.0]), "ttl-muon": pytest.approx([10.0, 0.08, 2.5, 0.8]),
                       "hf-muon": pytest.approx([20.0, 0.05, 5.0, 0.25])}


SASS = """
        /*0100*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0110*/                   LDG.E.EF.128 R8, desc[UR4][R2.64+0x10] ;
        /*0120*/                   LDG.E.64 R12, desc[UR4][R2.64+0x20] ;
        /*0130*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*0140*/                   STG.E.128 desc[UR4][R6.64], R4 ;
        /*0150*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0160*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0170*/                   STL [R1], R4 ;
        /*0180*/                   LDL R4, [R1] ;
"""


def test_kernel_inspection_counts_each_instruction_kind_of_the_dumped_sass(monkeypatch):
    """Registers and stack from cuobjdump's resource line; 128-bit global loads with or without a cache hint
    (evict-first: .EF), not 64-bit ones nor async copies to shared memory; stores, both MMA kinds, local spills."""
    script = load_script("kernel_report")
    usage = "Resource usage:\n Common:\n  GLOBAL:0\n Function _k:\n  REG:40 STACK:16 SHARED:0 LOCAL:0 TEXTURE:0\n"
    monkeypatch.setattr(script.subprocess, "run", lambda args, **kwargs: SimpleNamespace(
        stdout=usage if "--dump-resource-usage" in args else SASS))
    counts = script.inspect(SimpleNamespace(asm={"cubin": b"\x7fELF"}), script.Path("/unused"))
    assert counts == {"registers": 40, "stack_bytes": 16, "hgmma": 1, "hmma": 1, "ldg128": 2, "stg128": 1,
                      "local_ld_st": 2}


@pytest.mark.parametrize("shared_bytes, breaks, status", [(227 * 1024, 0, 0), (227 * 1024 + 512, 0, 1),
                                                          (1024, 1, 1)])
def test_kernel_report_fails_a_kernel_over_the_shared_memory_and_a_broken_compiled_block(
        tmp_path, monkeypatch, shared_bytes, breaks, status):
    """Hopper's opt-in maximum is 227 KB (of 1024 bytes) a block: a kernel using exactly that passes, half a KB
    more exits 1; a graph break in the compiled decoder block exits 1 too. The JSON row holds the KB used."""
    script = load_script("kernel_report")
    (tmp_path / "backends" / "nvidia" / "bin").mkdir(parents=True)
    (tmp_path / "backends" / "nvidia" / "bin" / "cuobjdump").touch()
    monkeypatch.setattr(script.triton, "__file__", str(tmp_path / "__init__.py"))
    kernel = SimpleNamespace(metadata=SimpleNamespace(shared=shared_bytes, num_warps=4, num_stages=3))
    monkeypatch.setattr(script, "capture_compilations", lambda arch: [("_fwd_kernel", {"BLOCK_M": 128}, kernel)])
    monkeypatch.setattr(script, "exercise_kernels", lambda: None)
    monkeypatch.setattr(script, "inspect", lambda kernel, tools: dict(registers=1, stack_bytes=0, hgmma=1, hmma=0,
                                                                      ldg128=1, stg128=1, local_ld_st=0))
    trace = {"graphs": 1 + breaks, "graph_breaks": breaks, "reasons": ["a reason"] * breaks}
    monkeypatch.setattr(script, "count_graph_breaks", lambda: {"inference": trace,
                                                               "training": dict(trace, graph_breaks=0)})
    assert script.main(["--json", str(tmp_path / "report.json")]) == status
    assert json.loads((tmp_path / "report.json").read_text())["rows"][0]["shared_kb"] == round(shared_bytes / 1024, 1)
