"""More idioms of transformers programs (the second batch of ported ones): prompts given as embeddings, forward hooks
capturing a block's activations; run on ttl's models against transformers itself."""

from __future__ import annotations

import pytest
import torch
from generation_helpers import PAD, left_padded, saved_models

from ttl_core.errors import GenerationError


def _column_verdict(input_ids: torch.Tensor, scores) -> torch.Tensor:
    """A criterion answering (rows, 1), which transformers' own criteria never do."""
    return (input_ids[:, -1] < 0)[:, None]


@pytest.mark.parametrize("sampling", [dict(do_sample=False), dict(do_sample=True, top_k=10)], ids=["greedy", "sampled"])
def test_generate_from_inputs_embeds_gives_transformers_tokens(sampling, tmp_path):
    """`model.generate(inputs_embeds=...)` (soft prompts, another model's features): the new tokens only without
    input_ids, the ids and then the new tokens with them; left-padded per attention_mask, or unpadded without one;
    `max_length` counts the embedded positions; several sequences a prompt."""
    hf, ours = saved_models(tmp_path)
    ids, mask = left_padded(131)
    embeds = hf.get_input_embeddings()(ids).detach() + 0.1 * torch.randn(3, 9, 64)  # no ids stand for these
    calls = [dict(attention_mask=mask), {}, dict(input_ids=ids, attention_mask=mask), dict(input_ids=ids),
             dict(attention_mask=mask, max_length=13, max_new_tokens=None),
             dict(attention_mask=mask, no_repeat_ngram_size=2)]
    if sampling["do_sample"]:
        calls.append(dict(attention_mask=mask, num_return_sequences=2))
    for call in calls:
        outputs = []
        for model in (hf, ours):
            torch.manual_seed(7)
            outputs.append(model.generate(inputs_embeds=embeds, **{"max_new_tokens": 6, **call, **sampling}))
        expected, got = outputs
        columns = (9 if "input_ids" in call else 0) + (4 if "max_length" in call else 6)
        assert expected.shape[1] == columns and torch.equal(got, expected), call


def test_generate_from_inputs_embeds_refuses_what_reads_the_prompt_ids(tmp_path):
    _, ours = saved_models(tmp_path)
    ids, _ = left_padded(131)
    embeds = torch.randn(3, 9, 64)
    for call, message in [(dict(num_beams=2), "not with beam search"), (dict(guidance_scale=2.0), "not with guidance"),
                          (dict(input_ids=ids[:, :4]), r"input_ids given with inputs_embeds must be the ids they "
                                                       r"embed, shaped \(3, 9\), got \(3, 4\)")]:
        with pytest.raises(GenerationError, match=message):
            ours.generate(inputs_embeds=embeds, max_new_tokens=3, **call)
    with pytest.raises(GenerationError, match=r"^inputs_embeds must be a floating-point tensor shaped \(batch, seq"):
        ours.generate(inputs_embeds=embeds[..., :5])


def test_a_forward_hook_on_a_block_sees_the_pair_that_sums_to_transformers_layer_output(tmp_path):
    """Activation capture with forward hooks, as written for transformers' `model.model.layers[i]`: ttl's blocks
    return (the MLP's output, the residual stream before it), whose sum is transformers' layer output (documented in
    docs/models.md; `output[0]` alone is not)."""
    hf, ours = saved_models(tmp_path)
    ids, mask = left_padded(131)
    captured = {}
    for name, layers in (("hf", hf.model.layers), ("ttl", ours.backbone.layers)):
        handles = [layer.register_forward_hook(lambda module, args, output, i=i, name=name:
                                               captured.__setitem__((name, i), output)) for i, layer in
                   enumerate(layers)]
        with torch.no_grad():
            (hf if name == "hf" else ours)(ids, attention_mask=mask)
        for handle in handles:
            handle.remove()
    for i in range(2):
        expected, (mlp_out, residual) = captured["hf", i], captured["ttl", i]
        assert float((mlp_out + residual - expected)[mask.bool()].abs().max()) <= 1e-5


class _LastTokenIs:
    """A custom transformers-style stopping criterion: a row is done once its last token is `token`."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids: torch.Tensor, scores) -> torch.Tensor:
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize("sampling", [dict(do_sample=False), dict(do_sample=True, top_k=10)], ids=["greedy", "sampled"])
def test_stopping_criteria_end_rows_as_in_transformers(sampling, tmp_path):
    """`stopping_criteria=StoppingCriteriaList([...])`, custom criteria written for transformers (one per row, one
    for all rows at a length): each row ends where transformers' ends, finished rows padded, the output trimmed."""
    import transformers

    hf, ours = saved_models(tmp_path)
    ids, mask = left_padded(131)
    torch.manual_seed(4)
    free = hf.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], pad_token_id=PAD, **sampling)
    per_row = [_LastTokenIs(int(free[0, 9 + 2])), _LastTokenIs(int(free[2, 9 + 4]))]
    at_length = [lambda input_ids, scores, **kwargs: input_ids.shape[1] >= 9 + 7]
    for criteria in (per_row, at_length):
        outputs = []
        for model in (hf, ours):
            torch.manual_seed(4)
            outputs.append(model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[],
                                          pad_token_id=PAD, stopping_criteria=transformers.StoppingCriteriaList(
                                              criteria), **sampling))
        assert torch.equal(outputs[1], outputs[0])
        stopped = (outputs[0][0, 9 + 3:] == PAD).all() if criteria is per_row else outputs[0].shape[1] == 9 + 7
        assert stopped
    with pytest.raises(GenerationError, match="^stopping_criteria must be callables .* got a int$"):
        ours.generate(ids, attention_mask=mask, stopping_criteria=[3])
    with pytest.raises(GenerationError, match=r"^a stopping criterion must return one bool or one per row \(3\), "
                       r"got shape \(3, 1\) from _column_verdict$"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=PAD,
                      stopping_criteria=[_column_verdict])
    with pytest.raises(GenerationError, match=r"^a stopping criterion must return .* got a str from <lambda>$"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=PAD,
                      stopping_criteria=[lambda input_ids, scores: "done"])
