"""FlashAttention in Triton: forward and backward, causal or not, GQA, variable-length packed sequences.

Every call is handled as packed: a (batch, seq, heads, dim) input is viewed as (batch·seq, heads, dim) with
`cu_seqlens` = 0, seq, 2·seq, ..., so one kernel serves both layouts and any sequence length. The forward
streams K/V blocks through an online softmax and saves the log-sum-exp per query row; the backward
recomputes the probabilities from it. Scores are kept in base 2 (log2(e) folded into the softmax scale), so
the exponentials are the GPU's native exp2 without a multiply of their own; the saved log-sum-exp is in base
2 as well.
Grouped-query attention maps query head h to KV head h // group and never repeats K/V in memory:
the dK/dV kernel owns one KV block of one KV head and loops over the query heads of its group (no atomics),
the dQ kernel owns one query block of one head.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from .dispatch import (HAVE_TRITON, apply_kernel, check_documents, interpreting, once_differentiable,
                       require_floating, require_one_device, use_triton)

if HAVE_TRITON:
    import triton
    import triton.language as tl

HEAD_DIMS = (16, 32, 64, 128)


def flash_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None, softmax_scale: float | None = None,
) -> torch.Tensor:
    """Explicit-softmax attention in the input dtype's precision (float64 in tests), same layouts as
    `flash_attention`, one document at a time (no sequences: one empty document, whose write keeps the graph)."""
    if cu_seqlens is None:
        batch, seq = q.shape[:2]
        cu = torch.arange(batch + 1) * seq if batch else torch.zeros(2, dtype=torch.long)
        flat = [t.flatten(0, 1) for t in (q, k, v)]
        out = flash_attention_reference(*flat, causal, cu, seq, softmax_scale)
        return out.view(q.shape)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, stop in zip(bounds[:-1], bounds[1:]):
        qd = q[start:stop].transpose(0, 1)  # (heads, len, dim)
        kd = k[start:stop].transpose(0, 1).repeat_interleave(group, 0)
        vd = v[start:stop].transpose(0, 1).repeat_interleave(group, 0)
        scores = qd @ kd.transpose(1, 2) * scale
        if causal:
            n = stop - start
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        out[start:stop] = (scores.softmax(-1) @ vd).transpose(0, 1)
    return out


if HAVE_TRITON:
    LOG2E = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        # the interpreter computes dots of bf16 operands wrongly, so they are upcast there; fp32 inputs use
        # full-precision dots rather than tf32
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        elif IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _tile(T, start, rows, head, stride_t, stride_h, offs_d, length):
        """The (rows, D) tile of tokens start + rows of one head; zeros past the sequence's end."""
        return tl.load(T + (start + rows)[:, None] * stride_t + head * stride_h + offs_d[None, :],
                       mask=(rows < length)[:, None], other=0.0)

    @triton.jit
    def _store_tile(T, start, rows, head, stride_t, stride_h, offs_d, tile, length):
        """Store the (rows, D) tile of tokens start + rows of one head, in T's dtype; rows past the end skipped."""
        tl.store(T + (start + rows)[:, None] * stride_t + head * stride_h + offs_d[None, :],
                 tile.to(T.dtype.element_ty), mask=(rows < length)[:, None])

    @triton.jit
    def _delta_kernel(O, DO, DELTA, n_rows, n_heads, stride_ot, stride_oh, stride_dot, stride_doh, D: tl.constexpr,
                      BLOCK_R: tl.constexpr):
        """rowsum(dO ∘ O) in float32 for BLOCK_R (token, head) rows: the softmax-gradient term both backward
        kernels subtract. One pass over O and dO, where eager PyTorch would write and reread float32 copies."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        token, head = (rows // n_heads).to(tl.int64), (rows % n_heads).to(tl.int64)
        offs_d = tl.arange(0, D)
        o = tl.load(O + (token * stride_ot + head * stride_oh)[:, None] + offs_d[None, :], mask=row_ok[:, None],
                    other=0.0)
        do = tl.load(DO + (token * stride_dot + head * stride_doh)[:, None] + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        tl.store(DELTA + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=row_ok)

    @triton.jit
    def _sequence(CU):
        """(sequence start, length, head) of a program on a grid of (blocks, heads, sequences). The head is
        64-bit like the start: in a head-major view (heads outside tokens) head x head stride can pass 2^31."""
        seq_id = tl.program_id(2)
        start = tl.load(CU + seq_id).to(tl.int64)
        length = tl.load(CU + seq_id + 1).to(tl.int32) - start.to(tl.int32)
        return start, length, tl.program_id(1).to(tl.int64)

    @triton.jit
    def _heavy_first(CAUSAL: tl.constexpr):
        """The query block of this program. Under a causal mask the last query blocks attend to the most keys;
        numbering them first schedules the longest programs first, so the grid's tail is made of short ones."""
        if CAUSAL:
            return tl.num_programs(0) - 1 - tl.program_id(0)
        return tl.program_id(0)

    @triton.jit
    def _query_block(CU, GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     D: tl.constexpr):
        """Where a program over (query block, head, sequence) works: (m_block, start, length, head, kv_head,
        offs_m, offs_n, offs_d). The block may lie past its sequence's end (the grid covers the longest)."""
        m_block = _heavy_first(CAUSAL)
        start, length, head = _sequence(CU)
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        return m_block, start, length, head, head // GROUP, offs_m, tl.arange(0, BLOCK_N), tl.arange(0, D)

    @triton.jit
    def _key_blocks(length, m_block, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
        """(unmasked_end, end) of the keys a query block attends to. Keys before `unmasked_end` need no mask:
        every one lies in the sequence and, with a causal mask, before the block's first query; only the
        blocks from there to `end` (the diagonal and the sequence's ragged end) pay for masking."""
        end = length
        unmasked_end = (length // BLOCK_N) * BLOCK_N
        if CAUSAL:
            end = tl.minimum(length, (m_block + 1) * BLOCK_M)
            unmasked_end = (tl.minimum(length, m_block * BLOCK_M) // BLOCK_N) * BLOCK_N
        return unmasked_end, end

    @triton.jit
    def _fwd_block(acc, m_i, l_i, q, K, V, start, n0, offs_m, offs_n, kv_head, stride_kt, stride_kh, stride_vt,
                   stride_vh, offs_d, length, qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                   UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """One key block of the online softmax: the running (acc, max, sum) after keys n0 .. n0 + BLOCK_N, with
        scores and max in base 2 (`qk_scale` is the softmax scale times log2(e))."""
        cols = n0 + offs_n
        k = _tile(K, start, cols, kv_head, stride_kt, stride_kh, offs_d, length)
        s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        if MASKED:
            keep = (cols < length)[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(V, start, cols, kv_head, stride_vt, stride_vh, offs_d, length)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, IEEE)
        return acc, m_new, l_i

    @triton.jit
    def _fwd_kernel(
        CU, Q, K, V, O, LSE, scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_ot, stride_oh, n_heads, GROUP: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        m_block, start, length, head, kv_head, offs_m, offs_n, offs_d = _query_block(CU, GROUP, CAUSAL, BLOCK_M,
                                                                                     BLOCK_N, D)
        if m_block * BLOCK_M < length:
            row_ok = offs_m < length
            q = _tile(Q, start, offs_m, head, stride_qt, stride_qh, offs_d, length)
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK_M,), tl.float32)
            acc = tl.zeros((BLOCK_M, D), tl.float32)
            unmasked_end, end = _key_blocks(length, m_block, BLOCK_M, BLOCK_N, CAUSAL)
            qk_scale = scale * LOG2E
            for n0 in range(0, unmasked_end, BLOCK_N):
                acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, start, n0, offs_m, offs_n, kv_head, stride_kt,
                                           stride_kh, stride_vt, stride_vh, offs_d, length, qk_scale, CAUSAL, False,
                                           UPCAST, IEEE)
            for n0 in range(unmasked_end, end, BLOCK_N):
                acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, start, n0, offs_m, offs_n, kv_head, stride_kt,
                                           stride_kh, stride_vt, stride_vh, offs_d, length, qk_scale, CAUSAL, True,
                                           UPCAST, IEEE)
            l_safe = tl.where(row_ok, l_i, 1.0)
            out = acc / l_safe[:, None]
            _store_tile(O, start, offs_m, head, stride_ot, stride_oh, offs_d, out, length)
            # saved in base 2 as the backward uses it: a round trip through natural log (/ log2(e), then * log2(e))
            # added two roundings at the log-sum-exp's magnitude, and every recomputed probability lost them
            # (|lse| * 2^-24 each: 4e-3 of dV at scores near 3e4, 1.4e-4 near 1e3)
            tl.store(LSE + (start + offs_m) * n_heads + head, m_i + tl.log2(l_safe), mask=row_ok)

    @triton.jit
    def _dkdv_block(dk, dv, k, v, Q, DO, LSE, DELTA, start, m0, offs_m, offs_n, head, n_heads, stride_qt, stride_qh,
                    stride_dot, stride_doh, offs_d, length, scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                    UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """(dK unscaled, dV) of one key block after adding the query block m0 .. m0 + BLOCK_M of `head`."""
        rows = m0 + offs_m
        row_ok = rows < length
        q = _tile(Q, start, rows, head, stride_qt, stride_qh, offs_d, length)
        do = _tile(DO, start, rows, head, stride_dot, stride_doh, offs_d, length)
        lse2 = tl.load(LSE + (start + rows) * n_heads + head, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + (start + rows) * n_heads + head, mask=row_ok, other=0.0)
        # (keys, queries)
        p_t = tl.exp2(_dot(k, tl.trans(q), UPCAST, IEEE) * (scale * LOG2E) - lse2[None, :])
        if MASKED:
            keep = (offs_n < length)[:, None] & row_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= rows[None, :])
            p_t = tl.where(keep, p_t, 0.0)
        dv += _dot(p_t.to(do.dtype), do, UPCAST, IEEE)
        ds_t = p_t * (_dot(v, tl.trans(do), UPCAST, IEEE) - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, UPCAST, IEEE)
        return dk, dv

    @triton.jit
    def _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, start, begin, end, offs_m, offs_n, kv_head, n_heads, stride_qt,
                     stride_qh, stride_dot, stride_doh, offs_d, length, scale, CAUSAL: tl.constexpr,
                     MASKED: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
                     IEEE: tl.constexpr):
        """(dK unscaled, dV) of one key block after adding the query blocks from `begin` to `end` of each query
        head of `kv_head`'s group. Under GQA one loop walks the (query head, query block) pairs: nested in a loop
        over the group's heads, the block loop spilled 8-496 bytes a thread in every GQA candidate (Triton 3.6)."""
        span = tl.cdiv(end - begin, BLOCK_M) * BLOCK_M
        for t in range(begin, end if GROUP == 1 else begin + GROUP * span, BLOCK_M):
            head, m0 = kv_head, t
            if GROUP > 1:
                g = (t - begin) // span
                head, m0 = kv_head * GROUP + g, t - g * span
            dk, dv = _dkdv_block(dk, dv, k, v, Q, DO, LSE, DELTA, start, m0, offs_m, offs_n, head, n_heads,
                                 stride_qt, stride_qh, stride_dot, stride_doh, offs_d, length, scale, CAUSAL, MASKED,
                                 UPCAST, IEEE)
        return dk, dv

    @triton.jit
    def _bwd_dkdv_kernel(
        CU, Q, K, V, DO, LSE, DELTA, DK, DV, scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
        stride_vh, stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, n_heads,
        GROUP: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        n_block = tl.program_id(0)
        start, length, kv_head = _sequence(CU)
        if n_block * BLOCK_N < length:
            offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_m = tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, D)
            k = _tile(K, start, offs_n, kv_head, stride_kt, stride_kh, offs_d, length)
            v = _tile(V, start, offs_n, kv_head, stride_vt, stride_vh, offs_d, length)
            dk = tl.zeros((BLOCK_N, D), tl.float32)
            dv = tl.zeros((BLOCK_N, D), tl.float32)
            # query blocks [first, length): masked up to `unmasked_start` (with a causal mask, the blocks that
            # reach back before the key block's last key; all of them when the key block runs past the
            # sequence's end), unmasked after. Rows past the end need no mask there: their q, dO, lse and
            # delta load as zeros, so they add exactly 0 to dK and dV.
            first = 0
            unmasked_start = 0
            if CAUSAL:  # queries before the block's first key see none of it
                first = (n_block * BLOCK_N // BLOCK_M) * BLOCK_M
                unmasked_start = tl.cdiv((n_block + 1) * BLOCK_N, BLOCK_M) * BLOCK_M
            if (n_block + 1) * BLOCK_N > length:
                unmasked_start = length
            unmasked_start = tl.minimum(unmasked_start, length)
            dk, dv = _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, start, first, unmasked_start, offs_m, offs_n,
                                  kv_head, n_heads, stride_qt, stride_qh, stride_dot, stride_doh, offs_d, length, scale,
                                  CAUSAL, True, GROUP, BLOCK_M, UPCAST, IEEE)
            dk, dv = _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, start, tl.cdiv(unmasked_start, BLOCK_M) * BLOCK_M,
                                  length, offs_m, offs_n, kv_head, n_heads, stride_qt, stride_qh, stride_dot,
                                  stride_doh, offs_d, length, scale, CAUSAL, False, GROUP, BLOCK_M, UPCAST, IEEE)
            _store_tile(DK, start, offs_n, kv_head, stride_dkt, stride_dkh, offs_d, dk * scale, length)
            _store_tile(DV, start, offs_n, kv_head, stride_dvt, stride_dvh, offs_d, dv, length)

    @triton.jit
    def _dq_block(dq, q, do, lse2, delta, K, V, start, n0, offs_m, offs_n, kv_head, stride_kt, stride_kh, stride_vt,
                  stride_vh, offs_d, length, qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                  UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """dQ (unscaled) after adding the key block n0 .. n0 + BLOCK_N (log-sum-exp and scale in base 2)."""
        cols = n0 + offs_n
        k = _tile(K, start, cols, kv_head, stride_kt, stride_kh, offs_d, length)
        v = _tile(V, start, cols, kv_head, stride_vt, stride_vh, offs_d, length)
        p = tl.exp2(_dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale - lse2[:, None])
        if MASKED:
            keep = ((offs_m < length)[:, None]) & (cols < length)[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.to(k.dtype), k, UPCAST, IEEE)

    @triton.jit
    def _bwd_dq_kernel(
        CU, Q, K, V, DO, LSE, DELTA, DQ, scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_dot, stride_doh, stride_dqt, stride_dqh, n_heads, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        m_block, start, length, head, kv_head, offs_m, offs_n, offs_d = _query_block(CU, GROUP, CAUSAL, BLOCK_M,
                                                                                     BLOCK_N, D)
        if m_block * BLOCK_M < length:
            row_ok = offs_m < length
            q = _tile(Q, start, offs_m, head, stride_qt, stride_qh, offs_d, length)
            do = _tile(DO, start, offs_m, head, stride_dot, stride_doh, offs_d, length)
            lse2 = tl.load(LSE + (start + offs_m) * n_heads + head, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + (start + offs_m) * n_heads + head, mask=row_ok, other=0.0)
            dq = tl.zeros((BLOCK_M, D), tl.float32)
            unmasked_end, end = _key_blocks(length, m_block, BLOCK_M, BLOCK_N, CAUSAL)
            qk_scale = scale * LOG2E
            for n0 in range(0, unmasked_end, BLOCK_N):
                dq = _dq_block(dq, q, do, lse2, delta, K, V, start, n0, offs_m, offs_n, kv_head, stride_kt, stride_kh,
                               stride_vt, stride_vh, offs_d, length, qk_scale, CAUSAL, False, UPCAST, IEEE)
            for n0 in range(unmasked_end, end, BLOCK_N):
                dq = _dq_block(dq, q, do, lse2, delta, K, V, start, n0, offs_m, offs_n, kv_head, stride_kt, stride_kh,
                               stride_vt, stride_vh, offs_d, length, qk_scale, CAUSAL, True, UPCAST, IEEE)
            _store_tile(DQ, start, offs_m, head, stride_dqt, stride_dqh, offs_d, dq * scale, length)


# Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, for head_dim <= 64 and for 128. In the dK/dV
# kernel BLOCK_N is the key block a program owns and BLOCK_M the query block it loops over. Every candidate
# compiles for sm_90 to warpgroup MMA (HGMMA) without register spills (scripts/kernel_report.py lists them);
# which is fastest is measured, not guessed: on CUDA the autotuner times them at the first call of each
# (head_dim, causal, group, dtype) and keeps the winner. The first candidate runs in the interpreter and
# with TTL_AUTOTUNE=0.
CONFIGS = {
    "fwd": {64: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3)],
            128: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)]},
    "dkdv": {64: [(32, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2)],
             128: [(16, 64, 8, 3), (16, 128, 8, 3)]},
    "dq": {64: [(64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2)],
           128: [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2)]},
}
KERNELS = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel} if HAVE_TRITON else {}
# Built at import rather than on first use: torch.compile cannot trace an autotuner's construction, and a
# graph break there would split every compiled block that calls attention.
AUTOTUNERS = {
    (name, dim_class): triton.autotune([triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                                        for m, n, w, s in candidates], key=["D", "CAUSAL", "GROUP"])(kernel)
    for name, kernel in KERNELS.items() for dim_class, candidates in CONFIGS[name].items()
}


def autotuned_configs() -> dict[str, dict]:
    """The candidate each autotuner chose so far, by kernel and tuning key (for benchmark results)."""
    return {f"{name}/d{dim}": {str(key): str(config) for key, config in tuner.cache.items()}
            for (name, dim), tuner in AUTOTUNERS.items() if tuner.cache}


# CUDA's limit on a grid's second and third axes (the first holds 2^31 - 1)
MAX_GRID_AXIS = 65535


def _launch(name: str, cu_seqlens: torch.Tensor, blocks: Callable[[dict], int], heads: int, dim: int,
            autotune: bool, *args, **constexprs) -> None:
    """Launch kernel `name` (its first argument cu_seqlens) on a grid of (`blocks(meta)` blocks, heads,
    sequences), with the autotuner over its candidates or with the first candidate. CUDA starts programs in
    the grid's order, the blocks of one sequence and head one after another (sharing its K/V in L2). More
    sequences than a grid axis holds go in several launches, each given cu_seqlens from its first sequence
    on: the kernels find every token through the offsets in it."""
    dim_class = 64 if dim <= 64 else 128
    n_seqs = cu_seqlens.numel() - 1
    for first in range(0, n_seqs, MAX_GRID_AXIS):
        def grid(meta, seqs=min(MAX_GRID_AXIS, n_seqs - first)):
            return blocks(meta), heads, seqs

        cu = cu_seqlens[first:] if first else cu_seqlens  # no view op in the usual single launch's graph
        if autotune:
            AUTOTUNERS[name, dim_class][grid](cu, *args, **constexprs)
        else:
            block_m, block_n, warps, stages = CONFIGS[name][dim_class][0]
            KERNELS[name][grid](cu, *args, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
                                **constexprs)


def _flags(q: torch.Tensor) -> dict:
    return {"UPCAST": interpreting() and q.dtype != torch.float32, "IEEE": q.dtype == torch.float32}


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale):
        total, heads, dim = q.shape
        kv_heads = k.shape[1]
        out = torch.empty_like(q)
        lse = torch.empty((total, heads), dtype=torch.float32, device=q.device)
        # no tokens: nothing to launch, and the autotuner must not pick its config by timing empty grids
        autotune = q.is_cuda and os.environ.get("TTL_AUTOTUNE", "1") != "0"
        if total:
            _launch(
                "fwd", cu_seqlens, lambda meta: triton.cdiv(max_seqlen, meta["BLOCK_M"]), heads, dim, autotune,
                q, k, v, out, lse, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                v.stride(1), out.stride(0), out.stride(1), heads, GROUP=heads // kv_heads, CAUSAL=causal, D=dim,
                **_flags(q),
            )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.scale, ctx.autotune = max_seqlen, causal, scale, autotune
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        total, heads, dim = q.shape
        kv_heads = k.shape[1]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if not total:
            return dq, dk, dv, None, None, None, None
        delta = torch.empty((total, heads), dtype=torch.float32, device=q.device)
        rows, block = total * heads, 8192 // dim
        if rows:
            _delta_kernel[(triton.cdiv(rows, block),)](out, grad_out, delta, rows, heads, out.stride(0), out.stride(1),
                                                      grad_out.stride(0), grad_out.stride(1), D=dim, BLOCK_R=block,
                                                      num_warps=8)
        common = dict(GROUP=heads // kv_heads, CAUSAL=ctx.causal, D=dim, **_flags(q))
        _launch(
            "dkdv", cu_seqlens, lambda meta: triton.cdiv(ctx.max_seqlen, meta["BLOCK_N"]), kv_heads, dim,
            ctx.autotune, q, k, v, grad_out, lse, delta, dk, dv, ctx.scale, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), grad_out.stride(0), grad_out.stride(1),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), heads, **common,
        )
        _launch(
            "dq", cu_seqlens, lambda meta: triton.cdiv(ctx.max_seqlen, meta["BLOCK_M"]), heads, dim, ctx.autotune,
            q, k, v, grad_out, lse, delta, dq, ctx.scale, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), v.stride(0), v.stride(1), grad_out.stride(0), grad_out.stride(1), dq.stride(0),
            dq.stride(1), heads, **common,
        )
        return dq, dk, dv, None, None, None, None


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: bool) -> None:
    want = 3 if packed else 4
    if q.dim() != want or k.dim() != want or v.dim() != want:
        raise ValueError(f"flash_attention expects {'(tokens, heads, dim)' if packed else '(batch, seq, heads, dim)'} "
                         f"tensors, got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    if not q.dtype == k.dtype == v.dtype:  # the kernels' dots need one dtype (the reference's matmuls too)
        raise ValueError(f"flash_attention needs q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    require_floating("flash_attention", q=q)
    require_one_device("flash_attention", q=q, k=k, v=v)
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2]:
        raise ValueError(f"query heads {q.shape[-2]} are not a multiple of key/value heads {k.shape[-2]}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head_dim {q.shape[-1]} is not supported (choose one of {HEAD_DIMS})")


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None, softmax_scale: float | None = None, *, backend: str = "auto",
) -> torch.Tensor:
    """Attention of q (batch, seq, heads, dim) over k, v (batch, seq, kv_heads, dim), or of packed (total_tokens,
    heads, dim) documents delimited by `cu_seqlens` (documents never attend across boundaries). kv_heads must divide
    heads; dim one of 16, 32, 64, 128; `softmax_scale` defaults to 1/sqrt(dim). `cu_seqlens` (integer,
    documents + 1) must start at 0, never decrease and end at total_tokens, and `max_seqlen` must be at least the
    longest document: checked when `cu_seqlens` is on the CPU, trusted when it is on the device (a check would
    sync), where a `max_seqlen` too small leaves the output rows past it unwritten and every key/value gradient of
    that document wrong (they read those rows' unwritten log-sum-exp)."""
    packed = cu_seqlens is not None
    _check(q, k, v, packed)
    if packed:
        check_documents(cu_seqlens, q.shape[0], max_seqlen)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    if not use_triton(q, backend):
        return flash_attention_reference(q, k, v, causal, cu_seqlens, max_seqlen, scale)
    if packed:
        qf, kf, vf = q, k, v
        # the kernels read cu_seqlens as a packed int32 array; `.to` keeps an int32 strided view as it is
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    else:
        batch, seq = q.shape[:2]
        qf, kf, vf = [t.reshape(batch * seq, *t.shape[2:]) for t in (q, k, v)]
        cu = torch.arange(batch + 1, device=q.device, dtype=torch.int32) * seq  # not a step of seq: it may be 0
        max_seqlen = seq
    qf, kf, vf = [t if t.stride(-1) == 1 else t.contiguous() for t in (qf, kf, vf)]
    out = apply_kernel(_FlashAttention, qf, kf, vf, cu, max_seqlen, causal, scale)
    return out if packed else out.view(q.shape)
