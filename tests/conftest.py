"""Test setup. Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter; TRITON_INTERPRET
must be set before triton is imported, so it is set here, before anything imports fer_kernels. Shared
helpers live in tests/helpers.py."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("FER_KERNELS_BACKEND", None)  # tests choose backends explicitly
os.environ.pop("FER_KERNELS_VERIFY", None)

import pytest  # noqa: E402

import fer_kernels  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
