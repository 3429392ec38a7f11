"""Attention backends in the model: SDPA, eager and our Triton kernel (interpreted here) give the same
logits and gradients; packed documents with document masking equal each document run alone."""

import pytest
import torch
from helpers import rel_err

import ttl_core.attention as attention_module
import ttl_core.model as model_module
from ttl_core import LlamaConfig, LlamaForCausalLM
from ttl_core.attention import attention, document_layout, packed_mask
from ttl_core.errors import ConfigError
from ttl_core.finetune import packs_batches
from ttl_kernels import flash_attention_reference

BACKENDS = ["sdpa", "eager", "triton", "flash_attn"]


class FlashAttnStandIn:
    """flash-attn's two training entry points with its signatures and the input contracts its kernels rely on,
    computed by the explicit-softmax reference. flash-attn needs CUDA and is not in the GPU image either, so
    this is what tests ttl's calls into it (argument order, layouts, int32 `cu_seqlens`, a `max_seqlen` that
    covers every document: the kernel sizes its grid by it and would leave longer documents half done)."""

    def __init__(self):
        self.calls = []

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        self.calls.append("flash_attn_func")
        assert q.dim() == 4 and k.shape == v.shape and k.shape[0] == q.shape[0] and k.shape[-1] == q.shape[-1]
        assert q.shape[2] % k.shape[2] == 0 and dropout_p == 0.0
        return flash_attention_reference(q, k, v, causal, softmax_scale=softmax_scale)

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        self.calls.append("flash_attn_varlen_func")
        assert q.dim() == 3 and k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[2] % k.shape[1] == 0
        for cu, longest in ((cu_seqlens_q, max_seqlen_q), (cu_seqlens_k, max_seqlen_k)):
            assert cu.dtype == torch.int32 and cu.dim() == 1 and cu.device == q.device and int(cu[-1]) == q.shape[0]
            assert isinstance(longest, int) and longest >= int((cu[1:] - cu[:-1]).max())
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and dropout_p == 0.0
        return flash_attention_reference(q, k, v, causal, cu_seqlens_q, max_seqlen_q, softmax_scale)


@pytest.fixture
def flash_attn(monkeypatch) -> FlashAttnStandIn:
    """Routes the 'flash_attn' backend to the stand-in (and makes it usable, as on an sm80+ GPU with flash-attn)."""
    stand_in = FlashAttnStandIn()
    monkeypatch.setattr(attention_module, "flash_attn_module", lambda: stand_in)
    monkeypatch.setattr(attention_module, "flash_attn_usable", lambda q: True)
    return stand_in


@pytest.fixture
def backend(request) -> str:
    """The parametrized backend, with flash-attn's stand-in in place when it is 'flash_attn'."""
    if request.param == "flash_attn":
        request.getfixturevalue("flash_attn")
    return request.param


def model_with(backend: str, dtype=torch.float32) -> LlamaForCausalLM:
    config = LlamaConfig.from_preset("tiny", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=300, attention=backend)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # O(1) activations, so a wrong attention cannot hide under the tolerance
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if p.dim() == 1 else 0.0))
    return model.to(dtype)


def logits_and_grads(model, ids, **kwargs):
    model.zero_grad()
    logits = model(ids, **kwargs).logits
    (logits.float().pow(2).mean()).backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_document_layout_on_known_lengths():
    starts = torch.zeros(2, 10, dtype=torch.bool)
    starts[0, [3, 8]] = True  # row 0: documents of 3, 5, 2 tokens
    starts[1, 6] = True       # row 1: 6 and 4 (the row start always begins one)
    position_ids, cu, longest = document_layout(starts)
    assert position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 8, 10, 16, 20] and longest == 6


@pytest.mark.parametrize("backend", ["eager", "triton", "flash_attn"], indirect=True)
def test_backends_give_the_same_logits_and_gradients(backend):
    ids = torch.randint(0, 300, (2, 21), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = logits_and_grads(model_with("sdpa"), ids)
    logits, grads = logits_and_grads(model_with(backend), ids)
    assert (logits - ref_logits).abs().max() <= 1e-4
    for name, grad in ref_grads.items():
        assert rel_err(grads[name], grad) <= 1e-4, name


def test_triton_backend_in_bf16_is_as_close_to_float64_as_sdpa():
    ids = torch.randint(0, 300, (2, 21), generator=torch.Generator().manual_seed(2))
    truth, truth_grads = logits_and_grads(model_with("eager").double(), ids)
    sdpa, sdpa_grads = logits_and_grads(model_with("sdpa", torch.bfloat16), ids)
    ours, our_grads = logits_and_grads(model_with("triton", torch.bfloat16), ids)
    assert rel_err(ours, truth) <= max(1e-2, 2 * rel_err(sdpa, truth))
    for name, grad in truth_grads.items():  # both about 2e-2 to 8e-2 off in bf16: the criterion alone
        assert rel_err(our_grads[name], grad) <= 2 * rel_err(sdpa_grads[name], grad), name


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_packed_documents_equal_each_document_alone(backend):
    model = model_with(backend)
    lengths = [7, 12, 5]
    docs = [torch.randint(4, 300, (1, n), generator=torch.Generator().manual_seed(10 + i))
            for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)
    starts = torch.zeros_like(packed, dtype=torch.bool)
    starts[0, [0, 7, 19]] = True
    position_ids, cu, longest = document_layout(starts)
    with torch.no_grad():
        together = model(packed, position_ids=position_ids, cu_seqlens=cu, max_seqlen=longest).logits
        alone = torch.cat([model(d).logits for d in docs], dim=1)
        unmasked = model(packed).logits
    assert (together - alone).abs().max() <= 1e-5
    assert (unmasked - alone).abs().max() > 1e-2  # without the layout, later documents do see earlier ones


def packed_rows(seed: int) -> tuple[torch.Tensor, dict]:
    """Two rows of 16 tokens holding documents of 5, 6, 5 and 9, 7 tokens (one spanning the row boundary), and
    the model keyword arguments that keep them apart."""
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(seed))
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[0, [5, 11]] = True
    starts[1, 9] = True
    position_ids, cu, longest = document_layout(starts)
    return ids, dict(position_ids=position_ids, cu_seqlens=cu, max_seqlen=longest)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_packed_documents_without_position_ids_restart_their_positions(backend):
    """Positions left out of a packed forward restart in each document, as each document alone has them:
    they ran on across the row, so a caller who passed cu_seqlens alone silently got other logits."""
    model = model_with(backend)
    ids, layout = packed_rows(seed=4)
    with torch.no_grad():
        given = model(ids, **layout).logits
        derived = model(ids, cu_seqlens=layout["cu_seqlens"], max_seqlen=layout["max_seqlen"]).logits
    assert torch.equal(derived, given)


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_packed_mask_is_built_once_per_forward(backend, checkpointed, monkeypatch):
    """SDPA and eager take packed documents as a block-diagonal mask, which the model builds once for all its
    layers (not in each layer's call, nor again in each checkpointed layer's recomputation); the varlen kernels
    take cu_seqlens and need none. Every layer gets the mask it did before, so logits and gradients equal those
    of a forward given that mask outright, bit for bit."""
    model = model_with(backend)
    if checkpointed:
        model.gradient_checkpointing_enable()
    assert model.config.num_hidden_layers > 1
    ids, packed = packed_rows(seed=7)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return packed_mask(*args, **kwargs)

    for module in (attention_module, model_module):  # the model's own build, and any in attention()
        monkeypatch.setattr(module, "packed_mask", counted)
    logits, grads = logits_and_grads(model, ids, **packed)
    assert len(calls) == (1 if backend in ("sdpa", "eager") else 0)
    mask = packed_mask(packed["cu_seqlens"], *ids.shape, packed["max_seqlen"])
    ref_logits, ref_grads = logits_and_grads(model, ids, attention_mask=mask, position_ids=packed["position_ids"])
    tolerance = 0 if backend in ("sdpa", "eager") else 1e-5  # the varlen kernels add up in another order than SDPA
    assert (logits - ref_logits).abs().max() <= tolerance
    for name, grad in ref_grads.items():
        assert (grads[name] - grad).abs().max() <= tolerance * grad.abs().max(), name


def test_auto_under_autocast_still_sends_packed_documents_to_flash_attn(flash_attn, monkeypatch):
    """The model decides the packed-document form once for its layers, before any query exists, from the
    queries' dtype: autocast's where it is on. An fp32 model under bf16 autocast runs flash-attn's varlen kernel
    in every layer (flash-attn taking fp16/bf16 only, as `flash_attn_usable` says), in fp32 the SDPA mask."""
    monkeypatch.setattr(attention_module, "flash_attn_usable", lambda q: q.dtype in (torch.float16, torch.bfloat16))
    model = model_with("auto")
    ids, packed = packed_rows(seed=9)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, **packed)
        assert flash_attn.calls == ["flash_attn_varlen_func"] * model.config.num_hidden_layers
        flash_attn.calls.clear()
        model(ids, **packed)
        assert flash_attn.calls == []


def test_auto_calls_flash_attn_where_it_is_usable(flash_attn):
    """With flash-attn usable, "auto" sends plain causal calls to `flash_attn_func` and packed documents to
    `flash_attn_varlen_func` in every layer; a padding mask (no flash-attn form here) goes to SDPA."""
    model = model_with("auto")
    layers = model.config.num_hidden_layers
    ids = torch.randint(4, 300, (2, 10), generator=torch.Generator().manual_seed(6))
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 4] = True
    position_ids, cu, longest = document_layout(starts)
    padding = torch.ones_like(ids)
    padding[0, :3] = 0
    with torch.no_grad():
        for kwargs, expected in (({}, ["flash_attn_func"] * layers),
                                 (dict(position_ids=position_ids, cu_seqlens=cu, max_seqlen=longest),
                                  ["flash_attn_varlen_func"] * layers),
                                 (dict(attention_mask=padding), [])):
            flash_attn.calls.clear()
            model(ids, **kwargs)
            assert flash_attn.calls == expected, kwargs


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_an_additive_mask_equals_its_boolean_form(backend):
    """Decoding passes one additive (0 / -inf) mask to every layer instead of a boolean one that SDPA would
    convert in each call: both forms give the same attention, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 4, 16, generator=gen)
    k, v = (torch.randn(2, 9, 4, 16, generator=gen) for _ in range(2))
    allowed = torch.rand(2, 1, 3, 9, generator=gen) > 0.4
    allowed[..., 0] = True  # an additive mask must leave each row a key
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    assert torch.equal(attention(q, k, v, mask=additive, backend=backend),
                       attention(q, k, v, mask=allowed, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_fewer_queries_than_keys_are_the_last_positions(backend):
    """A causal call without a mask whose queries are fewer than the keys (a chunk after cached keys): the
    queries are the last positions, so each row equals that row of the full-length call (SDPA's own
    `is_causal` would align them with the first keys; flash kernels take equal lengths only)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 9, 4, 16, generator=gen)
    k, v = (torch.randn(2, 9, 2, 16, generator=gen) for _ in range(2))
    full = attention(q, k, v, backend=backend)
    assert (attention(q[:, 6:], k, v, backend=backend) - full[:, 6:]).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_non_causal_attention_sees_every_key(backend):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 7, 4, 16, generator=gen)
    k, v = (torch.randn(2, 7, 2, 16, generator=gen) for _ in range(2))
    truth = flash_attention_reference(q.double(), k.double(), v.double(), causal=False)
    assert (attention(q, k, v, causal=False, backend=backend) - truth).abs().max() <= 1e-5
    causal = flash_attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert (truth - causal).abs().max() > 0.1  # the two differ, so the check above means something


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("causal", [True, False])
def test_packed_attention_keeps_documents_apart_causal_or_not(backend, causal):
    """Packed documents (a row ending mid-document, so one spans the row boundary) attend within each document
    only, causally or not as asked, on every backend: SDPA and eager build the mask the varlen kernels imply."""
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(2, 6, 4, 16, generator=gen)
    k, v = (torch.randn(2, 6, 2, 16, generator=gen) for _ in range(2))
    starts = torch.zeros(2, 6, dtype=torch.bool)
    starts[0, 4] = True
    starts[1, 3] = True
    _, cu, longest = document_layout(starts)
    flat = [t.flatten(0, 1).double() for t in (q, k, v)]
    truth = flash_attention_reference(*flat, causal=causal, cu_seqlens=cu, max_seqlen=longest).view(q.shape)
    got = attention(q, k, v, causal=causal, backend=backend, cu_seqlens=cu, max_seqlen=longest)
    assert (got - truth).abs().max() <= 1e-5


def test_unavailable_backends_are_clear_errors(monkeypatch):
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(ConfigError, match="'flash_attn' needs the flash-attn package"):
        attention(q, q, q, backend="flash_attn")
    monkeypatch.setenv("TTL_ATTENTION", "fastest")
    with pytest.raises(ConfigError, match="TTL_ATTENTION must be one of"):
        attention(q, q, q)
    monkeypatch.setenv("TTL_ATTENTION", "eager")
    assert torch.allclose(attention(q, q, q), attention(q, q, q, backend="sdpa"), atol=1e-6)
    # the variable picks the backend, not only passes validation: eager and SDPA agree above, flash-attn is refused
    monkeypatch.setenv("TTL_ATTENTION", "flash_attn")
    with pytest.raises(ConfigError, match="'flash_attn' needs the flash-attn package"):
        attention(q, q, q)


@pytest.mark.parametrize("name", ["flash-attn", "Triton", "math"])
def test_an_unknown_backend_name_is_a_config_error_not_sdpa(name):
    """A misspelt backend given to attention() (the config checks its own) was run by SDPA without a word."""
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ConfigError, match=rf"attention backend must be one of .*, got '{name}'"):
        attention(q, q, q, backend=name)
    with pytest.raises(ConfigError, match=rf"attention backend must be one of .*, got '{name}'"):
        attention_module.runs_packed_natively(name, 16, q.device, q.dtype)


def test_fine_tuning_packs_its_batches_where_auto_picks_flash_attn_for_the_autocast_dtype(monkeypatch):
    """Fine-tuning keeps float32 parameters and computes attention in its autocast dtype: under bf16 or fp16 "auto"
    picks flash-attn (an sm80+ GPU, faked here), so the batches are packed; in float32 it picks SDPA, so not."""
    monkeypatch.delenv("TTL_ATTENTION", raising=False)
    monkeypatch.setattr(attention_module, "flash_attn_usable", lambda q: q.dtype in (torch.float16, torch.bfloat16))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=1))
    assert [packs_batches(model, dtype) for dtype in ("float32", "bfloat16", "float16")] == [False, True, True]


def test_a_head_dim_the_triton_kernel_lacks_is_a_config_error():
    """The Triton kernel is compiled for a few head sizes: another one is refused by name, as flash-attn's
    limits are, not with the kernel's ValueError from inside the forward."""
    q = torch.randn(1, 4, 2, 24)
    with pytest.raises(ConfigError, match=r"attention backend 'triton' supports head_dim 16, 32, 64, 128, not 24"):
        attention(q, q, q, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flash_attn"])
def test_gpu_backends_match_sdpa(backend):
    from ttl_core.attention import flash_attn_usable
    gen = torch.Generator(device="cuda").manual_seed(6)
    q = torch.randn(2, 256, 8, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    if backend == "flash_attn" and not flash_attn_usable(q):
        pytest.skip("flash-attn is not installed")
    k, v = (torch.randn(2, 256, 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    truth = attention(q.double(), k.double(), v.double(), backend="eager")
    sdpa = attention(q, k, v, backend="sdpa")
    ours = attention(q, k, v, backend=backend)
    assert rel_err(ours, truth) <= max(2e-2, 2 * rel_err(sdpa, truth))
    starts = torch.zeros(2, 256, dtype=torch.bool, device="cuda")
    starts[:, [100, 201]] = True
    _, cu, longest = document_layout(starts)
    packed = attention(q, k, v, backend=backend, cu_seqlens=cu, max_seqlen=longest)
    assert rel_err(packed, attention(q, k, v, backend="sdpa", cu_seqlens=cu, max_seqlen=longest)) <= 2e-2


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_packed_documents_without_max_seqlen_are_an_error_on_every_backend(backend):
    """The varlen kernels need the longest document; SDPA does not, but a call that works there must not
    fail only once "auto" picks flash-attn on a GPU (with a TypeError from inside flash-attn); nor in the model,
    which builds the SDPA and eager mask itself."""
    q = torch.randn(1, 4, 2, 16)
    _, cu_seqlens, _ = document_layout(torch.tensor([[True, False, True, False]]))
    with pytest.raises(ConfigError, match=r"cu_seqlens without max_seqlen"):
        attention(q, q, q, cu_seqlens=cu_seqlens, backend=backend)
    with pytest.raises(ConfigError, match=r"cu_seqlens without max_seqlen"):
        model_with(backend)(torch.randint(4, 300, (1, 4)), cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("backend", ["sdpa", "eager", "triton"])
@pytest.mark.parametrize("cu_seqlens, max_seqlen, message", [
    ([0, 5, 10], 5, "cu_seqlens must start at 0, never decrease and end at the 16 packed tokens"),
    ([2, 8, 16], 8, "cu_seqlens must start at 0, never decrease"),
    ([0, 9, 4, 16], 12, "cu_seqlens must start at 0, never decrease"),
    ([0, 8, 16], 3, r"max_seqlen 3 is less than the longest document in cu_seqlens \(8 tokens\)"),
])
def test_bad_packed_documents_are_refused_alike_by_every_backend(backend, cu_seqlens, max_seqlen, message):
    """SDPA and eager turned any cu_seqlens into some block-diagonal mask and ignored max_seqlen, so a call that
    ran there failed under 'triton', or gave wrong rows under flash-attn (which trusts them on the GPU)."""
    model = model_with(backend).eval()
    ids = torch.randint(4, 300, (2, 8))
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        model(ids, cu_seqlens=cu, max_seqlen=max_seqlen)
    q = torch.randn(2, 8, 4, 16)
    with pytest.raises(ValueError, match=message):
        attention(q, q, q, backend=backend, cu_seqlens=cu, max_seqlen=max_seqlen)


def test_a_mask_with_packed_documents_is_an_error():
    q = torch.randn(1, 4, 2, 16)
    _, cu_seqlens, max_seqlen = document_layout(torch.tensor([[True, False, True, False]]))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    with pytest.raises(ConfigError, match=r"both a mask \(attention_mask\) and cu_seqlens"):
        attention(q, q, q, mask=mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, backend="sdpa")
