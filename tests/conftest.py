"""Test set-up: run the Triton kernels through Triton's interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so this runs before any
test module imports torch, triton or treecache.
"""

import os


def _has_cuda_device() -> bool:
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0"))


if "TRITON_INTERPRET" not in os.environ and not _has_cuda_device():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_report_header(config):
    gpu = torch.cuda.is_available()
    return (f"treecache tests: CUDA {'available' if gpu else 'not available'}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")
