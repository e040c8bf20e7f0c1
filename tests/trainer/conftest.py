import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One corpus/token cache for every run of the session."""
    return tmp_path_factory.mktemp("data-cache")
