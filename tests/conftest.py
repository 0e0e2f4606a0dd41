"""Fixtures shared by the end-to-end test modules."""
import time

import pytest

from tests.e2e import SHM, leaked_shm, prepare_tiny_assets


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> list[str]:
    """``model.path``/``data.path`` overrides of one tiny warm-started model and its data (made once)."""
    return prepare_tiny_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture
def no_shm_leak():
    """The test leaves nothing in /dev/shm (RAM until reboot): no name that appeared during it is still
    there, unmapped by any live process, once the engine guards had time to clean up (20 s at most)."""
    before = {p.name for p in SHM.iterdir()}
    yield
    deadline = time.monotonic() + 20
    while (left := leaked_shm(before)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"left behind in {SHM}: {left}"
