"""train.log_activation_stats (ttl_core.activation_stats): the figures against transformers' Llama on the same weights,
padding and packed documents, no effect on training, the eval records of a run, DDP/FSDP2 against one process."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama

from helpers import ROOT, run_script, run_torchrun
from hf_reference import hf_causal_lm
from train_helpers import losses, run_config, same_weights, set_arguments
import ttl_core
import ttl_core.activation_stats as ttl_activation_stats
from ttl_core.activation_stats import KINDS, _logit_max, activation_stats
from ttl_core.attention import causal_mask, document_layout
from ttl_core.errors import ConfigError
from ttl_core.metrics import read_metrics
from ttl_core.train import train

LAYERS = 3


def squares(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(sum of the real tokens' mean squares, their count), in float64."""
    per_token = x.double().square().mean(-1)[real]
    return torch.stack([per_token.sum(), torch.tensor(float(per_token.numel()), dtype=torch.float64)])


def transformers_raw(hf, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per figure, transformers' (sum of squares, count) or largest logit over the real tokens `mask` marks: RMS from
    output_hidden_states (the last block's output from a hook: transformers' last hidden state is after the final
    norm) and hooks on self_attn / mlp, logits from q and k in its eager attention function, as its eager path
    computes them before the softmax."""
    real, raw, handles = mask.bool(), {}, []
    eager = modeling_llama.eager_attention_forward

    def recording_attention(module, query, key, value, attention_mask, scaling, **kwargs):
        keys = modeling_llama.repeat_kv(key, module.num_key_value_groups)
        logits = torch.matmul(query, keys.transpose(2, 3)) * scaling
        allowed = attention_mask == 0 if attention_mask.dtype != torch.bool else attention_mask
        allowed = allowed & real[:, None, :, None] & real[:, None, None, :]
        raw[f"attn_logit_max/layers.{module.layer_idx}"] = logits.masked_fill(~allowed, float("-inf")).amax().double()
        return eager(module, query, key, value, attention_mask, scaling, **kwargs)

    modeling_llama.eager_attention_forward = recording_attention  # looked up by name at each call
    for i, layer in enumerate(hf.model.layers):
        handles.append(layer.self_attn.register_forward_hook(
            lambda m, a, out, i=i: raw.__setitem__(f"attn_out_rms/layers.{i}", squares(out[0], real))))
        handles.append(layer.mlp.register_forward_hook(
            lambda m, a, out, i=i: raw.__setitem__(f"mlp_out_rms/layers.{i}", squares(out, real))))
    handles.append(hf.model.layers[-1].register_forward_hook(
        lambda m, a, out: raw.__setitem__(f"act_rms/layers.{LAYERS - 1}", squares(out, real))))
    try:
        with torch.no_grad():
            hidden = hf(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
        modeling_llama.eager_attention_forward = eager
    for i in range(LAYERS - 1):  # hidden_states[0] is the embeddings
        raw[f"act_rms/layers.{i}"] = squares(hidden[i + 1], real)
    return raw


def figures_of(raws: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The figures of several passes taken together (the documents of a packed batch, each alone)."""
    out = {}
    for name in raws[0]:
        if name.startswith("attn_logit_max/"):
            out[name] = max(raw[name].item() for raw in raws)
        else:
            total = sum(raw[name] for raw in raws)
            out[name] = (total[0] / total[1]).sqrt().item()
    return out


def assert_close(got: dict[str, float], expected: dict[str, float], rel: float = 1e-5) -> float:
    """Same names, each within `rel` relatively; returns the largest relative difference."""
    assert list(got) == [f"{kind}/layers.{i}" for kind in KINDS for i in range(LAYERS)]
    assert set(got) == set(expected)
    worst = max(abs(got[name] - expected[name]) / abs(expected[name]) for name in got)
    assert worst <= rel, {name: (got[name], expected[name]) for name in got}
    return worst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """transformers' Llama (eager attention) and ttl's with its weights, random O(1) activations, 3 blocks (GQA)."""
    hf = hf_causal_lm(num_hidden_layers=LAYERS, attn_implementation="eager")
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, ttl_core.load_pretrained(path)


def random_ids(vocab: int, batch: int = 3, seq: int = 21, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("padded", [False, True])
def test_figures_match_transformers(models, padded):
    """Unpadded rows, and rows left-padded, right-padded and whole: RMS and logits over the real tokens only."""
    hf, ours = models
    ids = random_ids(hf.config.vocab_size)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5], mask[1, 15:] = 0, 0
        ids[mask == 0] = hf.config.pad_token_id
    ours.train()  # handed back in the mode it had
    got = activation_stats(ours, {"input_ids": ids, "attention_mask": mask})
    assert ours.training
    assert_close(got, figures_of([transformers_raw(hf, ids, mask)]))
    assert all(got[f"attn_logit_max/layers.{i}"] > 1 for i in range(LAYERS))  # O(1) logits: a real comparison


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_packed_documents_are_the_documents_alone(models, backend, monkeypatch, tmp_path):
    """A document-masked batch as the eval batch is (positions restarting, cu_seqlens; SDPA gets them as a mask, the
    Triton kernel as cu_seqlens): the figures of its documents run alone through transformers, together. The logits
    a query at a time: the chunks bounding their memory cover every pair."""
    monkeypatch.setattr(ttl_activation_stats, "LOGIT_CHUNK_ELEMENTS", 1)
    hf, _ = models
    hf.save_pretrained(tmp_path)
    ours = ttl_core.load_pretrained(tmp_path, attention=backend)
    ids = random_ids(hf.config.vocab_size, batch=2, seq=16, seed=1)
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[0, 6], starts[1, 3], starts[1, 11] = True, True, True
    position_ids, cu_seqlens, max_seqlen = document_layout(starts)
    got = activation_stats(ours, {"input_ids": ids, "position_ids": position_ids, "cu_seqlens": cu_seqlens,
                                  "max_seqlen": max_seqlen})
    flat = ids.flatten()
    documents = [flat[a:b][None] for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
    expected = figures_of([transformers_raw(hf, doc, torch.ones_like(doc)) for doc in documents])
    assert_close(got, expected)
    whole_rows = activation_stats(ours, {"input_ids": ids})  # across documents the logits differ: the mask counts
    assert whole_rows["attn_logit_max/layers.0"] != got["attn_logit_max/layers.0"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_are_recomputed_in_float32_under_the_run_s_autocast(dtype):
    """Under train.dtype's autocast (as evaluations run) the autocast output's q and k, not q·k rounded to dtype."""
    generator = torch.Generator().manual_seed(2)
    q = (torch.randn(2, 13, 4, 16, generator=generator) * 3).to(dtype)
    k = (torch.randn(2, 13, 2, 16, generator=generator) * 3).to(dtype)
    allowed = causal_mask(13, 13, q.device)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(2, dim=2)) / 4
    expected = scores.masked_fill(~allowed, float("-inf")).amax().item()
    with torch.autocast("cpu", dtype=dtype):
        got = _logit_max(q, k, allowed)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected, rel=1e-6)


def eval_records(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]


def test_training_is_the_same_with_and_without_and_each_evaluation_logs_the_figures(tmp_path, data_dir):
    """With attention dropout, so that a forward in training mode or a random number drawn would change the run."""
    common = ("train.max_steps=4", "train.eval_every=2", "model.attention_dropout=0.1")
    train(run_config(*common, "train.log_activation_stats=true"), tmp_path / "on", data_dir=str(data_dir))
    train(run_config(*common), tmp_path / "off", data_dir=str(data_dir))
    assert losses(tmp_path / "on") == losses(tmp_path / "off")
    last = "checkpoints/step-000004"
    assert same_weights(tmp_path / "on" / last, tmp_path / "off" / last)
    on, off = eval_records(tmp_path / "on"), eval_records(tmp_path / "off")
    assert [r["step"] for r in on] == [2, 4] and [r["eval_loss"] for r in on] == [r["eval_loss"] for r in off]
    names = [f"{kind}/layers.{i}" for kind in KINDS for i in range(2)]
    assert all(set(names) <= set(r) and not set(names) & set(o) for r, o in zip(on, off))
    assert all(r[name] > 0 for r in on for name in names)
    assert on[0]["act_rms/layers.1"] != on[1]["act_rms/layers.1"]  # measured again, on the trained weights


def test_refused_without_evaluation_or_with_a_kv_cache(models):
    with pytest.raises(ConfigError, match="log_activation_stats .*eval_every is 0") as e:
        run_config("train.log_activation_stats=true", "train.eval_every=0")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="without a kv_cache") as e:  # its keys would be the new tokens' alone
        activation_stats(models[1], {"input_ids": random_ids(131), "kv_cache": object()})
    assert "\n" not in str(e.value)


def test_the_model_is_handed_back_in_the_mode_it_had(models):
    """The pass runs in eval mode; a model in eval mode (an evaluation's) stays there, a training one trains on."""
    ours, was = models[1], models[1].training
    ids = random_ids(ours.config.vocab_size, seed=int(torch.randint(0, 2**31, ())))
    try:
        for training in (False, True):
            ours.train(training)
            activation_stats(ours, {"input_ids": ids})
            assert ours.training is training and all(m.training is training for m in ours.modules())
    finally:
        ours.train(was)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_give_one_process_s_figures(tmp_path, data_dir, mode):
    """The same global batch (2 x 2 rows against 4): each rank measures its rows, the figures are all of them."""
    common = ["train.max_steps=2", "train.eval_every=2", "train.log_activation_stats=true",
              "data.document_masking=true"]
    one = run_script("pretrain", "--data", data_dir, "--out", tmp_path / "one",
                     *set_arguments(*common, "train.micro_batch_size=4"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_torchrun(ROOT / "scripts" / "pretrain.py", "--data", data_dir, "--out", tmp_path / "two",
                       *set_arguments(*common, "train.micro_batch_size=2", f"train.distributed=\"{mode}\""))
    assert two.returncode == 0, two.stderr[-3000:]
    (a,), (b,) = eval_records(tmp_path / "one"), eval_records(tmp_path / "two")
    names = [f"{kind}/layers.{i}" for kind in KINDS for i in range(2)]
    assert [b[name] for name in names] == pytest.approx([a[name] for name in names], rel=1e-5)
