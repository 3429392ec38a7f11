"""The decode step generate() captures in a CUDA graph, checked on the CPU: stream capture refuses a step that reads
a tensor on the host (`.item()`, `int()`, `bool()`) or makes a tensor whose shape depends on its values, an error
that otherwise shows only on a GPU. Each step after the warm-up runs under a dispatch mode that records such ops."""

import importlib
import inspect
import weakref

import pytest
import torch
from generation_helpers import PAD, left_padded, saved_models
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import WatermarkingConfig

import ttl_core
from ttl_core import decode_session

generate_module = importlib.import_module("ttl_core.generate")  # the package's `generate` is the function

# ops that read a tensor's values on the host: item/int/bool/float (_local_scalar_dense), and those whose output
# shape depends on the values; `multinomial` checks its probabilities on the host
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
              "unique_consecutive", "equal", "is_nonzero", "multinomial"}


class RecordHostReads(TorchDispatchMode):
    def __init__(self, found: list[str]):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1])
        sized_by_values = name == "repeat_interleave" and "output_size" not in (kwargs or {})
        if name in HOST_READS or boolean_index or sized_by_values:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return saved_models(tmp_path_factory.mktemp("graph"))


def graphed_on_the_cpu(monkeypatch) -> tuple[list[str], list[int]]:
    """Build every session as a CUDA-graph session (only a CUDA device gets one) whose step records the host reads
    of each call the graph would capture or replay; returns (the reads, the number of steps so recorded)."""
    found, recorded = [], []

    class RecordedStep:
        def __init__(self, fn, generator):
            self.fn, self.calls = fn, 0

        def __call__(self) -> None:
            self.calls += 1
            if self.calls <= decode_session.GRAPH_WARMUP_STEPS:  # eager on a GPU too
                self.fn()
                return
            with RecordHostReads(found):
                self.fn()
            recorded.append(self.calls)

    build = generate_module.DecodeSession

    def graphed_session(*args, **kwargs):
        bound = inspect.signature(build).bind(*args, **kwargs)
        bound.arguments["cuda_graph"] = True
        return build(*bound.args, **bound.kwargs)

    monkeypatch.setattr(decode_session, "_CudaGraphStep", RecordedStep)
    monkeypatch.setattr(generate_module, "DecodeSession", graphed_session)  # where generate() builds one
    monkeypatch.setattr(decode_session, "_SESSIONS", weakref.WeakKeyDictionary())  # no eager session reused
    return found, recorded


SETTINGS = {
    "greedy": dict(repetition_penalty=1.2, eos_token_id=[5, 6, 7, 8]),
    "sampled": dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, min_p=0.01, seed=3, num_return_sequences=2),
    "global_rng": dict(do_sample=True, top_k=30, eos_token_id=[5, 6], output_scores=True, output_logits=True,
                       return_dict_in_generate=True),
    "token_rules": dict(do_sample=True, top_h=0.9, typical_p=0.9, eta_cutoff=1e-3, epsilon_cutoff=1e-4,
                        no_repeat_ngram_size=3, min_new_tokens=8, eos_token_id=[5, 6, 7, 8],
                        bad_words_ids=[[9], [10, 11]], suppress_tokens=[4], sequence_bias={(12, 13): -2.0},
                        begin_suppress_tokens=[15], forced_eos_token_id=5, remove_invalid_values=True,
                        exponential_decay_length_penalty=(6, 1.05), renormalize_logits=True),
    "guidance": dict(guidance_scale=1.8, eos_token_id=[5, 6]),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_the_graphed_decode_step_reads_nothing_on_the_host(models, monkeypatch, name):
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    kwargs = dict(max_new_tokens=10, pad_token_id=PAD, **SETTINGS[name])
    torch.manual_seed(0)
    eager = ttl_core.generate(ours, ids, mask, **kwargs)
    found, recorded = graphed_on_the_cpu(monkeypatch)
    torch.manual_seed(0)
    graphed = ttl_core.generate(ours, ids, mask, **kwargs)
    assert recorded and not found, found
    # the recorded steps are the decoding's own (return_dict_in_generate: the sequences of a GenerateOutput)
    assert torch.equal(*(getattr(out, "sequences", out) for out in (graphed, eager)))


def test_a_step_that_reads_on_the_host_is_caught(models, monkeypatch):
    """Watermarking seeds its green lists from each row on the host, so generate() decodes it eagerly: forced into
    a graphed session, its step's reads are recorded."""
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    found, _ = graphed_on_the_cpu(monkeypatch)
    ttl_core.generate(ours, ids, mask, max_new_tokens=8, do_sample=True, seed=0,
                      watermarking_config=WatermarkingConfig(seeding_scheme="lefthash"))
    assert "_local_scalar_dense" in found
