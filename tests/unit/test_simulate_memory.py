"""The simulator in-process (one fake rank, tiny model): its memory categories add up without
counting what exists before the step twice, and offloaded layer inputs are counted as host memory."""

from mst_megatron import simulate

FULL = ["--model-config", "tiny", "--vocab-size", "1000", "--recompute-granularity", "full",
        "--recompute-method", "uniform", "--recompute-num-layers", "1", "--micro-batch-size", "1"]
SEQ = 1024  # a layer input is then 1 MiB: the smallest the offload moves


def _memory(*flags):
    args, shape = simulate.parse(FULL + list(flags))
    return simulate.simulate(args, shape, SEQ)["busiest"]["memory"], shape


def test_categories_add_up_and_the_gradient_buffer_counts_once():
    two, _ = _memory("--num-layers", "2")
    four, _ = _memory("--num-layers", "4")
    parts = ("weights", "grads", "optimizer", "other_static", "activations", "temporaries")
    for m in (two, four):
        assert sum(m[k] for k in parts) == m["peak"] and m["host"] == 0
    # backward adds into the gradient buffer in place: counted as a temporary, the buffer would make
    # the temporaries grow by at least the buffer's growth with the layers
    assert four["temporaries"] - two["temporaries"] < four["grads"] - two["grads"], (two, four)


def test_offloaded_layer_inputs_are_host_memory():
    plain, shape = _memory()
    offloaded, _ = _memory("--offload-layer-inputs")
    layer_input = SEQ * shape.hidden_size * 4  # fp32 [S, 1, h]
    assert offloaded["host"] == shape.num_layers * layer_input
    # The peak falls, by at least one layer input. How much of the 4 shows depends on where the peak
    # falls (the head's backward, or a layer's with its own input and the next fetched ahead on the
    # device), which moves with the head's path and the versions: 2.0 MiB on 0.16.1, 1.75 on 0.19.2.
    assert plain["peak"] - offloaded["peak"] >= layer_input, (plain, offloaded)
