"""The models as plain `nn.Module`s: device moves, meta initialization, state dicts, freezing, compile."""

import copy

import pytest
import torch

import ttl_core


def tiny_config(**overrides) -> ttl_core.LlamaConfig:
    return ttl_core.LlamaConfig.from_preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, **overrides)


@pytest.mark.parametrize("fill", ["init_weights", "load_state_dict"])
def test_a_model_materialized_from_the_meta_device_has_exact_rotary_frequencies(fill):
    """`to_empty` leaves buffers uninitialized and the rotary frequencies are not in the state dict, so the
    usual meta-device recipes (init_weights, or load_state_dict) must still give the model its frequencies."""
    torch.manual_seed(0)
    model = ttl_core.LlamaForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    for meta in (copy.deepcopy(model).to("meta"), ttl_core.LlamaForCausalLM(tiny_config()).to("meta")):
        meta.to_empty(device="cpu")
        meta.init_weights() if fill == "init_weights" else meta.load_state_dict(model.state_dict())
        assert torch.equal(meta.backbone.rotary.inv_freq_bits, model.backbone.rotary.inv_freq_bits)
    if fill == "load_state_dict":
        assert torch.equal(meta.eval()(ids).logits, model(ids).logits)


def test_a_model_built_under_inference_mode_still_moves_and_casts():
    """Recomputing the frequencies on a move must not write into a buffer made under `torch.inference_mode`
    (an evaluation script that loads its model inside it, then casts it outside)."""
    with torch.inference_mode():
        model = ttl_core.LlamaForCausalLM(tiny_config())
    model.to(torch.bfloat16).float()
    expected = ttl_core.rope.rope_inverse_frequencies(model.config)
    assert torch.equal(model.backbone.rotary.inv_freq_bits.view(torch.float32), expected)
