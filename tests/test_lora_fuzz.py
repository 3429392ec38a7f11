"""LoRA against peft on random combinations of model and adapter settings, for the interactions the one-feature
tests leave out: a seed draws a micro Llama (GQA, tied embeddings, biases, causal LM or classifier) and PEFT LoRA
options ttl reproduces (rank and alpha, rsLoRA, DoRA, target lists, patterns and "all-linear", exclude_modules,
layers_to_transform, rank_pattern, alpha_pattern, modules_to_save, ensure_weight_tying), or settings ttl refuses.
Each case compares the adapter's tensor names, training-mode logits, the gradients of every trainable tensor, an
optimizer step, the adapter files both ways, merging (and unmerging) against PEFT's merge_and_unload."""

from __future__ import annotations

import copy
import json
import random

import peft
import pytest
import torch
import torch.nn.functional as F
from helpers import largest
from hf_reference import hf_causal_lm, hf_classifier
from lora_helpers import ALL, randomize_lora_, scale_saved_modules_, to_ttl
from safetensors.torch import load_file

import ttl_core
from ttl_core.errors import AdapterError
from ttl_core.lora import apply_lora, merge_lora, merged_weights, unmerge_lora
from ttl_core.lora_files import _adapter_tensors, load_adapter, save_adapter

PATTERN_TARGETS = [r".*\.(q_proj|up_proj)", r".*layers\.0\..*_proj", r"model\.layers\.\d+\.mlp\.(gate|down)_proj"]
SAVED = ["embed_tokens", "norm", "input_layernorm", "layers.0.post_attention_layernorm", "down_proj", "up_proj",
         "lm_head"]
# what ttl refuses where PEFT goes on (the docstrings of ttl_core.lora and lora_targets), in the order apply_lora
# checks: (option, name in its list) -> the error
REFUSED = {("modules_to_save", "up_proj"): r"^modules_to_save names 'up_proj', which takes .*: a fused projection",
           ("target_modules", "lm_head"): r"^LoRA on \['lm_head'\] is not supported: ttl adapts only the attention"}
# picked from the first 300 so that each setting above, both refusals among them, comes up in three cases or more
# (about a second each; tests/test_lora.py and tests/test_lora_targets.py check each option alone)
SEEDS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 14, 18, 35, 36, 70, 72, 77, 135, 141, 174, 208, 268, 297]


def draw_case(seed: int) -> tuple[str, dict, dict]:
    """(kind, transformers config overrides, PEFT LoraConfig options) drawn from `seed`."""
    rng = random.Random(seed)
    heads = rng.choice([2, 4])
    layers = rng.choice([1, 2])
    model = dict(hidden_size=32, num_attention_heads=heads, num_key_value_heads=rng.choice([1, heads]),
                 intermediate_size=rng.choice([40, 56]), num_hidden_layers=layers, vocab_size=61,
                 tie_word_embeddings=rng.random() < 0.4, attention_bias=rng.random() < 0.3,
                 mlp_bias=rng.random() < 0.3)
    kind = rng.choice(["causal", "causal", "causal", "classifier"])
    options = dict(r=rng.randint(1, 5), lora_alpha=rng.choice([1, 4, 8, 3.5]), use_rslora=rng.random() < 0.3,
                   use_dora=rng.random() < 0.3, lora_dropout=0.0)
    draw = rng.random()
    if draw < 0.4:
        targets = rng.sample(ALL, rng.randint(1, 7))
        if rng.random() < 0.3:
            # a causal LM's head, which ttl refuses to adapt; a classifier's score, which both train in full instead
            head = "lm_head" if kind == "causal" else "score"
            targets.append(rng.choice(["model.layers.0.mlp.up_proj", "self_attn.k_proj", head]))
    else:
        targets = rng.choice(PATTERN_TARGETS) if draw < 0.7 else "all-linear"
    options["target_modules"] = targets
    if rng.random() < 0.2:
        options["exclude_modules"] = rng.choice([["k_proj"], r".*\.0\.self_attn\..*"])
    if isinstance(targets, list) and rng.random() < 0.25:
        options.update(layers_to_transform=[layers - 1], layers_pattern=rng.choice([None, "layers"]))
    if rng.random() < 0.3:
        options["rank_pattern"] = rng.choice([{"down_proj": 2}, {r"layers\.0\.self_attn\.q_proj": 3}])
    if rng.random() < 0.3:
        options["alpha_pattern"] = rng.choice([{"v_proj": 16}, {r"layers\.0\..*": 2.5}])
    if rng.random() < 0.3:
        options["modules_to_save"] = rng.sample(SAVED[:-1] if kind == "classifier" else SAVED, rng.randint(1, 2))
    if model["tie_word_embeddings"] and kind == "causal" and rng.random() < 0.5:
        options["ensure_weight_tying"] = True
    return kind, model, options


def ttl_options(options: dict) -> dict:
    """PEFT's LoraConfig options under apply_lora's names."""
    renamed = {"lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets"}
    return {renamed.get(key, key): value for key, value in options.items()}


def peft_trainable(model) -> dict[str, torch.Tensor]:
    """PEFT key (as saved) -> each trainable tensor of a PEFT model, a tied one once."""
    found, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            key = name.replace(".modules_to_save.default.", ".").replace(".default", "")
            found[key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = p
    return found


def loss_of(kind: str, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if kind == "classifier":
        return F.cross_entropy(logits, torch.tensor([0, 1]))
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())


def assert_close(got: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    error = (got - expected).abs().max().item()
    assert error <= tolerance, f"{what}: {error:.3g} > {tolerance}"  # a NaN fails too


@pytest.mark.parametrize("seed", SEEDS)
def test_random_lora_settings_match_peft(tmp_path, seed):
    kind, overrides, options = draw_case(seed)
    build = hf_classifier if kind == "classifier" else hf_causal_lm
    task = "SEQ_CLS" if kind == "classifier" else "CAUSAL_LM"
    x = torch.randint(4, 61, (2, 7), generator=torch.Generator().manual_seed(seed))
    hf = build(seed, **overrides)
    ours = to_ttl(hf, tmp_path)
    refused = [error for (option, name), error in REFUSED.items()  # in a list of names, not a pattern's text
               if isinstance(options.get(option), list) and name in options[option]]
    if refused:
        with pytest.raises(AdapterError, match=refused[0]) as error:
            apply_lora(ours, **ttl_options(options))
        assert "\n" not in str(error.value)
        return
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(task_type=task, **copy.deepcopy(options)))
    apply_lora(ours, **ttl_options(options))
    randomize_lora_(theirs, seed + 1)
    scale_saved_modules_(theirs)
    expected = peft.get_peft_model_state_dict(theirs)
    tensors = _adapter_tensors(ours)
    assert sorted(tensors) == sorted(expected)
    with torch.no_grad():
        for key, tensor in tensors.items():
            tensor.copy_(expected[key])
    their_trainable = peft_trainable(theirs)
    assert {id(p) for p in ours.parameters() if p.requires_grad} == {id(t) for t in tensors.values()}
    assert set(their_trainable) <= set(expected) and len(their_trainable) == len({id(t) for t in tensors.values()})

    got, want = ours.train()(x).logits, theirs.train()(input_ids=x).logits
    assert_close(got, want, 1e-4, "logits")
    loss_of(kind, got, x).backward()
    loss_of(kind, want, x).backward()
    for key, p in their_trainable.items():
        assert_close(tensors[key].grad, p.grad, 1e-4 * max(p.grad.abs().max().item(), 1e-3), f"gradient of {key}")
    # one SGD step (Adam would turn a rounding difference in a near-zero gradient into a step of lr)
    for params in ({id(t): t for t in tensors.values()}.values(), their_trainable.values()):  # a tied tensor once
        torch.optim.SGD(list(params), lr=1e-2, weight_decay=0.01).step()
    ours.eval(), theirs.eval()
    with torch.no_grad():
        stepped = theirs(input_ids=x).logits
        assert_close(ours(x).logits, stepped, 1e-4, "logits after a step")

    save_adapter(ours, tmp_path / "ttl")
    theirs.save_pretrained(tmp_path / "peft")
    assert sorted(load_file(tmp_path / "ttl" / "adapter_model.safetensors")) == \
        sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    ours_config, their_config = (json.loads((tmp_path / name / "adapter_config.json").read_text())
                                 for name in ("ttl", "peft"))
    for field in ("task_type", "r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
                  "layers_to_transform", "exclude_modules"):
        assert ours_config[field] == their_config[field], field
    reloaded = peft.PeftModel.from_pretrained(build(seed, **overrides), tmp_path / "ttl").eval()
    again = load_adapter(to_ttl(build(seed, **overrides), tmp_path, "again"), tmp_path / "peft")
    with torch.no_grad():
        reference = reloaded(input_ids=x).logits
        assert_close(reference, stepped, 1e-4, "ttl's adapter in peft")
        assert_close(again(x).logits, stepped, 1e-4, "peft's adapter in ttl")
        unmerged = ours(x).logits
        merge_lora(ours)
        assert_close(ours(x).logits, unmerged, 1e-5, "merged")
        unmerge_lora(ours)
        assert_close(ours(x).logits, unmerged, 1e-5, "unmerged")
    truth = reloaded.merge_and_unload().state_dict()  # the same adapter weights: merging alone is compared
    folded = merged_weights(ours)
    ttl_core.save_pretrained(ours, tmp_path / "merged", state_dict=folded)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert set(merged) <= set(truth)
    assert largest((merged[k] - truth[k]).abs().max().item() for k in merged) <= 1e-5
