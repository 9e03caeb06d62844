"""Recorded dY against torch.autograd.grad of the same graph w.r.t. each layer's output (exact).

The recorder is the capture handler of the GEMM-site interception (nmgrad_cli.sites); the site kinds
it has no module hooks for (HF Conv1D, MultiheadAttention's q/k/v/out projections, Conv3d) are
tested in tests/test_sites.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nmgrad_cli.capture import SiteRecorder, dy_axes
from nmgrad_cli.errors import NmgradError
from nmgrad_cli.sites import ParamIndex, SiteMode, site_report

TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")


def record(model: nn.Module, x: torch.Tensor, layers=None, types=TYPES, inputs=False, amp=False):
    """{(name, kind, call): tensor} from one backward of sum(model(x)**2) with the recorder on."""
    got = {}
    rec = SiteRecorder(layers, types, lambda site, kind, call, t: got.__setitem__((site.name, kind, call), t), inputs)
    rec.start_step()
    with SiteMode(ParamIndex(model), rec), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    out.float().pow(2).sum().backward()
    rec.stop_step()
    return got


def reference(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict:
    """{(name, call): dL/dY} by torch.autograd.grad w.r.t. the outputs kept by plain forward hooks."""
    outputs: dict = {}
    mods = dict(model.named_modules())
    handles = [
        mods[n].register_forward_hook(lambda _m, _i, y, n=n: outputs.setdefault(n, []).append(y)) for n in names
    ]
    loss = model(x).pow(2).sum()
    for h in handles:
        h.remove()
    keys = [(n, c) for n in names for c in range(len(outputs.get(n, [])))]
    grads = torch.autograd.grad(loss, [outputs[n][c] for n, c in keys])
    return dict(zip(keys, grads))


def no_inplace(model: nn.Module) -> nn.Module:
    """The same model (same weights) with every ReLU out of place: the graph autograd.grad can read."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return ref


def assert_exact(model: nn.Module, x: torch.Tensor, ref_model: nn.Module | None = None) -> dict:
    got = record(model, x)
    names = sorted({n for n, kind, _ in got if kind == "grad"})
    ref = reference(ref_model or model, x, names)
    assert set(ref) == {(n, c) for n, kind, c in got if kind == "grad"}
    for (n, c), g in ref.items():
        assert got[(n, "grad", c)].dtype == g.dtype
        assert torch.equal(got[(n, "grad", c)], g), n
    return got


def test_linear_conv1d_conv2d_exact():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c2 = nn.Conv2d(3, 4, 3, padding=1)
            self.c1 = nn.Conv1d(4, 5, 3)
            self.lin = nn.Linear(4, 6)

        def forward(self, x):  # x (B, 3, 6, 6)
            y = torch.tanh(self.c2(x)).mean(-1)  # (B, 4, 6)
            y = torch.sin(self.c1(y))  # (B, 5, 4)
            return self.lin(y)  # (B, 5, 6)

    model = Net()
    got = assert_exact(model, torch.randn(2, 3, 6, 6))
    assert {n for n, *_ in got} == {"c2", "c1", "lin"}
    assert got[("c2", "grad", 0)].shape == (2, 4, 6, 6) and got[("c1", "grad", 0)].shape == (2, 5, 4)


def test_inplace_relu_after_layer_gets_the_pre_relu_gradient():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Linear(16, 3)
    )
    x = torch.randn(5, 8)
    got = assert_exact(model, x, no_inplace(model))
    # the gradient w.r.t. the post-ReLU tensor differs from dY wherever the ReLU cut: not what we store
    assert (got[("0", "grad", 0)] != 0).sum() > 0


def test_inplace_relu_in_resnet_blocks_with_batchnorm():
    from nmgrad_cli.models import cnn

    torch.manual_seed(2)
    model = cnn()
    x = torch.rand(4, 1, 8, 8)
    got = assert_exact(model, x, no_inplace(model))
    assert len({n for n, *_ in got}) == 7


def test_module_called_twice_records_each_call():
    torch.manual_seed(3)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    model = Shared()
    got = assert_exact(model, torch.randn(3, 6))
    assert sorted(c for n, kind, c in got) == [0, 1]
    assert not torch.equal(got[("lin", "grad", 0)], got[("lin", "grad", 1)])


def test_with_inputs_stores_x_and_the_weight_used():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    got = record(model, x, inputs=True)
    assert torch.equal(got[("0", "input", 0)], x)
    assert torch.equal(got[("0", "weight", 0)], model[0].weight)
    # dW = dY^T X: what autograd accumulated into the weight
    g, x1 = got[("2", "grad", 0)], got[("2", "input", 0)]
    torch.testing.assert_close(g.T @ x1, model[2].weight.grad)


def test_bf16_autocast_gradients_keep_their_dtype():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 4))
    x = torch.randn(4, 8)
    got = record(model, x, amp=True)
    assert got[("0", "grad", 0)].dtype == torch.bfloat16 and got[("2", "grad", 0)].dtype == torch.bfloat16
    outputs = []
    ref_model = no_inplace(model)
    hs = [ref_model[i].register_forward_hook(lambda _m, _i, y: outputs.append(y)) for i in (0, 2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ref_model(x)
    for h in hs:
        h.remove()
    ref = torch.autograd.grad(out.float().pow(2).sum(), outputs)
    assert torch.equal(got[("0", "grad", 0)], ref[0]) and torch.equal(got[("2", "grad", 0)], ref[1])


def test_recorder_off_records_nothing():
    model = nn.Sequential(nn.Linear(3, 3))
    got = []
    with SiteMode(ParamIndex(model), SiteRecorder(None, TYPES, lambda *a: got.append(a))):
        out = model(torch.randn(2, 3))
    out.sum().backward()
    assert got == []


def first_step(model, x, layers=None, types=TYPES, strict=False):
    """The site report of one step of ``model`` on ``x`` with the capture handler."""
    index = ParamIndex(model)
    rec = SiteRecorder(layers, types, lambda *a: None)
    with SiteMode(index, rec) as mode:
        out = model(x)
    out.float().pow(2).sum().backward()
    return site_report(index, mode, list(rec.selected.values()), layers, strict, what="/".join(types) + " GEMM site")


def test_site_selection_globs_types_and_errors():
    from nmgrad_cli.models import gpt
    from nmgrad_cli.sites import NotInterceptedError

    model = gpt(vocab_size=11, block_size=8)
    x = torch.randint(0, 11, (2, 8))
    report = first_step(model, x, "blocks.0.attn.*,lm_head", ("Linear",))
    assert [s.name for s in report.selected] == [f"blocks.0.attn.{p}" for p in ("q", "k", "v", "proj")] + ["lm_head"]
    # the embeddings get gradients but are no GEMM: reported, with the reason
    why = "used by embedding, not a linear/conv GEMM"
    assert dict(report.not_intercepted) == {"wte.weight": why, "wpe.weight": why}
    with pytest.raises(NmgradError, match=r"no Linear GEMM site matches --layers 'nope\*': the names are blocks.0"):
        first_step(model, x, "nope*", ("Linear",))
    with pytest.raises(NmgradError, match="the model has no Conv2d GEMM site: its GEMM sites are blocks.0"):
        first_step(model, x, None, ("Conv2d",))
    with pytest.raises(NotInterceptedError, match=r"--strict: 2 parameter\(s\) got gradients outside every GEMM site"):
        first_step(model, x, strict=True)


@pytest.mark.parametrize(
    ("kind", "ndim", "axes"),
    [("Linear", 2, (-1, (0,))), ("Linear", 3, (-1, (0, 1))), ("Conv1d", 3, (1, (0, 2))), ("Conv2d", 4, (1, (0, 2, 3))),
     ("Conv3d", 5, (1, (0, 2, 3, 4)))],
)
def test_dy_axes(kind, ndim, axes):
    assert dy_axes(kind, ndim) == axes


def test_stream_writer_bounds_its_queue_and_reports_thread_errors(tmp_path):
    import threading

    from nmgrad_cli.capture import StreamWriter
    from nmgrad_cli.dump import DumpReader, DumpWriter
    from nmgrad_cli.errors import DumpError

    w = DumpWriter(tmp_path / "s.h5")
    s = StreamWriter(w, max_queue_bytes=3 * 4096)
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], s._pending)

    t = threading.Thread(target=watch)
    t.start()
    s.add_layer(name="a", module_type="Linear", feature_axis=-1, token_axes=[0])
    for step in range(20):
        s.write("a", "grad", step, 0, torch.full((32, 32), float(step)))  # 4096 bytes each
        s.step_done(step)
    s.flush()
    stop.set()
    t.join()
    assert 0 < peak[0] <= 3 * 4096 and s.bytes_written == 20 * 4096 and s.steps_written == 20
    s.write("undeclared", "grad", 0, 0, torch.zeros(2, 2))  # fails on the writer thread
    with pytest.raises(DumpError, match="failed: KeyError"):
        s.flush()
    s.close()  # the thread's failure was raised once, by flush
    with DumpReader(tmp_path / "s.h5") as d:
        assert d.attrs["steps_completed"] == 20 and not d.attrs["complete"]
        assert torch.equal(d.load("a", "grad", "s0000007c000"), torch.full((32, 32), 7.0))
