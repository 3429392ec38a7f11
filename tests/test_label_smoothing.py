"""Label smoothing (torch's `F.cross_entropy(label_smoothing=)`) as the kernels report the unsmoothed cross-entropy
beside the smoothed loss, as the model returns it, and as the training loop optimizes and logs it
(`train.label_smoothing`): "loss" stays the negative log-likelihood, "smoothed_loss" is what the step optimizes."""

from __future__ import annotations

import copy
import importlib
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import head_loss_case
from hf_reference import as_close_as_transformers, hf_causal_lm
from train_helpers import prepared_corpus, run_config

import ttl_core
import ttl_kernels
from ttl_core.checkpoint import complete_checkpoints
from ttl_core.distributed import World
from ttl_core.errors import ConfigError
from ttl_core.hf import hf_plan
from ttl_core.metrics import read_metrics
from ttl_core.run_config import TrainConfig, load_run_config
from ttl_core.step import train_step
from ttl_core.train import train

CPU = World(0, 1, torch.device("cpu"))
CROSS_ENTROPY = importlib.import_module("ttl_kernels.cross_entropy")  # the module, which the function's name hides


def kernel_calls(monkeypatch) -> list[int]:
    """The rows of each call of the Triton cross-entropy kernel from here on."""
    calls, kernel = [], CROSS_ENTROPY.ce_rows_

    def counted(logits, *args):
        calls.append(len(logits))
        return kernel(logits, *args)
    monkeypatch.setattr(CROSS_ENTROPY, "ce_rows_", counted)
    return calls


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fused", [True, False])
def test_the_kernels_return_the_unsmoothed_cross_entropy_from_the_same_call(backend, reduction, fused):
    """With smoothing and z-loss, `return_nll` gives the plain cross-entropy of the targets (reduced alike, without
    gradient) after the z-loss part, and changes neither the loss nor its gradient."""
    hidden, weight, targets, call = head_loss_case(11, fused)
    options = dict(reduction=reduction, label_smoothing=0.2, z_loss=1e-2, backend=backend)
    loss, z_part, nll = call(return_z_loss=True, return_nll=True, **options)
    want = F.cross_entropy(hidden.detach().double() @ weight.double().t(), targets, reduction=reduction)
    assert not nll.requires_grad and (nll.double() - want).abs().max() <= 1e-5 * want.abs().max()
    (grad,) = torch.autograd.grad(loss.sum(), hidden)
    alone = call(**options)
    (alone_grad,) = torch.autograd.grad(alone.sum(), hidden)
    # the Triton kernel computes the loss and gradient as without the parts; the reference takes its per-token path
    tolerance = 0 if backend == "triton" else 1e-6
    assert (loss - alone).abs().max() <= tolerance * alone.abs().max()
    assert (grad - alone_grad).abs().max() <= tolerance * alone_grad.abs().max()
    only_loss, only_nll = call(return_nll=True, **options)
    assert torch.equal(only_loss, loss) and torch.equal(only_nll, nll)


def float64_step(hf, ours, micro_batches, label_smoothing: float, z_loss: float):
    """transformers' model in float64 on the step's micro-batches: the mean unsmoothed and smoothed cross-entropy and
    z-loss term over all their targets, and the gradient of smoothed + z-loss per ttl parameter (fused as ttl's)."""
    model = copy.deepcopy(hf).double()
    logits = torch.cat([model(mb["input_ids"]).logits.flatten(0, 1) for mb in micro_batches])
    targets = torch.cat([mb["targets"].flatten() for mb in micro_batches])
    nll = F.cross_entropy(logits, targets)
    smoothed = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    z = z_loss * torch.logsumexp(logits, -1)[targets != -100].pow(2).mean()
    (smoothed + z).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    fused = {name: torch.cat([grads[key] for key, _ in pieces])
             for name, pieces in hf_plan(ours.config, "LlamaForCausalLM").items()}
    return nll.item(), smoothed.item(), z.item(), fused


def micro_batches(vocab: int, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """Two micro-batches with different numbers of targets: averaging each apart would weigh their tokens unequally."""
    gen = torch.Generator().manual_seed(seed)
    batches = [{"input_ids": torch.randint(0, vocab, (2, 12), generator=gen),
                "targets": torch.randint(0, vocab, (2, 12), generator=gen)} for _ in range(2)]
    batches[0]["targets"][0, :5] = -100
    return batches


@pytest.mark.parametrize("z_loss", [0.0, 1e-2], ids=["smoothing", "smoothing+zloss"])
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_a_training_step_follows_transformers_with_smoothed_cross_entropy_in_float64(tmp_path, monkeypatch, kernels,
                                                                                      z_loss):
    """One accumulated step (SGD at lr 1, no clipping: the update is the gradient) of ttl's model against transformers'
    with the same weights in float64 optimizing F.cross_entropy(label_smoothing=0.1) (+ the z-loss): every
    parameter's gradient, "loss" the unsmoothed cross-entropy, "smoothed_loss" the smoothed one, on PyTorch and on
    the Triton kernels (interpreted) alike."""
    monkeypatch.setenv("TTL_KERNELS", kernels)
    calls = kernel_calls(monkeypatch)
    hf = hf_causal_lm(seed=2)
    hf.save_pretrained(tmp_path)
    ours = ttl_core.load_pretrained(tmp_path).train()
    micro = micro_batches(hf.config.vocab_size)
    nll, smoothed, z, grads = float64_step(hf, ours, micro, 0.1, z_loss)
    before = {name: p.detach().clone() for name, p in ours.named_parameters()}
    loss, _, figures = train_step(ours, torch.optim.SGD(ours.parameters(), lr=1.0), micro,
                                  TrainConfig(label_smoothing=0.1, z_loss=z_loss, grad_clip=0.0), CPU, 1.0, None)
    assert bool(calls) == (kernels == "triton")
    assert abs(loss - nll) <= 1e-5 * nll and abs(figures["smoothed_loss"] - smoothed) <= 1e-5 * smoothed
    assert ("z_loss" in figures) == bool(z_loss) and abs(figures.get("z_loss", 0.0) - z) <= 1e-5 * z
    for name, p in ours.named_parameters():
        step, want = before[name] - p.detach(), grads[name]
        assert (step.double() - want).abs().max() <= 1e-5 * want.abs().max(), name


def test_the_logged_loss_is_what_a_run_without_smoothing_logs_at_the_same_weights(tmp_path):
    """At the same weights and batches, a step with label smoothing logs as "loss" the cross-entropy a step without
    it logs (both summed per token in the same order), and a step without it logs no "smoothed_loss"."""
    hf = hf_causal_lm(seed=4)
    hf.save_pretrained(tmp_path)
    micro = micro_batches(hf.config.vocab_size, seed=5)
    logged = {}
    for smoothing in (0.0, 0.3):
        model = ttl_core.load_pretrained(tmp_path).train()
        logged[smoothing] = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), micro,
                                       TrainConfig(label_smoothing=smoothing), CPU, 0.1, None)
    assert logged[0.3][0] == logged[0.0][0] and logged[0.3][2]["smoothed_loss"] > logged[0.3][0]
    assert "smoothed_loss" not in logged[0.0][2]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_triton_kernels_train_as_the_pytorch_path_with_smoothing_and_z_loss(tmp_path, monkeypatch, dtype):
    """TTL_KERNELS=triton (interpreted) against TTL_KERNELS=torch on one accumulated step of the same weights. In
    float32 the logged figures agree within 1e-5 and each update within 1e-4 of its largest value (the chunked fused
    head sums the weight gradient in another order). Under bf16 autocast the figures agree within 1e-2, and each
    update is judged against float64 as test_train_reference judges bf16 runs: within 1e-2 of the truth, or no
    further from it than twice the PyTorch path's update (both are 2-3e-2 from it in places)."""
    hf = hf_causal_lm(seed=6)
    hf.save_pretrained(tmp_path)
    micro = micro_batches(hf.config.vocab_size, seed=7)
    train_cfg = TrainConfig(label_smoothing=0.1, z_loss=1e-2, grad_clip=0.0, dtype=dtype)
    runs = {}
    for kernels in ("torch", "triton"):
        monkeypatch.setenv("TTL_KERNELS", kernels)
        model = ttl_core.load_pretrained(tmp_path).train()
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        loss, _, figures = train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), micro, train_cfg, CPU, 1.0,
                                      None)
        runs[kernels] = ({"loss": loss, "smoothed_loss": figures["smoothed_loss"], "z_loss": figures["z_loss"]},
                         {name: before[name] - p.detach() for name, p in model.named_parameters()})
    (torch_figures, torch_steps), (triton_figures, triton_steps) = runs["torch"], runs["triton"]
    for key, want in torch_figures.items():
        assert abs(triton_figures[key] - want) <= (1e-5 if dtype == "float32" else 1e-2) * abs(want), key
    truth = float64_step(hf, model, micro, 0.1, 1e-2)[3]
    for name, want in torch_steps.items():
        scale = want.abs().max()
        if dtype == "float32":
            assert (triton_steps[name] - want).abs().max() <= 1e-4 * scale, name
        else:
            errors = [(steps[name].double() - truth[name]).abs().max() / scale for steps in (triton_steps, torch_steps)]
            assert as_close_as_transformers(*errors, floor=1e-2), (name, errors)


def test_smoothing_zero_asks_the_kernel_for_nothing_more(tmp_path, monkeypatch):
    """train.label_smoothing=0.0 makes the loss call of a run before the setting existed (no NLL asked: the PyTorch
    reference would take its per-token path for it), so the step is that run's bit for bit (checked against the
    commit before the setting: losses, z-loss figures and weights equal); it logs no "smoothed_loss"."""
    asked, fused = [], ttl_kernels.fused_linear_cross_entropy

    def recorded(*args, **kwargs):
        asked.append(kwargs["return_nll"])
        return fused(*args, **kwargs)
    monkeypatch.setattr(ttl_kernels, "fused_linear_cross_entropy", recorded)
    hf = hf_causal_lm(seed=8)
    hf.save_pretrained(tmp_path)
    model = ttl_core.load_pretrained(tmp_path).train()
    micro = micro_batches(hf.config.vocab_size, seed=9)
    _, _, figures = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), micro,
                               TrainConfig(label_smoothing=0.0, z_loss=1e-2), CPU, 0.1, None)
    assert asked == [False, False] and figures.keys() == {"z_loss"}


def test_a_resumed_run_with_smoothing_reproduces_an_uninterrupted_one_bit_for_bit(tmp_path):
    data = prepared_corpus(tmp_path)
    run = run_config("train.max_steps=4", "train.save_every=100", "train.grad_accum_steps=2", "train.eval_every=2",
                     "train.label_smoothing=0.1", "train.z_loss=1e-3")
    train(run, tmp_path / "straight", data_dir=str(data))
    assert train(run, tmp_path / "sliced", data_dir=str(data), stop_after=2).last_step == 2
    assert [p.name for p in complete_checkpoints(tmp_path / "sliced")] == ["step-000002"]
    train(run, tmp_path / "sliced", data_dir=str(data), resume=True)
    straight, sliced = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("straight", "sliced"))
    keys = ("loss", "smoothed_loss", "z_loss", "eval_loss")
    assert [[r.get(k) for k in keys] for r in sliced] == [[r.get(k) for k in keys] for r in straight]
    assert len([r for r in straight if "smoothed_loss" in r]) == 4
    a, b = (ttl_core.load_pretrained(tmp_path / name / "checkpoints" / "step-000004")
            for name in ("straight", "sliced"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("value", ["-0.1", "1.0", "1.5", "nan", "inf"])
def test_a_label_smoothing_outside_0_to_1_is_named_in_one_line(value):
    with pytest.raises(ConfigError, match=r"^train\.label_smoothing must lie in \[0, 1\), got ") as e:
        load_run_config(None, [f"train.label_smoothing={value}"])
    assert "\n" not in str(e.value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cuda_kernel_nll_part(dtype, tolerance):
    """The compiled kernel with smoothing and z-loss on a 32000 vocabulary: the loss, its z-loss part and the
    unsmoothed cross-entropy, in that order, and the hidden gradient, against the float64 formulas on the same inputs
    (the interpreter on the CPU is 10 times inside each tolerance)."""
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(300, 64, generator=gen).to("cuda", dtype).requires_grad_()
    weight = (torch.randn(32000, 64, generator=gen) * 0.2).to("cuda", dtype)
    targets = torch.randint(0, 32000, (300,), generator=gen).cuda()
    targets[::3] = -100
    loss, z_part, nll = ttl_kernels.fused_linear_cross_entropy(
        hidden, weight, targets, label_smoothing=0.1, z_loss=1e-3, return_z_loss=True, return_nll=True,
        backend="triton")
    exact = hidden.detach().double().requires_grad_()
    logits = exact @ weight.double().t()
    want_z = 1e-3 * torch.logsumexp(logits, -1)[targets != -100].pow(2).mean()
    want_loss = F.cross_entropy(logits, targets, label_smoothing=0.1) + want_z
    for got, want in ((loss, want_loss), (z_part, want_z), (nll, F.cross_entropy(logits, targets))):
        assert abs(float(got) - float(want)) <= tolerance * float(want)
    loss.backward()
    want_loss.backward()
    assert (hidden.grad.double() - exact.grad).abs().max() <= tolerance * exact.grad.abs().max()


@pytest.mark.parametrize("value", [None, "0.1", True])
def test_a_label_smoothing_that_is_not_a_number_is_named_by_the_model_in_one_line(value):
    """The model compared it with 0 before the kernel checked it: "'>' not supported between instances of 'NoneType'
    and 'int'", naming neither the option nor the value; True was smoothing 1 on PyTorch and failed in Triton."""
    model = ttl_core.LlamaForCausalLM(ttl_core.LlamaConfig.from_preset(
        "tiny", vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    ids = torch.randint(0, 50, (2, 6))
    with pytest.raises(TypeError, match=rf"^label_smoothing must be a number, got {re.escape(repr(value))}$"):
        model(ids, labels=ids, label_smoothing=value)


@pytest.mark.parametrize("value, error, message", [
    (float("nan"), ValueError, "label_smoothing must be between 0 and 1, got nan"),
    (1.5, ValueError, "label_smoothing must be between 0 and 1, got 1.5"),
    (True, TypeError, "label_smoothing must be a number, got True"),
    (None, TypeError, "label_smoothing must be a number, got None")])
def test_the_classifier_refuses_a_bad_label_smoothing_as_the_causal_lm_does(value, error, message):
    """torch's F.cross_entropy took a NaN label_smoothing as 0, so the classifier trained unsmoothed without a word
    (and True as 1, None as 0, 1.5 in a torch RuntimeError), where the causal LM names each in one line."""
    config = ttl_core.LlamaConfig.from_preset("tiny", vocab_size=50, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=2, pad_token_id=0)
    ids = torch.randint(1, 50, (2, 6))
    for model, labels in ((ttl_core.LlamaForCausalLM(config), ids),
                          (ttl_core.LlamaForSequenceClassification(config.replace(num_labels=3)),
                           torch.tensor([0, 2]))):
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            model(ids, labels=labels, label_smoothing=value)
