"""Test set-up shared by the whole suite.

Tests marked `experts` need the three pretrained experts: the first of them fetches and prepares the weights
once (`minislm.experts.fetch.fetch`, idempotent), so a fresh machine runs the suite with no manual step.
"""
import os

import pytest

# A stable cache folder keeps Numba's compiled kernels across test runs (PERFORMANCE.md: warm it once).
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "minislm", "numba"))


def pytest_configure(config):
    config.addinivalue_line("markers", "experts: needs the pretrained experts (fetched once per session)")


@pytest.fixture(scope="session")
def prepared_experts():
    """name -> folder of every pretrained expert, fetched on first use."""
    from minislm.experts import fetch as weights

    return weights.fetch()


@pytest.fixture(autouse=True)
def _fetch_experts_when_marked(request):
    if request.node.get_closest_marker("experts") is not None:
        request.getfixturevalue("prepared_experts")
