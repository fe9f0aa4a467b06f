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

try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # hypothesis is in the test extra; without it those tests are skipped
    _hypothesis_settings = None
else:
    # In CI (CI=true) property tests draw a fixed sequence of examples, so that a run is
    # reproducible; locally they draw fresh examples every run.
    _hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        _hypothesis_settings.load_profile("ci")


def pytest_report_header(config):
    gpu = torch.cuda.is_available()
    return (f"treecache tests: CUDA {'available' if gpu else 'not available'}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")
