"""Differential fuzzing against transformers: random micro Llamas whose features meet (grouped-query attention with
an explicit head_dim, biases, tied heads, each rotary scaling, padding ids, both heads), each drawn from a fixed seed
and run on random padded batches through an attention backend and kernel path the CPU runs. The other parity tests
change one feature at a time; these catch what breaks where two meet."""

import random

import pytest
import torch
import transformers
from helpers import rel_err
from hf_reference import randomize_
from test_model_parity import hf_grads_in_ttl_layout

import ttl_core
from ttl_kernels.flash_attention import HEAD_DIMS

SEEDS = range(24)  # together about 20 s of one core


def draw_config(rng: random.Random, max_layers: int) -> tuple[dict, str]:
    """transformers LlamaConfig fields and an architecture, with the rarer features drawn often enough to meet."""
    heads = rng.choice([1, 2, 3, 4, 6])
    kv_heads = rng.choice([d for d in range(1, heads + 1) if heads % d == 0])
    hidden = rng.choice([h for h in range(16, 97, 2) if h % heads == 0 and (h // heads) % 2 == 0])
    vocab = rng.choice([v for v in range(29, 200) if v % 8])
    max_positions = rng.choice([32, 64, 128])
    fields = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=rng.randint(8, 100),
                  num_hidden_layers=rng.randint(1, max_layers), num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_positions, rms_norm_eps=10 ** rng.uniform(-7, -3),
                  rope_theta=10 ** rng.uniform(2, 6), tie_word_embeddings=rng.random() < 0.4,
                  attention_bias=rng.random() < 0.4, mlp_bias=rng.random() < 0.4,
                  pad_token_id=rng.choice([None, -1, rng.randrange(vocab)]))
    if rng.random() < 0.5:  # transformers takes a head_dim that is not hidden_size / heads
        fields["head_dim"] = rng.choice([12, 16, 32])
    original = rng.randint(8, max_positions)
    fields["rope_scaling"] = rng.choice([
        None,
        {"rope_type": "linear", "factor": rng.uniform(0.5, 8)},
        {"rope_type": "llama3", "factor": rng.uniform(1, 16), "low_freq_factor": 1.0,
         "high_freq_factor": rng.uniform(1.5, 6), "original_max_position_embeddings": original},
        {"rope_type": "yarn", "factor": rng.choice([None, rng.uniform(1, 8)]), "original_max_position_embeddings":
         original, "beta_fast": rng.uniform(8, 40), "beta_slow": rng.uniform(0.5, 4), "truncate": rng.random() < 0.5,
         **({"mscale": rng.uniform(0.1, 2), "mscale_all_dim": rng.uniform(0.1, 2)} if rng.random() < 0.5 else {})},
    ])
    if rng.random() < 0.6:
        return fields, "LlamaForCausalLM"
    problem = rng.choice([None, "regression", "single_label_classification", "multi_label_classification"])
    fields["num_labels"] = 1 if problem == "regression" else rng.randint(2, 4)
    return {**fields, "problem_type": problem}, "LlamaForSequenceClassification"


def draw_batch(rng: random.Random, gen: torch.Generator, fields: dict, classifier: bool, max_seq: int):
    """Token ids, an attention mask (None, all ones, or rows padded left or right) and position ids (None, or
    consecutive from a random start: transformers reads a jump without a mask as a new packed document)."""
    vocab, pad = fields["vocab_size"], fields["pad_token_id"]
    batch = 1 if classifier and pad is None else rng.randint(1, 4)  # transformers pools a batch by its pad id
    seq = rng.randint(2, max_seq)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask_kind = rng.choice(["none", "ones", "padded"])
    for row in range(batch if mask_kind == "padded" else 0):
        padding = rng.randint(0, seq - 1)
        mask[row, slice(0, padding) if rng.random() < 0.5 else slice(seq - padding, seq)] = 0
    if pad is not None:
        ids[ids == pad % vocab] = (pad + 1) % vocab
        ids[mask == 0] = pad % vocab
    positions = None
    if rng.random() < 0.4:
        positions = torch.randint(0, fields["max_position_embeddings"] - seq + 1, (batch, 1), generator=gen)
        positions = positions + torch.arange(seq)
    return ids, None if mask_kind == "none" else mask, positions


def draw_labels(gen: torch.Generator, fields: dict, classifier: bool, ids: torch.Tensor, mask: torch.Tensor | None):
    """A causal LM's token labels, or a classifier's targets of the kind its problem type (None: class ids) takes."""
    if not classifier:  # padding and a tenth of the tokens besides are ignored
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
        return labels.masked_fill(torch.rand(ids.shape, generator=gen) < 0.1, -100)
    batch, problem = len(ids), fields["problem_type"]
    if problem == "regression":
        return torch.randn(batch, generator=gen)
    if problem == "multi_label_classification":
        return (torch.rand(batch, fields["num_labels"], generator=gen) < 0.5).float()
    return torch.randint(0, fields["num_labels"], (batch,), generator=gen)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_micro_llama_matches_transformers_and_round_trips(seed, tmp_path):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    kernels = "triton" if rng.random() < 0.25 else "torch"
    small = kernels == "triton"  # the interpreter runs a program per row and kernel: seconds for a larger model
    fields, architecture = draw_config(rng, max_layers=1 if small else 3)
    classifier = architecture == "LlamaForSequenceClassification"
    head_dim = fields.get("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    backend = rng.choice(["eager", "sdpa"] + (["triton"] * 2 if head_dim in HEAD_DIMS else []))
    hf_class = getattr(transformers, architecture)
    hf_attention = "eager" if backend == "eager" else "sdpa"  # our Triton kernel leaves a masked call to SDPA
    torch.manual_seed(seed)
    randomize_(hf_class(transformers.LlamaConfig(**fields)), seed).save_pretrained(tmp_path / "src")
    theirs = hf_class.from_pretrained(tmp_path / "src", attn_implementation=hf_attention)
    ours = ttl_core.load_pretrained(tmp_path / "src", attention=backend, kernels=kernels)
    ids, mask, positions = draw_batch(rng, gen, fields, classifier, max_seq=6 if small else 16)
    labels = draw_labels(gen, fields, classifier, ids, mask)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions)
    case = f"{architecture} {backend} attention, {kernels} kernels, {fields}"

    with torch.no_grad():
        expected, got = theirs(**inputs, use_cache=False).logits, ours(**inputs).logits
    real = slice(None) if classifier or mask is None else mask.bool()  # a padding query's output is unused
    assert (got - expected)[real].abs().max() <= 1e-4, case
    assert classifier or expected.abs().max() > 0.5, case  # logits of some size, so the tolerance means something

    their_loss, our_loss = theirs(**inputs, labels=labels, use_cache=False).loss, ours(**inputs, labels=labels).loss
    assert abs(our_loss.item() - their_loss.item()) <= 1e-5 * max(1.0, abs(their_loss.item())), case
    their_loss.backward()
    our_loss.backward()
    params = dict(ours.named_parameters())
    for name, their_grad in hf_grads_in_ttl_layout(theirs, ours.config, architecture).items():
        # relative to the largest entry, which is 0 where no labelled position reaches the weight
        assert (params[name].grad - their_grad).abs().max() <= 1e-4 * their_grad.abs().max(), (name, case)

    ttl_core.save_pretrained(ours, tmp_path / "out")
    back = hf_class.from_pretrained(tmp_path / "out", attn_implementation=hf_attention)
    with torch.no_grad():
        assert torch.equal(back(**inputs, use_cache=False).logits, expected), case
    again = ttl_core.load_pretrained(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values(), strict=True))
    assert again.config.to_hf_dict(architecture) == ours.config.to_hf_dict(architecture), case

    if kernels == "torch" and rng.random() < 0.4:  # the Triton kernels round in other places; the references do not
        back.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
        theirs = hf_class.from_pretrained(tmp_path / "bf16", attn_implementation=hf_attention)
        ours = ttl_core.load_pretrained(tmp_path / "bf16", attention=backend, kernels=kernels)
        with torch.no_grad():
            expected, got = theirs(**inputs, use_cache=False).logits, ours(**inputs).logits
        assert got.dtype == torch.bfloat16 and rel_err(got[real], expected[real]) <= 1e-2, case
