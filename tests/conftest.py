"""Fixtures shared by the end-to-end test modules."""
import pytest

from tests.e2e import prepare_tiny_assets


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> list[str]:
    """``model.path``/``data.path`` overrides of one tiny warm-started model and its data (made once)."""
    return prepare_tiny_assets(tmp_path_factory.mktemp("assets"))
