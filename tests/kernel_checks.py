"""What the Triton kernel tests share: device markers, the tolerance check, the CUDA compile check.

Each op's test module keeps its own per-dtype ``TOL`` dict and passes the entry it wants to
:func:`assert_close`. The ``triton_backend`` fixture (``LUMOS_BACKEND=triton``) lives in
``conftest.py``; a kernel test module turns it on for all its tests with
``pytestmark = pytest.mark.usefixtures("triton_backend")``.
"""
import os
import subprocess
import sys

import pytest
import torch

from lumos_kernels import dispatch

needs_interpreter = pytest.mark.skipif(
    not dispatch.triton_interpreted(), reason="needs TRITON_INTERPRET=1 (Triton's CPU interpreter)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = [pytest.param("cpu", marks=needs_interpreter), pytest.param("cuda", marks=needs_cuda)]

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_close(actual, expected, tol):
    """``actual`` vs ``expected`` in fp32 with ``tol`` (``dict(rtol=, atol=)``, one entry of an op's
    TOL); atol is relative to the largest expected magnitude (at least 1)."""
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol["rtol"], atol=tol["atol"] * scale)


def assert_compiles_for_cuda_target(script):
    """Run ``script`` in a fresh interpreter without TRITON_INTERPRET (real Triton compilation to
    CUDA cubins, no GPU needed: ``lumos_kernels._triton.cuda_target.compile_for_cuda_target``);
    it must exit cleanly and print ``compiled``. Its IR checks are asserts inside the script."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([_REPO_ROOT, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
