"""Inputs every kernel must refuse with one clear line on both backends, found by fuzzing: tensors on two devices
(Triton failed deep in its launcher, or read a pointer it cannot), an ignore_index that is no int (Triton failed
deep in the interpreter, or silently took 1.5) or a kv_heads that is no int (torch's split failed naming no
argument), an empty vocabulary, and a fused cross-entropy's hidden and weight of two dtypes outside autocast
(torch's matmul refused naming neither)."""

import pytest
import torch

import ttl_kernels

BACKENDS = ["triton", "torch"]


def elsewhere(*shape, dtype=torch.float32):
    """A tensor on a device other than the CPU the other inputs are on (meta: present on every machine)."""
    return torch.empty(*shape, dtype=dtype, device="meta")


def rand(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


TWO_DEVICES = {
    "rms_norm": lambda b: ttl_kernels.rms_norm(rand(4, 8), elsewhere(8), backend=b),
    "rms_norm residual": lambda b: ttl_kernels.rms_norm(rand(4, 8), rand(8), residual=elsewhere(4, 8), backend=b),
    "swiglu": lambda b: ttl_kernels.swiglu(rand(4, 8), elsewhere(4, 8), backend=b),
    "apply_rotary": lambda b: ttl_kernels.apply_rotary(rand(1, 5, 2, 8), rand(1, 5, 1, 8), elsewhere(5, 8),
                                                       elsewhere(5, 8), backend=b),
    "rotary_into_cache": lambda b: ttl_kernels.rotary_into_cache(
        rand(1, 5, 4, 8), rand(5, 8), rand(5, 8), rand(1, 9, 1, 8), rand(1, 9, 1, 8),
        elsewhere(5, dtype=torch.int64), backend=b),
    "cross_entropy": lambda b: ttl_kernels.cross_entropy(rand(6, 11), elsewhere(6, dtype=torch.int64), backend=b),
    "fused_linear_cross_entropy": lambda b: ttl_kernels.fused_linear_cross_entropy(
        rand(6, 4), elsewhere(11, 4), torch.zeros(6, dtype=torch.int64), backend=b),
    "flash_attention": lambda b: ttl_kernels.flash_attention(rand(1, 5, 2, 16), elsewhere(1, 5, 2, 16),
                                                             rand(1, 5, 2, 16), backend=b),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", TWO_DEVICES.values(), ids=TWO_DEVICES)
def test_tensors_on_two_devices_are_refused(call, backend):
    with pytest.raises(ValueError, match=r"on one device, got \w+ on meta and \w+ on cpu"):
        call(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [1.5, None, torch.tensor(3), True], ids=["float", "None", "tensor", "bool"])
def test_an_ignore_index_that_is_no_int_is_refused(ignore_index, backend):
    targets = torch.tensor([0, 3, 5])
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        ttl_kernels.cross_entropy(rand(3, 7), targets, ignore_index=ignore_index, backend=backend)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        ttl_kernels.fused_linear_cross_entropy(rand(3, 4), rand(7, 4), targets, ignore_index=ignore_index,
                                               backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_vocabulary_is_refused(backend):
    targets = torch.full((3,), -100)
    with pytest.raises(ValueError, match="at least one class"):
        ttl_kernels.cross_entropy(rand(3, 0), targets, backend=backend)
    with pytest.raises(ValueError, match="at least one class"):
        ttl_kernels.fused_linear_cross_entropy(rand(3, 4), rand(0, 4), targets, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_heads", [1.0, None, torch.tensor(1)], ids=["float", "None", "tensor"])
def test_a_kv_heads_that_is_no_int_is_refused(kv_heads, backend):
    with pytest.raises(TypeError, match="kv_heads must be an int"):
        ttl_kernels.apply_rotary_qkv(rand(1, 5, 4, 8), rand(5, 8), rand(5, 8), kv_heads, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fused_cross_entropy_of_two_dtypes_is_refused_outside_autocast_and_runs_within(backend):
    hidden, weight, targets = rand(6, 4).bfloat16(), rand(11, 4), torch.tensor([0, 3, 5, 10, 2, 7])
    with pytest.raises(TypeError, match="hidden and weight of one dtype outside autocast, got torch.bfloat16 and "
                                        "torch.float32"):
        ttl_kernels.fused_linear_cross_entropy(hidden, weight, targets, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ttl_kernels.fused_linear_cross_entropy(hidden, weight, targets, backend=backend)
    expected = torch.nn.functional.cross_entropy((hidden @ weight.bfloat16().T).float(), targets)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-2)
