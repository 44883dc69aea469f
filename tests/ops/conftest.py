"""Fixtures of the op tests: `backend`, one test body run on the CPU ops, the
host-emulated CUDA launchers and the real CUDA kernels (backends.py)."""
from __future__ import annotations

import pytest

import backends


@pytest.fixture(scope="session")
def emu():
    """torch.ops.kvcomm_emu (built once per session)."""
    if "emulated" not in backends.selected():
        pytest.skip("the host emulation is not selected (KVCOMM_TEST_BACKENDS / KVCOMM_SKIP_EMULATION)")
    return backends.build_emulator()


@pytest.fixture(params=backends.ALL)
def backend(request):
    name = request.param
    if name not in backends.selected():
        pytest.skip(f"backend {name} not selected (KVCOMM_TEST_BACKENDS)")
    if name == "cuda" and not backends.HAS_CUDA:
        pytest.skip(backends.NO_CUDA)
    emu = request.getfixturevalue("emu") if name == "emulated" else None
    b = backends.Backend(name, emu)
    b.sms(132)
    return b


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped with the reason otherwise)")
