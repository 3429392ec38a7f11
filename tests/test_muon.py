"""train.optimizer = "muon": torch.optim.Muon on transformers' separate projection matrices (q_proj, k_proj, v_proj,
o_proj, gate_proj, up_proj, down_proj) and torch's AdamW on the rest, though ttl fuses q, k, v and gate, up; its
options, its checkpoints and resume."""

from __future__ import annotations

import copy
import functools
import itertools
import json
import types

import pytest
import torch
import transformers

import ttl_core.optim as ttl_optim
from helpers import ROOT, run_snippet, run_torchrun
from hf_reference import hf_causal_lm, reference_adamw
from test_train_reference import reference_training
from train_helpers import losses, prepared_corpus, run_config, set_arguments
from ttl_core import LlamaConfig, LlamaForCausalLM, load_pretrained
from ttl_core.errors import ConfigError
from ttl_core.hf import hf_plan
from ttl_core.metrics import read_metrics
from ttl_core.muon import TorchMuonAndAdamW, is_hf_projection, orthogonalized, rows_per_process
from ttl_core.muon_sharing import balanced_owners, newton_schulz_flops
from ttl_core.run_config import TrainConfig
from ttl_core.train import train

MUON = ["train.optimizer=\"muon\""]
KELLER = ["train.muon_adjust_lr=\"original\"", "train.muon_nesterov=false", "train.muon_momentum=0.8",
          "train.muon_ns_steps=3"]


def torch_muon_and_adamw(model: torch.nn.Module, t: TrainConfig) -> TorchMuonAndAdamW:
    """torch.optim.Muon over a transformers model's projection matrices and the recipe's AdamW over the rest,
    stepped as one optimizer (as `reference_update` steps it)."""
    return TorchMuonAndAdamW(model, t, reference_adamw(model, t.lr, t.weight_decay, t.betas, t.eps,
                                                       leave_out=is_hf_projection))


def fuse_nothing_apart(monkeypatch) -> None:
    """Muon over each fused matrix whole, [q; k; v] and [gate; up]: what ttl must not do."""
    rows = ttl_optim.projection_rows
    monkeypatch.setattr(ttl_optim, "projection_rows", lambda model: {k: (sum(v),) for k, v in rows(model).items()})


def largest_step_difference(tmp_path, *overrides: str, steps: int = 3) -> float:
    """The largest difference between ttl's weights and transformers' after `steps` updates of ttl's optimizer and
    of `TorchMuonAndAdamW` from the same GQA model with biases, given the same fresh random gradients (ttl's fused
    ones the concatenation of transformers'), at a changing lr."""
    reference = hf_causal_lm(seed=2, num_key_value_heads=2, attention_bias=True, mlp_bias=True).float().train()
    reference.save_pretrained(tmp_path / "init")
    model = load_pretrained(tmp_path / "init").train()
    t = run_config(*MUON, "train.weight_decay=0.1", *overrides).train
    ours, theirs = ttl_optim.build_optimizer(model, t, torch.device("cpu")), torch_muon_and_adamw(reference, t)
    plan = hf_plan(model.config, "LlamaForCausalLM")
    named = dict(reference.named_parameters())
    gen = torch.Generator().manual_seed(3)
    for step in range(1, steps + 1):
        for param in named.values():
            param.grad = torch.randn(param.shape, generator=gen)
        for name, param in model.named_parameters():
            param.grad = torch.cat([named[piece].grad for piece, _ in plan[name]])
        for group in ours.param_groups + theirs.param_groups:
            group["lr"] = t.lr * step / steps
        ours.step()
        theirs.step()
    with torch.no_grad():
        return max((param - torch.cat([named[piece] for piece, _ in plan[name]])).abs().max().item()
                   for name, param in model.named_parameters())


@pytest.mark.parametrize("options", [[], KELLER], ids=["moonshot", "keller"])
def test_a_muon_step_is_torch_muon_on_each_projection_to_the_bit(tmp_path, options):
    """The same gradients give transformers' weights to the bit: q, k, v (k and v smaller: GQA) and gate, up each
    orthogonalised and lr-scaled alone, the momentum and weight decay on the fused tensor, AdamW on the embedding,
    head, norms and biases; with either lr adjustment, Nesterov or not, any momentum and Newton-Schulz steps."""
    assert largest_step_difference(tmp_path, *options) == 0.0


def test_muon_over_the_fused_matrices_is_another_optimizer(tmp_path, monkeypatch):
    """What the test above tells apart: orthogonalising [q; k; v] and [gate; up] whole moves the weights by about
    an update's size (1.6e-3 after three steps at lrs up to 3e-3) away from transformers'."""
    fuse_nothing_apart(monkeypatch)
    assert largest_step_difference(tmp_path) > 1e-4


RECIPE = ["train.max_steps=6", "train.grad_accum_steps=2", "train.warmup_steps=2", "train.min_lr=3e-4",
          "train.weight_decay=0.1", "train.eval_every=6", "train.save_every=6", "train.seed=5"]


def run_errors(tmp_path) -> dict[str, tuple[float, float]]:
    """A Muon run of ttl (GQA, gradient accumulation, clipping, warmup and cosine, evaluation) and the plain loop's
    run in float32 with transformers' model and `TorchMuonAndAdamW`, from the same weights and batches, each
    against the loop's run in float64: figure -> (ttl's error, the float32 loop's), the largest over the run,
    relative for the losses and gradient norms, absolute for the weights."""
    data_dir = prepared_corpus(tmp_path)
    run = run_config(*MUON, *RECIPE)
    t = run.train
    reference = hf_causal_lm(seed=1, vocab_size=400, intermediate_size=128, max_position_embeddings=64,
                             num_key_value_heads=2).float().train()
    reference.save_pretrained(tmp_path / "init")
    truth = copy.deepcopy(reference).double()
    train(run, tmp_path / "run", data_dir=str(data_dir), init_from=str(tmp_path / "init"))
    expected, eval_loss = reference_training(reference, data_dir, t, False, torch_muon_and_adamw)
    exact, exact_eval_loss = reference_training(truth, data_dir, t, False, torch_muon_and_adamw)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    logged = [r for r in records if "loss" in r]
    [logged_eval] = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert [r["lr"] for r in logged] == pytest.approx([r["lr"] for r in expected], rel=1e-12)
    errors = {key: tuple(max(abs(r[key] - x[key]) / x[key] for r, x in zip(run, exact)) for run in (logged, expected))
              for key in ("loss", "grad_norm")}
    errors["eval_loss"] = (abs(logged_eval - exact_eval_loss) / exact_eval_loss,
                           abs(eval_loss - exact_eval_loss) / exact_eval_loss)
    trained = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step-000006")
    errors["weights"] = tuple(max((weights[name].double() - value).abs().max().item()
                                  for name, value in truth.state_dict().items())
                              for weights in (trained.state_dict(), reference.state_dict()))
    return errors


def test_a_muon_run_is_transformers_with_torch_muon(tmp_path):
    """Every figure of the run no further from the float64 loop than 4 times the float32 loop's largest
    departure over the run. Not float32 rounding to the step: Newton-Schulz in bfloat16 turns a float32 rounding
    (ttl's fused matmuls, the loop's float32 or float64) into a bfloat16 one in an update, so after the first update
    both float32 runs wander about 1e-5 (losses) and 1e-4 (weights) from the float64 one, ttl's as far as the
    loop's (the exactness of the update itself is the bit-for-bit test above)."""
    errors = run_errors(tmp_path)
    for key, (ours, theirs) in errors.items():
        assert theirs <= 1e-3, ("the float64 loop is another run", key, errors)
        assert ours <= 4 * theirs, (key, errors)


def test_a_muon_run_over_the_fused_matrices_fails_that_comparison(tmp_path, monkeypatch):
    """Every figure 20 to 100 times as far from the float64 loop as the float32 loop's."""
    fuse_nothing_apart(monkeypatch)
    errors = run_errors(tmp_path)
    assert all(ours > 4 * theirs for ours, theirs in errors.values()), errors


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_resumed_muon_run_is_the_uninterrupted_one_bit_for_bit(tmp_path, dtype):
    """The momentum buffers and AdamW's moments go through optimizer.pt (read back with weights_only=True) and
    return to their parameters; in float16 the grad scaler unscales and steps the Muon groups too."""
    run = run_config(*MUON, "train.max_steps=6", "train.save_every=100", f"train.dtype=\"{dtype}\"")
    data_dir = prepared_corpus(tmp_path)
    train(run, tmp_path / "straight", data_dir=str(data_dir))
    train(run, tmp_path / "sliced", data_dir=str(data_dir), stop_after=3)
    train(run, tmp_path / "sliced", data_dir=str(data_dir), resume=True)
    assert losses(tmp_path / "sliced") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 6
    a, b = (load_pretrained(tmp_path / d / "checkpoints" / "step-000006") for d in ("straight", "sliced"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    adamw = run_config("train.max_steps=6", f"train.dtype=\"{dtype}\"")  # and Muon made a difference
    train(adamw, tmp_path / "adamw", data_dir=str(data_dir))
    assert losses(tmp_path / "adamw")[1:] != losses(tmp_path / "straight")[1:]


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "before-model-and-optimizer-were-recorded"])
def test_a_run_resumes_with_the_optimizer_it_saved(tmp_path, recorded):
    """Also an AdamW checkpoint whose trainer state records neither [model] nor train.optimizer (nor its own
    digest), as the oldest ones: it resumes with AdamW, and Muon is refused in one line, not a KeyError from
    the loading of AdamW's moments."""
    data_dir = prepared_corpus(tmp_path)
    train(run_config("train.max_steps=4", "train.save_every=2"), tmp_path / "run", data_dir=str(data_dir),
          stop_after=2)
    if not recorded:
        path = tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.json"
        state = json.loads(path.read_text())
        del state["config"]["model"], state["config"]["train"]["optimizer"], state["state_sha256"]
        path.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"step-000002 was trained with train.optimizer='adamw', whose state it "
                                          r"saved; resume with it, or start a new run with --init-from"):
        train(run_config(*MUON, "train.max_steps=4"), tmp_path / "run", data_dir=str(data_dir), resume=True)
    train(run_config("train.max_steps=4"), tmp_path / "run", data_dir=str(data_dir), resume=True)
    assert len(losses(tmp_path / "run")) == 4


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_run_resumed_before_its_first_update_is_the_uninterrupted_one(tmp_path, monkeypatch, optimizer):
    """An fp16 run whose first steps overflow (a loss scale of 2**24) is checkpointed before any update, with no
    optimizer state yet: saving must not make one (torch's gathering of the state steps the optimizer at lr 0, a
    step AdamW counts in its bias correction), so the resumed run's first update is the uninterrupted run's, and a
    run that saves then and goes on (train.save_every=1) updates as one that does not save."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**24))
    run_overrides = (f"train.optimizer=\"{optimizer}\"", "train.max_steps=8", "train.dtype=\"float16\"")
    run = run_config(*run_overrides, "train.save_every=100")
    data_dir = prepared_corpus(tmp_path)
    train(run, tmp_path / "straight", data_dir=str(data_dir))
    train(run, tmp_path / "sliced", data_dir=str(data_dir), stop_after=1)
    train(run, tmp_path / "sliced", data_dir=str(data_dir), resume=True)
    train(run_config(*run_overrides, "train.save_every=1", "train.keep_checkpoints=1"), tmp_path / "saving",
          data_dir=str(data_dir))
    skipped = [r["skipped"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    assert skipped[0] and not all(skipped), skipped
    assert losses(tmp_path / "sliced") == losses(tmp_path / "saving") == losses(tmp_path / "straight")
    a, b, c = (load_pretrained(tmp_path / d / "checkpoints" / "step-000008") for d in ("straight", "sliced", "saving"))
    assert all(torch.equal(x, y) and torch.equal(x, z)
               for x, y, z in zip(a.state_dict().values(), b.state_dict().values(), c.state_dict().values()))


@pytest.mark.parametrize("override, message", [
    ("train.optimizer=\"sgd\"", "train.optimizer must be one of adamw, muon, got 'sgd'"),
    ("train.muon_adjust_lr=\"spectral\"", "train.muon_adjust_lr must be one of match_rms_adamw, original, got "
                                          "'spectral'"),
    ("train.muon_momentum=1.0", r"train.muon_momentum must be in \[0, 1\), got 1.0"),
    ("train.muon_momentum=nan", r"train.muon_momentum must be in \[0, 1\), got nan"),
    ("train.muon_ns_steps=0", r"train.muon_ns_steps must be in \[1, 100\), got 0"),
    ("train.muon_ns_steps=100", r"train.muon_ns_steps must be in \[1, 100\), got 100"),
    ("train.muon_nesterov=1", "train.muon_nesterov must be true or false, got 1"),
])
def test_bad_muon_options_are_named_in_one_line(override, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        run_config(*MUON, override)


def test_muon_under_ddp_finds_the_projections_of_the_wrapped_model(tmp_path):
    """DDP all-reduces whole gradients, so each rank orthogonalises what a single process would: the optimizer
    built over the wrapped model is the one built over the model. A one-process gloo group (a FileStore: no port)
    stands in for torchrun's, in a subprocess of its own."""
    code = f"""
import torch, torch.distributed as dist
from ttl_core import LlamaConfig, LlamaForCausalLM
from ttl_core.distributed import World, wrap_model
from ttl_core.optim import build_optimizer
from ttl_core.run_config import TrainConfig
dist.init_process_group("gloo", store=dist.FileStore({str(tmp_path / "store")!r}, 1), rank=0, world_size=1)
config = LlamaConfig.from_preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
t, cpu = TrainConfig(optimizer="muon"), torch.device("cpu")
torch.manual_seed(0)
alone = LlamaForCausalLM(config)
ddp = wrap_model(LlamaForCausalLM(config), "ddp", World(0, 2, cpu))
ddp.module.load_state_dict(alone.state_dict())
optimizers = [build_optimizer(model, t, cpu) for model in (alone, ddp)]
assert [g.get("rows") for g in optimizers[0].param_groups] == [g.get("rows") for g in optimizers[1].param_groups]
assert [32, 16, 16] in [g.get("rows") for g in optimizers[1].param_groups]
ids = torch.randint(0, 64, (2, 8))
for model, optimizer in zip((alone, ddp), optimizers):
    model(ids, labels=ids).loss.backward()
    optimizer.step()
assert all(torch.equal(a, b) for a, b in zip(alone.parameters(), ddp.module.parameters()))
dist.destroy_process_group()
print("stepped")
"""
    done, ours = run_snippet(code)
    assert done.returncode == 0 and ours == ["stepped"], done.stderr[-3000:]


@pytest.mark.parametrize("processes, busiest", [(2, 1.0), (3, 1.0), (8, 1.03)])
def test_ttl_160m_newton_schulz_is_shared_evenly(processes, busiest):
    """ttl-160m's 84 pieces (q, k, v, o, gate, up, down in 12 blocks; 2.1 TFLOP of Newton-Schulz a step) handed out
    by FLOPs: the busiest process does an even share (at 8 processes within 3%, measured 2.6%; round robin, piece j
    to process j % 8, gives it 18% more), and every piece goes to one process."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_preset("ttl-160m"))
    columns = {id(param): param.shape[-1] for param in model.parameters()}
    costs = [newton_schulz_flops(rows, columns[param], 5) for param, pieces in ttl_optim.projection_rows(model).items()
             for rows in pieces]
    owners = balanced_owners(costs, processes)
    loads = [sum(cost for cost, owner in zip(costs, owners) if owner == process) for process in range(processes)]
    assert len(costs) == 84 and sorted(set(owners)) == list(range(processes))
    assert max(loads) <= busiest * sum(costs) / processes


@pytest.mark.parametrize("processes, mib", [(2, 108), (4, 81), (8, 51)])
def test_ttl_160m_fsdp_muon_receives_what_docs_training_md_says(processes, mib):
    """Under FSDP a process receives, in bfloat16, the other processes' rows of the pieces it owns and the rows it
    holds of the pieces others own: at most 108, 81 and 51 MiB a ttl-160m step at 2, 4 and 8 processes."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_preset("ttl-160m"))
    fused_rows, pieces = ttl_optim.projection_rows(model), []  # pieces: (rows each process holds, columns)
    for param in model.parameters():
        # what rows_per_process reads of a DTensor sharded on dim 0
        sharded = types.SimpleNamespace(shape=param.shape, device_mesh=types.SimpleNamespace(size=lambda: processes))
        rows = fused_rows.get(id(param), ())
        pieces += [(rows_per_process(sharded, start, count), param.shape[1])
                   for start, count in zip(itertools.accumulate(rows, initial=0), rows)]
    owners = balanced_owners([newton_schulz_flops(sum(held), columns, 5) for held, columns in pieces], processes)
    received = [sum(2 * columns * (sum(held) - held[owner] if owner == process else held[process])
                    for (held, columns), owner in zip(pieces, owners)) for process in range(processes)]
    assert round(max(received) / 2**20) == mib


@pytest.mark.parametrize("shape", [(48, 20), (20, 48)], ids=["tall", "wide"])
def test_an_update_sent_in_bfloat16_is_orthogonalised_to_the_same_bits(shape):
    """FSDP sends each process's rows of a piece's float32 update to the piece's owner in bfloat16, which loses
    nothing: `orthogonalized` casts to bfloat16 before anything else, its norm included. Its result, bfloat16 too,
    travels back as it is."""
    update = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    result = orthogonalized(update, 5)
    assert result.dtype == torch.bfloat16 and torch.equal(result, orthogonalized(update.bfloat16(), 5))


@pytest.mark.slow
def test_two_ddp_processes_are_one_process_with_the_same_global_batch(tmp_path):
    """Losses and gradient norms of every step of a two-process DDP run (gloo, torchrun) against one process's,
    no further than one process with its micro-batches split otherwise: the bfloat16 Newton-Schulz turns the
    float32 reordering of a gradient's sum (by DDP's all-reduce as by the accumulation) into bfloat16 roundings of
    the update, so neither is the one-process run to float32 rounding (measured: 3e-6 and 9e-5 for DDP, 3e-5 and
    2e-4 for the split, against about 1e-2 for AdamW in place of Muon)."""
    data_dir = prepared_corpus(tmp_path)
    common = [*MUON, "train.max_steps=4", "train.eval_every=0"]
    for name, batch, accum in (("one", 4, 2), ("split", 2, 4)):
        train(run_config(*common, f"train.micro_batch_size={batch}", f"train.grad_accum_steps={accum}"),
              tmp_path / name, data_dir=str(data_dir))
    two = run_torchrun(ROOT / "scripts" / "pretrain.py", "--data", data_dir, "--out", tmp_path / "two",
                       *set_arguments(*common, "train.micro_batch_size=2", "train.grad_accum_steps=2"))
    assert two.returncode == 0, two.stderr[-3000:]
    records = {name: [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
               for name in ("one", "split", "two")}
    for key in ("loss", "grad_norm"):
        one, split, ddp = ([r[key] for r in records[name]] for name in ("one", "split", "two"))
        assert len(ddp) == len(one) == 4 and ddp[0] == pytest.approx(one[0], abs=1e-6)  # before any Muon update
        assert max(abs(a - b) for a, b in zip(ddp, one)) <= max(abs(a - b) for a, b in zip(split, one)) <= 1e-3, key


def cuda_and_cpu_departures(device: torch.device, steps: int = 3) -> dict[str, tuple[float, float, bool]]:
    """ttl's Muon (AdamW beside it, fused on CUDA) stepped on `device` and on the CPU from the same weights with
    the same fresh random gradients: parameter name -> (the largest difference between the two runs' weights, the
    sum over the steps of the CPU run's largest change to it, whether Muon steps it)."""
    config = LlamaConfig.from_preset("tiny", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    cpu = LlamaForCausalLM(config)
    there = copy.deepcopy(cpu).to(device)
    t = TrainConfig(optimizer="muon", lr=0.02, weight_decay=0.1)
    optimizers = [ttl_optim.build_optimizer(cpu, t, torch.device("cpu")), ttl_optim.build_optimizer(there, t, device)]
    gen = torch.Generator().manual_seed(4)
    moved = {name: 0.0 for name, _ in cpu.named_parameters()}
    for _ in range(steps):
        before = {name: p.detach().clone() for name, p in cpu.named_parameters()}
        for p, q in zip(cpu.parameters(), there.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.to(device)
        for optimizer in optimizers:
            optimizer.step()
        for name, p in cpu.named_parameters():
            moved[name] += (p.detach() - before[name]).abs().max().item()
    muon = ttl_optim.projection_rows(cpu)
    return {name: ((q.detach().cpu() - p.detach()).abs().max().item(), moved[name], id(p) in muon)
            for (name, p), q in zip(cpu.named_parameters(), there.parameters())}


@pytest.mark.gpu
def test_muon_steps_on_cuda_are_the_cpu_steps_to_bfloat16_rounding():
    """Newton-Schulz runs in bfloat16, which a GPU's matmuls round otherwise than the CPU's. Each device's result
    departs from the rounding-free iteration's by up to 3.5% of its largest entry (at these shapes, 32 to 96 rows
    and columns, against float64 on the CPU), so two devices' results of one momentum are within 7% of each other,
    and 3 steps' differences add up: each projection matrix within 10% of the sum of its largest change per step.
    On the CPU, float32 Newton-Schulz against bfloat16 departs 1.3% of it; orthogonalising q, k, v and gate, up
    whole, 29%. AdamW's parameters, float32 throughout, within 1e-4 of it (the CPU's fused AdamW: 1.2e-7)."""
    departures = cuda_and_cpu_departures(torch.device("cuda"))
    assert sum(is_muon for _, _, is_muon in departures.values()) == 4 * 2  # qkv, out, gate_up, down in 2 layers
    for name, (difference, moved, is_muon) in departures.items():
        assert difference <= (0.1 if is_muon else 1e-4) * moved, (name, difference, moved)
