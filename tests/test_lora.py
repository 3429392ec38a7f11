"""LoRA against peft: adapters cross-load both ways with the same logits; freezing, dropout and errors (merging:
test_lora_merge.py)."""

from __future__ import annotations

import copy
import json
import re

import peft
import pytest
import torch
from hf_reference import hf_causal_lm, hf_classifier
from lora_helpers import ALL, ids, randomize_lora_, saved_peft_adapter, scale_saved_modules_, to_ttl
from safetensors.torch import load_file, save_file

from ttl_core.errors import AdapterError
from ttl_core.lora import apply_lora, lora_layers, merge_lora
from ttl_core.lora_files import load_adapter, save_adapter

# PEFT matches a listed target against the end of each module path, so a list can name single layers
ONE_LAYER_EACH = ["model.layers.0.self_attn.q_proj", "layers.1.mlp.down_proj", "self_attn.v_proj"]


@pytest.mark.parametrize("targets, rslora", [(["q_proj", "v_proj"], False), ("all-linear", False),
                                             (["k_proj", "gate_proj", "down_proj"], True), (ONE_LAYER_EACH, False)])
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, targets, rslora):
    hf = hf_causal_lm()
    ours = apply_lora(to_ttl(hf, tmp_path), r=4, alpha=8, targets=targets, use_rslora=rslora)
    randomize_lora_(ours, seed=3)
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = ids()
    with torch.no_grad():
        expected, got = theirs(input_ids=x).logits, ours(x).logits
    assert (got - expected).abs().max() < 1e-4
    assert (got - to_ttl(hf_causal_lm(), tmp_path, "plain")(x).logits).abs().max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ALL, "all-linear", ONE_LAYER_EACH])
def test_peft_adapter_loads_in_ttl_with_the_same_logits(tmp_path, targets):
    """Also PEFT's "all-linear", which it saves as the list of every adapted module's path, and lists that
    adapt single layers."""
    hf = hf_causal_lm()
    base = to_ttl(hf, tmp_path)
    theirs = saved_peft_adapter(hf, tmp_path / "adapter", seed=5, lora_alpha=16, target_modules=targets)
    ours = load_adapter(base, tmp_path / "adapter")
    adapted = {name.removeprefix("base_model.model.").removesuffix(".lora_A.default")
               for name, _ in theirs.named_modules() if name.endswith("lora_A.default")}
    assert len(adapted) == sum(len(layer.slices) for layer in lora_layers(ours).values())
    x = ids()
    with torch.no_grad():
        assert (ours(x).logits - theirs.eval()(input_ids=x).logits).abs().max() < 1e-4


@pytest.mark.parametrize("options", [
    {"target_modules": r".*\.(q_proj|down_proj)"}, {"target_modules": ALL, "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": "all-linear", "exclude_modules": ["k_proj", "layers.0.mlp.up_proj"]},
    {"target_modules": ALL, "exclude_modules": r".*\.1\.self_attn\..*"}])
def test_peft_target_options_adapt_the_same_layers_both_ways(tmp_path, options):
    """PEFT's pattern targets, layers_to_transform (with layers_pattern) and exclude_modules pick the same
    layers in ttl: a PEFT adapter loads with the same logits, and ttl's save of it loads back in PEFT."""
    hf = hf_causal_lm()
    base = to_ttl(hf, tmp_path)
    theirs = saved_peft_adapter(hf, tmp_path / "peft", seed=5, lora_alpha=16, **options)
    ours = load_adapter(base, tmp_path / "peft")
    adapted = [name for name, _ in theirs.named_modules() if name.endswith("lora_A.default")]
    assert 0 < len(adapted) == sum(len(layer.slices) for layer in lora_layers(ours).values()) < 14
    x = ids()
    with torch.no_grad():
        assert (ours(x).logits - theirs.eval()(input_ids=x).logits).abs().max() < 1e-4
    save_adapter(ours, tmp_path / "ttl")
    again = peft.PeftModel.from_pretrained(hf_causal_lm(), tmp_path / "ttl").eval()
    with torch.no_grad():
        assert (ours(x).logits - again(input_ids=x).logits).abs().max() < 1e-4


@pytest.mark.parametrize("pattern", [r".*mlp.*", r".*(q_proj|input_layernorm)", r".*"])
def test_a_pattern_that_also_matches_other_modules_is_refused_as_by_peft(tmp_path, pattern):
    """PEFT refuses a target pattern that matches a module it cannot adapt (the MLP block, a norm, the model);
    ttl does too, rather than adapt only the projections among them and save an adapter PEFT cannot load."""
    with pytest.raises(ValueError, match="Target module"):
        peft.get_peft_model(hf_causal_lm(), peft.LoraConfig(target_modules=pattern, task_type="CAUSAL_LM"))
    with pytest.raises(AdapterError, match=rf"LoRA target pattern {re.escape(repr(pattern))} also matches model"):
        apply_lora(to_ttl(hf_causal_lm(), tmp_path), targets=pattern)


def test_classifier_score_head_travels_as_modules_to_save_both_ways(tmp_path):
    hf = hf_classifier(num_labels=3)
    ours = apply_lora(to_ttl(hf, tmp_path), r=4, alpha=8)
    assert ours.score.weight.requires_grad
    randomize_lora_(ours, seed=7)
    with torch.no_grad():
        ours.score.weight.mul_(-1.5)
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    theirs = peft.PeftModel.from_pretrained(hf_classifier(num_labels=3), tmp_path / "ours").eval()
    x = ids()
    with torch.no_grad():
        assert (ours(x).logits - theirs(input_ids=x).logits).abs().max() < 1e-4
    # and back: peft's own save of that model loads into a fresh ttl classifier
    theirs.save_pretrained(tmp_path / "theirs")
    again = load_adapter(to_ttl(hf_classifier(num_labels=3), tmp_path, "base2"), tmp_path / "theirs")
    with torch.no_grad():
        assert (again(x).logits - ours(x).logits).abs().max() < 1e-5


def test_only_lora_parameters_learn(tmp_path):
    model = apply_lora(to_ttl(hf_causal_lm(), tmp_path).train(), targets=["q_proj", "up_proj"], r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n, _ in model.named_parameters() if ".lora_" in n}
    x = ids()
    model(x, labels=x).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    # B starts at zero, so at first only B receives a non-zero gradient (as in PEFT)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_adapters_on_biased_layers_whose_input_needs_no_gradient_train_like_peft(tmp_path):
    """o_proj and down_proj with biases as the first adapted layers (nothing before them needs a gradient): the
    adapter's update covers the whole output there, which an in-place add through indexing refused to backpropagate
    through (torch's view of the biased matmul's output)."""
    hf = hf_classifier(num_labels=3, attention_bias=True, mlp_bias=True)
    ours = apply_lora(to_ttl(hf, tmp_path), r=2, alpha=4, dropout=0.0, targets=["o_proj", "down_proj"])
    randomize_lora_(ours, seed=5)
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True).eval()
    x, labels = ids(), torch.tensor([0, 2])
    got, expected = ours(x, labels=labels), theirs(input_ids=x, labels=labels)
    assert (got.logits - expected.logits).abs().max() < 1e-5
    got.loss.backward()
    expected.loss.backward()
    grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if "lora_B" in n}
    key = "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"
    assert torch.allclose(ours.backbone.layers[0].attn.out.lora_B["o_proj"].weight.grad, grads[key], atol=1e-6)


def test_bad_adapters_are_clear_errors(tmp_path):
    model = apply_lora(to_ttl(hf_causal_lm(), tmp_path), r=4)
    save_adapter(model, tmp_path / "good")
    with pytest.raises(AdapterError, match="already has LoRA"):
        apply_lora(model)
    for targets, unknown in ((["qkv_proj"], "'qkv_proj'"), (["q_proj", "model.layers.9.self_attn.q_proj"],
                                                           "'model.layers.9.self_attn.q_proj'"),
                             (["proj"], "'proj'")):  # a name ends a path after a dot
        with pytest.raises(AdapterError, match=rf"unknown LoRA target module\(s\) \[{re.escape(unknown)}\]; "):
            apply_lora(to_ttl(hf_causal_lm(), tmp_path, "b"), targets=targets)
    with pytest.raises(AdapterError, match=r"LoRA target_modules must list strings, got \['q_proj', 3\]"):
        apply_lora(to_ttl(hf_causal_lm(), tmp_path, "b"), targets=["q_proj", 3])
    with pytest.raises(AdapterError, match="holds no adapter_config.json"):
        load_adapter(to_ttl(hf_causal_lm(), tmp_path, "c"), tmp_path)
    merge_lora(model)
    with pytest.raises(AdapterError, match="the adapters are merged into the base weights; unmerge_lora before"):
        save_adapter(model, tmp_path / "merged")
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    (tmp_path / "wrong_r").mkdir()
    (tmp_path / "wrong_r" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    (tmp_path / "wrong_r" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "good" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterError, match=r"has shape \(4, 64\).*r=8"):
        load_adapter(to_ttl(hf_causal_lm(), tmp_path, "d"), tmp_path / "wrong_r")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="peft_type 'IA3'"):
        load_adapter(to_ttl(hf_causal_lm(), tmp_path, "e"), tmp_path / "other")
    (tmp_path / "bigger").mkdir()
    (tmp_path / "bigger" / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "good" / "adapter_model.safetensors")
    save_file({k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v for k, v in tensors.items()},
              tmp_path / "bigger" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="the model needs"):
        load_adapter(to_ttl(hf_causal_lm(), tmp_path, "f"), tmp_path / "bigger")
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ALL}))
    save_file(tensors, tmp_path / "missing" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="does not fit this model: missing"):
        load_adapter(to_ttl(hf_causal_lm(), tmp_path, "g"), tmp_path / "missing")
    # PEFT reads a target_modules string as a regex over whole module paths, which "q_proj" alone never matches
    save_adapter(apply_lora(to_ttl(hf_causal_lm(), tmp_path, "h"), r=4, targets=["q_proj"]), tmp_path / "pattern")
    config = json.loads((tmp_path / "pattern" / "adapter_config.json").read_text())
    (tmp_path / "pattern" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": "q_proj"}))
    with pytest.raises(AdapterError, match=r"LoRA targets 'q_proj' leave no linear layer of the model to adapt"):
        load_adapter(to_ttl(hf_causal_lm(), tmp_path, "i"), tmp_path / "pattern")
    with pytest.raises(AdapterError, match=r"LoRA target pattern '\(q_proj' is not a regular expression"):
        apply_lora(to_ttl(hf_causal_lm(), tmp_path, "j"), targets="(q_proj")
    with pytest.raises(AdapterError, match=r"LoRA exclude_modules pattern '\[k' is not a regular expression"):
        apply_lora(to_ttl(hf_causal_lm(), tmp_path, "k"), targets="all-linear", exclude_modules="[k")


@pytest.mark.parametrize("field, value", [
    ("init_lora_weights", "pissa"), ("init_lora_weights", "olora"), ("init_lora_weights", "loftq"),
    ("alora_invocation_tokens", [7, 8]), ("loftq_config", {"loftq_bits": 4}),
    ("trainable_token_indices", [5]), ("init_lora_weights", "pissa_niter_4"),
])
def test_adapter_settings_that_change_the_math_are_refused(tmp_path, field, value):
    """PEFT would compute something else with these (PiSSA/OLoRA/LoftQ rewrite the base weights on load,
    aLoRA starts at the invocation tokens): loading them as plain LoRA would give other logits."""
    save_adapter(apply_lora(to_ttl(hf_causal_lm(), tmp_path), r=4), tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(AdapterError, match=re.escape(f"{field}={value!r} is not supported")):
        load_adapter(to_ttl(hf_causal_lm(), tmp_path, "fresh"), tmp_path / "adapter")


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_peft_bias_options_load_on_a_model_without_biases_and_are_refused_with_them(tmp_path, bias):
    """PEFT's bias="all" / "lora_only" train the base layers' biases and save them beside the adapter: on a Llama
    without biases (TeenyTinyLlama's) there are none, and the adapter is a plain LoRA one, which ttl refused. On a
    model with biases ttl still refuses it, naming the option, rather than drop the trained biases."""
    hf = hf_causal_lm()
    base = to_ttl(hf, tmp_path)
    theirs = saved_peft_adapter(hf, tmp_path / "peft", seed=14, lora_alpha=8, target_modules="all-linear", bias=bias)
    ours = load_adapter(base, tmp_path / "peft")
    x = ids()
    with torch.no_grad():
        assert (ours(x).logits - theirs.eval()(input_ids=x).logits).abs().max() < 1e-4
    biased = hf_causal_lm(attention_bias=True)
    peft.get_peft_model(biased, peft.LoraConfig(r=4, target_modules=["q_proj"], bias=bias)).save_pretrained(
        tmp_path / "biased")
    with pytest.raises(AdapterError, match=rf"bias='{bias}' is not supported on a model with biases"):
        load_adapter(to_ttl(hf_causal_lm(attention_bias=True), tmp_path, "biased_base"), tmp_path / "biased")


def test_an_adapter_config_with_fan_in_fan_out_loads_as_in_peft(tmp_path):
    """PEFT sets fan_in_fan_out to false for every nn.Linear it adapts (all of a Llama's), with a warning, so an
    adapter_config.json that says true loads there as the plain adapter it is; ttl refused it."""
    ours = apply_lora(to_ttl(hf_causal_lm(), tmp_path), r=4, targets="all-linear")
    randomize_lora_(ours, seed=15)
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        theirs = peft.PeftModel.from_pretrained(hf_causal_lm(), tmp_path / "adapter").eval()
    loaded = load_adapter(to_ttl(hf_causal_lm(), tmp_path, "fresh"), tmp_path / "adapter")
    x = ids()
    with torch.no_grad():
        assert (loaded(x).logits - theirs(input_ids=x).logits).abs().max() < 1e-4


def test_a_mica_adapter_loads_for_inference_and_is_refused_for_training(tmp_path):
    """PEFT's init_lora_weights="mica" computes as plain LoRA but freezes lora_B while training; ttl would train
    both, so is_trainable=True is refused by name rather than continue the training otherwise."""
    hf = hf_causal_lm()
    base = to_ttl(hf, tmp_path)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights="mica", lora_dropout=0.0, task_type="CAUSAL_LM"))
    assert not any(p.requires_grad for name, p in theirs.named_parameters() if "lora_B" in name)
    randomize_lora_(theirs, seed=16)
    theirs.save_pretrained(tmp_path / "adapter")
    with pytest.raises(AdapterError, match=r"init_lora_weights='mica' trains lora_A only in PEFT.*is_trainable=False"):
        load_adapter(to_ttl(hf_causal_lm(), tmp_path, "trainable"), tmp_path / "adapter", is_trainable=True)
    ours = load_adapter(base, tmp_path / "adapter")
    x = ids()
    with torch.no_grad():
        assert (ours(x).logits - theirs.eval()(input_ids=x).logits).abs().max() < 1e-4


def test_loading_for_inference_turns_dropout_off_and_freezes(tmp_path):
    model = apply_lora(to_ttl(hf_causal_lm(), tmp_path), r=4, dropout=0.5, modules_to_save=["lm_head"])
    randomize_lora_(model, seed=4)
    save_adapter(model, tmp_path / "adapter")
    fresh = to_ttl(hf_causal_lm(), tmp_path, "fresh").train()
    load_adapter(fresh, tmp_path / "adapter")
    x = ids()
    assert not fresh.training
    assert not any(p.requires_grad for p in fresh.parameters())  # as PEFT's from_pretrained(is_trainable=False)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, fresh(x).logits)


def test_loading_for_training_keeps_the_adapter_s_dropout(tmp_path):
    """As PEFT's from_pretrained(is_trainable=True): the saved lora_dropout applies in training, and is saved again."""
    saved_peft_adapter(hf_causal_lm(), tmp_path / "adapter", seed=4, lora_dropout=0.5)
    ours = load_adapter(to_ttl(hf_causal_lm(), tmp_path), tmp_path / "adapter", is_trainable=True).train()
    x = ids()
    with torch.no_grad():
        assert not torch.equal(ours(x).logits, ours(x).logits)  # each call draws its own dropout masks
    save_adapter(ours, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["lora_dropout"] == 0.5


def test_adapters_on_a_bf16_base_stay_float32_like_peft(tmp_path):
    hf = hf_causal_lm().to(torch.bfloat16)
    theirs = saved_peft_adapter(hf, tmp_path / "adapter", seed=6, target_modules=["q_proj", "v_proj"])
    ours = load_adapter(to_ttl(hf_causal_lm().to(torch.bfloat16), tmp_path), tmp_path / "adapter")
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    x = ids()
    truth = peft.PeftModel.from_pretrained(hf_causal_lm(), tmp_path / "adapter").eval()  # float32 throughout
    with torch.no_grad():
        exact = truth(input_ids=x).logits
        ours_error = (ours(x).logits.float() - exact).abs().max()
        peft_error = (theirs.eval()(input_ids=x).logits.float() - exact).abs().max()
    assert ours_error <= 2 * peft_error  # flash-attn's criterion for a low-precision path


def test_each_adapted_slice_draws_its_own_dropout_mask(tmp_path):
    """q and v of the fused projection are two PEFT modules, each with its own dropout."""
    model = apply_lora(to_ttl(hf_causal_lm(), tmp_path), r=4, dropout=0.5).train()
    layer = model.backbone.layers[0].attn.qkv
    with torch.no_grad():
        for n in ("q_proj", "v_proj"):
            layer.lora_A[n].weight.copy_(torch.eye(4, 64))
            layer.lora_B[n].weight.zero_()
            layer.lora_B[n].weight[:4].copy_(torch.eye(4))
        x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
        delta = layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias)
    q, v = delta[..., :4], delta[..., layer.slices["v_proj"][0]:layer.slices["v_proj"][0] + 4]
    assert not torch.equal(q == 0, v == 0)  # the same weights on the same inputs: only the masks differ


def test_adapters_under_activation_checkpointing_train_as_without_it(tmp_path):
    """A checkpointed block runs its adapters again for the backward pass: the recomputation must draw the
    forward's dropout masks, or the gradients would be those of another forward."""
    model = apply_lora(to_ttl(hf_causal_lm(), tmp_path), r=4, dropout=0.3, targets="all-linear").train()
    randomize_lora_(model, seed=2)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable()
    x, runs = ids(), []
    for m in (model, checkpointed):
        torch.manual_seed(7)
        loss = m(x, labels=x).loss
        loss.backward()
        runs.append((loss, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (loss, grads), (checkpointed_loss, checkpointed_grads) = runs
    assert torch.equal(loss, checkpointed_loss) and grads.keys() == checkpointed_grads.keys()
    assert all(torch.equal(grads[n], checkpointed_grads[n]) for n in grads)
    with torch.no_grad():
        assert loss != model.eval()(x, labels=x).loss  # dropout was on


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("kind, dtype, options", [
    ("causal", torch.float32, dict(target_modules=["q_proj", "v_proj"])),
    ("causal", torch.bfloat16, dict(target_modules="all-linear", use_rslora=True, rank_pattern={"down_proj": 2},
                                    alpha_pattern={"v_proj": 32})),
    ("classifier", torch.float16, dict(target_modules=["k_proj", "up_proj"], layers_to_transform=[1]))])
def test_fresh_adapters_from_a_seed_are_peft_s_to_the_bit(kind, dtype, options, use_dora, tmp_path):
    """The same seed gives PEFT's initial adapters (A kaiming-uniform, drawn in PEFT's module order after each
    pair's default nn.Linear inits, rounded through a half-precision base's dtype; B zero), so a LoRA run can
    start where PEFT's does; a fresh adapter leaves the logits exactly as they were. DoRA's magnitudes start at
    the row norms of each slice of the fused weight, taken in the base's dtype and kept in float32 as PEFT keeps
    them, and leave the seed's A draws as they were."""
    hf = (hf_causal_lm() if kind == "causal" else hf_classifier(num_labels=3)).to(dtype)
    ours = to_ttl(hf, tmp_path)
    x = ids()
    with torch.no_grad():
        before = ours(x).logits
        torch.manual_seed(11)
        apply_lora(ours, r=4, alpha=8, dropout=0.0, use_dora=use_dora, targets=options["target_modules"],
                   **{k: v for k, v in options.items() if k != "target_modules"})
        if not use_dora or dtype == torch.float32:  # DoRA's m / ||W|| is 1 in fp32 (half precision rounds m)
            assert torch.equal(ours(x).logits, before)
    torch.manual_seed(11)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=use_dora,
                                                     task_type="CAUSAL_LM" if kind == "causal" else "SEQ_CLS",
                                                     **options))
    save_adapter(ours, tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    expected = peft.get_peft_model_state_dict(theirs)
    lora = sorted(k for k in expected if "lora_" in k)
    assert lora and lora == sorted(k for k in saved if "lora_" in k)
    assert any(k.endswith("lora_magnitude_vector") for k in lora) == use_dora
    for key in lora:
        assert saved[key].dtype == expected[key].dtype == torch.float32 and torch.equal(saved[key], expected[key]), key


def test_adapter_keys_with_peft_adapter_name_load(tmp_path):
    """Keys that still hold PEFT's adapter name (`...lora_A.default.weight`, `score.modules_to_save.default.`)
    load as the plain ones do."""
    model = apply_lora(to_ttl(hf_classifier(num_labels=3), tmp_path), r=4, alpha=8)
    randomize_lora_(model, seed=8)
    save_adapter(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    renamed = {k.replace(".weight", ".default.weight") if "lora_" in k else
               k.replace("score.", "score.modules_to_save.default."): v for k, v in tensors.items()}
    assert any(".modules_to_save.default." in k for k in renamed)
    save_file(renamed, weights)
    loaded = load_adapter(to_ttl(hf_classifier(num_labels=3), tmp_path, "fresh"), tmp_path / "adapter")
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model.eval()(x).logits)


@pytest.mark.parametrize("saved", [["norm"], ["layers.1.post_attention_layernorm"], ["model.norm", "lm_head"]])
def test_modules_to_save_name_the_modules_whose_path_ends_so_as_in_peft(tmp_path, saved):
    """PEFT trains in full every module whose path ends with a modules_to_save entry, as a string: "norm" takes
    the final norm and every layer's two norms, "layers.1.post_attention_layernorm" that one layer's. Adapters
    cross-load both ways with the same logits; an entry that would take part of a fused projection is refused."""
    theirs = peft.get_peft_model(hf_causal_lm(), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0,
                                                                 modules_to_save=saved, task_type="CAUSAL_LM"))
    randomize_lora_(theirs, seed=5)
    scale_saved_modules_(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(to_ttl(hf_causal_lm(), tmp_path), tmp_path / "peft", is_trainable=True)
    trained = [n for n, p in theirs.named_parameters() if p.requires_grad and "lora_" not in n]
    assert len(trained) == sum(p.requires_grad and "lora_" not in n for n, p in ours.named_parameters())
    x = ids()
    with torch.no_grad():
        assert (ours.eval()(x).logits - theirs.eval()(input_ids=x).logits).abs().max() < 1e-4
    save_adapter(ours, tmp_path / "ttl")
    again = peft.PeftModel.from_pretrained(hf_causal_lm(), tmp_path / "ttl").eval()
    with torch.no_grad():
        assert (ours(x).logits - again(input_ids=x).logits).abs().max() < 1e-4
    with pytest.raises(AdapterError, match=r"modules_to_save names '_proj', which takes .*q_proj"):
        apply_lora(to_ttl(hf_causal_lm(), tmp_path, "fused"), modules_to_save=["_proj"])
