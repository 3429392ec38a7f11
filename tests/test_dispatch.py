"""Which path each kernel takes: every kernel test compares the Triton path with a float64 truth the references
also meet, so a kernel quietly taking its reference would pass them all; this holds the choice itself."""

import pytest
import torch
from helpers import KERNEL_MODULES, record_kernel_decisions

import ttl_kernels
from ttl_kernels.dispatch import interpreting


def call_every_kernel(backend: str) -> None:
    gen = torch.Generator().manual_seed(40)
    rows, targets = torch.randn(4, 16, generator=gen), torch.randint(0, 16, (4,), generator=gen)
    ttl_kernels.rms_norm(rows, torch.randn(16, generator=gen), backend=backend)
    ttl_kernels.swiglu(rows, backend=backend)
    q, k = torch.randn(1, 4, 2, 16, generator=gen), torch.randn(1, 4, 1, 16, generator=gen)
    angles = torch.randn(4, 16, generator=gen)
    ttl_kernels.apply_rotary(q, k, angles.cos(), angles.sin(), backend=backend)
    ttl_kernels.apply_rotary_qkv(torch.cat((q, k, k), dim=2), angles.cos(), angles.sin(), 1, backend=backend)
    ttl_kernels.cross_entropy(rows, targets, backend=backend)
    ttl_kernels.fused_linear_cross_entropy(rows, torch.randn(16, 16, generator=gen), targets, backend=backend)
    ttl_kernels.flash_attention(q, k, k, backend=backend)


@pytest.mark.parametrize("backend, env, triton", [("triton", None, True), ("auto", "triton", True),
                                                  ("auto", None, False), ("torch", None, False)],
                         ids=["triton", "auto-env-triton", "auto-cpu", "torch"])
def test_each_kernel_takes_the_path_its_backend_names(monkeypatch, backend, env, triton):
    # "auto" runs the references on the CPU; TTL_KERNELS=triton overrides it (Triton then runs interpreted)
    if triton and not interpreting():
        pytest.skip("Triton on CPU tensors needs the interpreter (TRITON_INTERPRET=1)")
    if env is None:
        monkeypatch.delenv("TTL_KERNELS", raising=False)
    else:
        monkeypatch.setenv("TTL_KERNELS", env)
    decisions = record_kernel_decisions(monkeypatch)
    call_every_kernel(backend)
    assert decisions == {module.__name__: {triton} for module in KERNEL_MODULES}
