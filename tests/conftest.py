"""Shared test setup. TRITON_INTERPRET must be set before anything imports triton."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def triton_backend(monkeypatch):
    """Route the lumos_kernels ops to Triton (the kernel tests turn this on module-wide)."""
    monkeypatch.setenv("LUMOS_BACKEND", "triton")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny models: faster, and immune to a busy machine's
    OpenMP stalls: two threads on a busy 2-core machine spent most of their time
    waiting on each other, 12x the wall time of one (use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
