"""Cross-entropy on logits, and fused linear cross-entropy that never builds the (N, V) logits.

One Triton kernel does the per-row work of both: an online max / sum-exp pass over the vocabulary gives
the log-sum-exp, the loss (with label smoothing and z-loss), and a second pass writes the gradient
d loss / d logits = softmax · (1 + 2·z·lse) − (1 − ε)·onehot − ε/V, scaled by the reduction's factor read
from device memory (1 / non-ignored count for "mean", so there is no host sync). The gradient overwrites
the logits buffer, which the fused linear version reuses chunk by chunk: logits_c = h_c Wᵀ (cuBLAS), the
kernel, then dh_c = g_c W and dW += g_cᵀ h_c in float32. For "mean" and "sum" the gradients are made in
the forward (the backward scales them by grad_output); "none" needs per-row grad_output and recomputes
each chunk in the backward instead. Gradients are made only for the inputs that need them, none under
`torch.no_grad`. A target outside [0, V) other than `ignore_index` is never read: its row's loss and
gradient are NaN (the check would cost a host sync; NaN makes the error visible instead).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .dispatch import (HAVE_TRITON, apply_kernel, as_rows, once_differentiable, require_floating, require_int,
                       require_one_device, use_triton)

if HAVE_TRITON:
    import triton
    import triton.language as tl

REDUCTIONS = ("mean", "sum", "none")
BLOCK_V = 4096  # vocabulary columns per loop iteration; a starting point for GPU tuning


def cross_entropy_reference(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss: float = 0.0, return_z_loss: bool = False, return_nll: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Cross-entropy in fp32 (or fp64 for fp64 inputs) with label smoothing and z-loss (`z_loss * logsumexp**2` per
    token).

    `mean` averages over non-ignored targets; with none of them it returns 0, not NaN. `return_z_loss` also
    returns the z-loss part of the loss, `return_nll` the negative log-likelihood of the targets (the loss without
    smoothing or z-loss), each reduced alike and without gradient, in that order after the loss."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64 (test truth)
    targets = targets.long()  # F.cross_entropy takes only int64 (and uint8) classes; the kernel any integer dtype
    valid = targets != ignore_index
    if reduction == "mean" and z_loss == 0.0 and not (return_z_loss or return_nll):
        # the exact transformers computation (same rounding) whenever there is something to average
        loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing)
        return torch.where(valid.any(), loss, torch.zeros_like(loss))
    per_token = F.cross_entropy(
        logits, targets, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    z_part = torch.zeros_like(per_token)
    if z_loss:
        # log-sum-exp of the logits measured from their max (a constant to autograd; 0 for a row of -inf):
        # torch.logsumexp's backward, exp(x - lse), lost |lse| * 2^-24 of every softmax value to lse's
        # rounding (2e-4 of the gradient at float32 logits near 1e4), as the kernel once did. Ignored rows' logits are
        # left out, not multiplied by 0 after: a NaN there would make their loss and gradient NaN, where F.cross_entropy
        # (and the kernel) give an ignored row 0 whatever its logits
        kept = torch.where(valid[:, None], logits, 0.0)
        top = kept.detach().amax(-1, keepdim=True)
        top = torch.where(top.isfinite(), top, torch.zeros_like(top))
        lse = (torch.logsumexp(kept - top, dim=-1, keepdim=True) + top).squeeze(-1)
        z_part = z_loss * lse.pow(2) * valid
        per_token = per_token + z_part
    loss = _reduce(per_token, targets, ignore_index, reduction)
    parts = [z_part.detach()] if return_z_loss else []
    if return_nll:  # a second pass over the logits: the Triton kernel finds it in its one
        parts.append(F.cross_entropy(logits.detach(), targets, ignore_index=ignore_index, reduction="none"))
    return (loss, *(_reduce(part, targets, ignore_index, reduction) for part in parts)) if parts else loss


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, return_z_loss: bool = False,
    return_nll: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Cross-entropy of `hidden @ weight.T` (logits in the input dtype, then fp32, as transformers does)."""
    return cross_entropy_reference(F.linear(hidden, weight), targets, ignore_index, reduction, label_smoothing, z_loss,
                                   return_z_loss, return_nll)


if HAVE_TRITON:

    @triton.jit
    def _ce_row_kernel(
        LOGITS, TARGETS, LOSS, PARTS, SCALE, n_cols, stride_row, scale_stride, parts_stride, ignore_index, smoothing,
        z_loss,
        WRITE_GRAD: tl.constexpr, WRITE_PARTS: tl.constexpr, SMOOTHING: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride_row
        target = tl.load(TARGETS + row).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        if target == ignore_index:
            tl.store(LOSS + row, 0.0)
            if WRITE_PARTS:
                tl.store(PARTS + row, 0.0)
                tl.store(PARTS + parts_stride + row, 0.0)
            if WRITE_GRAD:
                for start in range(0, n_cols, BLOCK):
                    tl.store(base + start + cols, tl.zeros((BLOCK,), tl.float32).to(LOGITS.dtype.element_ty),
                             mask=start + cols < n_cols)
        else:
            # pass 1: running max and sum of exp, and with label smoothing the sum of the logits (only then:
            # masked-out vocabulary entries are -inf, and 0 * -inf would make every loss NaN), measured from the
            # running shift and moved with it: a plain sum of logits near 3e4 lost 2e-5 of the loss to the
            # rounding of the sum and of shift - sum / V, where PyTorch (summing log-softmax values) loses 1e-7
            running_max = float("-inf")
            running_sum = 0.0
            centred_sum = 0.0
            for start in range(0, n_cols, BLOCK):
                mask = start + cols < n_cols
                x = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
                new_max = tl.maximum(running_max, tl.max(x, 0))
                # exponents against a finite shift: while every logit so far is -inf, -inf - -inf would be NaN
                shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), 0)
                if SMOOTHING:  # the `start` logits so far were measured from the previous shift
                    old_shift = tl.where(running_max == float("-inf"), 0.0, running_max)
                    centred_sum += start * (old_shift - shift) + tl.sum(tl.where(mask, x - shift, 0.0), 0)
                running_max = new_max
            # lse = shift + log_sum, kept in two parts: logits are measured from their max (x - shift is exact
            # near it), as PyTorch's softmax does; exp(x - lse) lost |lse| * 2^-24 of every softmax value to
            # lse's rounding, more than fp32's 1e-5 tolerance once logits reach about 500
            shift = tl.where(running_max == float("-inf"), 0.0, running_max)
            log_sum = tl.log(running_sum)
            lse = shift + log_sum
            # a target outside the vocabulary is not read (no host sync can reject it): NaN loss and gradient
            in_range = (target >= 0) & (target < n_cols)
            x_target = tl.load(base + target, mask=in_range, other=float("nan")).to(tl.float32)
            loss = log_sum + (1.0 - smoothing) * (shift - x_target)
            if SMOOTHING:
                loss -= smoothing * (centred_sum / n_cols)
            z_part = tl.where(z_loss == 0.0, 0.0, z_loss * lse * lse)  # 0 * lse**2 is NaN for an infinite lse
            tl.store(LOSS + row, loss + z_part)
            if WRITE_PARTS:  # the z-loss term, and the negative log-likelihood of the target (the loss unsmoothed)
                tl.store(PARTS + row, z_part)
                tl.store(PARTS + parts_stride + row, log_sum + (shift - x_target))
            if WRITE_GRAD:
                # pass 2: the gradient, written over the logits
                scale = tl.load(SCALE + row * scale_stride).to(tl.float32)
                scale = tl.where(in_range, scale, float("nan"))
                for start in range(0, n_cols, BLOCK):
                    idx = start + cols
                    mask = idx < n_cols
                    x = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
                    softmax = tl.exp((x - shift) - log_sum)
                    # the z-loss term added last, so that softmax - target cancels exactly where it does
                    grad = softmax - smoothing / n_cols
                    grad = tl.where(idx == target, grad - (1.0 - smoothing), grad) + (2.0 * z_loss * lse) * softmax
                    tl.store(base + idx, (grad * scale).to(LOGITS.dtype.element_ty), mask=mask)


def _check_loss_arguments(targets: torch.Tensor, rows: int, vocab: int, ignore_index: int, reduction: str,
                          label_smoothing: float, z_loss: float) -> None:
    if vocab == 0:  # every target would be out of range: the reference raises on the first, Triton cannot launch
        raise ValueError("cross-entropy needs at least one class, got a vocabulary of 0")
    require_int("ignore_index", ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if targets.dim() != 1 or targets.shape[0] != rows:
        raise ValueError(f"targets must be ({rows},), got {tuple(targets.shape)}")
    # the kernel would truncate float targets to classes and read bool ones as 0 and 1; the reference refuses both
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be class indices of an integer dtype, got {targets.dtype}")
    check_label_smoothing(label_smoothing)
    _check_number("z_loss", z_loss)
    if not 0.0 <= z_loss < math.inf:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")


def check_label_smoothing(label_smoothing: float) -> None:
    """A label_smoothing in [0, 1]; torch's F.cross_entropy takes NaN as 0 and True as 1 without a word."""
    _check_number("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:  # written so that NaN fails too
        raise ValueError(f"label_smoothing must be between 0 and 1, got {label_smoothing}")


def _check_number(option: str, value: float) -> None:
    # the reference took True as 1 and a 0-d tensor as its value; Triton failed on both (an i1, a pointer)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{option} must be a number, got {value!r}")


def _reduction_scale(targets: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """The per-token gradient factor as a one-element device tensor (no host sync): 1 but for "mean"."""
    if reduction == "mean":
        return 1.0 / (targets != ignore_index).sum().clamp(min=1).float().reshape(1)
    return torch.ones(1, dtype=torch.float32, device=targets.device)


def _reduce(losses: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    total = losses.sum()
    return total if reduction == "sum" else total / (targets != ignore_index).sum().clamp(min=1)


def ce_rows_(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None, ignore_index: int,
             label_smoothing: float, z_loss: float, parts: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row losses (fp32) of `logits` (rows, V) with a contiguous last dim; when `scale` is given (one
    value, or one per row), overwrite the logits with the loss gradient times that scale; when `parts` (2, rows,
    fp32, rows contiguous) is, write each row's z-loss term into its first row and negative log-likelihood into its
    second."""
    rows, vocab = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return losses
    block = min(BLOCK_V, triton.next_power_of_2(vocab))
    write = scale is not None
    scale = scale if write else losses  # unread when not writing
    _ce_row_kernel[(rows,)](
        logits, targets.contiguous(), losses, losses if parts is None else parts, scale, vocab, logits.stride(0),
        1 if scale.numel() > 1 else 0, 0 if parts is None else parts.stride(0), ignore_index, label_smoothing, z_loss,
        WRITE_GRAD=write, WRITE_PARTS=parts is not None, SMOOTHING=label_smoothing != 0.0, BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return losses


class _CrossEntropy(torch.autograd.Function):
    """Used only when the logits need a gradient: it is made in the forward, in a copy of the logits."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, label_smoothing, z_loss, parts):
        grad = logits.clone(memory_format=torch.contiguous_format)
        scale = _reduction_scale(targets, ignore_index, reduction)
        losses = ce_rows_(grad, targets, scale, ignore_index, label_smoothing, z_loss, parts)
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        return _reduce(losses, targets, ignore_index, reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        factor = grad_output[:, None] if ctx.reduction == "none" else grad_output
        return (grad * factor).to(grad.dtype), None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss: float = 0.0, *, return_z_loss: bool = False, return_nll: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Cross-entropy on given logits (N, V) against targets (N,), fp32 math for fp32, bf16 and fp16 (float64
    takes the reference: see `ttl_kernels.dispatch.use_triton`). On the Triton path a target outside [0, V)
    other than `ignore_index` gives that row a NaN loss and gradient (the reference raises). `return_z_loss`
    and `return_nll` also return, to log beside the loss, its z-loss part and the negative log-likelihood of the
    targets (the loss without smoothing or z-loss), reduced alike, without gradient, from the same pass."""
    if logits.dim() != 2:  # rows past the targets' end would be read as targets of other rows' logits
        raise ValueError(f"cross_entropy needs logits (rows, vocab), got shape {tuple(logits.shape)}")
    _check_loss_arguments(targets, logits.shape[0], logits.shape[1], ignore_index, reduction, label_smoothing, z_loss)
    require_floating("cross_entropy", logits=logits)
    require_one_device("cross_entropy", logits=logits, targets=targets)
    if not use_triton(logits, backend):
        return cross_entropy_reference(logits, targets, ignore_index, reduction, label_smoothing, z_loss,
                                       return_z_loss, return_nll)
    parts = _parts(logits.shape[0], logits.device, return_z_loss or return_nll)
    if not (torch.is_grad_enabled() and logits.requires_grad):  # the losses alone: no copy, no gradient
        losses = ce_rows_(as_rows(logits), targets, None, ignore_index, label_smoothing, z_loss, parts)
        loss = _reduce(losses, targets, ignore_index, reduction)
    else:
        loss = apply_kernel(_CrossEntropy, logits, targets, ignore_index, reduction, label_smoothing, z_loss, parts)
    return _with_parts(loss, parts, (return_z_loss, return_nll), targets, ignore_index, reduction)


def _parts(rows: int, device: torch.device, wanted: bool) -> torch.Tensor | None:
    """The buffer the kernel writes each row's z-loss term (into its first row) and negative log-likelihood (into
    its second) when the caller asked for either: each a contiguous vector, as a strided column would be summed in
    another order (a z-loss figure then moves in its last bits)."""
    return torch.empty(2, rows, dtype=torch.float32, device=device) if wanted else None


def _with_parts(loss: torch.Tensor, parts: torch.Tensor | None, asked: tuple[bool, bool], targets: torch.Tensor,
                ignore_index: int, reduction: str) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The loss, followed by the reduced rows of `parts` that `asked` (z-loss, NLL) names, if any."""
    reduced = [_reduce(parts[i], targets, ignore_index, reduction) for i, wanted in enumerate(asked) if wanted]
    return (loss, *reduced) if reduced else loss


CHUNKS = 8


def chunk_rows(n_rows: int) -> int:
    """Rows per chunk: 8 chunks (of at least 64 rows). One chunk's logits are then 1/16 of the unfused
    logits and their gradient, and the float32 weight gradient (V x d x 4 bytes, read and written once per
    chunk) is swept 8 times: at 16k tokens x 4096 x 128256 that is 34 GB, about 8 ms against the matmuls'
    65 ms, where V/d = 32 chunks of 512 rows swept it 32 times."""
    return max(64, math.ceil(n_rows / CHUNKS))


_fp32_addmm = True  # cleared the first time CUDA refuses addmm with out_dtype (torch < 2.8)


def _accumulate_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """grad_weight (float32) += grad_logits.T @ hidden. On CUDA the matmul accumulates into the float32
    tensor itself (addmm with out_dtype, torch >= 2.8); elsewhere, or where that is refused, the product is
    rounded to the activation dtype by the matmul and added in float32."""
    global _fp32_addmm
    if grad_weight.is_cuda and grad_logits.dtype in (torch.bfloat16, torch.float16) and _fp32_addmm:
        try:
            with torch.autocast("cuda", enabled=False):  # autocast would cast the float32 accumulator down
                torch.addmm(grad_weight, grad_logits.t(), hidden.to(grad_logits.dtype), out_dtype=torch.float32,
                            out=grad_weight)
            return
        except torch.OutOfMemoryError:  # a RuntimeError too, but no refusal: the next call may have the memory
            raise
        except (RuntimeError, TypeError):
            _fp32_addmm = False
    grad_weight += (grad_logits.t() @ hidden).float()


def _grad_buffers(hidden: torch.Tensor, weight: torch.Tensor, need_hidden: bool,
                  need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(hidden gradient, float32 weight gradient accumulator), each None where that input needs none (a frozen
    LM head under LoRA makes no V x d buffer and no weight-gradient matmuls)."""
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    return grad_hidden, grad_weight


def _chunked_pass(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                  label_smoothing: float, z_loss: float, parts: torch.Tensor | None = None, *,
                  scale: torch.Tensor | None = None, grad_hidden: torch.Tensor | None = None,
                  grad_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Losses of every row, one chunk of logits at a time (and each row's z-loss term and negative log-likelihood
    into `parts`, if given). Given `scale` (one value or one per row), the gradients too: the hidden one written into
    `grad_hidden`, the weight one accumulated into `grad_weight` (fp32), each where its buffer is given; without a
    scale the kernel leaves the logits as they are, so a buffer would receive them, not a gradient."""
    if scale is None and (grad_hidden is not None or grad_weight is not None):
        raise ValueError("_chunked_pass writes gradients only given the scale of the loss")
    n = hidden.shape[0]
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    step = chunk_rows(n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        h = hidden[start:stop]
        logits = h @ weight.t()
        row_scale = scale[start:stop] if scale is not None and scale.numel() > 1 else scale
        losses[start:stop] = ce_rows_(logits, targets[start:stop], row_scale, ignore_index, label_smoothing, z_loss,
                                      None if parts is None else parts[:, start:stop])
        if grad_hidden is not None:
            grad_hidden[start:stop] = logits @ weight
        if grad_weight is not None:
            _accumulate_weight_grad(grad_weight, logits, h)
    return losses


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Used only when hidden or weight needs a gradient; makes the gradients of those that do."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss, parts):
        hidden = hidden.contiguous()
        ctx.reduction = reduction
        ctx.options = (ignore_index, label_smoothing, z_loss)
        if reduction == "none":
            # per-row grad_output is known only in the backward: compute losses now, gradients then, under this
            # autocast state (the backward runs outside it), so that the chunks' logits are the forward's
            device = hidden.device.type
            ctx.autocast = device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
            ctx.save_for_backward(hidden, weight, targets)
            return _chunked_pass(hidden, weight, targets, ignore_index, label_smoothing, z_loss, parts)
        ctx.weight_dtype, ctx.scaled = weight.dtype, False
        grad_hidden, grad_weight = _grad_buffers(hidden, weight, *ctx.needs_input_grad[:2])
        scale = _reduction_scale(targets, ignore_index, reduction)
        losses = _chunked_pass(hidden, weight, targets, ignore_index, label_smoothing, z_loss, parts, scale=scale,
                               grad_hidden=grad_hidden, grad_weight=grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return _reduce(losses, targets, ignore_index, reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            hidden, weight, targets = ctx.saved_tensors
            grad_hidden, grad_weight = _grad_buffers(hidden, weight, *ctx.needs_input_grad[:2])
            device, autocast, autocast_dtype = ctx.autocast
            with torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
                _chunked_pass(hidden, weight, targets, *ctx.options, scale=grad_output.float().contiguous(),
                              grad_hidden=grad_hidden, grad_weight=grad_weight)
            return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                    None, None, None, None, None, None)
        if ctx.scaled:  # asked before saved_tensors, whose own check names only an internal tensor
            raise RuntimeError("fused_linear_cross_entropy scales the gradients its forward made in place, once: use "
                               "backend='torch' for a second backward through one loss (retain_graph)")
        ctx.scaled = True
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else _scaled(grad_hidden, grad_output, grad_hidden.dtype),
                None if grad_weight is None else _scaled(grad_weight, grad_output, ctx.weight_dtype),
                None, None, None, None, None, None)


def _scaled(grad: torch.Tensor, grad_output: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A gradient computed in the forward times the loss's incoming gradient, in `dtype`, without a float32
    temporary the size of the weight: in place when the dtype is kept (so a second backward through the same
    graph is refused rather than scaling twice), else written straight into the narrower dtype."""
    if grad.dtype == dtype:
        return grad.mul_(grad_output)
    return torch.mul(grad, grad_output, out=torch.empty(grad.shape, dtype=dtype, device=grad.device))


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, *, return_z_loss: bool = False,
    return_nll: bool = False, backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Cross-entropy of the LM head `hidden (N, d) @ weight (V, d).T` against targets (N,). The Triton path
    never holds more than one chunk of logits; the weight gradient accumulates in float32, and is made only
    when the weight requires grad; with "mean" or "sum" the gradients are made in the forward and handed out once,
    so a second backward through one loss (retain_graph) is refused. A target outside [0, V) other than
    `ignore_index` gives that row a NaN loss (and NaN gradients) on the Triton path (the reference raises).
    `return_z_loss` and `return_nll`: see `cross_entropy`."""
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy needs hidden (rows, d) and weight (vocab, d), got shapes "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    _check_loss_arguments(targets, hidden.shape[0], weight.shape[0], ignore_index, reduction, label_smoothing, z_loss)
    require_floating("fused_linear_cross_entropy", hidden=hidden, weight=weight)
    require_one_device("fused_linear_cross_entropy", hidden=hidden, weight=weight, targets=targets)
    on_triton = use_triton(hidden, backend, weight)  # first: it names float64 given to the Triton backend
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        # autocast casts both for the matmul; without it torch's matmul refuses in words naming neither tensor
        raise TypeError(f"fused_linear_cross_entropy needs hidden and weight of one dtype outside autocast, got "
                        f"{hidden.dtype} and {weight.dtype}")
    if not on_triton:
        return fused_linear_cross_entropy_reference(
            hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss, return_z_loss, return_nll)
    parts = _parts(hidden.shape[0], hidden.device, return_z_loss or return_nll)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):  # the losses alone
        losses = _chunked_pass(hidden.contiguous(), weight, targets, ignore_index, label_smoothing, z_loss, parts)
        loss = _reduce(losses, targets, ignore_index, reduction)
    else:
        loss = apply_kernel(_FusedLinearCrossEntropy, hidden, weight, targets, ignore_index, reduction,
                            label_smoothing, z_loss, parts)
    return _with_parts(loss, parts, (return_z_loss, return_nll), targets, ignore_index, reduction)
