"""Host copies of the recorded tensors (nmgrad_cli.capture.host) and the writer thread's wait on them."""

from __future__ import annotations

import threading
import time

import torch
from conftest import requires_cuda
from torch import nn

from nmgrad_cli.capture import StreamWriter
from nmgrad_cli.capture.hooks import StepRecords
from nmgrad_cli.capture.host import HostCopies
from nmgrad_cli.dump import DumpReader, DumpWriter
from nmgrad_cli.sites import ParamIndex, SiteMode


class Gate:
    """Stands for a CUDA event whose device-to-host copy is still in flight."""

    def __init__(self):
        self.opened = threading.Event()
        self.waited = 0

    def synchronize(self) -> None:
        self.waited += 1
        assert self.opened.wait(30)


def test_the_writer_thread_reads_a_record_only_after_its_event(tmp_path):
    w = DumpWriter(tmp_path / "d.h5", compression="none")
    s = StreamWriter(w, 1 << 20)
    s.add_layer(name="fc", module_type="Linear", feature_axis=-1, token_axes=[0])
    host = torch.zeros(4, 8)
    gate = Gate()
    s.write("fc", "grad", 0, 0, host, ready=gate)
    s.write("fc", "grad", 0, 1, torch.ones(4, 8))  # no event: written as it is, after the first
    s.step_done(0)
    time.sleep(0.2)
    assert s.bytes_written == 0 and gate.waited == 1  # the thread waits on the event
    host.fill_(3.0)  # the copy lands
    gate.opened.set()
    s.close()
    with DumpReader(tmp_path / "d.h5") as d:
        assert torch.equal(d.load("fc", "grad", "s0000000c000"), torch.full((4, 8), 3.0))
        assert torch.equal(d.load("fc", "grad", "s0000000c001"), torch.ones(4, 8))
        assert d.attrs["complete"]


def test_cpu_copies_are_owned_and_ready_at_once():
    h = HostCopies()
    t = torch.randn(3, 5)
    expect = t.clone()
    c = h.copy(t)
    t.add_(1.0)
    assert c.data_ptr() != t.data_ptr() and torch.equal(c, expect) and h.ready(c) is None


def test_step_records_hand_each_record_its_event_once(monkeypatch):
    """StepRecords.write passes each record's ``ready`` (None on the CPU) to the stream, in the
    order of the records; a dropped step forgets its events."""
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    records = StepRecords(None, ("Linear",), with_inputs=True)
    mode = SiteMode(ParamIndex(net), records.recorder, watch=False)
    records.recorder.start_step()
    with mode:
        loss = net(torch.randn(5, 4)).square().sum()
    loss.backward()
    records.recorder.stop_step()
    gates = {id(t): Gate() for *_, t in records.buffer}
    monkeypatch.setattr(records.host, "ready", lambda t: gates.pop(id(t)))

    class Stream:
        def __init__(self):
            self.got = []

        def add_layer(self, **kw):
            pass

        def write(self, layer, kind, step, call, tensor, ready=None):
            self.got.append((layer, kind, ready))

        def step_done(self, step):
            pass

    stream = Stream()
    records.write(stream, 0)
    assert not gates and len(stream.got) == 6 and all(isinstance(r, Gate) for *_, r in stream.got)
    assert [k for _, k, _ in stream.got] == ["input", "weight", "grad"] * 2


@requires_cuda
def test_cuda_copies_are_pinned_asynchronous_and_keep_the_values_at_the_copy():
    h = HostCopies()
    t = torch.randn(1024, 1024, device="cuda")
    expect = t.cpu()
    c = h.copy(t)
    t.mul_(0.0)  # the compute stream rewrites the source right after: the copy keeps the old values
    ready = h.ready(c)
    assert c.is_pinned() and isinstance(ready, torch.cuda.Event) and h.ready(c) is None
    ready.synchronize()
    assert torch.equal(c, expect)


def test_uncompressed_records_are_one_contiguous_extent_and_compressed_ones_chunked(tmp_path):
    import h5py

    t = torch.randn(300, 2000)  # 2.4 MB: more than one 1 MiB chunk
    for compression, chunked in (("none", False), ("lzf", True)):
        path = tmp_path / f"{compression}.h5"
        with DumpWriter(path, compression=compression) as w:
            w.add_layer("fc", "Linear", -1, [0])
            w.write("fc", "grad", 0, 0, t)
            w.step_done(0)
        with h5py.File(path, "r") as f:
            ds = f["layers/fc/grad/s0000000c000"]
            assert (ds.chunks is not None) == chunked and (ds.compression is not None) == chunked
        with DumpReader(path) as d:
            assert torch.equal(d.load("fc", "grad", "s0000000c000"), t)
