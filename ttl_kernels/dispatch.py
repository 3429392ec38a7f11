"""Choosing between a Triton kernel and its PyTorch reference for a given tensor.

"auto" runs Triton on CUDA tensors and the reference elsewhere (and for float64, which the kernels would
compute in float32); the `TTL_KERNELS` environment variable (`triton` or `torch`) overrides "auto". Triton
on CPU tensors needs `TRITON_INTERPRET=1`, set before the first kernel module is imported, because Triton
picks the interpreter when it decorates a kernel.
The kernels' autograd functions share `once_differentiable` and `apply_kernel` from here too.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Callable

import torch

try:
    import triton
except ImportError:  # triton ships for Linux only; the references still work elsewhere
    triton = None
HAVE_TRITON = triton is not None

BACKENDS = ("auto", "triton", "torch")


class BackendError(ValueError):
    """A kernel backend that was asked for cannot run here, or is not one of `BACKENDS`."""


def interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.disable
def _apply_eagerly(function: type[torch.autograd.Function], *args):
    return function.apply(*args)


# read once, as Triton reads it once when it decorates the kernels; a constant to dynamo, which traces `apply_kernel`
_INTERPRETED_KERNELS = interpreting()


def apply_kernel(function: type[torch.autograd.Function], *args):
    """`function.apply(*args)`, kept out of torch.compile's graphs when Triton interprets on the CPU: dynamo
    would trace into the interpreter's numpy code and fail (under no_grad, as in evaluation, with an error rather
    than a graph break). Compiled CUDA kernels stay in the graph."""
    return _apply_eagerly(function, *args) if _INTERPRETED_KERNELS else function.apply(*args)


def use_triton(x: torch.Tensor, backend: str = "auto", *others: torch.Tensor | None) -> bool:
    """Whether a kernel call on `x` (and `others`, its other floating inputs) should take the Triton path for
    the requested `backend`. The kernels compute in float32, so float64 inputs take the reference under "auto"
    and are refused under "triton" (TTL_KERNELS=triton included): their results would be float64 tensors of
    float32 accuracy."""
    if backend not in BACKENDS:
        raise BackendError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    forced_by_env = False
    if backend == "auto":
        backend = os.environ.get("TTL_KERNELS", "auto")
        if backend not in BACKENDS:
            raise BackendError(f"TTL_KERNELS must be one of {BACKENDS}, got {backend!r}")
        forced_by_env = backend == "triton"
    if backend == "torch":
        return False
    float64 = any(t is not None and t.dtype == torch.float64 for t in (x, *others))
    if backend == "auto":
        return HAVE_TRITON and x.is_cuda and not float64
    if float64:
        # name the switch the caller actually set: passing "auto" does not help while the environment forces Triton
        remedy = ("TTL_KERNELS=triton forces them; unset it (or set TTL_KERNELS=torch)" if forced_by_env else
                  "use backend='torch' or 'auto' (a model's config: kernels='torch' or 'auto')")
        raise BackendError(f"Triton kernels compute in float32, so float64 inputs would get float32 accuracy: "
                           f"{remedy} for float64")
    if not (HAVE_TRITON and (x.is_cuda or (interpreting() and x.device.type == "cpu"))):
        raise BackendError(
            f"Triton kernels need triton and a CUDA tensor or TRITON_INTERPRET=1 for CPU tensors "
            f"(got a {x.device.type} tensor, triton {'present' if HAVE_TRITON else 'missing'})"
        )
    return True


def require_floating(function: str, **tensors: torch.Tensor | None) -> None:
    """Refuse integer (or bool, complex) tensors where a kernel computes in floating point: the Triton path would
    round its results to the integer dtype and the reference would raise deep inside torch, or round too."""
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{function} takes floating-point tensors, got {name} of dtype {t.dtype}")


def require_int(name: str, value: object) -> None:
    """Refuse a non-integer where a kernel takes an int argument: Triton truncates 1.5 to 1 and fails deep inside
    its launcher on a tensor or None, and torch's split fails on a float with a message naming no argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")


def require_one_device(function: str, **tensors: torch.Tensor | None) -> None:
    """Refuse tensors on devices other than the first one's: a Triton kernel handed a pointer on another device
    fails deep inside Triton's launcher (or reads memory it cannot), where torch names no argument."""
    given = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = given[0]
    for name, t in given[1:]:
        if t.device != first.device:
            raise ValueError(f"{function} needs its tensors on one device, got {name} on {t.device} and {first_name} "
                             f"on {first.device}")


def check_documents(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """`cu_seqlens` against the packed tokens and `max_seqlen`: its values only when it is on the CPU, where
    reading them costs no device sync (see `ttl_kernels.flash_attention` for the contract on a device). Messages
    name no kernel: `ttl_core.attention` checks packed documents with this whatever backend runs them."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an integer tensor, got a {type(cu_seqlens).__name__}")
    if max_seqlen is None or isinstance(max_seqlen, float):  # the kernels' grid counts blocks of whole tokens
        raise ValueError(f"packed attention needs an int max_seqlen (the longest document), got {max_seqlen}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D, one more entry than documents, got shape {tuple(cu_seqlens.shape)}")
    # the kernels read it as int32: float offsets would be truncated to other documents without a word
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must hold integer token offsets, got {cu_seqlens.dtype}")
    if cu_seqlens.device.type != "cpu":
        return
    bounds = cu_seqlens.tolist()
    lengths = [stop - start for start, stop in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != total or min(lengths) < 0:
        shown = bounds if len(bounds) <= 8 else bounds[:4] + ["..."] + bounds[-2:]
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at the {total} packed tokens, got "
                         f"{shown}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen {max_seqlen} is less than the longest document in cu_seqlens "
                         f"({max(lengths)} tokens)")


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as a 2-D (rows, last dim) tensor with a contiguous last dim, for row-wise kernels: a view when
    the strides allow (e.g. a slice of a fused projection), a copy otherwise."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # not -1: a last dim of 0 leaves that ambiguous


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 on the CPU, where the interpreter runs the grid)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def once_differentiable(backward: Callable) -> Callable:
    """torch's `once_differentiable` for a backward whose gradients depend on the saved inputs (every kernel's
    but rotary's, which is linear in them): under `create_graph=True` its gradients always lead to the node that
    raises 'trying to differentiate twice'. torch's marks them only when the incoming gradients require grad;
    from a constant seed (a plain loss) they had no graph, so a term built on them (a gradient penalty) silently
    added nothing to the next backward."""
    marked = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():  # a backward under create_graph=True
            grads = tuple(g.detach().requires_grad_() if isinstance(g, torch.Tensor) and not g.requires_grad else g
                          for g in grads)
        return marked(ctx, *grads)

    return wrapper
