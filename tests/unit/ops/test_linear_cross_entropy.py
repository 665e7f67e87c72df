"""Mini-sequence LM head + vocab-parallel cross-entropy against full-logits cross-entropy."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

from mst_megatron.ops.linear_cross_entropy import WeightGradSum, linear_cross_entropy, vocab_blocks
from tests.helpers import OpLog, rel_err
from tests.helpers.cross_entropy import GRADIENT_KINDS, make_inputs, reference, run_op, upstream_gradient


def assert_fp32_matches_full_logits(hidden, weight, labels, grad_out, num_chunks):
    """The op's loss within 1e-5 and its gradients within 1e-4 of the fp64 reference; returns them."""
    loss, dh, dw = run_op(hidden, weight, labels, grad_out, num_chunks)
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels, grad_out)
    assert rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(dh, ref_dh) <= 1e-4
    assert rel_err(dw, ref_dw) <= 1e-4
    return loss, dh, dw


T_FP32 = 29  # prime: no chunk count in {2, 7} divides it


@pytest.mark.parametrize("kind", GRADIENT_KINDS)
@pytest.mark.parametrize("num_chunks", [1, 2, 7, T_FP32])
def test_fp32_matches_full_logits(num_chunks, kind):
    hidden, weight, labels, _ = make_inputs(T_FP32, 50, 16)
    loss, dh, dw = assert_fp32_matches_full_logits(hidden, weight, labels, upstream_gradient(kind, T_FP32), num_chunks)
    assert loss.dtype == torch.float32 and loss.shape == (T_FP32,)
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype


@pytest.mark.parametrize("threads, vocab, blocks", [(1, 60, 1), (3, 60, 3), (4, 50, 2), (2, 37, 1)])
def test_vocab_blocks_match_full_logits(threads, vocab, blocks, monkeypatch):
    """On a CPU the vocab shard runs in one block per thread, fewer when the thread count does not
    divide it: every split gives the full-logits loss and gradients."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    hidden, weight, labels, _ = make_inputs(T_FP32, vocab, 16)
    grad_out = upstream_gradient("masked mean", T_FP32)
    assert vocab_blocks(weight) == blocks
    assert_fp32_matches_full_logits(hidden, weight, labels, grad_out, 7)


def test_without_autograd_only_the_loss():
    """Under ``torch.no_grad`` (evaluation) the op computes the loss alone: one GEMM per chunk."""
    hidden, weight, labels, _ = make_inputs(T_FP32, 50, 16)
    with torch.no_grad(), OpLog() as ops:
        loss = linear_cross_entropy(hidden.requires_grad_(), weight.requires_grad_(), labels, 7)
    assert ops.count == 7 and loss.grad_fn is None
    assert rel_err(loss, reference(hidden, weight, labels, torch.ones(T_FP32))[0]) <= 1e-5


def test_single_token():
    hidden, weight, labels, _ = make_inputs(1, 11, 4)
    assert_fp32_matches_full_logits(hidden, weight, labels, torch.tensor([0.7]), 1)


def test_bf16_matches_fp32_reference_of_rounded_inputs():
    hidden, weight, labels, grad_out = make_inputs(37, 64, 32, dtype=torch.bfloat16)
    loss, dh, dw = run_op(hidden, weight, labels, grad_out, 5)
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels, grad_out)
    assert loss.dtype == torch.float32
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    # The logits GEMM outputs bf16 (unit roundoff 2^-9 ~ 2e-3 relative per logit). Logits here are
    # ~N(0, 1), so each carries an absolute error up to ~5e-3 that passes straight into the loss
    # (~log V ~ 4 plus spread): ~1e-3 of the max loss. Backward has that error inside exp (p off by up
    # to ~5e-3 relative), one bf16 rounding of softmax - onehot, one of each gradient GEMM output and
    # one of dh times the upstream gradient: a few 1e-3 of the max gradient. Bugs (wrong target, wrong
    # scaling, a dropped chunk) give O(1). The chunks' and the correction's dW terms sum in fp32.
    assert rel_err(loss, ref_loss) <= 3e-3
    assert rel_err(dh, ref_dh) <= 1.5e-2
    assert rel_err(dw, ref_dw) <= 1.5e-2


@pytest.mark.parametrize("kind", ["mean", "masked mean"])
@pytest.mark.parametrize("frozen", ["weight", "hidden", "none"])
def test_gemm_count(frozen, kind):
    """Forward: the logits GEMM and the dh and dW GEMMs per chunk (none for a frozen input), and no
    host sync. Backward: no GEMM for a mean loss; for a masked mean, the logits and dW GEMMs over the
    masked tokens of each chunk that has some (a frozen head: none)."""
    T, num_chunks = 23, 4
    hidden, weight, labels, _ = make_inputs(T, 30, 8)
    grad_out = upstream_gradient(kind, T)
    masked = int((grad_out == 0).sum())
    h = hidden.clone().requires_grad_(frozen != "hidden")
    w = weight.clone().requires_grad_(frozen != "weight")
    with OpLog() as fwd:
        loss = linear_cross_entropy(h, w, labels, num_chunks)
    with OpLog() as bwd:
        loss.backward(grad_out)
    assert fwd.count == num_chunks * (3 if frozen == "none" else 2)
    assert fwd.syncs == []
    # chunks of 6, 6, 6, 5 tokens: the ones holding a masked token are corrected
    chunks_with_masked = sum(bool((c == 0).any()) for c in grad_out.split([6, 6, 6, 5]))
    assert masked > 0 or kind == "mean"
    assert bwd.count == (2 * chunks_with_masked if kind == "masked mean" and frozen != "weight" else 0)

    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels, grad_out)
    assert rel_err(loss, ref_loss) <= 1e-5
    if frozen == "weight":
        assert w.grad is None
    else:
        assert rel_err(w.grad, ref_dw) <= 1e-4
    if frozen == "hidden":
        assert h.grad is None
    else:
        assert rel_err(h.grad, ref_dh) <= 1e-4


def test_weight_gradient_once_and_a_second_backward_refused():
    """dW reaches ``weight.grad`` once (an earlier MST implementation doubled it); the gradients are
    scaled in place, so a second backward through the same forward is refused, not wrong."""
    hidden, weight, labels, grad_out = make_inputs(19, 24, 8)
    _, _, ref_dw = reference(hidden, weight, labels, grad_out)
    w = weight.clone().requires_grad_()
    loss = linear_cross_entropy(hidden.clone().requires_grad_(), w, labels, 3)
    loss.backward(grad_out, retain_graph=True)
    assert rel_err(w.grad, ref_dw) <= 1e-4
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward(grad_out)


# Micro-batches into one buffer: (upstream gradient kind, its seed, the value forward is expected to
# assume). None guessed yet (0: no dW GEMM in forward, every token with g != 0 in backward); a mean
# twice, then right (nothing in backward); a masked mean with another token count (wrong for all),
# then twice more with the same mask (0: only the kept tokens; then right but for the masked ones);
# random weights (wrong); mostly masked after it (0, the common value of both: the kept tokens only).
MICRO_BATCHES = (
    ("mean", 0, "none"), ("mean", 0, "none"), ("mean", 0, "mean"), ("masked mean", 1, "mean"),
    ("masked mean", 1, "none"), ("masked mean", 1, "masked mean"), ("random", 2, "masked mean"),
    ("mostly masked", 3, "none"),
)


@pytest.mark.parametrize("num_chunks", [1, 7])
def test_weight_grad_sum_adds_each_micro_batch_exactly(num_chunks):
    """A WeightGradSum buffer that already holds a gradient gets each micro-batch's fp64-reference dW
    added (fp32: <= 1e-4 of it), whatever the upstream gradient and forward's expected value; dh is
    unchanged, nothing reaches ``weight.grad``; the expected value is the common upstream value of the
    last two backwards when they agree, else 0; the GEMMs are forward's three per chunk (two when the
    expected value is 0) plus the logits and dW GEMMs of each chunk with tokens that differ from it."""
    T, V, h = T_FP32, 50, 16
    _, weight, labels, _ = make_inputs(T, V, h)
    before = torch.randn(V, h, generator=torch.Generator().manual_seed(5)) * 0.05
    weight_grad_sum = WeightGradSum(before.clone())
    added = torch.zeros(V, h, dtype=torch.float64)
    sizes = [c.numel() for c in torch.arange(T).tensor_split(num_chunks)]
    common = {"none": 0.0, "mean": upstream_gradient("mean", T).max().item(),
              "masked mean": upstream_gradient("masked mean", T, seed=1).max().item()}  # fp32 values
    for i, (kind, seed, expected_kind) in enumerate(MICRO_BATCHES):
        hidden = make_inputs(T, V, h, seed=i + 1)[0]
        grad_out = upstream_gradient(kind, T, seed=seed)
        expected = weight_grad_sum.expected_grad
        case = f"micro-batch {i} ({kind}), expected {expected:.4g}"
        assert expected == common[expected_kind], case
        differing_chunks = sum(bool((c != expected).any()) for c in grad_out.split(sizes))
        h_, w_ = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with OpLog() as ops:
            linear_cross_entropy(h_, w_, labels, num_chunks, weight_grad_sum=weight_grad_sum).backward(grad_out)
        _, ref_dh, ref_dw = reference(hidden, weight, labels, grad_out)
        added += ref_dw
        assert w_.grad is None, case
        assert rel_err(h_.grad, ref_dh) <= 1e-4, case
        assert rel_err(weight_grad_sum.buffer.double() - before, added) <= 1e-4, case
        assert ops.count == num_chunks * (3 if expected != 0 else 2) + 2 * differing_chunks, case
    assert weight_grad_sum.expected_grad == 0.0  # "mostly masked" and "random" share the common value 0
    # The tokens the last two corrected: the kept ones only (mostly masked), every one (random).
    assert 0 < (upstream_gradient("mostly masked", T, seed=3) != 0).sum() < T


def test_weight_grad_sum_bf16_as_close_as_the_own_sum():
    """bf16 weights, fp32 buffer: dW as close to the fp64 reference as the op's own fp32 sum, rounded
    to bf16, is (the buffer keeps fp32: no bf16 rounding of the total)."""
    hidden, weight, labels, grad_out = make_inputs(37, 64, 32, dtype=torch.bfloat16)
    _, _, ref_dw = reference(hidden, weight, labels, grad_out)
    own_err = rel_err(run_op(hidden, weight, labels, grad_out, 5)[2], ref_dw)
    for expected in (0.0, float(grad_out.mean())):  # all tokens in backward / all corrected from a guess
        weight_grad_sum = WeightGradSum(torch.zeros(weight.shape), expected_grad=expected)
        linear_cross_entropy(hidden.clone().requires_grad_(), weight.clone().requires_grad_(), labels, 5,
                             weight_grad_sum=weight_grad_sum).backward(grad_out)
        assert rel_err(weight_grad_sum.buffer, ref_dw) <= own_err + 2**-9, expected


def test_weight_grad_sum_returned_grad_and_checks():
    """Backward returns ``returned_grad()`` as the weight's gradient; a buffer that cannot take the
    weight's gradient, or another type, is refused naming the argument."""
    hidden, weight, labels, grad_out = make_inputs(19, 24, 8)
    placeholder = torch.zeros_like(weight)
    w = weight.clone().requires_grad_()
    weight_grad_sum = WeightGradSum(torch.zeros(weight.shape), returned_grad=lambda: placeholder)
    linear_cross_entropy(hidden, w, labels, 3, weight_grad_sum=weight_grad_sum).backward(grad_out)
    assert torch.equal(w.grad, placeholder)
    for buffer in (torch.zeros(24, 8, dtype=torch.float64), torch.zeros(8, 24), torch.zeros(8, 24).t()):
        with pytest.raises(ValueError, match="weight_grad_sum.buffer must be a contiguous fp32 tensor"):
            linear_cross_entropy(hidden, w, labels, 3, weight_grad_sum=WeightGradSum(buffer))
    with pytest.raises(TypeError, match="weight_grad_sum must be a WeightGradSum"):
        linear_cross_entropy(hidden, w, labels, 3, weight_grad_sum=torch.zeros(24, 8))


def _bad(hidden=(4, 2), weight=(5, 2), labels=(4,), num_chunks=1, hidden_dtype=torch.float32,
         weight_dtype=torch.float32, labels_dtype=torch.long):
    """Arguments that are valid except where overridden."""
    return (torch.zeros(hidden, dtype=hidden_dtype), torch.zeros(weight, dtype=weight_dtype),
            torch.zeros(labels, dtype=labels_dtype), num_chunks)


@pytest.mark.parametrize(
    "args, match",
    [
        (_bad(hidden=(4, 3, 2)), "hidden"),
        (_bad(hidden_dtype=torch.long), "hidden"),
        (_bad(weight=(5, 3)), "weight"),
        (_bad(weight=(5,)), "weight"),
        (_bad(weight_dtype=torch.float64), "weight"),
        (_bad(labels=(3,)), "labels"),
        (_bad(labels=(4, 1)), "labels"),
        (_bad(labels_dtype=torch.float32), "labels"),
        (_bad(num_chunks=0), "num_chunks"),
        (_bad(num_chunks=5), "num_chunks"),
        (_bad(num_chunks=2.0), "num_chunks"),
        (_bad(num_chunks=True), "num_chunks"),
        (_bad() + (True,), "tp_group"),
        (_bad() + (None, 1), "sequence_parallel"),
        (_bad() + (None, True), "sequence_parallel=True needs the tensor-parallel tp_group"),
    ],
)
def test_input_checks_name_the_argument(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        linear_cross_entropy(*args)


def peak_extra_bytes(fn, *inputs):
    """Peak tracked tensor bytes while running ``fn()`` (forward + backward), above ``inputs``."""
    tracker = MemTracker()
    tracker.track_external(*inputs)
    baseline = sum(t.untyped_storage().nbytes() for t in inputs)
    with tracker:
        fn()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return peak - baseline


def test_memory_peak_far_below_full_logits():
    T, V, h, num_chunks = 512, 8192, 64, 16
    hidden, weight, labels, _ = make_inputs(T, V, h)
    grad_out = upstream_gradient("masked mean", T)
    full_logits_bytes = T * V * 4
    hidden.requires_grad_()
    weight.requires_grad_()

    def mst():
        linear_cross_entropy(hidden, weight, labels, num_chunks).backward(grad_out)

    def full():
        F.cross_entropy(hidden @ weight.t(), labels, reduction="none").backward(grad_out)

    inputs = (hidden, weight, labels, grad_out)
    mst_extra = peak_extra_bytes(mst, *inputs)
    hidden.grad = weight.grad = None
    ref_extra = peak_extra_bytes(full, *inputs)
    print(
        f"\nfull fp32 logits {full_logits_bytes / 2**20:.2f} MiB; peak above inputs: "
        f"MST(M={num_chunks}) {mst_extra / 2**20:.2f} MiB, full-logits CE {ref_extra / 2**20:.2f} MiB"
    )
    # What MST may hold: dW and dh (outputs), one chunk of logits and its 16-bit-free gradient (the
    # same storage in fp32), a chunk of gathered hidden rows in the correction, per-token vectors.
    chunk_logits_bytes = full_logits_bytes // num_chunks
    outputs_bytes = 4 * (V * h + T * h)
    assert mst_extra <= outputs_bytes + 1.25 * chunk_logits_bytes, (mst_extra, outputs_bytes, chunk_logits_bytes)
    assert ref_extra > full_logits_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_tensors_shapes_without_host_reads(dtype):
    """Under FakeTensorMode (the simulator) forward and backward run with no data-dependent host read
    (a real one raises DataDependentOutputException there) and give gradients of the inputs' shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        hidden = torch.empty(37, 16, dtype=dtype, requires_grad=True)
        weight = torch.empty(96, 16, dtype=dtype, requires_grad=True)
        labels = torch.zeros(37, dtype=torch.long)
        loss = linear_cross_entropy(hidden, weight, labels, 4)
        loss.mean().backward()
        assert loss.shape == (37,) and loss.dtype == torch.float32
        assert hidden.grad.shape == hidden.shape and hidden.grad.dtype == dtype
        assert weight.grad.shape == weight.shape and weight.grad.dtype == dtype
        # Into a caller's buffer: the GEMMs a mean loss costs on real tensors, call by call (2 + 2 per
        # chunk until two backwards had the same value, then 3), so the simulator counts the real step's.
        weight.grad = None
        fake_counts = _buffer_gemm_counts(hidden, weight, labels)
        assert weight.grad is None
    real_counts = _buffer_gemm_counts(torch.randn(37, 16, dtype=dtype, requires_grad=True),
                                      torch.randn(96, 16, dtype=dtype, requires_grad=True),
                                      torch.zeros(37, dtype=torch.long))
    assert fake_counts == real_counts == [4 * 4, 4 * 4, 3 * 4]


def _buffer_gemm_counts(hidden, weight, labels, calls=3):
    """Logits-sized GEMMs of each of ``calls`` mean-loss steps into one WeightGradSum (4 chunks)."""
    weight_grad_sum = WeightGradSum(torch.zeros(weight.shape), returned_grad=lambda: None)
    counts = []
    for _ in range(calls):
        with OpLog() as ops:
            linear_cross_entropy(hidden, weight, labels, 4, weight_grad_sum=weight_grad_sum).mean().backward()
        counts.append(ops.count)
    return counts
