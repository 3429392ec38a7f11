"""YaRN rotary scaling against transformers' Llama (fp32 CPU) on sequences past the pretraining context: logits,
gradients, greedy decoding with the KV cache, the Triton kernels, packed documents, round trips and refusals."""

import json

import pytest
import torch
import transformers
from generation_helpers import hf_generation_model, hf_greedy, left_padded
from helpers import load_script
from hf_reference import hf_causal_lm, to_ttl
from test_model_parity import assert_loss_and_grads_match

import ttl_core
from ttl_core.attention import document_layout
from ttl_core.config import yarn_factor
from ttl_core.errors import ConfigError
from ttl_core.rope import rope_attention_factor, rope_inverse_frequencies

# (max_position_embeddings, rope block): transformers' defaults (the pretraining context is max_position_embeddings,
# betas 32 and 1, truncated), other betas untruncated, the mscale ratio, an mscale transformers ignores alone, and a
# null factor (the context ratio) under an explicit attention_factor
YARN_CASES = {
    "defaults": (32, {"factor": 2.0}),
    "betas_untruncated": (64, {"factor": 3.0, "original_max_position_embeddings": 16, "beta_fast": 8,
                               "beta_slow": 2, "truncate": False}),
    "mscale_ratio": (64, {"factor": 8.0, "original_max_position_embeddings": 16, "mscale": 0.707,
                          "mscale_all_dim": 1.0}),
    "mscale_alone": (64, {"factor": 4.0, "original_max_position_embeddings": 16, "mscale": 2.0}),
    "null_factor": (64, {"factor": None, "original_max_position_embeddings": 16, "attention_factor": 1.3}),
}


def yarn_overrides(case: str) -> dict:
    context, block = YARN_CASES[case]
    return dict(max_position_embeddings=context, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, **block})


def random_ids(shape, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, 131, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(YARN_CASES))
def test_yarn_logits_and_gradients_match_transformers_past_the_original_context(case, tmp_path):
    hf = hf_causal_lm(**yarn_overrides(case))
    ours = to_ttl(hf, tmp_path)
    ids = random_ids((2, 40))
    assert ids.shape[1] > ours.config.rope_scaling["original_max_position_embeddings"]
    rotary = ours.backbone.rotary
    assert torch.equal(rotary.inv_freq_bits.view(torch.float32), hf.model.rotary_emb.inv_freq)
    assert rotary.attention_factor == hf.model.rotary_emb.attention_scaling != 1.0
    with torch.no_grad():
        ref = hf(ids).logits
        # measured: at most 1.9e-6 over the cases (fp32, the same math in another order)
        assert (ours(ids).logits - ref).abs().max() <= 1e-5
        assert ref.abs().max() > 0.5  # logits are O(1), so the tolerance means something
        rotary.attention_factor = 1.0  # the tolerance sees an attention factor left out
        assert (ours(ids).logits - ref).abs().max() > 1e-3
        rotary.attention_factor = hf.model.rotary_emb.attention_scaling
    assert_loss_and_grads_match(hf, ours, ids)


def test_a_bf16_yarn_checkpoint_gives_transformers_logits_bit_for_bit(tmp_path):
    """The attention factor multiplies cos and sin in fp32, before their cast to the model's dtype, as transformers'."""
    hf_causal_lm(**yarn_overrides("mscale_ratio")).to(torch.bfloat16).save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # its rotary tables in fp32
    ids = random_ids((2, 40))
    with torch.no_grad():
        assert torch.equal(ttl_core.load_pretrained(tmp_path)(ids).logits, theirs(ids).logits)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_yarn_greedy_decoding_with_the_kv_cache_matches_transformers(kernels, tmp_path):
    """The cache's angle table and (Triton) rotary_into_cache take the scaled cos and sin, past the original context."""
    hf = hf_generation_model(**yarn_overrides("mscale_ratio"))
    hf.save_pretrained(tmp_path)
    ours = ttl_core.load_pretrained(tmp_path, kernels=kernels)
    batch = 3 if kernels == "torch" else 1  # the interpreter is slow
    ids, mask = left_padded(hf.config.vocab_size, batch=batch)
    new = 24 if kernels == "torch" else 10
    ref = hf_greedy(hf, ids, mask, max_new_tokens=new, eos_token_id=[])
    assert ref.shape[1] > 16
    assert torch.equal(ttl_core.generate(ours, ids, mask, max_new_tokens=new, eos_token_id=[]), ref)


@pytest.mark.gpu
def test_cuda_graph_yarn_decoding_matches_transformers(tmp_path):
    """On the GPU in float32, past the original context of 16, graphed and eager decoding give transformers' tokens:
    the captured graph replays the cache's angle table with the attention factor in it."""
    hf = hf_generation_model(**yarn_overrides("mscale_ratio"))  # a context of 64
    hf.save_pretrained(tmp_path)
    hf, ours = hf.cuda(), ttl_core.load_pretrained(tmp_path, device="cuda")
    ids, mask = (tensor.cuda() for tensor in left_padded(hf.config.vocab_size))
    ref = hf_greedy(hf, ids, mask, max_new_tokens=40, eos_token_id=[])
    assert ref.shape[1] > 16
    for cuda_graph in (True, False):
        assert torch.equal(ttl_core.generate(ours, ids, mask, max_new_tokens=40, eos_token_id=[],
                                             cuda_graph=cuda_graph), ref), cuda_graph

def test_yarn_triton_kernels_match_transformers(tmp_path):
    """The Triton rotary (on the fused q/k/v, forward and backward) and attention kernels, in the interpreter."""
    hf = hf_causal_lm(**yarn_overrides("betas_untruncated"), num_hidden_layers=1)
    ours = to_ttl(hf, tmp_path, kernels="triton", attention="triton")
    ids = random_ids((1, 24), seed=2)
    with torch.no_grad():  # measured: at most 4.2e-6 over the cases
        assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-5
    assert_loss_and_grads_match(hf, ours, ids)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "triton"])
def test_yarn_packed_documents_give_each_document_alone(attention, tmp_path):
    ours = to_ttl(hf_causal_lm(**yarn_overrides("mscale_ratio")), tmp_path, attention=attention)
    starts = torch.zeros(1, 45, dtype=torch.bool)
    starts[0, [20, 39]] = True  # documents of 20 (past the original 16), 19 and 6 tokens
    position_ids, cu_seqlens, max_seqlen = document_layout(starts)
    ids = random_ids(starts.shape, seed=3)
    with torch.no_grad():
        packed = ours(ids, position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen).logits
        for start, end in ((0, 20), (20, 39), (39, 45)):
            assert (packed[:, start:end] - ours(ids[:, start:end]).logits).abs().max() <= 1e-5


def test_yarn_round_trips_through_save_convert_and_transformers(tmp_path):
    """to_hf_dict writes what transformers reads back to the same scaling; convert.py takes such checkpoints both
    ways, and what it writes gives transformers' logits bit for bit."""
    hf = hf_causal_lm(**yarn_overrides("betas_untruncated"))
    hf.save_pretrained(tmp_path / "src")
    config = ttl_core.load_pretrained(tmp_path / "src").config
    exported = config.to_hf_dict()
    assert ttl_core.LlamaConfig.from_hf_dict(json.loads(json.dumps(exported))) == config
    reread = transformers.LlamaConfig.from_dict(exported)
    assert reread.rope_parameters == hf.config.rope_parameters == {**config.rope_scaling, "rope_theta": 1e4}
    convert = load_script("convert")
    convert.main(["--from-hf", str(tmp_path / "src"), str(tmp_path / "native")])
    convert.main(["--to-hf", str(tmp_path / "native"), str(tmp_path / "out")])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert theirs.model.rotary_emb.attention_scaling == hf.model.rotary_emb.attention_scaling
    ids = random_ids((2, 30), seed=4)
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, hf(ids).logits)


@pytest.mark.parametrize("context, block", [
    (1024, {"factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 10.0}),
    (131072, {"factor": 2.0, "original_max_position_embeddings": 65536, "beta_slow": 2}),
])
def test_a_yarn_ramp_ending_past_the_last_pair_gives_transformers_frequencies(context, block):
    """A small rope_theta or a long pretraining context puts the slow end of the ramp past the last pair (13 and 8 of
    a 16-dim head's 8 pairs here): transformers clamps it to head_dim - 1, not to the last pair, which changes the
    ramp's slope over every pair. The frequencies and the attention factor are transformers' to the bit."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = {"max_position_embeddings": context, "hidden_size": 64, "num_attention_heads": 4,
          "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, **block}}
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](transformers.LlamaConfig(**hf), "cpu")
    ours = ttl_core.LlamaConfig.from_hf_dict(hf)
    assert torch.equal(rope_inverse_frequencies(ours), inv_freq)
    assert rope_attention_factor(ours) == attention_factor


@pytest.mark.parametrize("block, message", [
    ({"factor": 0.5}, r"factor of type 'yarn' must be >= 1, got 0.5"),
    ({"factor": "2"}, r"factor must be a positive finite number, got '2'"),
    ({}, r"rope_scaling of type 'yarn' lacks factor"),
    ({"factor": 2.0, "original_max_position_embeddings": None}, r"original_max_position_embeddings must be a posit"),
    ({"factor": 2.0, "beta_fast": 1, "beta_slow": 4}, r"beta_fast 1 is below beta_slow 4"),
    ({"factor": 2.0, "beta_slow": 40}, r"beta_fast None is below beta_slow 40 \(null: 32 and 1\)"),
    ({"factor": 2.0, "beta_fast": -3}, r"beta_fast must be a positive finite number, got -3"),
    ({"factor": 2.0, "mscale": -1, "mscale_all_dim": 1}, r"mscale must be a finite number >= 0, got -1"),
    ({"factor": 2.0, "attention_factor": 0.0}, r"attention_factor must be a positive finite number, got 0.0"),
    ({"factor": 2.0, "truncate": None}, r"truncate must be true or false, got None"),
    ({"factor": 2.0, "truncate": "false"}, r"truncate must be true or false, got 'false'"),
    ({"factor": 2.0, "partial_rotary_factor": 0.5}, r"partial_rotary_factor 0.5 is not supported"),
])
def test_bad_yarn_parameters_are_refused_by_name(block, message):
    with pytest.raises(ConfigError, match=message):
        ttl_core.LlamaConfig.from_hf_dict({"rope_parameters": {"rope_type": "yarn", **block}})


def test_a_null_yarn_factor_below_1_is_refused_as_a_written_one_is():
    """A null factor is the context's ratio to the pretraining one: a context shorter than that is a factor below 1
    (every pair turning faster than in pretraining), refused as `"factor": 0.5` is."""
    block = {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4096}
    with pytest.raises(ConfigError, match=r"factor of type 'yarn' must be >= 1, got 0.5 \(null: max_position_embedd"
                                          r"ings 2048 / original_max_position_embeddings 4096\)$"):
        ttl_core.LlamaConfig.from_hf_dict({"max_position_embeddings": 2048, "rope_parameters": block})
    config = ttl_core.LlamaConfig.from_hf_dict({"max_position_embeddings": 8192, "rope_parameters": block})
    assert yarn_factor(config.rope_scaling, config.max_position_embeddings) == 2.0


def test_keys_yarn_does_not_read_are_kept_with_a_warning():
    """Nous' YaRN Llama 2 configs carry `finetuned`, which transformers ignores with a warning too."""
    with pytest.warns(UserWarning, match="rope_scaling keys finetuned mean nothing to yarn"):
        config = ttl_core.LlamaConfig.from_hf_dict({"rope_scaling": {"type": "yarn", "factor": 32.0,
                                                                     "original_max_position_embeddings": 4096,
                                                                     "finetuned": True}})
    assert config.to_hf_dict()["rope_scaling"]["finetuned"] is True


def test_dynamic_ntk_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"unsupported rope type 'dynamic'; .*longest sequence seen; docs/models.md"):
        ttl_core.LlamaConfig.from_hf_dict({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})


@pytest.mark.parametrize("config, message", [
    ({"partial_rotary_factor": 0.5}, r"^partial_rotary_factor 0.5 is not supported"),
    ({"original_max_position_embeddings": None}, r"original_max_position_embeddings must be a positive .*got None$"),
    ({"rope_theta": None}, r"^rope_theta must be a number, got None$"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": None},
      "rope_theta": 5e5}, r"^rope_theta must be a number, got None$"),
])
def test_top_level_rotary_keys_transformers_moves_into_the_block_are_refused_where_it_fails(config, message):
    """transformers moves a top-level partial_rotary_factor and original_max_position_embeddings into the scaling
    block and takes a null rope_theta as given: its model then fails (cos and sin of half the head; None / int), so
    these configs are refused, not run with full rotary or a default in their place."""
    with pytest.raises(ConfigError, match=message):
        ttl_core.LlamaConfig.from_hf_dict({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}, **config})


def test_a_top_level_original_context_joins_llama3_and_yarn_blocks_alone():
    """As transformers' rotary set-up: a linear block is left as written, not given a key it warns about."""
    hf = {"max_position_embeddings": 64, "original_max_position_embeddings": 16}
    for block in ({"rope_type": "linear", "factor": 2.0}, {"rope_type": "yarn", "factor": 2.0}):
        theirs = transformers.LlamaConfig(**hf, rope_scaling=dict(block))
        theirs.standardize_rope_params()  # as its rotary embedding does, once the top-level key is an attribute
        ours = ttl_core.LlamaConfig.from_hf_dict({**hf, "rope_scaling": dict(block)}).to_hf_dict()["rope_parameters"]
        assert ours == theirs.rope_parameters
