"""Shared test set-up: Triton's interpreter on CPU-only machines, no hub access, tiny HF reference models."""

import os

import torch

# Triton decides between compiling and interpreting when a kernel is decorated, so this must be set before
# anything imports `ttl_kernels`. Model tests still take the PyTorch references on CPU ("auto" dispatch).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# the attention autotuner compiles and times every candidate per shape class: minutes over the GPU tests, which
# check the first candidate (each candidate is checked in the interpreter, the autotuned path by one test)
os.environ.setdefault("TTL_AUTOTUNE", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the README's test command runs a pytest-xdist worker per core: torch's own threads in each (and in the scripts each
# starts) would oversubscribe the cores, and the suite is mostly single-threaded work (the interpreter, imports)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

import pytest  # noqa: E402


def _interpreter_rounds_bf16_like_the_gpu() -> None:
    """Triton's interpreter casts fp32 to bf16 by truncation (even when asked for round-to-nearest-even),
    which doubles the rounding error of every bf16 result; GPUs round to nearest even. Route that one
    conversion through torch's cast, so bf16 interpreter tests measure the kernels, not the simulator.
    Fails loudly if a Triton upgrade moves the function, rather than silently testing truncation again."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    truncating = interpreter._convert_float

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if (input_dtype == tl.float32 and output_dtype == tl.bfloat16
                and rounding_mode != interpreter._ir.ROUNDING_MODE.RTZ):
            values = torch.from_numpy(np.array(input, dtype=np.float32))
            return values.to(torch.bfloat16).view(torch.uint16).numpy().reshape(np.shape(input))
        return truncating(input, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert


def _interpreter_indexes_with_scalar_tensors() -> None:
    """Every scalar in Triton's interpreter is a one-element 1-D array, and Triton 3.5 and 3.6 turn one used as a
    Python index (a loop's runtime bound: `range(0, end, BLOCK)`) into an int with `int(array)`, which NumPy
    2.4+ refuses for arrays of rank above 0. Later Tritons (3.9) squeeze the array first; do the same, so the
    kernels' loops run in the interpreter under Triton 3.5 and 3.6 too (a GPU compiles the loop and never takes
    this path). Fails loudly if a Triton upgrade moves the function."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def index(self) -> int:
        return int(self.handle.data.squeeze())

    def patch_with_scalar_index(tensor, *scope):  # Triton 3.6 passes a patch scope, 3.5 none
        patch_tensor(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    interpreter._patch_lang_tensor = patch_with_scalar_index


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_rounds_bf16_like_the_gpu()
    _interpreter_indexes_with_scalar_tensors()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The bundled sample corpus prepared once per test module (a module may define its own `data_dir`)."""
    from train_helpers import prepared_corpus  # after the environment above: it imports ttl_kernels

    return prepared_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    """'a' and 'b': the two halves of train_helpers' corpus, prepared with one tokenizer (a module may define its
    own)."""
    from train_helpers import corpus_halves

    return corpus_halves(tmp_path_factory.mktemp("halves"), 40)
