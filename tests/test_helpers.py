"""The comparison helpers every numeric test leans on: a NaN or inf must fail every form of tolerance they feed."""

import math

import torch
from helpers import largest, rel_err


def test_rel_err_of_a_nan_or_inf_fails_even_against_a_reference_as_broken():
    """The flash-attention criterion `rel_err(ours, truth) <= 2 * rel_err(reference, truth)` passed (inf <= inf)
    when a bug made both ours and the reference NaN."""
    truth = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    assert rel_err(truth * (1 + 1e-6), truth) <= 1e-5
    for bad_value in (math.nan, math.inf):
        broken = truth.clone()
        broken[2, 3] = bad_value
        assert not rel_err(broken, truth) <= max(1e-2, 2 * rel_err(broken, truth))
        assert not rel_err(truth, broken) <= 1e-2
    assert not rel_err(truth, torch.zeros_like(truth)) <= 1e-2


def test_largest_is_nan_when_any_value_is():
    """Python's max([0.0, nan]) is 0.0: a NaN loss after the first step passed `max(differences) <= tol`."""
    differences = torch.rand(5, generator=torch.Generator().manual_seed(1)).tolist()
    assert largest(differences) == max(differences)
    for position in range(len(differences)):
        assert math.isnan(largest(differences[:position] + [math.nan] + differences[position:]))
