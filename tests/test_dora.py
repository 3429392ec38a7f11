"""DoRA (PEFT's use_dora) against peft: logits and gradients (dropout included) in both directions of loading,
merging, errors, and the fine-tuning scripts' --lora-dora (fresh magnitudes: tests/test_lora.py)."""

from __future__ import annotations

import json
import re

import peft
import pytest
import torch
import torch.nn.functional as F
from finetune_helpers import saved_base_model
from helpers import largest, run_script
from hf_reference import hf_causal_lm, hf_classifier
from lora_helpers import ids, randomize_lora_, saved_peft_adapter, to_ttl
from safetensors.torch import load_file, save_file

import ttl_core
from ttl_core.errors import AdapterError, ConfigError
from ttl_core.finetune import FinetuneConfig
from ttl_core.lora import apply_lora, lora_layers, merge_lora, merged_weights, unload_lora, unmerge_lora
from ttl_core.lora_files import _peft_keys, load_adapter, save_adapter

PATTERNS = dict(target_modules="all-linear", use_rslora=True, rank_pattern={"down_proj": 2},
                alpha_pattern={"v_proj": 32})


def peft_grads(model) -> dict[str, torch.Tensor]:
    """PEFT key (as saved) -> gradient of each of PEFT's adapter parameters."""
    return {name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p.grad
            for name, p in model.named_parameters() if p.requires_grad and "lora_" in name}


@pytest.mark.parametrize("options", [dict(target_modules=["q_proj", "v_proj"]), PATTERNS])
def test_dora_adapters_cross_load_with_peft_logits(tmp_path, options):
    hf = hf_causal_lm()
    settings = dict(targets=options["target_modules"], **{k: v for k, v in options.items() if k != "target_modules"})
    ours = apply_lora(to_ttl(hf, tmp_path), r=4, alpha=16, dropout=0.0, use_dora=True, **settings)
    randomize_lora_(ours, seed=3)
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    x = ids()
    with torch.no_grad():
        got = ours.eval()(x).logits
        assert (got - theirs(input_ids=x).logits).abs().max() < 1e-5
        assert (got - to_ttl(hf_causal_lm(), tmp_path, "plain")(x).logits).abs().max() > 1e-2  # the adapter matters
        # and back: peft's save of its own DoRA adapter loads in ttl
        saved_peft_adapter(hf_causal_lm(), tmp_path / "theirs", seed=4, lora_alpha=16, use_dora=True, **options)
        theirs = peft.PeftModel.from_pretrained(hf_causal_lm(), tmp_path / "theirs").eval()
        again = load_adapter(to_ttl(hf_causal_lm(), tmp_path, "base2"), tmp_path / "theirs")
        assert (again(x).logits - theirs(input_ids=x).logits).abs().max() < 1e-5


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["causal", "biased_classifier"])
def test_dora_trains_like_peft(tmp_path, kind, dropout):
    """Loss, logits and the gradients of A, B and the magnitudes equal PEFT's in training mode; with dropout, the
    same seed draws PEFT's masks (one per adapted module, in its order) and the base output is recomputed from the
    dropped-out input, as PEFT does; on layers with biases, the bias stays out of the rescaled base output."""
    x = ids()
    if kind == "causal":  # the loss of predicting each next token
        hf, loss_of = hf_causal_lm(), lambda logits: F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    else:
        hf = hf_classifier(num_labels=3, attention_bias=True, mlp_bias=True)
        loss_of = lambda logits: F.cross_entropy(logits, torch.tensor([0, 2]))  # noqa: E731
    ours = apply_lora(to_ttl(hf, tmp_path), r=4, alpha=8, dropout=dropout, targets="all-linear", use_dora=True)
    randomize_lora_(ours, seed=5)
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
    torch.manual_seed(7)
    got = ours.train()(x).logits
    torch.manual_seed(7)
    expected = theirs.train()(input_ids=x).logits
    assert (got - expected).abs().max() < 1e-5
    loss_of(got).backward()
    loss_of(expected).backward()
    grads = peft_grads(theirs)
    ours_grads = {key: p.grad for key, p in _peft_keys(ours).items()}
    assert ours_grads.keys() == grads.keys() and any("magnitude" in key for key in grads)
    for key, grad in grads.items():
        assert (ours_grads[key] - grad).abs().max() <= 1e-5 * grad.abs().max(), key
    if dropout:
        with torch.no_grad():
            assert (got - ours.eval()(x).logits).abs().max() > 1e-3


def test_dora_merge_equals_peft_merge(tmp_path):
    hf = hf_causal_lm()
    model = apply_lora(to_ttl(hf, tmp_path), targets="all-linear", r=4, alpha=8, dropout=0.0, use_dora=True)
    randomize_lora_(model, seed=13, scale=0.05)
    save_adapter(model, tmp_path / "adapter")
    truth = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").merge_and_unload().state_dict()
    ttl_core.save_pretrained(model, tmp_path / "folded", state_dict=merged_weights(model))  # model unchanged
    folded = load_file(tmp_path / "folded" / "model.safetensors")
    assert sorted(folded) == sorted(truth)
    assert largest((folded[k] - truth[k]).abs().max().item() for k in folded) <= 1e-5
    # the round trip merge -> unmerge -> unload: tests/test_lora.py, test_merge_unmerge_and_unload


def test_a_merged_dora_model_moved_to_another_device_unmerges(tmp_path):
    """The row factors merging kept (the merged rows cannot give them back) go where the weights have gone; the meta
    device stands in for a GPU."""
    model = apply_lora(to_ttl(hf_causal_lm(), tmp_path), r=4, dropout=0.0, targets="all-linear", use_dora=True)
    randomize_lora_(model, seed=2)
    merge_lora(model)
    unmerge_lora(model.to("meta"))
    assert not any(layer.merged for layer in lora_layers(model).values())

def test_dora_on_a_bf16_base_computes_and_merges_as_peft_does(tmp_path):
    """The magnitudes stay float32 like the adapters; the logits are as close to float32 PEFT's as bf16 PEFT's are;
    the merged weights round once from float64 where PEFT's round from float32, so only a rare one on a bf16 tie
    differs."""
    hf = hf_causal_lm().to(torch.bfloat16)
    theirs = saved_peft_adapter(hf, tmp_path / "adapter", seed=6, target_modules="all-linear", use_dora=True)
    ours = load_adapter(to_ttl(hf_causal_lm().to(torch.bfloat16), tmp_path), tmp_path / "adapter")
    assert {p.dtype for n, p in ours.named_parameters() if "lora_magnitude" in n} == {torch.float32}
    x = ids()
    with torch.no_grad():
        exact = peft.PeftModel.from_pretrained(hf_causal_lm(), tmp_path / "adapter").eval()(input_ids=x).logits
        ours_error = (ours(x).logits.float() - exact).abs().max()
        peft_error = (theirs.eval()(input_ids=x).logits.float() - exact).abs().max()
    assert ours_error <= 2 * peft_error  # flash-attn's criterion for a low-precision path
    truth = theirs.merge_and_unload().state_dict()
    ttl_core.save_pretrained(unload_lora(ours), tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert sorted(merged) == sorted(truth) and {t.dtype for t in merged.values()} == {torch.bfloat16}
    differing = sum((merged[k] != truth[k]).sum().item() for k in merged)
    assert differing <= 1e-4 * sum(t.numel() for t in merged.values()), differing


def test_dora_inputs_peft_refuses_or_that_do_not_fit_are_one_line_errors(tmp_path):
    with pytest.raises(AdapterError, match=r"^LoRA use_dora must be true or false, got 'yes'$"):
        apply_lora(to_ttl(hf_causal_lm(), tmp_path), use_dora="yes")
    save_adapter(apply_lora(to_ttl(hf_causal_lm(), tmp_path, "a"), r=4), tmp_path / "plain")
    save_adapter(apply_lora(to_ttl(hf_causal_lm(), tmp_path, "b"), r=4, use_dora=True), tmp_path / "dora")
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    plain, dora = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("plain", "dora"))
    q_magnitude = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"

    def adapter(name: str, weights: dict, **changes) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        save_file(weights, tmp_path / name / "adapter_model.safetensors")
        return tmp_path / name

    with pytest.raises(ValueError, match="Invalid or unsupported variant combination"):  # PEFT's refusal
        peft.get_peft_model(hf_causal_lm(), peft.LoraConfig(use_dora=True, init_lora_weights="mica"))
    cases = [(adapter("mica", dora, use_dora=True, init_lora_weights="mica"),
              "use_dora=True cannot go with init_lora_weights='mica'"),
             (adapter("text", dora, use_dora="true"), "use_dora must be true or false, got 'true'"),
             (adapter("no_magnitudes", plain, use_dora=True), re.escape(f"missing ['{q_magnitude}'")),
             (adapter("not_dora", dora), re.escape(f"unexpected ['{q_magnitude}'")),
             (adapter("short", {**dora, q_magnitude: dora[q_magnitude][:3]}, use_dora=True),
              r"lora_magnitude_vector has shape \(3,\), the model needs \(64,\)")]
    for directory, message in cases:
        with pytest.raises(AdapterError, match=message) as error:
            load_adapter(to_ttl(hf_causal_lm(), tmp_path, "fresh"), directory)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("settings, message", [
    (dict(lora_dora=True), r"^lora_dora \(--lora-dora\) trains DoRA adapters; it needs --lora$"),
    (dict(lora=True, lora_dora="no"), r"^lora_dora \(--lora-dora\) must be true or false, got 'no'$")])
def test_finetune_config_refuses_dora_without_lora_or_not_a_flag(settings, message):
    """Without lora, lora_dora would be dropped for a full fine-tune, as merge_lora would; a string such as "no"
    would turn DoRA on."""
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(**settings)


def test_the_lora_dora_flag_trains_and_saves_a_dora_adapter(tmp_path):
    base = saved_base_model(tmp_path)
    result = run_script("finetune_instruct", "--model", base, "--out", tmp_path / "run", "--epochs", "1",
                        "--max-length", "256", "--lora-r", "4", "--lora-dora")
    assert result.returncode == 0, result.stderr
    adapter = tmp_path / "run" / "best"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    magnitudes = {k: v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "magnitude" in k}
    assert len(magnitudes) == 4  # q_proj and v_proj of both layers, each moved off its initial row norms
    initial = {k: v for k, v in _peft_keys(apply_lora(ttl_core.load_pretrained(base), r=4, use_dora=True)).items()
               if k in magnitudes}
    assert all(not torch.equal(magnitudes[k], initial[k]) for k in magnitudes)
