"""The model with the Triton kernels (interpreted on CPU) against the same model on the PyTorch references."""

import copy

import pytest
import torch
from helpers import record_kernel_decisions, rel_err

from ttl_core import LlamaConfig, LlamaForCausalLM
from ttl_core.errors import ConfigError
from ttl_kernels.dispatch import interpreting


def loss_and_grads(model, ids, labels=None):
    model.zero_grad()
    loss = model(ids, labels=ids if labels is None else labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_kernels_give_the_reference_loss_and_gradients(dtype, monkeypatch):
    config = LlamaConfig.from_preset("tiny", num_hidden_layers=2, num_key_value_heads=2, vocab_size=512,
                                     kernels="torch")
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config)
    truth = LlamaForCausalLM(config).double()
    truth.load_state_dict(reference.state_dict())
    reference.to(dtype)
    ours = LlamaForCausalLM(config.replace(kernels="triton")).to(dtype)
    ours.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = loss_and_grads(reference, ids)
    decisions = record_kernel_decisions(monkeypatch)
    our_loss, our_grads = loss_and_grads(ours, ids)
    # else the comparisons below hold the references against themselves (attention is the config's default)
    assert decisions == {f"ttl_kernels.{name}": {True} for name in ("rms_norm", "rotary", "swiglu", "cross_entropy")}
    if dtype == torch.float32:  # the same math up to fp32 rounding
        assert rel_err(our_loss, ref_loss) <= 1e-5
        for name, grad in ref_grads.items():
            assert rel_err(our_grads[name], grad) <= 1e-5, name
        return
    # bf16: no further from the float64 model than the reference path is (flash-attn's criterion)
    true_loss, true_grads = loss_and_grads(truth, ids)
    assert rel_err(our_loss, true_loss) <= max(1e-2, 2 * rel_err(ref_loss, true_loss))
    for name, grad in true_grads.items():
        assert rel_err(our_grads[name], grad) <= 2 * rel_err(ref_grads[name], grad), name


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_labels_of_any_integer_dtype_give_the_int64_loss_and_gradients(kernels):
    """uint8 labels made the -100 padding of the shift overflow (transformers refuses all but int64 labels)."""
    config = LlamaConfig.from_preset("tiny", num_hidden_layers=1, vocab_size=128, kernels=kernels)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    masked = ids.clone()
    masked[0, :3] = -100  # a masked prompt: no uint8 holds -100
    for labels, dtypes in ((masked, (torch.int8, torch.int16, torch.int32)), (ids, (torch.uint8,))):
        want_loss, want_grads = loss_and_grads(model, ids, labels)
        for dtype in dtypes:
            got_loss, got_grads = loss_and_grads(model, ids, labels.to(dtype))
            assert torch.equal(got_loss, want_loss), dtype
            assert all(torch.equal(got_grads[name], grad) for name, grad in want_grads.items()), dtype


@pytest.mark.parametrize("argument", ["labels", "targets"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_labels_that_are_not_integers_are_named(argument, dtype):
    model = LlamaForCausalLM(LlamaConfig.from_preset("tiny", num_hidden_layers=1, vocab_size=128))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ConfigError, match=f"^{argument} must be integer token ids, got {dtype}$"):
        model(ids, **{argument: ids.to(dtype)})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_compiled_kernels_in_the_model_on_cuda(dtype):
    """The model on CUDA with the Triton kernels (compiled, not interpreted) and our attention against the
    PyTorch references and SDPA, both judged against a float64 copy of the model."""
    config = LlamaConfig.from_preset("tiny", num_hidden_layers=2, num_key_value_heads=2, vocab_size=4096,
                                     kernels="torch", attention="sdpa")
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).cuda()
    truth = LlamaForCausalLM(config).cuda().double()
    truth.load_state_dict(reference.state_dict())
    reference.to(dtype)
    ours = LlamaForCausalLM(config.replace(kernels="triton", attention="triton")).cuda().to(dtype)
    ours.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 4096, (4, 256), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    ref_loss, ref_grads = loss_and_grads(reference, ids)
    our_loss, our_grads = loss_and_grads(ours, ids)
    true_loss, true_grads = loss_and_grads(truth, ids)
    assert rel_err(our_loss, true_loss) <= max(1e-2, 2 * rel_err(ref_loss, true_loss))
    for name, grad in true_grads.items():
        assert rel_err(our_grads[name], grad) <= max(1e-2, 2 * rel_err(ref_grads[name], grad)), name


@pytest.mark.gpu
def test_compiled_block_has_no_graph_breaks_on_cuda():
    """torch.compile traces a decoder block on the Triton kernels and our attention, forward and backward, into
    one graph: a break would run pieces of every block eagerly in compiled training."""
    from ttl_core.model import Block

    torch.manual_seed(0)  # the block's weights, its inputs and the output gradients below
    config = LlamaConfig.from_preset("tiny", kernels="triton", attention="triton")
    block = Block(config, 0).cuda().to(torch.bfloat16)
    x, residual = (torch.randn(2, 64, config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(2))
    cos, sin = (torch.randn(2, 64, config.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    explained = torch._dynamo.explain(block)(x, residual, cos, sin, None)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    out, new_residual = torch.compile(block)(x, residual, cos, sin, None)
    eager_out, eager_residual = block(x, residual, cos, sin, None)
    assert rel_err(out, eager_out) <= 1e-2 and rel_err(new_residual, eager_residual) == 0
    params = [x, residual, block.attn.qkv.weight, block.mlp.gate_up.weight]
    weights = [torch.randn_like(t) for t in (out, new_residual)]  # fresh gradients, not an all-ones sum
    compiled_grads = torch.autograd.grad([out, new_residual], params, weights)
    eager_grads = torch.autograd.grad([eager_out, eager_residual], params, weights)
    for got, want in zip(compiled_grads, eager_grads):  # the qkv gradient is written by the rotary backward
        assert rel_err(got, want) <= 1e-2


def test_compiled_blocks_stay_compiled_under_activation_checkpointing():
    """train.compile with train.activation_checkpointing: each block's forward is traced (a checkpoint that
    torch.compile never entered left the run eager without a word) and gives the eager gradients; a deep copy
    of the model (an EMA copy) runs its own weights."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_preset("tiny", hidden_size=64, intermediate_size=128, vocab_size=400,
                                                     num_hidden_layers=2, kernels="torch"))
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = copy.deepcopy(model)
    model.gradient_checkpointing_enable()
    eager = loss_and_grads(model, ids)[1]
    halved = copy.deepcopy(model)
    with torch.no_grad():
        for ours, theirs in zip(halved.parameters(), plain.parameters()):
            ours.mul_(0.5), theirs.mul_(0.5)
        assert torch.equal(halved(ids).logits, plain(ids).logits)
    graphs = []

    def recording_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    try:
        for block in model.backbone.layers:
            block.compile(backend=recording_backend)
        compiled = loss_and_grads(model, ids)[1]
    finally:
        torch._dynamo.reset()
    assert graphs
    assert all(torch.allclose(compiled[name], grad, rtol=1e-5, atol=1e-7) for name, grad in eager.items())


@pytest.mark.skipif(not interpreting(), reason="the Triton interpreter's case (TRITON_INTERPRET=1)")
def test_compiled_blocks_run_the_interpreted_kernels():
    """train.compile with TTL_KERNELS=triton on the CPU: dynamo traced into the Triton interpreter's numpy code,
    which in training broke the graph but under no_grad (the run's first evaluation) raised InterpreterError.
    The kernels run eagerly between the compiled pieces, forward and backward, with the eager results."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_preset("tiny", hidden_size=64, intermediate_size=128, vocab_size=400,
                                                     num_hidden_layers=1, kernels="triton"))
    ids = torch.randint(0, 400, (1, 16), generator=torch.Generator().manual_seed(0))
    eager_loss, eager_grads = loss_and_grads(model, ids)
    with torch.no_grad():
        eager_logits = model(ids).logits
    torch._dynamo.reset()
    try:
        for block in model.backbone.layers:
            block.compile(backend="eager")
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, eager_logits, rtol=1e-5, atol=1e-6)
        loss, grads = loss_and_grads(model, ids)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(loss, eager_loss, rtol=1e-6)
    assert all(torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-7) for name, grad in eager_grads.items())


@pytest.mark.parametrize("checkpointed", [False, True])
def test_lora_adapters_train_on_the_triton_kernels_as_on_the_references(checkpointed):
    """LoRA adds its update in place to the fused q/k/v output, which the rotary kernel then rotates and whose
    gradient its backward writes: the adapters' loss and gradients (with the attention kernel too, checkpointed
    or not) are those of the PyTorch references."""
    from ttl_core.lora import apply_lora

    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, kernels="torch",
                         attention="eager")
    runs = []
    for settings in ({}, {"kernels": "triton", "attention": "triton"}):
        torch.manual_seed(0)
        model = apply_lora(LlamaForCausalLM(config.replace(**settings)), r=4, dropout=0.0, targets="all-linear")
        with torch.no_grad():  # B starts at zero: give the adapters an effect on the loss and on A's gradients
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
        if checkpointed:
            model.gradient_checkpointing_enable()
        ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
        loss = model.train()(ids, labels=ids).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (ref_loss, ref_grads), (our_loss, our_grads) = runs
    assert rel_err(our_loss, ref_loss) <= 1e-5 and len(our_grads) == 2 * 2 * 7
    for name, grad in ref_grads.items():
        assert rel_err(our_grads[name], grad) <= 1e-5, name
