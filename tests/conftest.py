"""Shared test set-up: Triton's interpreter on CPU-only machines, no hub access, tiny HF reference models."""

import os

import torch

# Triton decides between compiling and interpreting when a kernel is decorated, so this must be set before
# anything imports `kernels`. Model tests still take the PyTorch references on CPU ("auto" dispatch).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
