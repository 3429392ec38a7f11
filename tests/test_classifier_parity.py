"""ttl's sequence classifier against transformers' LlamaForSequenceClassification (fp32 CPU unless stated): losses
of every problem type, and the token each row is pooled at, whatever its padding."""

import pytest
import torch
from helpers import rel_err
from hf_reference import hf_classifier, padded_batch, to_ttl

import ttl_core


@pytest.mark.parametrize("problem", ["single_label_classification", "regression", "multi_label_classification"])
def test_classifier_matches_transformers(problem, tmp_path):
    num_labels = 1 if problem == "regression" else 4
    hf = hf_classifier(num_labels=num_labels)
    ours = to_ttl(hf, tmp_path)
    assert isinstance(ours, ttl_core.LlamaForSequenceClassification)
    ids, mask = padded_batch(hf.config.vocab_size, pad=3)
    gen = torch.Generator().manual_seed(5)
    if problem == "single_label_classification":
        labels = torch.randint(0, num_labels, (ids.shape[0],), generator=gen)
    elif problem == "regression":
        labels = torch.randn(ids.shape[0], generator=gen)
    else:
        labels = (torch.rand(ids.shape[0], num_labels, generator=gen) > 0.5).float()
    ref = hf(ids, attention_mask=mask, labels=labels)
    got = ours(ids, attention_mask=mask, labels=labels)
    assert got.logits.shape == (ids.shape[0], num_labels)
    assert (ref.logits - got.logits).abs().max() <= 1e-4
    assert abs(ref.loss.item() - got.loss.item()) <= 1e-5
    assert ours.config.problem_type == hf.config.problem_type == problem  # recorded, so a saved config keeps it
    if problem == "single_label_classification":  # int32 class ids too (transformers' F.cross_entropy refuses them)
        assert ours(ids, attention_mask=mask, labels=labels.int()).loss.item() == got.loss.item()
    ref.loss.backward()
    got.loss.backward()
    assert rel_err(ours.score.weight.grad, hf.score.weight.grad) <= 1e-5


def test_bf16_classifier_losses_keep_float_labels_unrounded(tmp_path):
    """As in transformers, the float targets of regression and multi-label losses are not cast to bf16 logits."""
    ids, mask = padded_batch(131, pad=3)
    gen = torch.Generator().manual_seed(6)
    for num_labels, labels in ((1, 4 + torch.rand(ids.shape[0], generator=gen)),
                               (3, torch.rand(ids.shape[0], 3, generator=gen))):
        ours = to_ttl(hf_classifier(num_labels=num_labels), tmp_path / str(num_labels)).to(torch.bfloat16)
        with torch.no_grad():
            got = ours(ids, attention_mask=mask, labels=labels)
        # transformers' own call on these logits (before, the labels were rounded to bf16 and so was the loss)
        loss = (torch.nn.functional.mse_loss(got.logits.squeeze(), labels) if num_labels == 1 else
                torch.nn.functional.binary_cross_entropy_with_logits(got.logits, labels))
        assert got.loss.dtype == torch.float32 and torch.equal(got.loss, loss)


def test_classifier_pools_last_non_pad_token_left_and_right_padding(tmp_path):
    ours = to_ttl(hf_classifier(), tmp_path)
    ids, mask = padded_batch(131, pad=3)
    with torch.no_grad():
        batch_logits = ours(ids, attention_mask=mask).logits
        for row in range(ids.shape[0]):
            real = ids[row][mask[row].bool()][None]
            alone = ours(real).logits[0]
            # the right-padded and unpadded rows see exactly their own tokens at the pooled position
            if mask[row, 0] == 1:
                assert torch.allclose(batch_logits[row], alone, atol=1e-5)


def test_classifier_pools_like_transformers_with_padding_on_both_sides_and_inside(tmp_path):
    """transformers pools the rightmost non-pad token: rows padded on both ends, or with the padding id
    inside the text, pool there too (not before the first padding token); a row of padding ids alone pools at
    its first position (the argmax of no candidate), not at a token of the row before."""
    hf = hf_classifier(num_labels=3, seed=4)
    ours = to_ttl(hf, tmp_path)
    gen = torch.Generator().manual_seed(21)
    ids = torch.randint(4, 131, (5, 15), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = mask[0, 11:] = 0  # both ends
    mask[1, :5] = 0                 # left
    mask[2, 9:] = 0                 # right
    ids = ids.masked_fill(mask == 0, 3)
    ids[3, 6] = ids[0, 5] = 3       # the padding id as a token inside the text
    ids[4] = 3                      # nothing but padding ids (attended)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert (ref - got).abs().max() <= 1e-4
    assert ref.abs().max() > 0.5


def test_classifier_without_pad_id_rejects_batches(tmp_path):
    ours = to_ttl(hf_classifier(), tmp_path)
    ours.config.pad_token_id = None
    ids, _ = padded_batch(131, pad=3)
    with pytest.raises(ttl_core.TTLError, match="pad_token_id"):
        ours(ids)
    assert ours(ids[:1]).logits.shape == (1, 2)
