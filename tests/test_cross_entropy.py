"""The Triton cross-entropy (interpreted on CPU, compiled on CUDA) against float64 truths: losses, logits gradients,
every reduction, label smoothing and z-loss; what it shares with the fused linear cross-entropy (whose own tests are
test_fused_linear_cross_entropy.py): ignored targets, refused inputs, no second derivative."""

import importlib
import re

import pytest
import torch
import torch.nn.functional as F
from cross_entropy_helpers import FLCE_TOL, OPTION_IDS, OPTIONS, formula, reduce, targets_for
from helpers import rel_err

import ttl_kernels

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def ce_check(logits, t, reduction, options, grad_out, tol=1e-5, backend="triton"):
    """The loss on `logits` (which require grad) and its gradient against the float64 formula's; returns both."""
    out = ttl_kernels.cross_entropy(logits, t, reduction=reduction, backend=backend, **options)
    (grad,) = torch.autograd.grad(out, logits, grad_out)
    truth_in = logits.detach().double().requires_grad_()
    truth = reduce(formula(truth_in, t, **options), t, reduction)
    (truth_grad,) = torch.autograd.grad(truth, truth_in, grad_out.double())
    assert rel_err(out, truth) <= tol and rel_err(grad, truth_grad) <= tol
    return out, grad


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_reference_matches_the_written_out_formula(options):
    logits, t = torch.randn(13, 37, dtype=torch.float64), targets_for(13, 37)
    for reduction in ("mean", "sum", "none"):
        got = ttl_kernels.cross_entropy_reference(logits, t, reduction=reduction, **options)
        assert (got - reduce(formula(logits, t, **options), t, reduction)).abs().max() < 1e-12


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_reference_gives_zero_not_nan_when_every_target_is_ignored(options):
    # the CPU training path: a micro-batch of padding alone must add 0 to the loss and the gradients, where
    # F.cross_entropy's mean (and a plain sum / count) is 0 / 0 = NaN
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(28), requires_grad=True)
    t = torch.full((4,), -100)
    for reduction in ("mean", "sum", "none"):
        loss = ttl_kernels.cross_entropy_reference(logits, t, reduction=reduction, **options)
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_cross_entropy_on_logits_matches_float64(dtype, reduction, options):
    n, vocab = 19, 1003
    logits = (3 * torch.randn(n, vocab, generator=torch.Generator().manual_seed(2))).to(dtype).requires_grad_()
    grad_out = torch.randn(n) if reduction == "none" else torch.tensor(1.3)
    out, grad = ce_check(logits, targets_for(n, vocab), reduction, options, grad_out, TOL[dtype])
    assert out.dtype == torch.float32 and grad.dtype == dtype


def test_label_smoothing_spreads_over_the_whole_vocabulary_of_uncentred_logits():
    # the smoothing term is ε · the mean of all V logits: on logits centred near 0 (as above) a wrong divisor,
    # e.g. V - 1, hides under the tolerance; a common offset of 20 (which leaves the true loss as it is) shows it
    n, vocab = 7, 11
    logits = (torch.randn(n, vocab, generator=torch.Generator().manual_seed(26)) + 20).requires_grad_()
    t = targets_for(n, vocab, seed=26, ignored_every=4)
    ce_check(logits, t, "none", dict(label_smoothing=0.1), torch.randn(n, generator=torch.Generator().manual_seed(27)))


@pytest.mark.parametrize("offset, vocab, options", [(-1000.0, 500, {}),
                                                   (1000.0, 500, dict(label_smoothing=0.1, z_loss=1e-4)),
                                                   (0.0, 1, dict(label_smoothing=0.1, z_loss=1e-4)),
                                                   (30000.0, 9000, dict(label_smoothing=0.1)),
                                                   (-10000.0, 500, dict(z_loss=1e-4))],
                         ids=["low", "high", "one-class", "smoothed-3e4", "z-loss-1e4"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_float32_accuracy_does_not_depend_on_the_logits_magnitude(offset, vocab, options, backend):
    """Softmax values come from logits measured against their max, as PyTorch's do, not against a
    log-sum-exp rounded at the logits' magnitude: that lost |lse| * 2^-24 of every gradient value (2e-5 at
    logits near 1000, 1e-7 now). A one-class vocabulary, whose loss is z·lse² and gradient 2z·lse exactly,
    lost both to cancellation (lse - x_t, and softmax·(1 + 2z·lse) - 1), 1e-4 where PyTorch is exact. The
    smoothing term's sum of logits is measured from the max too: a plain sum lost 2e-5 of the loss near 3e4.
    The reference's z-loss lost what the kernel once did, through torch.logsumexp's backward (3e-4 near 1e4)."""
    n = 64
    logits = (3 * torch.randn(n, vocab, generator=torch.Generator().manual_seed(28)) + offset).requires_grad_()
    grad_out = torch.randn(n, generator=torch.Generator().manual_seed(29))
    ce_check(logits, targets_for(n, vocab, seed=28), "none", options, grad_out, backend=backend)


def test_cross_entropy_on_a_strided_view_of_a_32000_vocab():
    wide = torch.randn(6, 32100, generator=torch.Generator().manual_seed(3))
    logits = wide[:, :32000].requires_grad_()  # rows strided by 32100, as a slice of a padded head output
    ce_check(logits, targets_for(6, 32000, ignored_every=4), "mean", dict(label_smoothing=0.1), torch.tensor(1.0))


def test_logits_with_a_strided_last_dim():
    # the transpose of a (vocab, rows) tensor: the kernel reads each row as contiguous, so such logits must be
    # copied first, both for the losses alone (no_grad) and for the gradient (its buffer is a copy)
    logits = torch.randn(37, 9, generator=torch.Generator().manual_seed(25)).t()
    assert logits.stride(-1) != 1
    t = targets_for(9, 37, seed=25)
    truth_in = logits.double().requires_grad_()
    truth = reduce(formula(truth_in, t, label_smoothing=0.1), t, "mean")
    (truth_grad,) = torch.autograd.grad(truth, truth_in)
    with torch.no_grad():
        assert rel_err(ttl_kernels.cross_entropy(logits, t, backend="triton", label_smoothing=0.1), truth) <= 1e-5
    logits.requires_grad_()
    out = ttl_kernels.cross_entropy(logits, t, backend="triton", label_smoothing=0.1)
    (grad,) = torch.autograd.grad(out, logits)
    assert rel_err(out, truth) <= 1e-5 and rel_err(grad, truth_grad) <= 1e-5


def test_all_ignored_targets_give_zero_loss_and_zero_grads():
    hidden = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    t = torch.full((10,), -100)
    for reduction in ("mean", "sum"):
        loss = ttl_kernels.fused_linear_cross_entropy(hidden, weight, t, reduction=reduction, backend="triton")
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        assert loss.item() == 0.0 and gh.abs().max() == 0 and gw.abs().max() == 0
        logits = torch.randn(10, 50, requires_grad=True)
        loss = ttl_kernels.cross_entropy(logits, t, reduction=reduction, backend="triton")
        (g,) = torch.autograd.grad(loss, logits)
        assert loss.item() == 0.0 and torch.isfinite(g).all() and g.abs().max() == 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_custom_ignore_index_ignores_exactly_its_rows(reduction):
    """Every other test ignores -100: here a padding id inside the vocabulary is the ignore_index, on each
    path (kernel on logits, fused kernel, reference; with gradients and for the losses alone, as in evaluation),
    and must act exactly as -100 at the same rows."""
    n, d, vocab, pad = 14, 8, 29, 3
    gen = torch.Generator().manual_seed(29)
    hidden, weight = torch.randn(n, d, generator=gen), torch.randn(vocab, d, generator=gen) / d**0.5
    t = targets_for(n, vocab, seed=29, ignored_every=3)
    t = torch.where(t == -100, pad, t)
    as_default = t.masked_fill(t == pad, -100)
    opts = dict(label_smoothing=0.1, z_loss=1e-3)
    grad_out = torch.randn(n, generator=gen) if reduction == "none" else torch.tensor(0.7)

    def check(fn, inputs, tol):
        inputs = [x.clone().requires_grad_() for x in inputs]
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, grad_out)
        alone = torch.no_grad()(fn)(*inputs)  # the losses alone (evaluation) take another path
        x64 = [x.detach().double().requires_grad_() for x in inputs]
        logits64 = x64[0] if len(x64) == 1 else x64[0] @ x64[1].T
        truth = reduce(formula(logits64, as_default, **opts), as_default, reduction)
        truth_grads = torch.autograd.grad(truth, x64, grad_out.double())
        for got, want in zip((out, alone, *grads), (truth, truth, *truth_grads)):
            assert rel_err(got, want) <= tol

    logits = hidden @ weight.T
    check(lambda x: ttl_kernels.cross_entropy(x, t, pad, reduction, backend="triton", **opts), [logits], 1e-5)
    check(lambda x: ttl_kernels.cross_entropy_reference(x, t, pad, reduction, **opts), [logits], 1e-5)
    check(lambda h, w: ttl_kernels.fused_linear_cross_entropy(h, w, t, pad, reduction, backend="triton", **opts),
          [hidden, weight], FLCE_TOL[torch.float32])


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="reduction must be one of"):
        ttl_kernels.cross_entropy(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), reduction="avg",
                                  backend="triton")
    with pytest.raises(ValueError, match=r"targets must be \(3,\)"):
        ttl_kernels.fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(4, dtype=torch.long),
                                               backend="triton")
    with pytest.raises(ValueError, match=r"targets must be \(3,\), got \(3, 1\)"):  # one per row, not a column
        ttl_kernels.cross_entropy(torch.randn(3, 5), torch.zeros(3, 1, dtype=torch.long), backend="triton")
    for z_loss in (-1e-4, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="z_loss must be a finite number >= 0"):
            ttl_kernels.fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4),
                                                   torch.zeros(3, dtype=torch.long), z_loss=z_loss)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_inputs_that_are_not_logit_rows_and_class_indices_are_refused(backend):
    """Each once gave a number or an unclear error on the Triton path: (batch, seq, vocab) logits with one
    target per batch row read seq times too many targets (past the tensor's end), 1-D logits gave one row's
    loss, float or bool targets were cast to classes, a label smoothing outside [0, 1] was applied."""
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"needs logits \(rows, vocab\), got shape \(2, 3, 5\)"):
        ttl_kernels.cross_entropy(torch.randn(2, 3, 5), t, backend=backend)
    with pytest.raises(ValueError, match=r"needs logits \(rows, vocab\), got shape \(5,\)"):
        ttl_kernels.cross_entropy(torch.randn(5), torch.zeros(5, dtype=torch.long), backend=backend)
    for bad in (t.float(), t.bool()):
        with pytest.raises(ValueError, match="targets must be class indices of an integer dtype"):
            ttl_kernels.cross_entropy(torch.randn(2, 5), bad, backend=backend)
    for smoothing in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing must be between 0 and 1"):
            ttl_kernels.cross_entropy(torch.randn(2, 5), t, label_smoothing=smoothing, backend=backend)
    for option, value in (("label_smoothing", True), ("label_smoothing", torch.tensor(0.1)), ("z_loss", None)):
        with pytest.raises(TypeError,  # Triton's was cryptic
                           match=rf"^{option} must be a number, got {re.escape(repr(value))}$"):
            ttl_kernels.cross_entropy(torch.randn(2, 5), t, **{option: value}, backend=backend)
    for hidden, weight in ((torch.randn(2, 3, 4), torch.randn(5, 4)), (torch.randn(2, 4), torch.randn(5, 3)),
                           (torch.randn(2, 4), torch.randn(4))):
        with pytest.raises(ValueError, match=r"needs hidden \(rows, d\) and weight \(vocab, d\)"):
            ttl_kernels.fused_linear_cross_entropy(hidden, weight, t, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_compiled_kernels_on_cuda(dtype):
    """The same checks with compiled kernels on real CUDA tensors, at LM-head sizes."""
    n, d, vocab = 1024, 256, 32000
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, d, device="cuda", generator=gen) / d**0.5 * 2).to(dtype).requires_grad_()
    t = targets_for(n, vocab, device="cuda")
    out = ttl_kernels.fused_linear_cross_entropy(hidden, weight, t, backend="triton", label_smoothing=0.1)
    grads = torch.autograd.grad(out, (hidden, weight))
    h64, w64 = (x.detach().double().requires_grad_() for x in (hidden, weight))
    truth = reduce(formula(h64 @ w64.T, t, label_smoothing=0.1), t, "mean")
    truth_grads = torch.autograd.grad(truth, (h64, w64))
    # tf32 may be on for fp32 matmuls on the GPU: hold fp32 to the matmul-bound tolerance only
    for got, want in zip((out, *grads), (truth, *truth_grads)):
        assert rel_err(got, want) <= FLCE_TOL[dtype]
    # the weight gradient accumulated inside the matmul in float32, not through a rounded copy
    assert importlib.import_module("ttl_kernels.cross_entropy")._fp32_addmm
    logits = (h64 @ w64.T).detach().to(dtype).requires_grad_()
    loss = ttl_kernels.cross_entropy(logits, t, backend="triton", z_loss=1e-4)
    (g,) = torch.autograd.grad(loss, logits)
    l64 = logits.detach().double().requires_grad_()
    ref = reduce(formula(l64, t, z_loss=1e-4), t, "mean")
    assert rel_err(loss, ref) <= TOL[dtype] and rel_err(g, torch.autograd.grad(ref, l64)[0]) <= TOL[dtype]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["plain", "smooth"])
def test_minus_inf_logits_give_what_pytorch_gives(label_smoothing):
    """Masked vocabulary entries (-inf logits): PyTorch gives finite losses, or inf with label smoothing (a
    smoothed target puts weight on the masked entries), and finite gradients. The kernel once gave NaN: from
    0 * -inf in the smoothing term, and from -inf - -inf in the running sum-exp after a whole -inf block."""
    vocab = 4100  # two 4096-column blocks
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(20))
    logits[0, 7] = float("-inf")
    logits[1, :4096] = float("-inf")  # the whole first block
    logits[2, 100:] = float("-inf")
    logits.requires_grad_()
    t = torch.tensor([vocab - 1, vocab - 2, 3])
    out = ttl_kernels.cross_entropy(logits, t, reduction="none", label_smoothing=label_smoothing, backend="triton")
    (grad,) = torch.autograd.grad(out.sum(), logits)
    l64 = logits.detach().double().requires_grad_()
    truth = F.cross_entropy(l64, t, reduction="none", label_smoothing=label_smoothing)
    (truth_grad,) = torch.autograd.grad(truth.sum(), l64)
    if label_smoothing:
        assert torch.isposinf(out).all() and torch.isposinf(truth).all()
    else:
        assert rel_err(out, truth) <= 1e-5
    assert rel_err(grad, truth_grad) <= 1e-5


def test_strided_targets_are_read_by_their_strides():
    # a column of a (rows, 2) tensor: the kernel once read it as a packed array
    gen = torch.Generator().manual_seed(21)
    t = torch.randint(0, 11, (8, 2), generator=gen)[:, 0]
    logits, hidden, weight = torch.randn(8, 11, generator=gen), torch.randn(8, 4, generator=gen), torch.randn(11, 4)
    assert not t.is_contiguous()
    got = ttl_kernels.cross_entropy(logits, t, backend="triton")
    assert rel_err(got, ttl_kernels.cross_entropy_reference(logits.double(), t)) <= 1e-6
    got = ttl_kernels.fused_linear_cross_entropy(hidden, weight, t, backend="triton")
    assert rel_err(got, ttl_kernels.fused_linear_cross_entropy_reference(hidden.double(), weight.double(), t)) <= 1e-6


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_targets_of_any_integer_dtype_give_the_int64_losses(backend, dtype):
    # the Triton path took int32 targets while the reference (the CPU default) raised deep in F.cross_entropy
    gen = torch.Generator().manual_seed(22)
    t = torch.randint(0, 11, (6,), generator=gen)
    t[2] = 7 if dtype == torch.uint8 else -100
    logits, hidden, weight = torch.randn(6, 11, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(11, 4)
    options = dict(ignore_index=7 if dtype == torch.uint8 else -100, label_smoothing=0.1, backend=backend)
    for loss, args in ((ttl_kernels.cross_entropy, (logits,)),
                       (ttl_kernels.fused_linear_cross_entropy, (hidden, weight))):
        assert torch.equal(loss(*args, t.to(dtype), reduction="none", **options),
                           loss(*args, t, reduction="none", **options))


def test_targets_outside_the_vocabulary_give_nan_rows_not_stray_reads():
    """The reference raises; the kernel cannot without a host sync, so it reads nothing out of bounds and makes
    those rows' losses and gradients NaN (it once returned a plausible loss, or crashed on a far target)."""
    gen = torch.Generator().manual_seed(22)
    vocab = 7
    t = torch.tensor([0, vocab, -1, 10**6, -100, 2])
    bad, good = [1, 2, 3], [0, 4, 5]
    logits = torch.randn(6, vocab, generator=gen, requires_grad=True)
    out = ttl_kernels.cross_entropy(logits, t, reduction="none", backend="triton")
    (grad,) = torch.autograd.grad(out.sum(), logits)
    want = ttl_kernels.cross_entropy_reference(logits.detach()[good], t[good], reduction="none")
    assert out[bad].isnan().all() and grad[bad].isnan().all()
    assert rel_err(out[good], want) <= 1e-6 and grad[good].isfinite().all()
    hidden = torch.randn(6, 4, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, 4, generator=gen, requires_grad=True)
    loss = ttl_kernels.fused_linear_cross_entropy(hidden, weight, t, backend="triton")
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    assert loss.isnan() and gh[bad].isnan().all() and gh[good].isfinite().all() and gw.isnan().any()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_are_made_only_for_inputs_that_need_them(monkeypatch, reduction):
    """No gradient work under no_grad or without inputs that require grad, no float32 weight gradient for a
    frozen LM head (LoRA), no hidden gradient for a frozen hidden; the gradients made are the same bits."""
    module = importlib.import_module("ttl_kernels.cross_entropy")
    chunked_pass, ce_rows = module._chunked_pass, module.ce_rows_
    passes, writes = [], []

    def spy_chunked_pass(*args, **buffers):  # a gradient pass (a scale given): which of the two buffers it fills
        if buffers.get("scale") is not None:
            passes.append((buffers["grad_hidden"] is not None, buffers["grad_weight"] is not None))
        return chunked_pass(*args, **buffers)

    def spy_ce_rows(logits, targets, scale, *options):  # whether the kernel writes a gradient over the logits
        writes.append(scale is not None)
        return ce_rows(logits, targets, scale, *options)

    monkeypatch.setattr(module, "_chunked_pass", spy_chunked_pass)
    monkeypatch.setattr(module, "ce_rows_", spy_ce_rows)
    gen = torch.Generator().manual_seed(23)
    hidden, weight = torch.randn(12, 16, generator=gen), torch.randn(50, 16, generator=gen)
    t = targets_for(12, 50, seed=23)

    def run(need_hidden, need_weight):
        passes.clear()
        h, w = hidden.clone().requires_grad_(need_hidden), weight.clone().requires_grad_(need_weight)
        loss = ttl_kernels.fused_linear_cross_entropy(h, w, t, reduction=reduction, backend="triton")
        used = [x for x in (h, w) if x.requires_grad]
        return loss, torch.autograd.grad(loss.sum(), used) if loss.requires_grad else ()

    loss, (gh, gw) = run(True, True)
    assert passes == [(True, True)]
    with torch.no_grad():
        assert torch.equal(run(True, True)[0], loss) and passes == []
    assert torch.equal(run(False, False)[0], loss) and passes == []
    frozen_head_loss, (frozen_head_gh,) = run(True, False)
    assert torch.equal(frozen_head_loss, loss) and torch.equal(frozen_head_gh, gh) and passes == [(True, False)]
    frozen_hidden_loss, (frozen_hidden_gw,) = run(False, True)
    assert torch.equal(frozen_hidden_loss, loss) and torch.equal(frozen_hidden_gw, gw) and passes == [(False, True)]
    logits = torch.randn(12, 50, generator=gen, requires_grad=True)
    writes.clear()
    with torch.no_grad():
        ttl_kernels.cross_entropy(logits, t, reduction=reduction, backend="triton")
    ttl_kernels.cross_entropy(logits.detach(), t, reduction=reduction, backend="triton")
    assert writes == [False, False]


def test_double_backward_fails_loudly_rather_than_dropping_terms():
    # the backwards are not differentiable: a loss scaled by a learned weight once gave a second derivative
    # with the terms through the kernel silently missing
    logits, hidden = torch.randn(6, 10, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    weight, t = torch.randn(10, 4, requires_grad=True), torch.randint(0, 10, (6,))
    s = torch.tensor(2.0, requires_grad=True)
    for loss, x in [(ttl_kernels.cross_entropy(logits, t, backend="triton"), logits),
                    (ttl_kernels.fused_linear_cross_entropy(hidden, weight, t, backend="triton"), hidden)]:
        (g,) = torch.autograd.grad(loss * s, x, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            g.pow(2).sum().backward()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_gradient_penalty_fails_loudly_rather_than_adding_nothing(reduction):
    # from a constant seed (a plain loss) torch's once_differentiable gave the gradient no graph, so a penalty
    # on it added no gradient to the backward, without a word
    logits, hidden = torch.randn(6, 10, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    weight, t = torch.randn(10, 4, requires_grad=True), torch.randint(0, 10, (6,))
    for loss, x in [(ttl_kernels.cross_entropy(logits, t, reduction=reduction, backend="triton"), logits),
                    (ttl_kernels.fused_linear_cross_entropy(hidden, weight, t, reduction=reduction,
                                                            backend="triton"), hidden)]:
        (g,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            (loss.sum() + g.pow(2).sum()).backward()
