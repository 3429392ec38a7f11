"""The training loop: schedule, the step's arithmetic, DDP/FSDP2 parity, the README's main job (resume and
crash safety: test_resume.py; refusals, --init-from and evaluation settings: test_train_runs.py; whole runs
against a loop written with transformers: test_train_reference.py)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, largest, run_script, run_torchrun
from train_helpers import losses, random_model, run_config, set_arguments
from ttl_core import load_pretrained, save_pretrained
from ttl_core.checkpoint import complete_checkpoints
from ttl_core.distributed import World
from ttl_core.errors import TrainingError
from ttl_core.loader import PackedLoader
from ttl_core.metrics import flops_per_token, peak_tflops, read_metrics, step_throughput
import ttl_core.model as ttl_model
import ttl_core.train as ttl_train
from ttl_core.optim import build_optimizer, clip_gradients, lr_at, optimizer_update
from ttl_core.step import evaluate, model_inputs, train_step
from ttl_core.run_setup import cpp_compiler
from ttl_core.train import train


# --- optimizer groups, MFU -----------------------------------------------------------------------------------


def test_no_decay_groups_follow_the_name_fragments():
    run = run_config("train.no_decay=[\"norm\", \"embed\"]")
    from ttl_core.model import LlamaForCausalLM
    model = LlamaForCausalLM(run.model_config())
    optimizer = build_optimizer(model, run.train, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in optimizer.param_groups[0]["params"]}
    undecayed = {names[id(p)] for p in optimizer.param_groups[1]["params"]}
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    assert all("norm" in n or "embed" in n for n in undecayed) and "backbone.embed.weight" in undecayed
    assert "lm_head.weight" in decayed and not any("norm" in n for n in decayed)


def test_a_tied_lm_head_named_in_no_decay_is_not_decayed():
    """A tied LM head is the embedding table: naming either in no_decay takes the one shared weight out of decay
    (named_parameters lists it under the embedding's name only)."""
    from ttl_core.model import LlamaForCausalLM
    for fragment in ("lm_head", "embed"):
        run = run_config(f"train.no_decay=[\"{fragment}\"]", "model.tie_word_embeddings=true")
        model = LlamaForCausalLM(run.model_config())
        optimizer = build_optimizer(model, run.train, torch.device("cpu"))
        assert [len(g["params"]) for g in optimizer.param_groups] == [len(list(model.parameters())) - 1, 1]
        assert optimizer.param_groups[1]["params"][0] is model.lm_head.weight is model.backbone.embed.weight


def test_adamw_steps_with_the_configured_betas_and_eps():
    """Three steps of build_optimizer's AdamW are torch's AdamW built with train.betas, train.eps and the no-decay
    groups; the settings are far from torch's defaults and the gradients small beside eps, so one left at its
    default moves the weights visibly (after one step any betas give the same update: three, drawn apart)."""
    from hf_reference import reference_adamw
    run = run_config("train.betas=[0.5, 0.8]", "train.eps=0.01", "train.weight_decay=0.3", "train.lr=0.1")
    t = run.train
    ours = random_model(run, seed=1)
    reference = copy.deepcopy(ours)
    optimizers = [build_optimizer(ours, t, torch.device("cpu")),
                  reference_adamw(reference, t.lr, t.weight_decay, tuple(t.betas), t.eps)]
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) * 0.01 for p in ours.parameters()]
        for model, optimizer in zip((ours, reference), optimizers):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        assert (p - q).abs().max() <= 1e-6, name


def test_mfu_flops_and_peaks():
    from ttl_core import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_preset("ttl-160m"))
    flops = flops_per_token(model.num_parameters(exclude_embedding=True), 12, 768, 2048)
    assert flops == 6 * (162_417_408 - 32000 * 768) + 12 * 12 * 768 * 2048  # about 1.05 GFLOP per token
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert peak_tflops("NVIDIA GeForce RTX 4090") is None
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA A100 80GB PCIe") == 312.0
    assert peak_tflops("NVIDIA H100 PCIe") is peak_tflops("NVIDIA H100 NVL") is peak_tflops("NVIDIA H200 NVL") is None


def test_tokens_per_s_counts_every_rank_and_mfu_is_per_gpu():
    """4 ranks of 8192 tokens in 2 s at 1.05 GFLOP per token on 312-TFLOP/s GPUs: 16384 tokens/s per rank."""
    tokens_per_s, mfu = step_throughput(8192, 4, 2.0, 1_050_000_000, 312.0)
    assert tokens_per_s == 4 * 8192 / 2.0
    assert mfu == pytest.approx(1.05e9 * 8192 / 2.0 / 312e12)
    assert step_throughput(8192, 1, 2.0, 1_050_000_000, 312.0) == (8192 / 2.0, pytest.approx(mfu))
    assert step_throughput(8192, 4, 2.0, 1_050_000_000, None) == (tokens_per_s, None)


# --- training runs: masking, precision, recomputation, failures, starting points --------------------------

def test_document_masking_trains_on_packed_documents(tmp_path, data_dir):
    """The training loop's first loss with document masking is that of the first batch's documents run alone
    (not merely another loss than an unmasked run's: one predicting each next document's <s> is one too)."""
    run = run_config("train.max_steps=1", "data.document_masking=true", "train.seed=3")  # seed 3: several documents
    model = random_model(run).eval()
    bos = json.loads((data_dir / "meta.json").read_text())["bos_id"]
    save_pretrained(model, tmp_path / "init")
    train(run, tmp_path / "m", data_dir=str(data_dir), init_from=str(tmp_path / "init"))
    batch = next(PackedLoader(data_dir, "train", run.train.seq_len, run.train.micro_batch_size, seed=run.train.seed))
    assert batch["doc_starts"][:, 1:].sum() >= 2  # rows that pack several documents
    with torch.no_grad():
        truth = eager_loss(model, documents_alone(batch, bos))
        unmasked = model(batch["input_ids"], targets=batch["labels"]).loss
    assert abs(losses(tmp_path / "m")[0] - truth.item()) <= 1e-5 and abs(unmasked.item() - truth.item()) > 1e-3
    # and the evaluation after the (last) step is the masked one of the weights that step saved
    [logged] = [r["eval_loss"] for r in read_metrics(tmp_path / "m" / "metrics.jsonl") if "eval_loss" in r]
    trained = load_pretrained(tmp_path / "m" / "checkpoints" / "step-000001")
    assert logged == pytest.approx(evaluate(trained, data_dir, run, World(0, 1, torch.device("cpu")), bos), rel=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_autocast_tracks_float32(tmp_path, data_dir, dtype):
    """bf16 autocast, and fp16 with its gradient scaler, follow the float32 run within low-precision rounding."""
    train(run_config("train.max_steps=3"), tmp_path / "fp32", data_dir=str(data_dir))
    train(run_config("train.max_steps=3", f"train.dtype=\"{dtype}\""), tmp_path / dtype, data_dir=str(data_dir))
    ours, reference = losses(tmp_path / dtype), losses(tmp_path / "fp32")
    assert all(math.isfinite(x) for x in ours) and ours != reference
    assert largest(abs(x - y) / y for x, y in zip(ours, reference)) <= 1e-2


def test_activation_checkpointing_changes_memory_not_results(tmp_path, data_dir, monkeypatch):
    """The blocks are really recomputed (equal losses alone would pass with the setting ignored): each training
    forward of a block runs it again in the backward, with the same results."""
    runs = []  # per checkpointed call: how many times the block ran (1 forward + 1 recomputation)
    real = ttl_model.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        runs.append(0)
        index = len(runs) - 1

        def counted(*a, **k):
            runs[index] += 1
            return function(*a, **k)
        return real(counted, *args, **kwargs)

    monkeypatch.setattr(ttl_model, "checkpoint", counting_checkpoint)
    plain = train(run_config("train.max_steps=2"), tmp_path / "p", data_dir=str(data_dir))
    assert runs == []
    recomputed = train(run_config("train.max_steps=2", "train.activation_checkpointing=true"), tmp_path / "c",
                       data_dir=str(data_dir))
    assert losses(tmp_path / "c") == losses(tmp_path / "p") and recomputed.last_loss == plain.last_loss
    assert runs == [2] * 2 * 2  # 2 steps x 2 layers, each recomputed once (evaluation, in eval mode, runs none)


def test_compiled_training_on_the_cpu_gives_eager_s_losses(tmp_path, data_dir):
    """`train.compile` on the CPU (what the ttl-160m recipe asks for, run without --device cuda): the compiled
    blocks, on the reference kernels, train to eager's losses within float32 rounding."""
    if cpp_compiler() is None:
        pytest.skip("torch.compile builds C++ kernels on the CPU, and no C++ compiler is installed")
    eager = train(run_config("train.max_steps=3"), tmp_path / "e", data_dir=str(data_dir))
    compiled = train(run_config("train.max_steps=3", "train.compile=true"), tmp_path / "c", data_dir=str(data_dir))
    assert largest(abs(x - y) for x, y in zip(losses(tmp_path / "e"), losses(tmp_path / "c"))) <= 1e-4
    assert compiled.last_loss == pytest.approx(eager.last_loss, abs=1e-4)


@pytest.mark.gpu
def test_bf16_compiled_training_on_cuda_tracks_eager(tmp_path, data_dir):
    """Compiled blocks, Triton kernels and fused AdamW on the GPU: the same losses as eager within bf16
    rounding, and a loss that falls."""
    common = ("train.max_steps=8", "train.dtype=\"bfloat16\"", "train.eval_every=8")
    eager = train(run_config(*common), tmp_path / "e", data_dir=str(data_dir), device="cuda")
    compiled = train(run_config(*common, "train.compile=true"), tmp_path / "c", data_dir=str(data_dir), device="cuda")
    a, b = losses(tmp_path / "e"), losses(tmp_path / "c")
    assert largest(abs(x - y) / abs(x) for x, y in zip(a, b)) <= 1e-2 and b[-1] < b[0]
    assert compiled.last_loss == pytest.approx(eager.last_loss, rel=1e-2)


def test_a_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, data_dir):
    run = run_config("train.max_steps=8", "train.save_every=1", "train.lr=1e12", "train.warmup_steps=0",
                     "train.min_lr=1e12", "train.grad_clip=0.0")
    with pytest.raises(TrainingError) as e:  # into a new directory, which keeps what the run trained
        train(run, tmp_path / "run", data_dir=str(data_dir))
    good = complete_checkpoints(tmp_path / "run")
    assert good and "loss became" in str(e.value) and f"Last good checkpoint: {good[-1]}" in str(e.value)
    assert all(math.isfinite(x) for x in losses(tmp_path / "run"))


# --- distributed --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("mode, extra", [("ddp", ["train.label_smoothing=0.1", "train.z_loss=1e-3"]),
                                         ("fsdp", ["data.document_masking=true",
                                                   "train.activation_checkpointing=true"])])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, data_dir, mode, extra):
    """Loss, grad norm and each part's (train.log_grad_norms; FSDP's over its shards: the global ones), the smoothed
    loss and z-loss (DDP's case), and eval loss (each rank's share of the same val batches) of every step, and the
    saved weights."""
    common = ["train.max_steps=4", "train.grad_accum_steps=2", "train.log_grad_norms=true", *extra]
    one = run_script("pretrain", "--data", data_dir, "--out", tmp_path / "one",
                     *set_arguments(*common, "train.micro_batch_size=4"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_torchrun(ROOT / "scripts" / "pretrain.py", "--data", data_dir, "--out", tmp_path / "two",
                       *set_arguments(*common, "train.micro_batch_size=2", f"train.distributed=\"{mode}\""))
    assert two.returncode == 0, two.stderr[-3000:]
    parts = [f"grad_norm/{part}" for part in ("embed", "layers.0", "layers.1", "norm", "lm_head")]
    objective = ["smoothed_loss", "z_loss"] if mode == "ddp" else []
    for key in ("loss", "grad_norm", "eval_loss", *parts, *objective):
        figures = [[r[key] for r in read_metrics(tmp_path / run / "metrics.jsonl") if key in r]
                   for run in ("one", "two")]
        within = pytest.approx(figures[0], **{"rel" if key in parts else "abs": 1e-5})  # a part's norm may be 0.02
        assert figures[1] == within and len(figures[0]) == (2 if key == "eval_loss" else 4)
    # the FSDP-saved checkpoint is an ordinary HF checkpoint with the same weights
    a = load_pretrained(tmp_path / "one" / "checkpoints" / "step-000004")
    b = load_pretrained(tmp_path / "two" / "checkpoints" / "step-000004")
    assert largest((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values())) < 1e-5


# --- the README's main job ----------------------------------------------------------------------------------

def test_main_job_on_the_bundled_corpus_trains_saves_and_samples(tmp_path):
    run_dir = tmp_path / "tiny"
    done = run_script("pretrain", "--config", ROOT / "configs" / "tiny.toml", "--out", run_dir,
                      "--set", "train.max_steps=80", "--set", "train.eval_every=40", "--set", "train.sample_tokens=8",
                      timeout=1800)  # a hang guard: 25 s alone on 2 cores, 240 s on 2 busy ones
    assert done.returncode == 0, done.stderr[-3000:]
    record = losses(run_dir)
    assert len(record) == 80 and sum(record[-5:]) / 5 < sum(record[:5]) / 5 - 1.0
    evals = [r["eval_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert (run_dir / "loss.png").stat().st_size > 0 and "sample: " in done.stdout
    checkpoint = run_dir / "checkpoints" / "step-000080"
    assert json.loads((checkpoint / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (checkpoint / "tokenizer.model").exists()
    replot = run_script("plot_metrics", run_dir)
    assert replot.returncode == 0 and "loss.png" in replot.stdout


# --- the step's arithmetic against eager PyTorch ----------------------------------------------------------

def eager_loss(model, micro_batches) -> torch.Tensor:
    """Mean cross-entropy per target token over every micro-batch together, from the full logits."""
    total, count = 0.0, 0
    for mb in micro_batches:
        logits = model(mb["input_ids"], position_ids=mb.get("position_ids")).logits
        total = total + torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb["targets"].flatten(),
                                                          ignore_index=-100, reduction="sum")
        count += int((mb["targets"] != -100).sum())
    return total / count


def documents_alone(batch, bos: int) -> list[dict[str, torch.Tensor]]:
    """Each document of a packed loader batch as a micro-batch of its own (from position 0), the <s> that opens
    the next document no target."""
    pieces = []
    for row in range(batch["input_ids"].shape[0]):
        starts = [*batch["doc_starts"][row].nonzero().flatten().tolist(), batch["input_ids"].shape[1]]
        for a, b in zip(starts, starts[1:]):
            targets = batch["labels"][row:row + 1, a:b]
            pieces.append({"input_ids": batch["input_ids"][row:row + 1, a:b],
                           "targets": targets.masked_fill(targets == bos, -100)})
    return pieces


def test_accumulated_step_is_the_gradient_of_the_whole_batch_mean(tmp_path):
    """Micro-batches with different numbers of ignored targets: the update is the gradient of the mean over
    all target tokens of the step (one big batch), not a mean of per-micro-batch means or a multiple."""
    run = run_config("train.grad_clip=0.0", "train.grad_accum_steps=3")
    model = random_model(run)
    gen = torch.Generator().manual_seed(4)
    micro = []
    for ignored in (0.1, 0.6, 0.3):
        ids = torch.randint(0, 400, (2, 16), generator=gen)
        targets = torch.randint(0, 400, (2, 16), generator=gen)
        dropped = torch.rand(2, 16, generator=gen) < ignored
        micro.append({"input_ids": ids, "targets": targets.masked_fill(dropped, -100)})
    reference = copy.deepcopy(model)
    truth = eager_loss(reference, micro)
    truth.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is minus the gradient itself
    loss, grad_norm, _ = train_step(model, optimizer, micro, run.train, World(0, 1, torch.device("cpu")), 1.0,
                                    None)
    assert abs(loss - truth.item()) <= 1e-5
    grads = {n: p.grad for n, p in reference.named_parameters()}
    # the truth's norm in float64: a float32 one of 133k entries is itself 5e-6 off (ttl's: 6e-8)
    assert grad_norm == pytest.approx(torch.cat([g.flatten() for g in grads.values()]).double().norm().item(), rel=1e-5)
    for name, p in model.named_parameters():
        assert (before[name] - p.detach() - grads[name]).abs().max() <= 1e-5, name


def test_document_masked_loss_is_the_loss_of_each_document_alone(data_dir):
    """With document masking a packed row's loss is that of its documents run one by one from position 0,
    without predicting the <s> that opens the next document."""
    run = run_config()
    model = random_model(run).eval()
    bos = json.loads((data_dir / "meta.json").read_text())["bos_id"]
    batch = next(PackedLoader(data_dir, "train", 32, 4, seed=3))
    assert batch["doc_starts"][:, 1:].sum() >= 2  # rows that pack several documents
    inputs = model_inputs(batch, torch.device("cpu"), document_masking=True, bos_id=bos)
    with torch.no_grad():
        got = model(**inputs).loss
        truth = eager_loss(model, documents_alone(batch, bos))
        unmasked = model(batch["input_ids"], targets=batch["labels"]).loss
    assert abs(got.item() - truth.item()) <= 1e-5
    assert abs(unmasked.item() - truth.item()) > 1e-3


def test_document_masking_at_row_edges_is_alike_on_every_attention_backend(tmp_path):
    """Hand-made rows through the loader: EOS as a row's last token, a row that is one document with no EOS, a row
    that opens mid-document and holds a document of just <s></s>. Positions restart at each <s> (a document's
    EOS is its own last token), no <s> is a target, and sdpa, eager and triton give the loss of each document
    alone, and one gradient."""
    bos, eos = 1, 2
    words = torch.randint(4, 400, (31,)).tolist()
    stream = [bos, *words[1:4], eos, bos, *words[6:9], eos, bos, *words[11:20], *words[20:22], eos, bos, eos, bos,
              *words[26:31]]
    (tmp_path / "train.bin").write_bytes(np.array(stream, dtype=np.uint16).tobytes())
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16", "eos_id": eos, "vocab_size": 400}))
    batch = next(PackedLoader(tmp_path, "train", 10, 3, shuffle=False))
    inputs = model_inputs(batch, torch.device("cpu"), document_masking=True, bos_id=bos)
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4], list(range(10)),
                                               [0, 1, 2, 0, 1, 0, 1, 2, 3, 4]]
    assert (inputs["targets"] == -100).nonzero().tolist() == [[0, 4], [0, 9], [2, 2], [2, 4]]
    grads = {}
    for backend in ("sdpa", "eager", "triton"):
        model = random_model(run_config(f'model.attention="{backend}"')).eval()
        loss = model(**inputs).loss
        loss.backward()
        with torch.no_grad():
            assert abs(loss.item() - eager_loss(model, documents_alone(batch, bos)).item()) <= 1e-5, backend
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    for backend in ("eager", "triton"):
        for name, grad in grads["sdpa"].items():
            assert (grads[backend][name] - grad).abs().max() <= 1e-5 * grad.abs().max(), (backend, name)


def test_a_non_finite_gradient_under_a_finite_loss_leaves_the_weights_alone():
    """Clipping an infinite norm would turn every gradient into NaN; the step is refused before the update."""
    run = run_config()
    model = random_model(run)
    model.backbone.layers[0].mlp.down.weight.register_hook(lambda g: g * float("inf"))
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, run.train, torch.device("cpu"))
    with pytest.raises(TrainingError, match="gradient norm became"):
        train_step(model, optimizer, [{"input_ids": ids, "targets": ids}], run.train,
                   World(0, 1, torch.device("cpu")), 1e-3, None)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    model(ids, labels=ids).loss.backward()  # fine-tuning's update takes the same guard
    with pytest.raises(TrainingError, match="gradient norm became"):
        optimizer_update(model, optimizer, run.train, 1e-3)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_fp16_steps_that_overflow_are_skipped_but_a_gradient_that_stays_nan_stops_training():
    """The grad scaler skips a step whose gradients overflow and halves its scale; gradients still NaN at a
    scale of 1 are no overflow, and were once skipped for ever (the scale halving to 0) without a word."""
    run, world = run_config("train.dtype=float16"), World(0, 1, torch.device("cpu"))
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(1))
    for bad, init_scale in ((["inf"], 2.0**16), (["nan"] * 3, 4.0)):  # overflow once; NaN at scales 4, 2 and 1
        model = random_model(run)
        model.backbone.layers[0].mlp.down.weight.register_hook(lambda g: g * float(bad.pop()) if bad else g)
        optimizer, scaler = build_optimizer(model, run.train, world.device), torch.amp.GradScaler("cpu", init_scale)
        before = [p.detach().clone() for p in model.parameters()]

        def step():
            return train_step(model, optimizer, [{"input_ids": ids, "targets": ids}], run.train, world, 1e-3, scaler)

        assert not math.isfinite(step()[1]) and scaler.get_scale() == init_scale / 2  # skipped
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        if bad:  # skipped at scale 2, then a NaN at scale 1 is no overflow
            assert not math.isfinite(step()[1]) and scaler.get_scale() == 1.0
            with pytest.raises(TrainingError, match="gradient norm at fp16 loss scale 1 became nan"):
                step()
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        else:
            assert math.isfinite(step()[1]) and any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_fp16_norm_and_clipping_are_those_of_the_unscaled_gradients():
    """The grad scaler's factor is taken out before the norm is measured and the clip applied: the norm and the
    update match the same fp16 step without a scaler (clipping scaled gradients would shrink the update by it)."""
    run = run_config("train.dtype=float16", "train.grad_clip=0.05")
    gen = torch.Generator().manual_seed(8)
    batch = [{"input_ids": torch.randint(0, 400, (2, 16), generator=gen),
              "targets": torch.randint(0, 400, (2, 16), generator=gen)}]
    norms, updates = [], []
    for scaler in (None, torch.amp.GradScaler("cpu", 2.0**8)):
        model = random_model(run, seed=5)
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        _, grad_norm, _ = train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, run.train,
                                     World(0, 1, torch.device("cpu")), 0.25, scaler)
        norms.append(grad_norm)
        updates.append(before - torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert norms[0] > 10 * run.train.grad_clip and norms[1] == pytest.approx(norms[0], rel=1e-3)
    assert (updates[1] - updates[0]).abs().max() <= 1e-2 * updates[0].abs().max()


def test_step_clips_to_grad_clip_and_applies_the_scheduled_lr():
    """The update is -lr * gradient * grad_clip / norm when the norm exceeds grad_clip, with the lr passed for
    this step (not the optimizer's construction-time lr); the norm returned is the one before clipping."""
    run = run_config("train.grad_clip=0.05")
    model = random_model(run, seed=2)
    gen = torch.Generator().manual_seed(6)
    ids, targets = torch.randint(0, 400, (2, 16), generator=gen), torch.randint(0, 400, (2, 16), generator=gen)
    reference = copy.deepcopy(model)
    eager_loss(reference, [{"input_ids": ids, "targets": targets}]).backward()
    grads = {n: p.grad for n, p in reference.named_parameters()}
    norm = torch.cat([g.flatten() for g in grads.values()]).double().norm().item()
    assert norm > 10 * run.train.grad_clip  # the clip binds
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    lr = 0.25
    _, grad_norm, _ = train_step(model, optimizer, [{"input_ids": ids, "targets": targets}], run.train,
                              World(0, 1, torch.device("cpu")), lr, None)
    assert grad_norm == pytest.approx(norm, rel=1e-5)
    factor = lr * run.train.grad_clip / norm
    for name, p in model.named_parameters():
        assert (before[name] - p.detach() - factor * grads[name]).abs().max() <= 1e-6, name


def test_no_clipping_measures_the_norm_without_rewriting_the_gradients():
    """grad_clip 0 (the published recipes') logs the norm but leaves every gradient untouched: clipping to
    infinity would still multiply each one by 1 in place, a pass over all gradients every step."""
    model = random_model(run_config(), seed=3)
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(4))
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters()]
    versions = [g._version for g in grads]
    norm = torch.cat([g.flatten() for g in grads]).double().norm()
    for grad_clip, rewritten in ((0.0, False), (1e6, True)):
        run = run_config(f"train.grad_clip={grad_clip}")
        assert clip_gradients(model, build_optimizer(model, run.train, torch.device("cpu")), run.train).item() == \
            pytest.approx(norm.item(), rel=1e-5)
        assert ([g._version for g in grads] != versions) == rewritten


def test_evaluate_is_the_eval_mode_mean_over_target_tokens(data_dir):
    """evaluate() runs without dropout, averages over the tokens that are targets (with document masking the
    <s> of the next document is none), reads `eval_batches` batches of val.bin in file order, and leaves the
    model in training mode."""
    run = run_config("model.attention_dropout=0.5", "data.document_masking=true", "train.eval_batches=2")
    model = random_model(run)
    bos = json.loads((data_dir / "meta.json").read_text())["bos_id"]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for _, batch in zip(range(2), PackedLoader(data_dir, "val", 32, 4, shuffle=False)):
            inputs = model_inputs(batch, torch.device("cpu"), True, bos)
            total += model(**inputs, loss_reduction="sum").loss.item()
            count += int((inputs["targets"] != -100).sum())
    assert count < 2 * 4 * 32  # some targets are masked
    model.train()
    got = evaluate(model, data_dir, run, World(0, 1, torch.device("cpu")), bos)
    assert got == pytest.approx(total / count, rel=1e-5) and model.training


def test_each_step_updates_with_its_scheduled_lr(tmp_path, data_dir, monkeypatch):
    """The lr the optimizer steps with at step s is lr_at(s), the one logged: the schedule's tests check lr_at
    alone, and the loop's resumes and losses look the same with the schedule one step off."""
    applied = []
    real = ttl_train.train_step

    def recording_step(model, optimizer, *args):
        result = real(model, optimizer, *args)
        applied.append([g["lr"] for g in optimizer.param_groups])
        return result

    monkeypatch.setattr(ttl_train, "train_step", recording_step)
    run = run_config("train.max_steps=4", "train.min_lr=1e-4")
    train(run, tmp_path, data_dir=str(data_dir))
    scheduled = [lr_at(step, run.train) for step in range(1, 5)]
    assert scheduled[0] < scheduled[1] == scheduled[2] > scheduled[3]  # warmup, peak, cosine: one step off differs
    assert applied == [[lr, lr] for lr in scheduled]
    assert [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if "lr" in r] == scheduled


