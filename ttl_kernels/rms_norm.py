"""RMSNorm with an optional fused residual add: Triton forward and backward kernels beside the reference.

Memory traffic is the whole cost, so each row is read once per pass and kept in registers: the forward
reads x (and the residual) and writes y (and x + residual); the backward reads dy, the saved sum h (and the
gradient of the new residual) and writes dx. The per-row 1/rms (4 bytes a row) is the only thing saved
besides h. The weight gradient is a sum over rows; each backward program accumulates a partial row in fp32
over a contiguous block of rows, and a second pass sums the partial rows, so the result is deterministic
(no atomics) and the grid still fills the GPU.
"""

from __future__ import annotations

import torch

from .dispatch import (HAVE_TRITON, apply_kernel, as_rows, once_differentiable, require_floating, require_one_device,
                       sm_count, use_triton)

if HAVE_TRITON:
    import triton
    import triton.language as tl

# One tile is ROWS x BLOCK_N elements. Small hidden sizes put several rows in a tile so each program moves
# enough bytes; warps grow with the tile to keep 8..32 values per thread (the backward, which also holds
# a dW accumulator row, gets up to twice the warps). Starting points for tuning on the GPU, not
# measured optima.
TILE_ELEMENTS = 4096
# The largest hidden size accepted. Rows live in registers: the backward holds whole rows without spilling up
# to 16384 (sm_90) and spills to local memory above that (correct, slower).
MAX_HIDDEN = 65536


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch RMSNorm, rounding exactly like transformers' `LlamaRMSNorm` (fp32 statistics, float64 inputs
    included, the normalized value cast back to the input dtype before the weight multiply), so that a float64 model
    is transformers' float64 model to float64 rounding. With `residual`, normalizes `x + residual` and also returns
    that sum."""
    if residual is not None:
        x = residual + x
    normed = x.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(x.dtype)
    return (out, x) if residual is not None else out


if HAVE_TRITON:

    @triton.jit
    def _rms_norm_fwd_kernel(
        X, R, W, Y, H, RSTD, n_rows, n_cols, eps, stride_x, stride_r, stride_y, stride_h,
        HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        rows = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows * stride_x + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        if HAS_RESIDUAL:
            r = tl.load(R + rows * stride_r + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
            # rounded to the sum's dtype first, as the reference's `residual + x` is
            x = (x.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + rows * stride_h + cols[None, :], x, mask=mask)
        x = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        tl.store(RSTD + tl.program_id(0) * ROWS + tl.arange(0, ROWS), rstd, mask=row_ok)
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0, eviction_policy="evict_last").to(tl.float32)
        normed = (x * rstd[:, None]).to(H.dtype.element_ty).to(tl.float32)
        tl.store(Y + rows * stride_y + cols[None, :], (w[None, :] * normed).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY, DH, H, W, RSTD, DX, DR, DW_PARTIAL, n_rows, n_cols, rows_per_program,
        stride_dy, stride_dh, stride_h, stride_dx, stride_dr,
        HAS_DH: tl.constexpr, HAS_DR: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK_N: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        first = pid * rows_per_program
        last = tl.minimum(first + rows_per_program, n_rows)
        for start in range(first, last, ROWS):
            rows = start + tl.arange(0, ROWS)
            row_ok = rows < last
            mask = row_ok[:, None] & col_ok[None, :]
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            rows = rows.to(tl.int64)[:, None]
            h = tl.load(H + rows * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if COMPUTE_DW:
                dw += tl.sum(dy * (h * rstd[:, None]), axis=0)
            # reloaded per tile (an L1 hit) rather than held across the loop beside the dw accumulator
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
            g = dy * w[None, :]
            # d/dh of g . (h * rstd) with rstd = (mean(h^2) + eps)^-1/2; written with h rather than h * rstd
            # and with dW summed first, so at most three row-sized values are live at once: 16384-wide rows
            # then fit in 64 registers a thread instead of spilling 72-96 bytes. The per-row factors are applied one
            # at a time (per row, not per element), so the partial products stay in float32's range wherever the
            # forward's mean square does: rstd^3 / n alone went subnormal for rows of rms above 1e11 (6e-3 off at
            # 1e14) and overflowed for rms below 1e-13 (with eps 0)
            c = tl.sum(g * h, axis=1) / n_cols * rstd * rstd * rstd
            dx = g * rstd[:, None] - h * c[:, None]
            if HAS_DH:
                dx += tl.load(DH + rows * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_DR:  # the same gradient in the residual's dtype (an fp32 residual stream beside bf16 x)
                tl.store(DR + rows * stride_dr + cols[None, :], dx.to(DR.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_ok)


def _launch_config(n_cols: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) for a hidden size."""
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"rms_norm supports hidden sizes up to {MAX_HIDDEN}, got {n_cols}")
    block_n = triton.next_power_of_2(max(n_cols, 1))  # next_power_of_2(0) is 0
    rows = max(1, TILE_ELEMENTS // block_n)
    max_warps = 32 if backward or block_n > 16384 else 16
    return block_n, rows, max(4, min(max_warps, rows * block_n // 512))


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward kernel on (rows, hidden) views: returns (y, x + residual or None, 1/rms per row);
    y is in `out_dtype`, by default the promotion of the weight's and the sum's dtypes."""
    n_rows, n_cols = x.shape
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype or torch.promote_types(weight.dtype, h_dtype), device=x.device)
    h = None if residual is None else torch.empty((n_rows, n_cols), dtype=h_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_n, rows, num_warps = _launch_config(n_cols)
    if x.numel():
        # without a residual, x stands in for the unused R and H (H's dtype is the rounding dtype)
        r_, h_ = (x, x) if residual is None else (residual, h)
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, rows),)](
            x, r_, weight, y, h_, rstd, n_rows, n_cols, eps, x.stride(0), r_.stride(0), y.stride(0),
            h_.stride(0), HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, ROWS=rows, num_warps=num_warps,
        )
    return y, h, rstd


def rms_norm_backward(
    dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    compute_dw: bool, x_dtype: torch.dtype | None = None, r_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernel: returns (dx, dresidual, dweight or None) from the output gradient `dy`,
    the new residual's gradient `dh` (or None) and the forward's saved input `h` (x, or x + residual) and `rstd`. dx
    comes in `x_dtype` (default h's); dresidual is the same gradient in `r_dtype`, a second output of the
    same pass where the dtypes differ, dx itself where they agree, None without `r_dtype`."""
    n_rows, n_cols = h.shape
    block_n, rows, num_warps = _launch_config(n_cols, backward=True)
    dx = torch.empty((n_rows, n_cols), dtype=x_dtype or h.dtype, device=h.device)
    dr = dx if r_dtype in (None, dx.dtype) else torch.empty((n_rows, n_cols), dtype=r_dtype, device=h.device)
    # at least two programs per SM (so one's start and final store overlap another's streaming), more
    # when they are small, each with a whole number of tiles; the partial rows cost programs x hidden x 4 B
    programs = max(1, min(sm_count(h.device) * max(2, 32 // num_warps), triton.cdiv(n_rows, rows)))
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs), rows) * rows
    programs = triton.cdiv(n_rows, rows_per_program) if n_rows else 0
    dw_partial = torch.empty((programs, n_cols) if compute_dw else (0,), dtype=torch.float32, device=h.device)
    if programs and n_cols:
        dh_ = dy if dh is None else dh
        _rms_norm_bwd_kernel[(programs,)](
            dy, dh_, h, weight, rstd, dx, dr, dw_partial, n_rows, n_cols, rows_per_program,
            dy.stride(0), dh_.stride(0), h.stride(0), dx.stride(0), dr.stride(0),
            HAS_DH=dh is not None, HAS_DR=dr is not dx, COMPUTE_DW=compute_dw, BLOCK_N=block_n, ROWS=rows,
            num_warps=num_warps,
        )
    dw = None
    if compute_dw:
        dw = dw_partial.sum(0) if programs else torch.zeros(n_cols, dtype=torch.float32, device=h.device)
        dw = dw.to(weight.dtype)
    return dx, (dr if r_dtype is not None else None), dw


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: returns y, or (y, x + residual) when a residual is given. Gradients may flow into
    either output or both; dx (the gradient of x + residual) goes to x and to the residual alike. Where the
    two share a dtype they are returned as one tensor object, as `AddBackward` returns its gradient: autograd
    copies a gradient used twice before making it a leaf's `.grad`, whereas two views of one buffer would
    each become a `.grad`, one storage that later accumulations add into twice. For the same reason the
    incoming gradient itself, never a view of it, is returned when only the new residual is used."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps, out_dtype):
        shape = x.shape
        x_rows = as_rows(x)
        residual_rows = None if residual is None else as_rows(residual)
        weight = weight.contiguous()
        y, h, rstd = rms_norm_forward(x_rows, weight, eps, residual_rows, out_dtype)
        ctx.save_for_backward(x_rows if h is None else h, weight, rstd)
        ctx.input_dtypes = (x.dtype, None if residual is None else residual.dtype)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to read
        if h is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh=None):
        h, weight, rstd = ctx.saved_tensors
        x_dtype, r_dtype = ctx.input_dtypes
        if dy is None and dh is None:  # neither output's gradient is defined (set_materialize_grads(False))
            return None, None, None, None, None
        if dy is None:  # only the new residual was used: its gradient is x's and the residual's (.to: no copy)
            return dh.to(x_dtype), None, dh.to(r_dtype), None, None
        dh_rows = None if dh is None else as_rows(dh)
        dx_rows, dr_rows, dw = rms_norm_backward(as_rows(dy), dh_rows, h, weight, rstd, ctx.needs_input_grad[1],
                                                 x_dtype, r_dtype)
        dx = dx_rows.view(dy.shape)
        if dr_rows is dx_rows:
            return dx, dw, dx, None, None  # one object for both, not two views (see the class docstring)
        return dx, dw, None if dr_rows is None else dr_rows.view(dy.shape), None, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
    *, out_dtype: torch.dtype | None = None, backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension of `x` (any hidden size up to 65536; fp32, bf16 or fp16 with fp32
    statistics), scaled by `weight`, rounding like `rms_norm_reference`; the output dtype is the promotion
    of the weight's and the input's, or `out_dtype`, to which the result is rounded once (as the cast
    autocast puts before the next matmul would, without writing and rereading the wider tensor). With
    `residual` (same shape as `x`), normalizes `x + residual` in the same pass and returns `(normed,
    x + residual)`. `backend` picks Triton or the reference (see `ttl_kernels.dispatch.use_triton`). A limit of
    both paths: the input gradient is a difference of terms of size |dy * weight| / rms, which cancels almost
    entirely for a hidden size of 1 (or 2) with eps far below the mean square (at eps=0 the output is sign(x), of
    exact gradient 0): both then return float32 rounding noise of that size, neither consistently smaller."""
    if x.dim() == 0:
        raise ValueError("rms_norm normalizes over the last dimension: the input must have one, got a 0-dim tensor")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm residual shape {tuple(residual.shape)} != input shape {tuple(x.shape)}")
    require_floating("rms_norm", x=x, weight=weight, residual=residual)
    require_one_device("rms_norm", x=x, weight=weight, residual=residual)
    if not use_triton(x, backend, weight, residual):
        out = rms_norm_reference(x, weight, eps, residual)
        if out_dtype is None:
            return out
        return (out[0].to(out_dtype), out[1]) if residual is not None else out.to(out_dtype)
    return apply_kernel(RMSNormFunction, x, weight, residual, eps, out_dtype)
