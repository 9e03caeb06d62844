"""The HDF5 dump: writer/reader round trip, streaming reads, and every way a file can be bad."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from nmgrad_cli.dump import SCHEMA_NAME, SCHEMA_VERSION, DumpReader, DumpWriter
from nmgrad_cli.dump.schema import layer_key, record_name
from nmgrad_cli.errors import DumpError, OutputExistsError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Random values plus the ones a lossy path would change: -0.0, tiny, huge, subnormal-ish."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 3, generator=gen).to(dtype)
    flat = x.view(-1)
    info = torch.finfo(dtype)
    flat[:5] = torch.tensor([-0.0, info.tiny, info.max, -info.max, info.eps], dtype=torch.float64).to(dtype)
    return x


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so -0.0 vs 0.0 and every mantissa bit are compared."""
    width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width)


@pytest.mark.parametrize("compression", ["lzf", "gzip", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_exact(tmp_path, dtype, compression):
    x = special_values(dtype)
    path = tmp_path / "d.h5"
    with DumpWriter(path, run={"model": "m", "seed": 3}, compression=compression) as w:
        w.add_layer("enc/fc1", "Linear", -1, [0, 1], weight_shape=(3, 4))
        w.write("enc/fc1", "grad", 2, 1, x)
        w.step_done(2)
    with DumpReader(path) as r:
        (rec,) = list(r.records("grad"))
        y = rec.load()
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(bits(y), bits(x))
        assert (rec.step, rec.call, rec.name, rec.dtype) == (2, 1, "s0000002c001", str(dtype).split(".")[-1])
        li = rec.layer
        assert (li.name, li.key, li.module_type, li.feature_axis, li.token_axes, li.weight_shape) == (
            "enc/fc1", "enc|fc1", "Linear", -1, (0, 1), (3, 4))
        assert r.attrs["run"] == {"model": "m", "seed": 3}
        assert r.attrs["complete"] and not r.attrs["interrupted"] and r.attrs["steps_completed"] == 1


def test_bf16_is_stored_as_uint16_bit_pattern(tmp_path):
    x = special_values(torch.bfloat16)
    with DumpWriter(tmp_path / "d.h5") as w:
        w.add_layer("a", "Linear", -1, [0])
        w.write("a", "grad", 0, 0, x)
    with h5py.File(tmp_path / "d.h5", "r") as f:
        ds = f["layers/a/grad"][record_name(0, 0)]
        assert ds.dtype == np.uint16 and ds.attrs["dtype"] == "bfloat16"
        assert np.array_equal(ds[()], x.view(torch.int16).numpy().view(np.uint16))


def test_layers_in_declaration_order_and_glob(tmp_path):
    names = ["z.out", "a.fc1", "m.fc2", ""]
    with DumpWriter(tmp_path / "d.h5") as w:
        for n in names:
            w.add_layer(n, "Linear", -1, [0])
            w.write(n, "grad", 0, 0, torch.ones(2, 4))
    with DumpReader(tmp_path / "d.h5") as r:
        assert [li.name for li in r.layers.values()] == names
        assert list(r.layers) == ["z.out", "a.fc1", "m.fc2", layer_key("")] and layer_key("") == "<root>"
        assert [li.name for li in r.select("*.fc*")] == ["a.fc1", "m.fc2"]
        assert r.select("nothing*") == []


def test_records_are_lazy_and_streamed_one_dataset_at_a_time(tmp_path):
    """Listing records reads no data; each load reads its own dataset only: corrupting one record's
    compressed chunk on disk breaks that load alone, with a DumpError, not the others."""
    path = tmp_path / "d.h5"
    tensors = {}
    with DumpWriter(path) as w:
        w.add_layer("a", "Linear", -1, [0])
        for step in range(4):
            tensors[step] = (torch.arange(64 * 32.0).reshape(64, 32) % (7 + step)).round()  # compressible
            w.write("a", "grad", step, 0, tensors[step])
            w.step_done(step)
    with h5py.File(path, "r") as f:
        info = f["layers/a/grad"][record_name(2, 0)].id.get_chunk_info(0)
    with open(path, "r+b") as fh:  # overwrite the middle of step 2's lzf chunk
        fh.seek(info.byte_offset + info.size // 4)
        fh.write(b"\xff" * (info.size // 2))
    with DumpReader(path) as r:
        recs = list(r.records("grad"))  # no data read yet: listing succeeds
        assert [rec.step for rec in recs] == [0, 1, 2, 3]
        for rec in recs:
            if rec.step == 2:
                with pytest.raises(DumpError, match="cannot read a/grad/s0000002c000"):
                    rec.load()
            else:
                assert torch.equal(rec.load(), tensors[rec.step])


def test_interrupted_run_keeps_written_records(tmp_path):
    path = tmp_path / "d.h5"
    with pytest.raises(KeyboardInterrupt), DumpWriter(path) as w:
        w.add_layer("a", "Linear", -1, [0])
        w.write("a", "grad", 0, 0, torch.ones(3, 4))
        w.step_done(0)
        raise KeyboardInterrupt
    with DumpReader(path) as r:
        assert not r.attrs["complete"] and r.attrs["interrupted"]
        assert r.attrs["interrupt_reason"] == "KeyboardInterrupt"
        assert r.n_records("grad") == 1


def test_writer_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "d.h5"
    path.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="--force"):
        DumpWriter(path)
    assert path.read_bytes() == b"precious"
    with DumpWriter(path, force=True) as w:
        w.add_layer("a", "Linear", -1, [0])
    assert h5py.is_hdf5(path)


def _dump(path, **attrs):
    with DumpWriter(path) as w:
        w.add_layer("a", "Linear", -1, [0])
        for step in range(3):
            w.write("a", "grad", step, 0, torch.randn(256, 64))
    if attrs:
        with h5py.File(path, "a") as f:
            f.attrs.update(attrs)
    return path


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p / "missing.h5", "no such file"),
        (lambda p: p, "is a directory"),
        (lambda p: (p / "t.h5").write_text("not hdf5") and p / "t.h5", "not an HDF5 file"),
        (lambda p: _dump(p / "o.h5", schema="something-else"), "not an nmgrad dump"),
        (lambda p: _dump(p / "n.h5", schema_version=SCHEMA_VERSION + 1), "newer than this nmgrad reads"),
        (lambda p: _dump(p / "v.h5", schema_version="one"), "no valid schema_version"),
    ],
    ids=["missing", "directory", "not-hdf5", "other-schema", "newer-version", "bad-version"],
)
def test_bad_files_raise_one_line_dump_errors(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(DumpError, match=match) as info:
        DumpReader(path)
    assert "\n" not in str(info.value)


def test_truncated_file_is_a_dump_error(tmp_path):
    """Half the bytes of a valid dump: refused when opened, or at the latest when a record is read."""
    path = _dump(tmp_path / "d.h5")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DumpError, match="truncated|corrupt"), DumpReader(path) as r:
        for rec in r.records("grad"):
            rec.load()


def test_schema_constants_are_in_the_file(tmp_path):
    path = _dump(tmp_path / "d.h5")
    with h5py.File(path, "r") as f:
        assert f.attrs["schema"] == SCHEMA_NAME and int(f.attrs["schema_version"]) == SCHEMA_VERSION
        assert set(f["layers/a"].attrs) >= {"name", "module_type", "feature_axis", "token_axes", "weight_shape"}


def test_file_held_open_by_a_writer_says_so(tmp_path, monkeypatch):
    """HDF5 locks a file open for writing; another process's reader gets a message, not 'corrupt'."""
    import subprocess
    import sys

    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    path = _dump(tmp_path / "d.h5")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import h5py, sys, time; f = h5py.File(sys.argv[1], 'a'); print('ok', flush=True); "
         "time.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(DumpError, match="open for writing by another process"):
            DumpReader(path)
    finally:
        holder.kill()
        holder.wait()


def test_a_full_disk_keeps_every_completed_step_in_library_use(tmp_path):
    """A file-size limit (like a full disk) under DumpWriter used directly: DiskFullError before the
    record that does not fit, and the closed file holds every completed step, marked interrupted."""
    import resource

    from nmgrad_cli.dump.writer import DiskFullError

    path = tmp_path / "d.h5"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, hard))
    try:
        with pytest.raises(DiskFullError, match="under the file-size limit"), DumpWriter(path) as w:
            w.add_layer("a", "Linear", -1, [0])
            for step in range(100):
                for call in range(3):
                    w.write("a", "grad", step, call, torch.randn(64, 100))
                w.step_done(step)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    with DumpReader(path) as d:
        n = d.attrs["steps_completed"]
        assert 1 <= n < 100 and d.attrs["interrupted"] and d.attrs["interrupt_reason"] == "DiskFullError"
        assert d.n_records() >= 3 * n and all(torch.isfinite(r.load()).all() for r in d.records())
