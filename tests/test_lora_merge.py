"""LoRA merging against peft: merge, unmerge and unload keep the logits, merging twice folds in once, and the
weights folded (merged_weights, unload_lora) are peft's merge_and_unload, in float32 and into a bf16 base."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers import largest
from hf_reference import hf_causal_lm
from lora_helpers import ids, randomize_lora_, to_ttl
from safetensors.torch import load_file

import ttl_core
from ttl_core.errors import CheckpointError
from ttl_core.lora import apply_lora, merge_lora, merged_weights, unload_lora, unmerge_lora
from ttl_core.lora_files import save_adapter


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge_and_unload(use_dora, tmp_path):
    model = apply_lora(to_ttl(hf_causal_lm(), tmp_path), targets="all-linear", r=4, alpha=8, use_dora=use_dora)
    randomize_lora_(model, seed=11, scale=0.05)  # deltas of a trained adapter's size
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    x = ids()
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(x).logits
        unmerged = model(x).logits
        merge_lora(model)
        merged = model(x).logits
        unmerge_lora(model)
        again = model(x).logits
    assert (merged - unmerged).abs().max() < 1e-5 and (again - unmerged).abs().max() < 1e-5
    # merging rounds the weights once; its error against float64 is that of the unmerged float32 path
    assert (merged.double() - truth).abs().max() <= 2 * (unmerged.double() - truth).abs().max()
    params = dict(model.named_parameters())
    assert largest((params[n] - w).abs().max().item() for n, w in base.items()) < 1e-6
    with pytest.raises(CheckpointError, match="LoRA adapters"):
        ttl_core.save_pretrained(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(CheckpointError, match="LoRA adapters"):  # else written, then refused when loaded
        ttl_core.save_native(model, tmp_path / "refused_native")
    assert not (tmp_path / "refused_native").exists()
    ttl_core.save_pretrained(model, tmp_path / "folded", state_dict=merged_weights(model))  # model unchanged
    with torch.no_grad():
        assert (ttl_core.load_pretrained(tmp_path / "folded")(x).logits - unmerged).abs().max() < 1e-5
    unload_lora(model)
    ttl_core.save_pretrained(model, tmp_path / "merged")
    assert not any("lora" in k for k in load_file(tmp_path / "merged" / "model.safetensors"))
    import transformers
    hf_merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (hf_merged(input_ids=x).logits - unmerged).abs().max() < 1e-4


@pytest.mark.parametrize("merge_first", [False, True])
def test_merged_weights_equal_peft_merge_and_unload(tmp_path, merge_first):
    """`merged_weights` folds each adapter in exactly once, whether or not the model is merged already."""
    hf = hf_causal_lm()
    model = apply_lora(to_ttl(hf, tmp_path), targets="all-linear", r=4, alpha=8, dropout=0.0)
    randomize_lora_(model, seed=13, scale=0.05)
    save_adapter(model, tmp_path / "adapter")
    truth = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").merge_and_unload().state_dict()
    if merge_first:
        merge_lora(model)
    ttl_core.save_pretrained(model, tmp_path / "folded", state_dict=merged_weights(model))
    folded = load_file(tmp_path / "folded" / "model.safetensors")
    assert sorted(folded) == sorted(truth)
    assert largest((folded[k] - truth[k]).abs().max().item() for k in folded) <= 1e-5


def test_merging_twice_folds_the_adapter_in_once(tmp_path):
    model = apply_lora(to_ttl(hf_causal_lm(), tmp_path), targets="all-linear", r=4, alpha=8)
    randomize_lora_(model, seed=12, scale=0.05)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    x = ids()
    with torch.no_grad():
        unmerged = model(x).logits
        merge_lora(model)
        once = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
        merge_lora(model)
        assert all(torch.equal(p, once[n]) for n, p in model.named_parameters() if "lora_" not in n)
        assert (model(x).logits - unmerged).abs().max() < 1e-5
        unmerge_lora(model)
        unmerge_lora(model)
    params = dict(model.named_parameters())
    assert largest((params[n] - w).abs().max().item() for n, w in base.items()) < 1e-6


@pytest.mark.parametrize("fold", ["unload_lora", "merged_weights"])
def test_merging_into_a_bf16_base_rounds_as_peft_does(tmp_path, fold):
    """The float32 adapters' update is added to the bf16 weights before rounding, once, as peft's merge does;
    rounding the update to bf16 first changes about 5% of the merged weights by an ulp."""
    model = apply_lora(to_ttl(hf_causal_lm().to(torch.bfloat16), tmp_path), targets="all-linear", r=4, alpha=8,
                       dropout=0.0)
    randomize_lora_(model, seed=21, scale=0.05)
    save_adapter(model, tmp_path / "adapter")
    hf = hf_causal_lm().to(torch.bfloat16)
    truth = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").merge_and_unload().state_dict()
    if fold == "unload_lora":
        ttl_core.save_pretrained(unload_lora(model), tmp_path / "merged")
    else:
        ttl_core.save_pretrained(model, tmp_path / "merged", state_dict=merged_weights(model))
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert sorted(merged) == sorted(truth) and {t.dtype for t in merged.values()} == {torch.bfloat16}
    # ttl's float64 update and peft's float32 one may round apart only where the sum sits on a bf16 tie
    differing = sum((merged[k] != truth[k]).sum().item() for k in merged)
    assert differing <= 1e-4 * sum(t.numel() for t in merged.values()), differing
