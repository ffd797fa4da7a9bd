"""Test set-up shared by the whole suite.

Tests marked `experts` need the three pretrained experts: the first of them fetches and prepares the weights
once (`minislm.experts.fetch.fetch`, idempotent), so a fresh machine runs the suite with no manual step.
Tests that need a real dataset ask `real_dataset` for it: it is looked for where minislm looks
($MINISLM_DATA_DIR, data/, ../shared/data) and its absence fails the test, naming what is missing; a test is
never skipped for want of data. Every other data test reads the small committed sets in tests/fixtures/.
"""
import os

import pytest

# A stable cache folder keeps Numba's compiled kernels across test runs (PERFORMANCE.md: warm it once).
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "minislm", "numba"))


def pytest_configure(config):
    config.addinivalue_line("markers", "experts: needs the pretrained experts (fetched once per session)")
    config.addinivalue_line("markers", "avx2_only: tests the AVX2 kernel path (runs where that path is compiled)")
    config.addinivalue_line("markers", "avx512_only: runs on AVX-512 hosts (e.g. starts the AVX2 path's child run)")
    config.addinivalue_line("markers", "needs_avx2: needs AVX2 instructions on this CPU")


def pytest_collection_modifyitems(config, items):
    """Kernel tests for a vector path this process did not compile are deselected, not skipped: the AVX2
    path's tests run in a child process compiled for Haswell (tests/test_kernels_avx2.py), so every check
    runs on any host and the summary never reports a skipped one."""
    from minislm.kernels import tiles
    from minislm.numba_setup import has_feature

    def unwanted(item):
        return ((item.get_closest_marker("avx2_only") and tiles.AVX512)
                or (item.get_closest_marker("avx512_only") and not tiles.AVX512)
                or (item.get_closest_marker("needs_avx2") and not has_feature("avx2")))

    drop = [i for i in items if unwanted(i)]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [i for i in items if not unwanted(i)]


@pytest.fixture(scope="session")
def prepared_experts():
    """name -> folder of every pretrained expert, fetched on first use."""
    from minislm.experts import fetch as weights

    return weights.fetch()


@pytest.fixture(autouse=True)
def _fetch_experts_when_marked(request):
    if request.node.get_closest_marker("experts") is not None:
        request.getfixturevalue("prepared_experts")


@pytest.fixture
def real_dataset():
    """-> need(name, *splits): the folder holding <name>/{split}.parquet + labels.json, or a failure that says
    which files are missing, where they were looked for and how to point the tests at them."""
    from minislm import data

    def need(name, *splits):
        files = [f"{name}/{s}.parquet" for s in splits] + [f"{name}/labels.json"]
        dirs = data.search_dirs()
        for folder in dirs:
            if all((folder / f).is_file() for f in files):
                return folder
        pytest.fail(f"this test needs the real {name} dataset ({', '.join(files)}) and none of "
                    f"{', '.join(map(str, dirs))} has it: set MINISLM_DATA_DIR to the folder that holds {name}/",
                    pytrace=False)

    return need
