"""mini_sequence_apply: exactness, autograd modes, memory; measure_peak: the numbers are real."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mst_megatron.ops.mini_sequence import mini_sequence_apply
from mst_megatron.measure.memory import format_bytes, measure_peak
from tests.helpers import rel_err

MiB = 2**20


class SwiGLU(torch.nn.Module):
    """fc1 -> SwiGLU -> fc2 from plain torch Linear layers (megatron's MLP shape, no TP)."""

    def __init__(self, h, ffn, bias=False, dtype=torch.float32):
        super().__init__()
        self.fc1 = torch.nn.Linear(h, 2 * ffn, bias=bias, dtype=dtype)
        self.fc2 = torch.nn.Linear(ffn, h, bias=bias, dtype=dtype)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


def run(fn_apply, mlp, x, g):
    """Forward + backward; returns (output, x.grad or None, {param name: grad})."""
    mlp.zero_grad(set_to_none=True)
    if x.grad is not None:
        x.grad = None
    out = fn_apply(x)
    out.backward(g)
    return out.detach(), (None if x.grad is None else x.grad.clone()), {
        n: p.grad.clone() for n, p in mlp.named_parameters()
    }


def assert_close(ref, got, out_tol, grad_tol):
    (o_ref, xg_ref, pg_ref), (o, xg, pg) = ref, got
    assert rel_err(o, o_ref) <= out_tol, f"output rel err {rel_err(o, o_ref):.3g}"
    if xg_ref is not None:
        assert rel_err(xg, xg_ref) <= grad_tol, f"input grad rel err {rel_err(xg, xg_ref):.3g}"
    for n in pg_ref:
        assert rel_err(pg[n], pg_ref[n]) <= grad_tol, f"{n} grad rel err {rel_err(pg[n], pg_ref[n]):.3g}"


# S = 37 is prime: no chunk count > 1 divides it.
S, H, FFN = 37, 16, 24


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("num_chunks", [1, 2, 3, 8, S])
def test_exact_fp32(num_chunks, b):
    torch.manual_seed(0)
    mlp = SwiGLU(H, FFN, bias=True)
    x = torch.randn(S, b, H, requires_grad=True)
    g = torch.randn(S, b, H)
    ref = run(mlp, mlp, x, g)
    got = run(lambda t: mini_sequence_apply(mlp, t, num_chunks, dim=0), mlp, x, g)
    assert_close(ref, got, out_tol=1e-6, grad_tol=1e-5)


def test_exact_fp32_dim1():
    torch.manual_seed(0)
    mlp = SwiGLU(H, FFN)
    x = torch.randn(2, S, H, requires_grad=True)  # [b, s, h]
    g = torch.randn(2, S, H)
    ref = run(mlp, mlp, x, g)
    got = run(lambda t: mini_sequence_apply(mlp, t, 5, dim=1), mlp, x, g)
    assert_close(ref, got, out_tol=1e-6, grad_tol=1e-5)


def test_bf16():
    """bf16 tolerance: output and input grad within 1e-2 (relative, Frobenius) of the unchunked bf16
    run; weight grads within 2e-2 (they are summed over M chunks in bf16 ``.grad`` accumulation), and
    no further from the fp32 reference than twice the unchunked bf16 error (+ 1e-3)."""
    torch.manual_seed(0)
    s, h, ffn, m = 256, 64, 128, 8
    mlp32 = SwiGLU(h, ffn)
    mlp16 = SwiGLU(h, ffn, dtype=torch.bfloat16)
    mlp16.load_state_dict({k: v.bfloat16() for k, v in mlp32.state_dict().items()})
    x16 = torch.randn(s, 2, h, dtype=torch.bfloat16, requires_grad=True)
    g16 = torch.randn(s, 2, h, dtype=torch.bfloat16)
    x32 = x16.detach().float().requires_grad_()
    ref32 = run(mlp32, mlp32, x32, g16.float())
    ref16 = run(mlp16, mlp16, x16, g16)
    got16 = run(lambda t: mini_sequence_apply(mlp16, t, m), mlp16, x16, g16)
    assert got16[0].dtype == torch.bfloat16
    assert_close(ref16, got16, out_tol=1e-2, grad_tol=2e-2)
    for i in (0, 1):
        assert rel_err(got16[i], ref32[i]) <= 2 * rel_err(ref16[i], ref32[i]) + 1e-3
    for n in ref32[2]:
        assert rel_err(got16[2][n], ref32[2][n]) <= 2 * rel_err(ref16[2][n], ref32[2][n]) + 1e-3


def test_tuple_output():
    """fn returns (out, bias, None): extras come from the first chunk, grads flow into the bias."""
    torch.manual_seed(0)
    mlp = SwiGLU(H, FFN)
    bias = torch.nn.Parameter(torch.randn(H))

    def fn(t):
        return mlp(t), bias, None

    x = torch.randn(S, 2, H, requires_grad=True)
    g = torch.randn(S, 2, H)
    out, b_out, none = mini_sequence_apply(fn, x, 3)
    assert b_out is bias and none is None
    (out + b_out).backward(g)
    got = (out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in mlp.named_parameters()})
    bias_grad = bias.grad.clone()

    mlp.zero_grad(set_to_none=True)
    x.grad = bias.grad = None
    ref_out = mlp(x)
    (ref_out + bias).backward(g)
    ref = (ref_out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in mlp.named_parameters()})
    assert_close(ref, got, out_tol=1e-6, grad_tol=1e-5)
    assert rel_err(bias_grad, bias.grad) <= 1e-6


def test_input_without_grad():
    torch.manual_seed(0)
    mlp = SwiGLU(H, FFN, bias=True)
    x = torch.randn(S, 2, H)  # requires_grad=False: only the weights get gradients
    g = torch.randn(S, 2, H)
    ref = run(mlp, mlp, x, g)
    got = run(lambda t: mini_sequence_apply(mlp, t, 4), mlp, x, g)
    assert got[1] is None
    assert_close(ref, got, out_tol=1e-6, grad_tol=1e-5)


def test_no_grad_chunks_without_checkpoint(monkeypatch):
    import mst_megatron.ops.mini_sequence as ms

    def forbidden(*a, **k):
        raise AssertionError("checkpoint must not run with autograd off")

    monkeypatch.setattr(ms, "checkpoint", forbidden)
    torch.manual_seed(0)
    mlp = SwiGLU(H, FFN)
    x = torch.randn(S, 2, H, requires_grad=True)
    calls = []

    def fn(t):
        calls.append(t.shape[0])
        return mlp(t)

    with torch.no_grad():
        ref = mlp(x)
        out = mini_sequence_apply(fn, x, 8)
    assert calls == [5, 5, 5, 5, 5, 4, 4, 4]
    assert not out.requires_grad and out.grad_fn is None
    assert rel_err(out, ref) <= 1e-6


def test_one_chunk_is_stock_call():
    x = torch.randn(4, 3, requires_grad=True)
    seen = []

    def fn(t):
        seen.append(t)
        return t * 2

    out = mini_sequence_apply(fn, x, 1)
    assert len(seen) == 1 and seen[0] is x
    assert out.grad_fn.name() == "MulBackward0"


@pytest.mark.parametrize("num_chunks", [1, 6])
def test_weight_grad_hooks_fire_once_per_backward(num_chunks):
    """The engine sums the chunks' weight-gradient contributions in AccumulateGrad's input buffer and
    runs AccumulateGrad once per backward, so post-accumulate hooks (megatron DDP's grad-ready hook)
    fire once per step, as in the unchunked model, whatever the chunk count."""
    torch.manual_seed(0)
    mlp = SwiGLU(H, FFN)
    counts = {n: 0 for n, _ in mlp.named_parameters()}
    for n, p in mlp.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, n=n: counts.__setitem__(n, counts[n] + 1))
    x = torch.randn(S, 1, H, requires_grad=True)
    mini_sequence_apply(mlp, x, num_chunks).sum().backward()
    assert counts == {n: 1 for n in counts}


def test_errors():
    x = torch.randn(5, 2)
    for bad in (0, -1, True, 2.0, "auto"):
        with pytest.raises(ValueError):
            mini_sequence_apply(lambda t: t, x, bad)
    with pytest.raises(ValueError):
        mini_sequence_apply(lambda t: t, x, 6)  # more chunks than tokens
    with pytest.raises(ValueError):
        mini_sequence_apply(lambda t: t[:1], x, 2)  # not per-token
    with pytest.raises(TypeError):
        mini_sequence_apply(lambda t: [1, 2], x, 2)


@pytest.mark.parametrize("num_chunks", [2, 7])
def test_nested_in_reentrant_checkpoint(num_chunks):
    """Inside megatron-style full recompute (reentrant checkpoint): the outer forward runs under
    no_grad (chunk only), the outer recompute in backward checkpoints each chunk again."""
    torch.manual_seed(0)
    mlp = SwiGLU(H, FFN, bias=True)
    norm = torch.nn.LayerNorm(H)

    def layer(t):
        return t + mini_sequence_apply(mlp, norm(t), num_chunks)

    def stock_layer(t):
        return t + mlp(norm(t))

    x = torch.randn(S, 2, H, requires_grad=True)
    g = torch.randn(S, 2, H)

    def grads():
        return {n: p.grad.clone() for n, p in list(mlp.named_parameters()) + list(norm.named_parameters())}

    out = checkpoint(layer, x, use_reentrant=True)
    out.backward(g)
    got = (out.detach(), x.grad.clone(), grads())

    mlp.zero_grad(set_to_none=True)
    norm.zero_grad(set_to_none=True)
    x.grad = None
    ref_out = stock_layer(x)
    ref_out.backward(g)
    ref = (ref_out.detach(), x.grad.clone(), grads())
    assert_close(ref, got, out_tol=1e-6, grad_tol=1e-5)


@pytest.mark.parametrize("num_chunks", [2, 7])
def test_outputs_unread_ending_reentrant_checkpoint(num_chunks):
    """``outputs_unread`` when the op ends a reentrant checkpoint (megatron's full recompute of a
    layer): the outer recompute computes no GEMM, each chunk computes once in its own recompute, and
    the gradients are the stock ones."""
    from mst_megatron.measure.flops import GemmLog

    torch.manual_seed(0)
    mlp = SwiGLU(H, FFN, bias=True)

    def layer(t):
        return t + mini_sequence_apply(mlp, t.sin(), num_chunks, outputs_unread=torch.is_grad_enabled())

    x = torch.randn(S, 2, H, requires_grad=True)
    g = torch.randn(S, 2, H)
    with GemmLog() as forward:
        out = checkpoint(layer, x, use_reentrant=True)
    with GemmLog() as backward:
        out.backward(g)
    # forward: fc1 + fc2 per chunk; backward: the chunk's recompute (fc1 only: torch's checkpoint
    # stops it once the last saved tensor is rebuilt, before fc2's product), then 2 per linear
    assert (forward.count, backward.count) == (2 * num_chunks, 5 * num_chunks)
    got = (out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in mlp.named_parameters()})
    ref = run(lambda t: t + mlp(t.sin()), mlp, x, g)
    assert_close(ref, got, out_tol=1e-6, grad_tol=1e-5)
    with torch.no_grad(), pytest.raises(ValueError, match="outputs_unread"):
        mini_sequence_apply(mlp, x, num_chunks, outputs_unread=True)


def _fwd_bwd_peak(num_chunks, s=4096, h=256, ffn=1024, nested=False):
    torch.manual_seed(0)
    mlp = SwiGLU(h, ffn)
    x = torch.randn(s, 1, h, requires_grad=True)
    g = torch.randn(s, 1, h)
    kept = {}

    def apply(t):
        return mini_sequence_apply(mlp, t, num_chunks)

    def step():
        out = checkpoint(apply, x, use_reentrant=True) if nested else apply(x)
        out.backward(g)
        kept["out"] = out

    peak = measure_peak(step, (mlp, x, g), allocator=True)
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    weights = sum(nbytes(p) for p in mlp.parameters())
    # floor: weights, weight grads, input, upstream grad, output, input grad
    floor = 2 * weights + nbytes(x) + nbytes(g) + nbytes(kept["out"]) + nbytes(x.grad)
    return peak, floor


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "in_reentrant_recompute"])
def test_memory_peak_fwd_bwd(nested):
    """S=4096, h=256, ffn=1024 SwiGLU fp32, M=8: forward+backward peak above the floor is <= 1/4 of
    the unchunked one; also inside a reentrant (megatron full-recompute style) checkpoint."""
    stock, floor = _fwd_bwd_peak(1, nested=nested)
    mst, floor_mst = _fwd_bwd_peak(8, nested=nested)
    assert floor == floor_mst
    stock_excess, mst_excess = stock["total"] - floor, mst["total"] - floor
    msg = ("nested: " if nested else "") + (
        f"stock peak {format_bytes(stock['total'])} (above floor {format_bytes(stock_excess)}), "
        f"MST M=8 peak {format_bytes(mst['total'])} (above floor {format_bytes(mst_excess)}), "
        f"floor {format_bytes(floor)}"
    )
    print(msg)
    assert mst_excess <= stock_excess / 4, msg
    # Cross-check against the CPU allocator's own record: same peak above the tracked externals
    # (weights + x + g, which MemTracker counts from the start).
    for peak in (stock, mst):
        start = peak["PARAM"] + peak["OTH"]
        assert abs(peak["total"] - start - peak["allocator_peak_delta"]) <= MiB // 16, (peak, msg)


class _BigTempInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t * 2

    @staticmethod
    def backward(ctx, grad):
        tmp = torch.ones(16 * MiB)  # 64 MiB fp32, created inside autograd backward
        grad = grad * 2 + tmp[0]
        del tmp
        return grad


def test_measure_peak_sees_known_allocations():
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64, requires_grad=True)
    base = measure_peak(lambda: lin(x).sum().backward(), (lin, x))
    lin.zero_grad(set_to_none=True)
    x.grad = None

    def fwd_temp():
        tmp = torch.empty(16 * MiB)  # 64 MiB fp32 temp in forward
        tmp.fill_(1.0)
        del tmp
        lin(x).sum().backward()

    fwd = measure_peak(fwd_temp, (lin, x), allocator=True)
    lin.zero_grad(set_to_none=True)
    x.grad = None
    bwd = measure_peak(lambda: _BigTempInBackward.apply(lin(x)).sum().backward(), (lin, x), allocator=True)

    assert set(fwd) >= {"PARAM", "BUFFER", "GRAD", "ACT", "TEMP", "OPT", "OTH", "total"}
    assert all(type(k) is str and type(v) is int for k, v in fwd.items())
    assert base["total"] < MiB
    assert base["PARAM"] == 64 * 64 * 4 + 64 * 4 and base["OTH"] == 32 * 64 * 4
    assert 64 * MiB <= fwd["total"] - base["PARAM"] - base["OTH"] <= 64 * MiB + base["total"]
    assert fwd["ACT"] >= 64 * MiB
    assert 64 * MiB <= bwd["total"] <= 64 * MiB + 2 * base["total"]
    assert bwd["TEMP"] >= 64 * MiB  # created in backward: labelled TEMP
    for peak in (fwd, bwd):
        assert abs(peak["total"] - peak["PARAM"] - peak["OTH"] - peak["allocator_peak_delta"]) <= MiB // 16


def test_measure_peak_repeated_top_level_calls_and_optimizer():
    """Stock MemTracker raises on a second top-level call of one module; measure_peak accepts it.
    Adam state created in the step counts as OPT."""
    lin = torch.nn.Linear(128, 128, bias=False)
    opt = torch.optim.Adam(lin.parameters())
    x = torch.randn(64, 128)

    def step():
        mini_sequence_apply(lin, x, 4).sum().backward()
        opt.step()

    peak = measure_peak(step, lin, optimizer=opt)
    after = measure_peak(lambda: None, lin, optimizer=opt)
    weight = 128 * 128 * 4
    assert 2 * weight <= after["OPT"] <= 2 * weight + 64  # exp_avg, exp_avg_sq, step counter
    assert after["GRAD"] == weight and after["PARAM"] == weight
    assert peak["total"] >= 3 * 128 * 128 * 4


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(64 * MiB) == "64.00 MiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(-2048) == "-2.00 KiB"
