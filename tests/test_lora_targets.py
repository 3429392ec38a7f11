"""LoRA's per-module options against peft: the layers target_modules, layers_to_transform and layers_pattern
pick (and the combinations PEFT refuses), and the rank and alpha rank_pattern and alpha_pattern give each."""

from __future__ import annotations

import json
import re

import peft
import pytest
import torch
from hf_reference import hf_causal_lm, hf_classifier
from lora_helpers import ALL, ids, randomize_lora_, saved_peft_adapter, scale_saved_modules_, to_ttl

import ttl_core
from ttl_core.errors import AdapterError
from ttl_core.lora import apply_lora, lora_layers, merge_lora, unmerge_lora
from ttl_core.lora_files import load_adapter, save_adapter


def adapted_modules(model) -> set[str]:
    """The HF paths of a PEFT model's adapted modules ("model.layers.0.self_attn.q_proj")."""
    return {name.removeprefix("base_model.model.").removesuffix(".lora_A.default")
            for name, _ in model.named_modules() if name.endswith("lora_A.default")}


@pytest.mark.parametrize("options, refused", [
    ({"target_modules": r".*\.q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"target_modules": r".*\.q_proj", "layers_pattern": "layers"}, "layers_pattern"),
    ({"target_modules": ["q_proj"], "layers_pattern": "layers"}, "layers_pattern"),
])
def test_layer_options_peft_refuses_are_refused(tmp_path, options, refused):
    """PEFT refuses layers_to_transform or layers_pattern beside a pattern target (the pattern alone picks the
    layers), and layers_pattern without layers_to_transform. ttl ignored them: layers_to_transform=[0] adapted
    every layer, and the adapter it saved was one PEFT cannot load."""
    with pytest.raises(ValueError, match=f"`{refused}`"):
        peft.LoraConfig(**options)
    settings = {"targets" if key == "target_modules" else key: value for key, value in options.items()}
    with pytest.raises(AdapterError, match=rf"LoRA {refused} .*\(as in PEFT"):
        apply_lora(to_ttl(hf_causal_lm(), tmp_path), r=4, **settings)


def test_targets_naming_layers_the_model_lacks_load_as_in_peft(tmp_path):
    """PEFT adapts what a target list's entries match and passes over the others (the names of other
    architectures' layers, in lists written for several), so its adapter loads; ttl refused it as naming
    unknown modules. Entries naming a module ttl cannot adapt (lm_head) are still refused, by name."""
    hf = hf_causal_lm()
    base = to_ttl(hf, tmp_path)
    theirs = saved_peft_adapter(hf, tmp_path / "peft", seed=4, lora_alpha=8,
                                target_modules=["q_proj", "v_proj", "c_attn", "query_key_value"])
    ours = load_adapter(base, tmp_path / "peft")
    assert sum(len(layer.slices) for layer in lora_layers(ours).values()) == len(adapted_modules(theirs)) == 4
    x = ids()
    with torch.no_grad():
        assert (ours(x).logits - theirs.eval()(input_ids=x).logits).abs().max() < 1e-4
    with pytest.raises(AdapterError, match=r"LoRA on \['lm_head'\] is not supported: ttl adapts only the "):
        apply_lora(to_ttl(hf_causal_lm(), tmp_path, "head"), targets=["q_proj", "lm_head"])
    # an adapter none of whose targets the model has (another architecture's) is still named
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    with pytest.raises(AdapterError, match=r"unknown LoRA target module\(s\) \['c_attn'\]"):
        load_adapter(to_ttl(hf_causal_lm(), tmp_path, "gpt2_targets"), tmp_path / "peft")


def test_a_target_naming_a_whole_path_escapes_layers_to_transform_as_in_peft(tmp_path):
    """PEFT applies layers_to_transform only to the targets that end a module's path, not to one that is the
    whole path: with ["model.layers.1.self_attn.q_proj", "v_proj"] and layers_to_transform=[0] it adapts layer 0's
    v_proj and layer 1's q_proj. ttl left the q_proj out, so PEFT's adapter did not fit."""
    hf = hf_causal_lm()
    base = to_ttl(hf, tmp_path)
    theirs = saved_peft_adapter(hf, tmp_path / "peft", seed=6, lora_alpha=8, layers_to_transform=[0],
                                target_modules=["model.layers.1.self_attn.q_proj", "v_proj"])
    assert adapted_modules(theirs) == {"model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"}
    ours = load_adapter(base, tmp_path / "peft")
    x = ids()
    with torch.no_grad():
        assert (ours(x).logits - theirs.eval()(input_ids=x).logits).abs().max() < 1e-4
    save_adapter(ours, tmp_path / "ttl")
    again = peft.PeftModel.from_pretrained(hf_causal_lm(), tmp_path / "ttl").eval()
    assert adapted_modules(again) == adapted_modules(theirs)


@pytest.mark.parametrize("options", [
    # a key must end the path, after a dot: "layers.0" gives no module of layer 0 its rank, "_proj" none at all
    {"target_modules": ALL, "rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6, r"layers\.0": 3,
                                          "_proj": 5}, "alpha_pattern": {"v_proj": 3.5}},
    {"target_modules": "all-linear", "use_rslora": True, "rank_pattern": {"model.layers.0.self_attn.k_proj": 1},
     "alpha_pattern": {r"layers\.\d\.mlp\..*": 32}},
])
def test_rank_and_alpha_patterns_cross_load_with_peft_logits(tmp_path, options):
    """PEFT's rank_pattern and alpha_pattern give the modules whose path a key ends (as a pattern) their own rank
    and alpha, within one fused ttl layer too; ttl refused such adapters. Unmerged and merged logits match
    PEFT's, and ttl's save of the adapter loads back in PEFT with the same ranks."""
    hf = hf_causal_lm()
    base = to_ttl(hf, tmp_path)
    theirs = saved_peft_adapter(hf, tmp_path / "peft", seed=9, lora_alpha=8, **options)
    ours = load_adapter(base, tmp_path / "peft")
    x = ids()
    with torch.no_grad():
        expected = theirs.eval()(input_ids=x).logits
        assert (ours(x).logits - expected).abs().max() < 1e-4
        merge_lora(ours)
        assert (ours(x).logits - expected).abs().max() < 1e-4
        unmerge_lora(ours)
    save_adapter(ours, tmp_path / "ttl")
    again = peft.PeftModel.from_pretrained(hf_causal_lm(), tmp_path / "ttl").eval()
    ranks = {n: p.shape for n, p in theirs.named_parameters() if "lora_" in n}
    assert ranks == {n: p.shape for n, p in again.named_parameters() if "lora_" in n}
    assert len(set(ranks.values())) > 4  # the patterns changed some ranks
    with torch.no_grad():
        assert (again(input_ids=x).logits - expected).abs().max() < 1e-4


@pytest.mark.parametrize("option, value, message", [
    ("rank_pattern", {"q_proj": 0}, r"rank_pattern\['q_proj'\] must be an integer in \[1, 2\*\*31\), got 0"),
    ("rank_pattern", ["q_proj", 2], r"rank_pattern must map module name patterns to values"),
    ("alpha_pattern", {"v_proj": "8"}, r"alpha_pattern\['v_proj'\] must be a positive finite number, got '8'"),
    ("alpha_pattern", {"(v_proj": 8}, r"alpha_pattern key '\(v_proj' is not a regular expression"),
])
def test_bad_rank_and_alpha_patterns_are_one_line_errors(tmp_path, option, value, message):
    with pytest.raises(AdapterError, match=message):
        apply_lora(to_ttl(hf_causal_lm(), tmp_path), r=4, **{option: value})


@pytest.mark.parametrize("option, value, message", [
    # a flag that is not a bool was applied (any text is true) and written to adapter_config.json, which ttl's own
    # load_adapter then refused
    ("use_rslora", "yes", "LoRA use_rslora must be true or false, got 'yes'"),
    ("ensure_weight_tying", 1, "LoRA ensure_weight_tying must be true or false, got 1"),
    # a string where a list belongs was read letter by letter: "modules_to_save names 'l'"
    ("modules_to_save", "lm_head", "LoRA modules_to_save must be a list, got 'lm_head'"),
    # and these were a TypeError from deep inside the layer matching
    ("layers_to_transform", "0", "LoRA layers_to_transform must be an integer or a list, got '0'"),
    ("targets", None, "LoRA target_modules must be a string or a list, got None"),
])
def test_options_of_the_wrong_type_are_one_line_errors(tmp_path, option, value, message):
    with pytest.raises(AdapterError, match=f"^{message}$"):
        apply_lora(to_ttl(hf_causal_lm(), tmp_path), r=4, **{"targets": ["q_proj"], option: value})


def test_modules_to_save_take_precedence_over_lora_targets_as_in_peft(tmp_path):
    """PEFT never adapts a module that modules_to_save names: with "all-linear" and modules_to_save=["o_proj"] the
    o_proj layers are trained in full and carry no LoRA pair. ttl adapted them as well: PEFT loaded ttl's adapter
    without a word and gave logits 7.5 away, and ttl refused PEFT's adapter (missing o_proj.lora_A)."""
    hf = hf_causal_lm()
    base = to_ttl(hf, tmp_path)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                     target_modules="all-linear", modules_to_save=["o_proj"]))
    assert not any("o_proj" in name for name in adapted_modules(theirs))
    randomize_lora_(theirs, seed=10)
    scale_saved_modules_(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(base, tmp_path / "peft", is_trainable=True)
    assert not any("o_proj" in layer.slices for layer in lora_layers(ours).values())
    assert ours.backbone.layers[0].attn.out.weight.requires_grad
    x = ids()
    with torch.no_grad():
        expected = theirs.eval()(input_ids=x).logits
        assert (ours.eval()(x).logits - expected).abs().max() < 1e-4
    save_adapter(ours, tmp_path / "ttl")
    again = peft.PeftModel.from_pretrained(hf_causal_lm(), tmp_path / "ttl").eval()
    with torch.no_grad():
        assert (again(input_ids=x).logits - expected).abs().max() < 1e-4


@pytest.mark.parametrize("task, targets, saved", [("SEQ_CLS", ["q_proj", "v_proj", "score"], None),
                                                 ("CAUSAL_LM", ["q_proj", "lm_head"], ["lm_head"])])
def test_a_target_that_modules_to_save_trains_in_full_is_no_error(tmp_path, task, targets, saved):
    """A classifier's score head (always trained in full for SEQ_CLS) or a modules_to_save entry listed among the
    targets too is trained in full by PEFT, without a LoRA pair; ttl refused such adapters ('LoRA on ['score'] is
    not supported')."""
    hf = hf_classifier(num_labels=3) if task == "SEQ_CLS" else hf_causal_lm()
    hf.save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type=task,
                                                     target_modules=targets, modules_to_save=saved))
    randomize_lora_(theirs, seed=12)
    scale_saved_modules_(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(ttl_core.load_pretrained(tmp_path / "base"), tmp_path / "peft")
    x = ids()
    with torch.no_grad():
        assert (ours(x).logits - theirs.eval()(input_ids=x).logits).abs().max() < 1e-4


def test_the_all_linear_shorthand_is_read_in_any_case_as_by_peft(tmp_path):
    ours = apply_lora(to_ttl(hf_causal_lm(), tmp_path), r=4, targets="All-Linear")
    theirs = peft.get_peft_model(hf_causal_lm(), peft.LoraConfig(r=4, target_modules="All-Linear"))
    assert len(adapted_modules(theirs)) == sum(len(layer.slices) for layer in lora_layers(ours).values()) > 0


def test_a_classifier_of_a_tied_config_trains_its_embedding_in_full_as_peft_does(tmp_path):
    """A classifier has no LM head to share the input embedding with, whatever tie_word_embeddings says:
    modules_to_save=["embed_tokens"] trains the embedding alone (ttl must not untie a head it lacks)."""
    hf = hf_classifier(num_labels=3, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="SEQ_CLS",
                                                     modules_to_save=["embed_tokens"]))
    randomize_lora_(theirs, seed=13)
    scale_saved_modules_(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(ttl_core.load_pretrained(tmp_path / "base"), tmp_path / "peft")
    with torch.no_grad():
        assert (ours(ids()).logits - theirs.eval()(input_ids=ids()).logits).abs().max() < 1e-4
    assert ours.config.tie_word_embeddings  # nothing was untied


def test_a_peft_adapter_training_part_of_a_fused_projection_is_refused_naming_its_file(tmp_path):
    """PEFT's modules_to_save=["up_proj"] trains up_proj in full, which ttl cannot (gate_up is one layer); apply_lora
    refuses it, and so does load_adapter, whose error lacked the adapter's file (every other refusal of an adapter
    names it)."""
    theirs = peft.get_peft_model(hf_causal_lm(), peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM",
                                                                 modules_to_save=["up_proj"]))
    theirs.save_pretrained(tmp_path / "peft")
    config = re.escape(str(tmp_path / "peft" / "adapter_config.json"))
    with pytest.raises(AdapterError, match=rf"^{config}: modules_to_save names 'up_proj', which takes .*gate_proj"):
        load_adapter(to_ttl(hf_causal_lm(), tmp_path), tmp_path / "peft")
