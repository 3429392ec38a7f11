"""SwiGLU activation silu(gate) * up: fused Triton forward and backward beside the reference.

gate and up are usually the two halves of one fused projection, so the kernels take row-strided views
and never copy them; given that projection's output whole, the backward writes both input gradients into
one tensor shaped like it, so autograd need not concatenate two halves (a read and a write of both). The
forward reads gate and up and writes the product (3 tensors of traffic); the backward saves nothing but the
inputs, recomputes sigmoid(gate), and reads the output gradient, gate and up to write both input gradients
(5 tensors). The reference saves silu(gate) as well and runs 3 kernels forward and more backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import (HAVE_TRITON, apply_kernel, as_rows, once_differentiable, require_floating, require_one_device,
                       use_triton)

if HAVE_TRITON:
    import triton
    import triton.language as tl

BLOCK = 1024  # elements per program; a starting point for tuning on the GPU


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch SwiGLU, as transformers' Llama MLP computes it (`up=None`: see `swiglu`)."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return F.silu(gate) * up


if HAVE_TRITON:

    @triton.jit
    def _swiglu_fwd_kernel(G, U, OUT, n_cols, stride_g, stride_u, stride_out, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        out = g * tl.sigmoid(g) * u
        tl.store(OUT + row * stride_out + cols, out.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(
        DOUT, G, U, DG, DU, n_cols, stride_dout, stride_g, stride_u, stride_dg, stride_du, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dout = tl.load(DOUT + row * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        # d silu / dg = sig + g * sig * (1 - sig)
        dg = dout * u * (sig + silu * (1.0 - sig))
        tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + row * stride_du + cols, (dout * silu).to(DU.dtype.element_ty), mask=mask)


def _grid(rows: torch.Tensor) -> tuple[int, int]:
    return rows.shape[0], triton.cdiv(rows.shape[1], BLOCK)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper saving only gate and up (views into the caller's projection output). With `up` None,
    `gate` holds both halves and gets one gradient tensor."""

    @staticmethod
    def forward(ctx, gate, up):
        packed = up is None
        if packed:
            g, u = as_rows(gate).chunk(2, dim=-1)
        else:
            g, u = as_rows(gate), as_rows(up)
        out = torch.empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype), device=gate.device)
        if out.numel():
            _swiglu_fwd_kernel[_grid(g)](g, u, out, g.shape[1], g.stride(0), u.stride(0), out.stride(0),
                                         BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(g, u)
        ctx.packed, ctx.shape = packed, gate.shape
        return out.view(*gate.shape[:-1], g.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        g, u = ctx.saved_tensors
        dout_rows = as_rows(dout)
        if ctx.packed:  # both halves of one gradient, as the fused projection's output is laid out
            grad = torch.empty((g.shape[0], 2 * g.shape[1]), dtype=g.dtype, device=g.device)
            dg, du = grad.chunk(2, dim=-1)
        else:
            dg = torch.empty(g.shape, dtype=g.dtype, device=g.device)
            du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        if dout_rows.numel():
            _swiglu_bwd_kernel[_grid(g)](dout_rows, g, u, dg, du, g.shape[1], dout_rows.stride(0), g.stride(0),
                                         u.stride(0), dg.stride(0), du.stride(0), BLOCK=BLOCK, num_warps=4)
        if ctx.packed:
            return grad.view(ctx.shape), None
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up for gate and up of one shape (e.g. the halves of a fused gate/up projection, as
    strided views), in the promotion of their dtypes: the Triton path computes in fp32 and rounds once, the
    reference (as transformers) rounds silu(gate) first. With `up=None`, `gate` is the
    fused projection's output itself, gate then up along the last dim (even), and its gradient is one tensor.
    `backend` picks Triton or the reference (see `ttl_kernels.dispatch.use_triton`)."""
    if up is None and (gate.dim() == 0 or gate.shape[-1] % 2):
        raise ValueError(f"swiglu of a fused gate/up tensor needs an even last dim, got {tuple(gate.shape)}")
    if up is not None and (gate.shape != up.shape or gate.dim() == 0):
        raise ValueError(f"swiglu gate and up must have one shape with a last dim, got {tuple(gate.shape)} and "
                         f"{tuple(up.shape)}")
    require_floating("swiglu", gate=gate, up=up)
    require_one_device("swiglu", gate=gate, up=up)
    if not use_triton(gate, backend, up):
        return swiglu_reference(gate, up)
    return apply_kernel(SwiGLUFunction, gate, up)
