"""Shared fixtures: the device under test, random-weight tiny checkpoints and transformers twins.

QWEN2VL_FAST_TEST_DEVICE=cuda runs the device-aware tests on a GPU; tests marked `gpu` are skipped
without CUDA.
"""

import os

import torch

# Without a GPU, Triton kernels are tested under the interpreter. Triton reads this when a kernel is defined,
# so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

TEST_DEVICE = os.environ.get("QWEN2VL_FAST_TEST_DEVICE", "cpu")
# Parity checkpoints use larger weights than the models' 0.02 init: with 0.02 every attention row is
# nearly uniform and a wrong rotary or position would go unseen.
PARITY_STD = 0.15


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device():
    return torch.device(TEST_DEVICE)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{preset: directory} of float32 random checkpoints for both tiny presets, written once per session."""
    from qwen2vl_fast.testing.checkpoint_writer import write_random_checkpoint

    root = tmp_path_factory.mktemp("tiny_ckpt")
    return {name: write_random_checkpoint(root / name, name, dtype=torch.float32, seed=1, std=PARITY_STD)
            for name in ("tiny-qwen2-vl", "tiny-qwen2.5-vl")}


def float_dtypes(device):
    """(dtype, atol, rtol) cases for kernel tests: fp32/fp16 everywhere, bf16 on CUDA only (the Triton
    interpreter cannot do bfloat16)."""
    cases = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]
    if torch.device(device).type == "cuda":
        cases.append((torch.bfloat16, 1.6e-2, 1.6e-2))
    return cases


@pytest.fixture(scope="session")
def triton_device(device):
    """The device Triton kernels run on here (the test device), or skip when Triton cannot run."""
    from qwen2vl_fast.ops.registry import triton_runs_on

    if not triton_runs_on(device):
        pytest.skip("Triton cannot run here (no CUDA device, and TRITON_INTERPRET is not 1, or no triton)")
    return device
