"""init_parallel's checks and the CPU compatibility layer's version gate (the bridges at work:
tests/integration/test_cpu_bridges.py)."""

import pytest
import torch

import mst_megatron


@pytest.mark.parametrize(
    "world_size, kwargs, message",
    [
        ("1", dict(tensor_model_parallel_size=2), "world size 1 is not divisible"),
        ("6", dict(tensor_model_parallel_size=4), "world size 6 is not divisible"),
        ("4", dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, context_parallel_size=2), "= 8"),
        ("1", dict(tensor_model_parallel_size=0), "--tensor-model-parallel-size must be an int >= 1"),
        ("1", dict(pipeline_model_parallel_size=1.5), "--pipeline-model-parallel-size must be an int >= 1"),
        ("1", dict(context_parallel_size=-1), "--context-parallel-size must be an int >= 1"),
        ("1", dict(virtual_pipeline_model_parallel_size=2), "needs --pipeline-model-parallel-size > 1"),
        ("2", dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=0), "--virtual-pipeline-model-parallel-size must be None or an int >= 1"),
    ],
)
def test_init_parallel_rejects_bad_sizes(monkeypatch, world_size, kwargs, message):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.raises(ValueError, match=message):
        mst_megatron.init_parallel(**kwargs)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("version", ["0.15.0", "0.16.0", "0.20.0", "1.0.0rc1"])
def test_bridges_refuse_other_megatron_versions(version):
    from mst_megatron.runtime import cpu_compat

    with pytest.raises(RuntimeError, match=rf"megatron-core {version} is not supported .*>=0.16.1,<0.20"):
        cpu_compat.check_mcore_version(version)
    for ok in ("0.16.1", "0.17.0", "0.19.2", "0.19.0rc3"):
        cpu_compat.check_mcore_version(ok)
