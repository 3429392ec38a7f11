"""LoRA adapters of models whose vocabulary grew (added tokens): the embedding and LM head rows travel beside
the adapter, as PEFT's modules_to_save and save_embedding_layers carry them, so the adapter loads onto its base."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from hf_reference import hf_causal_lm
from lora_helpers import ids, randomize_lora_, to_ttl
from safetensors.torch import load_file

import ttl_core
from ttl_core.errors import AdapterError
from ttl_core.lora import apply_lora, lora_layers
from ttl_core.lora_files import load_adapter, load_with_adapter, save_adapter


def test_resized_embeddings_travel_as_modules_to_save(tmp_path):
    model = to_ttl(hf_causal_lm(), tmp_path)
    model.resize_token_embeddings(134)
    assert model.backbone.embed.weight.shape == (134, 64) and model.lm_head.weight.shape == (134, 64)
    apply_lora(model, r=2, modules_to_save=["embed_tokens", "lm_head"])
    assert model.backbone.embed.weight.requires_grad and model.lm_head.weight.requires_grad
    save_adapter(model, tmp_path / "adapter")
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys
    fresh = to_ttl(hf_causal_lm(), tmp_path, "fresh")
    fresh.resize_token_embeddings(134)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh.backbone.embed.weight, model.backbone.embed.weight)


def grown_peft_adapter(hf, directory, seed: int):
    """`hf` grown from 131 to 135 tokens (new rows random) under a random q/v LoRA adapter, saved to `directory`
    with its embedding layers, as PEFT saves a fine-tune that added tokens."""
    hf.resize_token_embeddings(135, mean_resizing=False)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                                     task_type="CAUSAL_LM"))
    randomize_lora_(theirs, seed=seed)
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.weight[131:].normal_()
    theirs.save_pretrained(directory, save_embedding_layers=True)
    return theirs


def test_peft_adapter_with_saved_embedding_layers_loads(tmp_path):
    """PEFT saves a resized vocabulary's embedding and LM head beside the adapter (save_embedding_layers) and
    loads them into the base; ttl does the same once the vocabulary is resized to match, and
    `load_with_adapter` resizes the base itself and merges the adapter into it."""
    theirs = grown_peft_adapter(hf_causal_lm(), tmp_path / "adapter", seed=2)
    assert "base_model.model.model.embed_tokens.weight" in load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    ours = to_ttl(hf_causal_lm(), tmp_path)
    with pytest.raises(AdapterError, match=r"embed_tokens.weight has shape \(135, 64\), the model's is \(131, 64\)"):
        load_adapter(ours, tmp_path / "adapter")
    ours.resize_token_embeddings(135)
    load_adapter(ours, tmp_path / "adapter")
    x = ids(vocab=135)
    with torch.no_grad():
        assert (ours(x).logits - theirs.eval()(input_ids=x).logits).abs().max() <= 1e-5
    with pytest.raises(AdapterError, match="no base_model_name_or_path; give the base model's directory"):
        load_with_adapter(tmp_path / "adapter")  # PEFT records no name for a model built in memory
    merged = load_with_adapter(tmp_path / "adapter", base=tmp_path / "base")
    assert merged.config.vocab_size == 135 and not lora_layers(merged)
    with torch.no_grad():
        assert (merged(x).logits - theirs(input_ids=x).logits).abs().max() <= 1e-5


def test_an_adapter_of_a_grown_vocabulary_saves_its_embeddings_as_peft_does(tmp_path):
    """PEFT's save_embedding_layers="auto" saves the embedding and LM head beside the adapter when the model's
    vocabulary differs from its base's (config.json of base_model_name_or_path). ttl's save_adapter left them out
    unless they were modules_to_save: an adapter loaded with PEFT's saved rows and saved again lost the added
    tokens, and load_with_adapter then built a model without them (an IndexError on those ids)."""
    hf = hf_causal_lm()
    hf.save_pretrained(tmp_path / "base")
    theirs = grown_peft_adapter(hf, tmp_path / "peft", seed=3)
    ours = to_ttl(hf_causal_lm(), tmp_path, "ttl_base")
    ours.resize_token_embeddings(135)
    load_adapter(ours, tmp_path / "peft", is_trainable=True)
    save_adapter(ours, tmp_path / "ttl", base_model_name_or_path=str(tmp_path / "base"))
    saved = load_file(tmp_path / "ttl" / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.weight"].shape == (135, 64)
    x = ids(vocab=135)
    with torch.no_grad():
        expected = theirs.eval()(input_ids=x).logits
        assert (load_with_adapter(tmp_path / "ttl")(x).logits - expected).abs().max() <= 1e-5
    grown = hf_causal_lm()
    grown.resize_token_embeddings(135, mean_resizing=False)
    again = peft.PeftModel.from_pretrained(grown, tmp_path / "ttl").eval()
    with torch.no_grad():
        assert (again(input_ids=x).logits - expected).abs().max() <= 1e-5
    # a base in ttl's native layout (ttl_config.json, no config.json) is compared the same way
    ttl_core.save_native(to_ttl(hf_causal_lm(), tmp_path, "hf_base"), tmp_path / "native")
    # given as a Path, as ttl's other functions take directories (it was a TypeError after the weights were written)
    save_adapter(ours, tmp_path / "over_native", base_model_name_or_path=tmp_path / "native")
    with torch.no_grad():
        assert (load_with_adapter(tmp_path / "over_native")(x).logits - expected).abs().max() <= 1e-5


def test_a_peft_adapter_training_grown_embeddings_in_full_loads(tmp_path):
    """A PEFT fine-tune that adds tokens trains the embedding and LM head in full (modules_to_save). On a base read
    from a directory, PEFT also writes each wrapper's own copies: the trained one again (`...modules_to_save.weight`)
    and the base's (`...original_module.weight`); ttl refused those as unexpected keys."""
    hf_causal_lm().save_pretrained(tmp_path / "base")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    hf.resize_token_embeddings(135, mean_resizing=False)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf, lora)
    randomize_lora_(theirs, seed=4)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(5)))
    theirs.save_pretrained(tmp_path / "adapter")
    assert "base_model.model.lm_head.original_module.weight" in load_file(tmp_path / "adapter" /
                                                                          "adapter_model.safetensors")
    ours = to_ttl(hf_causal_lm(), tmp_path, "ours")
    ours.resize_token_embeddings(135)
    load_adapter(ours, tmp_path / "adapter")
    x = ids(vocab=135)
    with torch.no_grad():
        expected = theirs.eval()(input_ids=x).logits
        assert (ours(x).logits - expected).abs().max() <= 1e-5  # the same math: the adapter beside the weights
        # merged into the base the adapter names, grown: logits of about 10 differ by float32 rounding
        assert (load_with_adapter(tmp_path / "adapter")(x).logits - expected).abs().max() <= 1e-4
