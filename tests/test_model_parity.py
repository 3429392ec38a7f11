"""ttl's model against transformers' Llama on random tiny configs (fp32 CPU unless stated)."""

import re

import pytest
import torch
import transformers
from helpers import rel_err
import hf_reference
from hf_reference import hf_causal_lm, padded_batch, to_ttl

import ttl_core
from ttl_core.attention import document_layout
from ttl_core.errors import ConfigError
from ttl_core.kv_cache import StaticKVCache
from ttl_core.hf import hf_plan

CAUSAL_CASES = {
    "gqa": {},
    "mha": dict(num_key_value_heads=4),
    "mqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "theta_500k": dict(rope_theta=500000.0),
    "odd_sizes": dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3, intermediate_size=77,
                      vocab_size=97),
    "bias": dict(attention_bias=True, mlp_bias=True),
    "head_dim_override": dict(head_dim=32, num_attention_heads=4, num_key_value_heads=2),
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope_llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("case", list(CAUSAL_CASES))
def test_causal_lm_logits_loss_and_grads_match_transformers(case, tmp_path):
    hf = hf_causal_lm(**CAUSAL_CASES[case])
    ours = to_ttl(hf, tmp_path)
    vocab = hf.config.vocab_size
    ids, mask = padded_batch(vocab, pad=3)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
        assert torch.isfinite(got).all()
        assert (ref - got).abs().max() <= 1e-4
        assert ref.abs().max() > 0.5  # logits are O(1), so the tolerance means something
        ref_masked = hf(ids, attention_mask=mask).logits
        got_masked = ours(ids, attention_mask=mask).logits
        real = mask.bool()
        assert (ref_masked[real] - got_masked[real]).abs().max() <= 1e-4

    assert_loss_and_grads_match(hf, ours, ids, mask)


def assert_loss_and_grads_match(hf, ours, ids: torch.Tensor, mask: torch.Tensor | None = None, **packed) -> None:
    """Loss and every parameter's gradient under the usual recipe, labels = ids with padding ignored, in
    which the last left-padding position (a query that sees no key) still predicts the first real token.
    Packed rows (`packed`: document_layout's position_ids, cu_seqlens, max_seqlen) go to transformers as their
    position_ids alone, from whose restarts it keeps the documents apart when it has no mask and no cache."""
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    hf.zero_grad()
    ref_loss = hf(ids, attention_mask=mask, position_ids=packed.get("position_ids"), labels=labels,
                  use_cache=False).loss
    ref_loss.backward()
    loss = ours(ids, attention_mask=mask, labels=labels, **packed).loss
    loss.backward()
    assert abs(ref_loss.item() - loss.item()) <= 1e-5

    ours_params = dict(ours.named_parameters())
    for name, hf_grad in hf_grads_in_ttl_layout(hf, ours.config).items():
        # measured: under 1.1e-6 of the largest entry (fp32, the same math summed in another order)
        assert rel_err(ours_params[name].grad, hf_grad) <= 1e-5, name


def hf_grads_in_ttl_layout(hf, config: ttl_core.LlamaConfig, architecture: str = "LlamaForCausalLM") -> dict:
    """transformers' gradients under ttl's parameter names, the pieces of a fused weight (q, k, v) stacked."""
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    return {name: torch.cat([hf_grads[key] for key, _ in pieces])
            for name, pieces in hf_plan(config, architecture).items()}


def test_bf16_gradients_are_as_close_to_float64_as_transformers(tmp_path):
    """The fp32 parity above cannot see a gradient that goes wrong in bf16 only (e.g. a bf16 branch that detaches).
    A bf16 checkpoint loaded by both libraries (logits and loss bit for bit the same, see below): ttl's gradients
    are no further from the float64 model than transformers' are (flash-attn's criterion: at most twice that
    error; both are about 2.5e-2 off, 1.3 times apart at most over 4 seeds)."""
    hf_causal_lm().to(torch.bfloat16).save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)  # its rotary tables in fp32, as ttl's
    ids, mask = padded_batch(hf.config.vocab_size, pad=3)
    truth, ours = ttl_core.load_pretrained(tmp_path).double(), ttl_core.load_pretrained(tmp_path)
    for model in (truth, ours, hf):
        model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    hf_grads = hf_grads_in_ttl_layout(hf, ours.config)
    for (name, p), ours_p in zip(truth.named_parameters(), ours.parameters(), strict=True):
        assert ours_p.grad.dtype == torch.bfloat16, name
        assert rel_err(ours_p.grad, p.grad) <= 2 * rel_err(hf_grads[name], p.grad), name


@pytest.mark.parametrize("attention", ["sdpa", "eager", "triton"])
def test_packed_rows_give_transformers_logits_from_its_position_id_restarts(tmp_path, attention):
    """The documents ttl keeps apart by cu_seqlens are those transformers finds where position_ids restart:
    logits, loss and gradients agree on rows of one, two and five documents, some of a single token."""
    hf = hf_causal_lm()
    ours = to_ttl(hf, tmp_path, attention=attention)
    starts = torch.zeros(3, 11, dtype=torch.bool)
    starts[1, 4] = True
    starts[2, [1, 2, 6, 10]] = True
    position_ids, cu_seqlens, max_seqlen = document_layout(starts)
    ids = torch.randint(4, hf.config.vocab_size, starts.shape)
    with torch.no_grad():
        ref = hf(ids, position_ids=position_ids, use_cache=False).logits
        got = ours(ids, position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen).logits
        assert (got - ref).abs().max() <= 1e-4
        assert (ours(ids, position_ids=position_ids).logits - ref).abs().max() > 1e-2  # not one document a row
    assert_loss_and_grads_match(hf, ours, ids, position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def test_a_chunk_after_cached_keys_takes_the_last_positions_of_a_2d_mask(tmp_path):
    """A (batch, kv_len) `attention_mask` with a KV cache holding earlier tokens (chunked prefill): the new
    tokens are the mask's last positions, so their logits are those of one pass over the whole batch."""
    hf = hf_causal_lm()
    ours = to_ttl(hf, tmp_path)
    ids, mask = padded_batch(hf.config.vocab_size, pad=3)
    batch, seq = ids.shape
    split = 10
    cache = StaticKVCache(ours.config, batch, seq, ids.device, torch.float32)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        cache.write_index, cache.visible = torch.arange(split), split
        ours(ids[:, :split], attention_mask=mask[:, :split], kv_cache=cache)
        cache.write_index, cache.visible = torch.arange(split, seq), seq
        positions = torch.arange(split, seq)[None].expand(batch, -1)
        got = ours(ids[:, split:], attention_mask=mask, position_ids=positions, kv_cache=cache).logits
    real = mask[:, split:].bool()
    assert (got[real] - ref[:, split:][real]).abs().max() <= 1e-4


def refused_for_input_ids_2x5(argument: str, value: torch.Tensor, classes=(ttl_core.LlamaForCausalLM,)) -> None:
    config = ttl_core.LlamaConfig.from_preset("tiny", hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                              vocab_size=50)
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    message = rf"{argument} shape {re.escape(str(tuple(value.shape)))} does not fit input_ids shape \(2, 5\)"
    for model_class in classes:
        with pytest.raises(ConfigError, match=message):
            model_class(config)(ids, **{argument: value})


@pytest.mark.parametrize("shape", [(2, 4), (3, 5), (2, 6), (5,), (2, 1, 5)])
def test_an_attention_mask_that_does_not_fit_input_ids_is_named(shape):
    """A mask of another batch or length, or without its batch dimension, is refused by name rather than with a
    broadcasting or dtype error from inside attention; a 2-d mask may be longer only over cached keys."""
    refused_for_input_ids_2x5("attention_mask", torch.ones(shape, dtype=torch.long),
                              (ttl_core.LlamaForCausalLM, ttl_core.LlamaForSequenceClassification))


@pytest.mark.parametrize("shape", [(2, 4), (3, 5), (5, 1), (2, 1, 5), (4,)])
def test_position_ids_that_do_not_fit_input_ids_are_named(shape):
    """Positions are (batch or 1, seq) or (seq,); others were refused by the rotary kernel, naming its cos/sin."""
    refused_for_input_ids_2x5("position_ids", torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("shape", [(2, 1, 5, 4), (2, 1, 5, 6), (3, 1, 5, 5), (2, 1, 4, 5), (2, 3, 5, 5), (2, 5, 5)])
def test_a_4d_attention_mask_that_does_not_fit_input_ids_is_named(shape):
    """A ready mask is (batch or 1, 1 or heads, seq or 1, seq); any other shape is refused by name, not left to a
    broadcasting error from inside attention (or, broadcast, to attend over the wrong keys)."""
    refused_for_input_ids_2x5("attention_mask", torch.ones(shape, dtype=torch.bool))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_ready_4d_mask_gives_transformers_logits_and_an_integer_one_is_refused(tmp_path, attention):
    """transformers takes a 4-d mask as it is: boolean (True attends) or additive. An integer 0/1 mask is
    neither: SDPA fails deep inside torch and the eager path added it to the scores, attending everywhere."""
    hf = hf_causal_lm()
    ours = to_ttl(hf, tmp_path, attention=attention)
    ids, mask = padded_batch(hf.config.vocab_size, pad=3)
    allowed = torch.tril(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool)) & mask.bool()[:, None, None, :]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    real = mask.bool()
    with torch.no_grad():
        for ready in (allowed, additive):
            got, ref = ours(ids, attention_mask=ready).logits, hf(ids, attention_mask=ready).logits
            assert (got - ref)[real].abs().max() <= 1e-4
        per_head = allowed.expand(-1, hf.config.num_attention_heads, -1, -1)  # (batch, heads, seq, seq) fits too
        assert (ours(ids, attention_mask=per_head).logits - got)[real].abs().max() <= 1e-5
        with pytest.raises(ConfigError,
                           match=r"a 4-d attention_mask must be boolean .* or additive .*, got torch.int64"):
            ours(ids, attention_mask=allowed.long())


def test_eager_backend_matches_transformers_eager(tmp_path):
    hf = hf_causal_lm()
    hf.config._attn_implementation = "eager"
    ours = to_ttl(hf, tmp_path, attention="eager")
    ids, mask = padded_batch(hf.config.vocab_size, pad=3)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert (ref - got)[mask.bool()].abs().max() <= 1e-4
    assert_loss_and_grads_match(hf, ours, ids, mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 48, 64])
def test_eager_attention_is_bit_identical_to_transformers_eager_in_low_precision(dtype, head_dim):
    """In bf16/fp16 the order of roundings decides the last bits: the scores are scaled in the input dtype
    before the fp32 softmax, as transformers does (head_dim 32 and 48 have scales that are not powers of two),
    with GQA and a padded causal mask (its fully masked rows included); the gradients too, which a softmax left in
    bf16/fp16 rounds while its CPU forward stays the same."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from ttl_core.attention import causal_mask, eager_attention
    gen = torch.Generator().manual_seed(head_dim)
    q = torch.randn(2, 9, 4, head_dim, generator=gen).mul(2).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 9, 2, head_dim, generator=gen).mul(2).to(dtype).requires_grad_() for _ in range(2))
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, :3] = False
    allowed = causal_mask(9, 9, q.device) & padding[:, None, None, :]
    additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    module = type("Attention", (), {"num_key_value_groups": 2, "training": False})()
    ref, _ = eager_attention_forward(module, *(t.transpose(1, 2) for t in (q, k, v)), additive,
                                     scaling=head_dim ** -0.5)
    got = eager_attention(q, k, v, allowed)
    assert got.dtype == dtype and torch.equal(got, ref)
    grad_out = torch.randn(got.shape, generator=gen).to(dtype)
    grads = [torch.autograd.grad(out, (q, k, v), grad_out) for out in (got, ref)]
    assert all(map(torch.equal, *grads))


def test_bf16_logits_error_no_worse_than_transformers_bf16(tmp_path):
    """bf16 rounding alone moves these O(1) logits by ~1.7% (transformers' own bf16 model too), so the
    criterion is flash-attn's: our bf16 error against the fp32 reference within 1.25x transformers'."""
    hf = hf_causal_lm()
    ours = to_ttl(hf, tmp_path, dtype=torch.bfloat16)
    assert ours.backbone.embed.weight.dtype == torch.bfloat16
    ids, _ = padded_batch(hf.config.vocab_size, pad=3)
    with torch.no_grad():
        exact = hf(ids).logits
        hf_error = (hf.to(torch.bfloat16)(ids).logits.float() - exact).norm() / exact.norm()
        got = ours(ids).logits.float()
    assert torch.isfinite(got).all()
    our_error = (got - exact).norm() / exact.norm()
    assert our_error <= 1.25 * hf_error and our_error < 0.03


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_autocast_forward_is_transformers_own(tmp_path, attention):
    """ttl trains fp32 weights under bf16 autocast. There transformers' rotary multiplies the bf16 queries and
    keys by its fp32 cos/sin (type promotion: fp32 products, rounded once), and so must ttl: rounding the
    tables to bf16 first moved the logits 0.07 from transformers' (bf16 values of about 5)."""
    hf = hf_causal_lm()
    hf.config._attn_implementation = attention
    ours = to_ttl(hf, tmp_path, attention=attention, kernels="torch")
    ids, mask = padded_batch(hf.config.vocab_size, pad=3)
    real = mask.bool()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert got.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(got[real], expected[real])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_checkpoint_gives_transformers_logits_bit_for_bit(tmp_path, dtype):
    """Loaded by both libraries in its stored dtype, with fp32 rotary tables in both (as from_pretrained makes
    them), a bf16 or fp16 checkpoint gives transformers' own logits and loss."""
    hf_causal_lm().to(dtype).save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = ttl_core.load_pretrained(tmp_path, kernels="torch")
    ids, mask = padded_batch(theirs.config.vocab_size, pad=3)
    labels, real = ids.masked_fill(mask == 0, -100), mask.bool()
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask, labels=labels)
        got = ours(ids, attention_mask=mask, labels=labels, return_logits=True)
    assert got.logits.dtype == dtype and torch.equal(got.logits[real], expected.logits[real])
    assert got.loss.item() == expected.loss.item()


def test_logits_to_keep_and_return_logits(tmp_path):
    ours = to_ttl(hf_causal_lm(), tmp_path)
    ids, _ = padded_batch(131, pad=3)
    with torch.no_grad():
        full = ours(ids).logits
        last = ours(ids, logits_to_keep=1).logits
        with_loss = ours(ids, labels=ids)
        both = ours(ids, labels=ids, return_logits=True)
    assert torch.equal(last, full[:, -1:])
    assert with_loss.logits is None and with_loss.loss is not None
    assert torch.equal(both.logits, full) and torch.equal(both.loss, with_loss.loss)


def test_sum_reduction_equals_mean_times_count(tmp_path):
    ours = to_ttl(hf_causal_lm(), tmp_path)
    ids, mask = padded_batch(131, pad=3)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        mean = ours(ids, labels=labels).loss
        total = ours(ids, labels=labels, loss_reduction="sum").loss
    count = (labels[:, 1:] != -100).sum()
    assert torch.allclose(total, mean * count, rtol=1e-6)


def test_ttl_160m_preset_builds_counts_and_trains_on_cpu():
    config = ttl_core.LlamaConfig.from_preset("ttl-160m")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (768, 3072, 12)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (12, 12, 32000)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 3)
    assert config.rms_norm_eps == 1e-5 and config.rope_theta == 10000.0 and not config.tie_word_embeddings
    torch.manual_seed(0)
    model = ttl_core.LlamaForCausalLM(config)
    assert model.num_parameters() == 162_417_408
    ids = torch.randint(0, 32000, (1, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(32000.0)).item()) < 0.5
    assert all(p.grad is not None for p in model.parameters())
    big = ttl_core.LlamaConfig.from_preset("ttl-460m")
    with torch.device("meta"):
        assert ttl_core.LlamaForCausalLM(big).num_parameters() == 468_239_360


def test_a_preset_with_another_head_count_keeps_one_kv_head_per_head():
    """The presets have a key/value head per head (no GQA): overriding the head count alone keeps that, rather
    than pairing it with the preset's kv heads (a GQA nobody asked for, or an error naming num_key_value_heads,
    which the call never set)."""
    for preset, heads in (("tiny", 8), ("ttl-160m", 6)):
        assert ttl_core.LlamaConfig.from_preset(preset, num_attention_heads=heads).num_key_value_heads == heads
    gqa = ttl_core.LlamaConfig.from_preset("tiny", num_attention_heads=8, num_key_value_heads=2)
    assert gqa.num_key_value_heads == 2
    assert [ttl_core.LlamaConfig.from_preset(name).num_key_value_heads for name in ("ttl-160m", "ttl-460m", "tiny")] \
        == [12, 16, 4]


@pytest.mark.parametrize("architecture, overrides", [
    ("LlamaForCausalLM", {}), ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}), ("LlamaForSequenceClassification", {}),
    ("LlamaForCausalLM", {"hidden_size": 36, "num_attention_heads": 6, "intermediate_size": 30})])  # odd pieces
def test_a_model_built_after_a_seed_is_transformers_own_to_the_bit(architecture, overrides, tmp_path):
    """The same draws as transformers, in its order (a fused projection piece by piece: the last piece above has
    1080 weights, which normal_ draws in blocks of 16), so a run from scratch starts where transformers' does, and
    the global RNG is left where transformers leaves it, for what is drawn next (dropout masks, LoRA adapters)."""
    config = hf_reference.hf_config(**overrides, num_labels=3)
    torch.manual_seed(5)
    theirs = getattr(transformers, architecture)(config)
    their_next_draw = torch.rand(4)
    torch.manual_seed(5)
    ours = ttl_core.model.build_model(ttl_core.LlamaConfig.from_hf_dict(config.to_dict()), architecture)
    assert torch.equal(torch.rand(4), their_next_draw)
    head = ours.get_output_embeddings()
    assert head is None or (head.weight is ours.backbone.embed.weight) == config.tie_word_embeddings
    ttl_core.save_pretrained(ours, tmp_path)
    saved, expected = getattr(transformers, architecture).from_pretrained(tmp_path).state_dict(), theirs.state_dict()
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)


def test_init_weights_on_a_trained_model_resets_the_norms_too():
    """A re-initialization leaves nothing trained behind: transformers sets RMSNorm weights back to 1."""
    model = ttl_core.LlamaForCausalLM(ttl_core.LlamaConfig.from_preset("tiny", num_hidden_layers=1))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ttl_core.model.RMSNorm):
                module.weight.fill_(2.0)
    model.init_weights()
    assert all(torch.all(m.weight == 1) for m in model.modules() if isinstance(m, ttl_core.model.RMSNorm))


def test_resizing_keeps_the_rows_and_starts_new_ones_at_the_mean_with_too_few_rows_to_draw_around_it():
    """Growing keeps every row; new rows take the old rows' mean itself, as in transformers when (40 rows of 64
    dims) no positive definite covariance is there to draw around it. Frozen stays frozen; shrinking keeps the first."""
    torch.manual_seed(0)
    config = ttl_core.LlamaConfig.from_preset("tiny", vocab_size=40, hidden_size=64, intermediate_size=96,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    model = ttl_core.LlamaForCausalLM(config)
    model.backbone.embed.weight.requires_grad_(False)
    embed, head = model.backbone.embed.weight.clone(), model.lm_head.weight.clone()
    model.resize_token_embeddings(44)
    assert torch.equal(model.backbone.embed.weight[:40], embed) and torch.equal(model.lm_head.weight[:40], head)
    assert torch.allclose(model.backbone.embed.weight[40:], embed.mean(0).expand(4, -1))
    assert torch.allclose(model.lm_head.weight[40:], head.mean(0).expand(4, -1))
    assert not model.backbone.embed.weight.requires_grad and model.lm_head.weight.requires_grad
    model.resize_token_embeddings(30)
    assert torch.equal(model.backbone.embed.weight, embed[:30]) and torch.equal(model.lm_head.weight, head[:30])
    assert model.backbone.embed.padding_idx == 3 and model.config.vocab_size == 30
    assert model(torch.tensor([[5, 29]])).logits.shape == (1, 2, 30)


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_without_the_embedding_keeps_a_tied_head(tied):
    """The count MFU uses: a tied LM head still does a matmul per token, so only an untied table is left out."""
    config = ttl_core.LlamaConfig.from_preset("tiny", tie_word_embeddings=tied)
    with torch.device("meta"):
        model = ttl_core.LlamaForCausalLM(config)
    total, table = model.num_parameters(), config.vocab_size * config.hidden_size
    assert model.num_parameters(exclude_embedding=True) == (total if tied else total - table)


def test_rotary_frequencies_survive_dtype_casts():
    model = ttl_core.LlamaForCausalLM(ttl_core.LlamaConfig.from_preset("tiny"))
    before = model.backbone.rotary.inv_freq_bits.clone()
    model.to(torch.bfloat16)
    assert torch.equal(model.backbone.rotary.inv_freq_bits, before)
