import os
import sys

import pytest

# Make `tests.multirank` importable in spawned ranks and from test modules.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    """The training tests' tiny corpus (see :func:`tests.pretraining.build_corpus`), built once."""
    from tests.pretraining import build_corpus

    return build_corpus(tmp_path_factory.mktemp("pretrain"))
