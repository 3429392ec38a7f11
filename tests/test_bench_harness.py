"""The benchmark harness times fairly: warm calls, medians within a budget; it gives every implementation like
work and holds no memory it no longer needs (what a baseline is charged beyond what it does where it is used, a
copy or a rescale pass, would flatter ttl's ratios, and memory kept across CUDA graph captures could cost a
measurement at the largest shapes). CPU checks of the code paths, on fake clocks and stubbed devices."""

import time
import weakref
from types import SimpleNamespace

import pytest
import torch
from helpers import load_script

from ttl_core import benchmark
from ttl_core.benchmark import BenchDevice, Results


def test_kernel_timing_keeps_no_output_or_graph_of_an_earlier_call_through_a_capture(monkeypatch):
    """A pass's outputs hold their saved tensors (8 GB of float32 log-probabilities for the eager cross-entropy at
    the goal's shape) and a captured graph pins its memory pool: neither may outlive its use while the next
    graph is captured and the eager peak-memory run allocates."""
    script = load_script("bench_kernels")
    monkeypatch.setattr(BenchDevice, "time_ms", lambda self, fn, **kwargs: 2.0)
    outputs, graphs, alive = [], [], []

    class Graph:
        def replay(self):
            pass

    def graph_replay(self, fn):
        alive.append([ref() is not None for ref in outputs + graphs])
        graph = Graph()
        graphs.append(weakref.ref(graph))
        return graph.replay

    def peak_memory_mb(self, fn):
        alive.append([ref() is not None for ref in outputs + graphs])

    monkeypatch.setattr(BenchDevice, "graph_replay", graph_replay)
    monkeypatch.setattr(BenchDevice, "peak_memory_mb", peak_memory_mb)

    def fn(t):
        out = t * 2
        outputs.append(weakref.ref(out))
        return out

    dev = BenchDevice(torch.device("cpu"), "cpu", smoke=False, bandwidth_gbs=100.0, bf16_tflops=10.0)
    script.time_passes(dev, "ttl", fn, (torch.randn(8, 16, requires_grad=True),), {}, torch.bfloat16, 1, 1, 0.0,
                       0.0, [])
    assert len(alive) == 4 and not any(any(flags) for flags in alive), alive


def test_the_fused_loss_forward_row_is_timed_as_an_evaluation_without_grad(monkeypatch):
    """With `forward_grad=False` the forward pass runs under no_grad on detached inputs (ttl's and Liger's training
    forward computes the gradients too, which its 2·N·d·V FLOP charge would not count); the forward + backward
    pass keeps them."""
    script = load_script("bench_kernels")
    monkeypatch.setattr(BenchDevice, "time_ms", lambda self, fn, **kwargs: 2.0)
    seen = []

    def fn(t):
        seen.append((torch.is_grad_enabled(), t.requires_grad))
        return t * 2

    dev = BenchDevice(torch.device("cpu"), "cpu", smoke=False, bandwidth_gbs=100.0, bf16_tflops=10.0)
    script.time_passes(dev, "ttl", fn, (torch.randn(8, 16, requires_grad=True),), {}, torch.bfloat16, 1, 1, 1.0,
                       2.0, [], forward_grad=False)
    assert seen == [(True, True), (False, False), (True, True)]  # the first call makes the output gradients


def test_only_the_fused_loss_forward_row_is_measured_without_grad(monkeypatch):
    """The fused linear cross-entropy's forward row is the loss alone (its training forward computes both gradients
    too, 3x the 2·N·d·V FLOPs the row is charged); every other family's forward is timed as training runs it."""
    script = load_script("bench_kernels")
    forward_grads = []
    monkeypatch.setattr(script, "measure", lambda results, impls, make_inputs, row_inputs, shape, *args,
                        forward_grad=True, **kwargs: forward_grads.append(("unfused_logits_grad_mb" in shape,
                                                                           forward_grad)))
    for bench in script.FAMILIES.values():
        bench("smoke", torch.bfloat16, SimpleNamespace(device=SimpleNamespace(device=torch.device("cpu"))))
    assert {fused for fused, _ in forward_grads} == {True, False}
    assert all(forward_grad != fused for fused, forward_grad in forward_grads), forward_grads


def test_rotary_baselines_get_q_and_k_liger_rotates_without_a_copy(monkeypatch):
    """Liger's rotary takes transformers' transposed views of the q and k projections and makes them contiguous
    (batch, seq, heads, dim) before rotating in place: a no-op on separate projections, but a copy of both
    (charged to Liger alone) if q and k were strided views cut from one fused qkv projection."""
    script = load_script("bench_kernels")
    made = []
    monkeypatch.setattr(script, "measure", lambda results, impls, make_inputs, row_inputs, shape, *args, **kwargs:
                        made.append((make_inputs(), shape)))  # inputs made in their loop step, as measure does
    script.bench_rotary("smoke", torch.bfloat16, SimpleNamespace(device=SimpleNamespace(device=torch.device("cpu"))))
    for (q, k, cos, sin), shape in made:
        # the tokens and heads the shape records (and the byte count charges) are the ones rotated
        assert q.shape[:3] == (shape["tokens"] // q.shape[1], q.shape[1], shape["heads"]), (q.shape, shape)
        assert k.shape[:3] == q.shape[:2] + (shape["kv_heads"],) and cos.shape[:2] == q.shape[:2]
        for t in (q, k):
            as_liger_sees_it = t.transpose(1, 2).transpose(1, 2)
            assert as_liger_sees_it.contiguous().data_ptr() == t.data_ptr() and t.requires_grad


def test_transformers_training_step_takes_the_gradient_norm_without_a_rescale(monkeypatch):
    """The baseline's step does what ttl's does with grad_clip 0 (the recipes'): the gradient norm alone, not
    clip_grad_norm_ with an infinite bound, which would also multiply every gradient by 1 (a pass that ttl's
    step does not make, charged to transformers alone)."""
    from ttl_core import LlamaConfig
    from ttl_core.run_config import TrainConfig
    script = load_script("bench_train")
    norms = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *args, **kwargs: pytest.fail("rescaled gradients"))
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda grads, *args, **kwargs: norms.append(len(grads)))
    config = LlamaConfig.from_preset("tiny")
    train = TrainConfig(seq_len=8, lr=6e-4, weight_decay=0.01, no_decay=[], grad_clip=0.0, dtype="bfloat16")
    step, _ = script.hf_step(config, train, False, torch.device("cpu"))
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    assert step(ids) > 0 and len(norms) == 1 and norms[0] > 0


def test_transformers_muon_step_gives_muon_the_projections_and_adamw_the_rest():
    """hf-muon's optimizer splits transformers' parameters as ttl's Muon splits its fused ones: torch.optim.Muon
    on the 7 projection matrices of each layer, the AdamW that "hf" and "ttl" use (lr, weight decay) on the
    embedding, head and norms, each parameter in exactly one; its step moves both."""
    from ttl_core import LlamaConfig, LlamaForCausalLM
    from ttl_core.run_config import TrainConfig
    script = load_script("bench_train")
    config = LlamaConfig.from_preset("tiny", num_hidden_layers=2)
    train = TrainConfig(seq_len=8, lr=6e-4, weight_decay=0.01, no_decay=[], grad_clip=0.0, dtype="bfloat16",
                        optimizer="muon")
    step, optimizer = script.hf_step(config, train, False, torch.device("cpu"))
    muon = [p for group in optimizer.muon.param_groups for p in group["params"]]
    adamw = [p for group in optimizer.adamw.param_groups for p in group["params"]]
    assert len(muon) == 7 * 2 and all(p.dim() == 2 and p.shape != (config.vocab_size, config.hidden_size)
                                       for p in muon)
    with torch.device("meta"):
        parameters = LlamaForCausalLM(config).num_parameters()  # ttl's count of the same model's
    assert sum(p.numel() for p in muon + adamw) == parameters
    assert len({id(p) for p in muon + adamw}) == len(muon + adamw)
    assert all(g["lr"] == 6e-4 and g["weight_decay"] == 0.01 for g in optimizer.param_groups)
    before = [p.detach().clone() for p in (muon[0], adamw[0])]
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    assert step(ids) > 0 and all(not torch.equal(b, p) for b, p in zip(before, (muon[0], adamw[0])))


def test_transformers_muon_step_exempts_the_norms_from_weight_decay_as_ttl_does():
    """hf-muon's AdamW groups transformers' norms by name, as "hf" and ttl's Muon run do (train.no_decay)."""
    from ttl_core import LlamaConfig
    from ttl_core.run_config import TrainConfig
    config = LlamaConfig.from_preset("tiny", num_hidden_layers=2)
    train = TrainConfig(seq_len=8, weight_decay=0.01, optimizer="muon")
    _, optimizer = load_script("bench_train").hf_step(config, train, False, torch.device("cpu"))
    exempt = [p for g in optimizer.adamw.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert len(exempt) == 2 * 2 + 1 and all(p.shape == (config.hidden_size,) for p in exempt)


def test_timing_stays_within_its_budget():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.02)

    device = BenchDevice(torch.device("cpu"), "cpu", smoke=False)
    ms = device.time_ms(slow, warmup=10, reps=50, max_seconds=0.2)
    # 2 estimating calls, at most 2 warm-ups (a quarter of the budget), 5..10 timed: not 10 + 50
    assert 7 <= len(calls) <= 14 and ms >= 20


def test_timing_is_the_median_of_at_least_five_timed_calls(monkeypatch):
    """On a fake clock: a call slower than the whole budget is still timed 5 times, and the figure is their
    median (3 ms here; the mean would be 8 ms, the minimum 1 ms)."""
    clock = [0.0]
    durations = [5.0, 3.0, 0.001, 0.002, 0.030, 0.004, 0.003]  # untimed, estimate, then the timed calls

    def fn():
        clock[0] += durations.pop(0)

    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=lambda: clock[0], monotonic=time.monotonic))
    ms = BenchDevice(torch.device("cpu"), "cpu", smoke=False).time_ms(fn, warmup=10, reps=50, max_seconds=2.0)
    assert durations == [] and ms == pytest.approx(3.0)


def test_a_fast_call_warms_up_for_25_ms_before_it_is_timed(monkeypatch):
    """On a fake clock: 10 warm-up calls of a 0.1 ms kernel would be 1 ms, too short for an idle GPU's clocks
    to rise; it gets about 25 ms of them (Triton's do_bench warm-up), then its 50 timed calls."""
    clock, calls = [0.0], []

    def fn():
        calls.append(1)
        clock[0] += 1e-4

    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=lambda: clock[0], monotonic=time.monotonic))
    BenchDevice(torch.device("cpu"), "cpu", smoke=False).time_ms(fn, warmup=10, reps=50, max_seconds=2.0)
    assert 245 <= len(calls) - 2 - 50 <= 255


def test_generation_is_timed_as_the_median_of_the_calls_after_the_cold_one(monkeypatch):
    """On a fake clock: the first generate() call (compilation, graph capture: 9 s) is not timed, and the figure is
    the median of the next `reps` calls (3 ms; their mean would be 5 ms, and with the cold call in, 1.5 s)."""
    script = load_script("bench_generate")
    clock, durations = [0.0], [9.0, 0.001, 0.003, 0.011]

    def fn():
        clock[0] += durations.pop(0)
        return torch.zeros(2, 5)

    monkeypatch.setattr(script, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    device = BenchDevice(torch.device("cpu"), "cpu", smoke=False)
    assert script.time_generate(device, "ttl", fn, (2, 5), reps=3) == (pytest.approx(3.0), None) and durations == []


def test_training_steps_are_timed_from_when_the_warm_up_steps_have_finished(monkeypatch):
    """On a fake device whose steps return before their work is done (as a GPU's do, ttl's optimizer update
    included): the clock starts after a sync, so the warm-up steps' unfinished work is not charged to the timed ones."""
    script = load_script("bench_train")
    clock, queued = [0.0], [0.0]

    def step(ids):
        queued[0] += 0.5

    def sync():
        clock[0], queued[0] = clock[0] + queued[0], 0.0

    monkeypatch.setattr(script, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    device = SimpleNamespace(device=torch.device("cpu"), cuda=False, sync=sync)
    assert script.measure(device, step, 2, 8, 100, 4) == (pytest.approx(500.0), None)


def test_a_kernel_run_with_a_failed_measurement_goes_on_and_exits_1(tmp_path, monkeypatch):
    """A measurement failing in one family leaves the next family to run, and the run's status says so (the GPU
    suite logs it beside each step)."""
    script = load_script("bench_kernels")
    device = BenchDevice(torch.device("cpu"), "Test GPU", smoke=False, bandwidth_gbs=1.0, bf16_tflops=1.0)
    monkeypatch.setattr(script, "open_device", lambda name, smoke: device)
    monkeypatch.setattr(script, "compile_once_per_width", lambda: None)  # no dynamo settings left behind
    ran = []

    def family(name, fails):
        def bench(mode, dtype, results):
            ran.append(name)
            results.attempt({"impl": "ttl", "shape": {}}, lambda: 1 / 0 if fails else None)
        return bench

    monkeypatch.setattr(script, "FAMILIES", {"first": family("first", True), "second": family("second", False)})
    assert script.main(["--out", str(tmp_path)]) == 1 and ran == ["first", "second"]


def test_peak_memory_is_the_extra_mebibytes_a_call_allocates_beyond_what_was_held(monkeypatch):
    """On a stubbed CUDA allocator holding 3 MiB of inputs before the call, whose peak reaches 3 + 5 MiB: the
    figure is 5 (MiB, as the goal's gradient bytes are counted), not the inputs' 8 nor 5.24 million bytes."""
    held = [3 * 2**20]
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: held.append(held[0]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: held[0])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: max(held))
    device = BenchDevice(torch.device("cuda"), "gpu", smoke=False)
    assert device.peak_memory_mb(lambda: held.append(8 * 2**20)) == pytest.approx(5.0)


def test_each_pass_is_timed_as_its_captured_replay_and_its_memory_measured_on_that_pass(monkeypatch):
    """The fwd+bwd row's time and peak memory (the fused loss's memory goal reads it) are those of the forward +
    backward, the forward row's those of the forward alone; where a pass was captured, its replay is timed."""
    script = load_script("bench_kernels")
    x = torch.randn(8, 16, requires_grad=True)
    backwards = []
    x.register_hook(lambda grad: backwards.append(1))
    replays = set()

    def graph_replay(self, fn):
        def replay():
            return fn()
        replays.add(replay)
        return replay

    def time_ms(self, fn, **kwargs):
        assert fn in replays, "timed eagerly though captured"
        before = len(backwards)
        fn()
        return 1.0 + len(backwards) - before  # 1 ms forward, 2 ms with the backward

    def peak_memory_mb(self, fn):
        before = len(backwards)
        fn()
        return 10.0 * (len(backwards) - before)

    monkeypatch.setattr(BenchDevice, "graph_replay", graph_replay)
    monkeypatch.setattr(BenchDevice, "time_ms", time_ms)
    monkeypatch.setattr(BenchDevice, "peak_memory_mb", peak_memory_mb)
    dev = BenchDevice(torch.device("cpu"), "cpu", smoke=False, bandwidth_gbs=100.0, bf16_tflops=10.0)
    rows = script.time_passes(dev, "ttl", lambda t: t * 2, (x,), {}, torch.bfloat16, 1, 1, 0.0, 0.0, [])
    assert [(r["pass"], r["ms"], r["peak_mem_mb"]) for r in rows] == [("fwd", 1.0, 0.0), ("fwd+bwd", 2.0, 10.0)]


def test_attention_shapes_hold_16k_tokens_and_a_2048_wide_model(tmp_path, monkeypatch):
    """Every attention shape is timed with batch x seq = 16384 tokens and heads x head_dim = 2048, as the script
    says (and its FLOP count follows from the shape): a 64-wide head's 32 heads, a 128-wide head's 16."""
    attention = load_script("bench_attention")
    device = BenchDevice(torch.device("cpu"), "Test GPU", smoke=False, bandwidth_gbs=1.0, bf16_tflops=1.0)
    monkeypatch.setattr(attention, "open_device", lambda name, smoke: device)
    monkeypatch.setattr(attention, "implementations", lambda dev: {"ttl": None})
    monkeypatch.setattr(benchmark, "_plot", lambda *args: None)
    shapes = []
    monkeypatch.setattr(attention, "time_impl", lambda dev, impl, fn, shape, dtype, untimed: shapes.append(shape) or [])
    assert attention.main(["--out", str(tmp_path)]) == 0
    assert len(shapes) == 20 and {s["seq"] for s in shapes} == {512, 1024, 2048, 4096, 8192}
    assert all(s["batch"] * s["seq"] == 16384 and s["heads"] * s["head_dim"] == 2048 for s in shapes), shapes


def test_every_implementation_decodes_the_same_prompts_and_ttl_is_profiled_at_the_smallest_batch(tmp_path,
                                                                                                 monkeypatch):
    """Baselines are timed on ttl's inputs: at each batch size every implementation gets the same prompt tokens.
    The kernel profile (is decoding bound by the host?) is of ttl at the goals' batch, the smallest."""
    from ttl_core import LlamaConfig, LlamaForCausalLM
    script = load_script("bench_generate")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_preset("tiny"))
    prompts = []
    monkeypatch.setattr(script, "load_pretrained", lambda path, dtype, device: model)
    monkeypatch.setattr(script, "generate", lambda model, ids, mask, **kwargs: prompts.append(ids.clone()))
    monkeypatch.setattr(script, "hf_model", lambda path, device: SimpleNamespace(
        generate=lambda ids, **kwargs: prompts.append(ids.clone())))
    monkeypatch.setattr(script, "time_generate", lambda dev, impl, fn, shape, reps: (fn(), (250.0, None))[1])
    monkeypatch.setattr(BenchDevice, "kernel_profile", lambda self, fn, calls: {"kernel_ms": 1.0, "top": []})
    results = Results("generate", tmp_path, BenchDevice(torch.device("cpu"), "cpu", smoke=False, bandwidth_gbs=100.0))
    results.last_plot = time.monotonic()  # no plot
    script.bench("unused", "tiny", [4, 1], [1, 4], 8, 16, results, reps=1)
    assert [p.shape for p in prompts] == [(1, 8)] * 4 + [(4, 8)] * 4  # ttl, hf, hf_static_compile, ttl_nograph
    assert all(torch.equal(p, prompts[0]) for p in prompts[:4]) and all(torch.equal(p, prompts[4]) for p in prompts[4:])
    assert list(results.notes["kernel_profiles"]) == ["ttl batch 1"]


def test_smoke_results_get_their_own_folder_beside_a_gpus(tmp_path):
    """A smoke run's figures (toy sizes, CPU allowed) never land in a GPU's results folder, even on that GPU."""
    smoke_suffix = " (smoke run: figures mean nothing)"
    for name, smoke, folder in (("NVIDIA H100 80GB HBM3", False, "nvidia-h100-80gb-hbm3"),
                                ("NVIDIA H100 80GB HBM3" + smoke_suffix, True, "nvidia-h100-80gb-hbm3-smoke"),
                                ("cpu" + smoke_suffix, True, "cpu-smoke")):
        device = BenchDevice(torch.device("cpu"), name, smoke=smoke, bandwidth_gbs=1.0, bf16_tflops=1.0)
        assert Results("demo", tmp_path, device).write(plot=False) == tmp_path / folder / "demo.json"
