import os
import sys

import pytest

# Make `tests.helpers` importable in spawned ranks and from test modules.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ("unit", "integration", "cuda")  # tests/<kind>/...: the marker each test gets


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Mark every test with the folder it lives in: ``pytest -m unit`` runs the in-process tests,
    ``-m integration`` those that spawn ranks or subprocesses, ``-m cuda`` the GPU checks."""
    for item in items:
        parts = item.path.relative_to(os.path.dirname(os.path.abspath(__file__))).parts
        if parts[0] in KINDS:
            item.add_marker(parts[0])


@pytest.fixture(scope="module")
def one_rank():
    """megatron-core as a one-rank world for a module's in-process tests, torn down after it."""
    import mst_megatron

    mst_megatron.init_parallel()
    yield
    mst_megatron.destroy_parallel()
    os.environ.pop("MASTER_PORT", None)  # the next module's world picks a fresh port


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The training tests' tiny corpus (see :func:`tests.helpers.corpus.build_corpus`), built once."""
    from tests.helpers.corpus import build_corpus

    return build_corpus(tmp_path_factory.mktemp("pretrain"))
