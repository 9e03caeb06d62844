"""Dumps that are damaged, hand-edited or crafted: every one is refused with one line saying what is
wrong (never a KeyError or TypeError), and none makes a reader touch another file."""

from __future__ import annotations

import struct

import h5py
import numpy as np
import pytest
import torch
from _cli import assert_user_error, invoke

from nmgrad_cli.capture.summary import summarize
from nmgrad_cli.dump import DumpReader, DumpWriter
from nmgrad_cli.errors import DumpError

REC = "layers/a/grad/s0000000c000"


def make(path, steps: int = 2, compression: str = "lzf"):
    gen = torch.Generator().manual_seed(0)
    with DumpWriter(path, run={"model": "tiny"}, compression=compression) as w:
        w.add_layer("a", "Linear", -1, [0], weight_shape=(8, 4))
        w.add_layer("b", "Linear", -1, [0])
        for step in range(steps):
            w.write("a", "grad", step, 0, torch.randn(16, 8, generator=gen))
            w.write("b", "grad", step, 0, torch.randn(16, 4, generator=gen))
            w.step_done(step)
    return path


def read_all(path) -> None:
    """Everything `nmgrad inspect` and `nmgrad evaluate` read."""
    summarize(path)
    with DumpReader(path) as d:
        for kind in ("grad", "input", "weight"):
            for rec in d.records(kind):
                rec.load()


def _set_attr(where: str, name: str, value):
    def edit(f):
        f[where].attrs[name] = value
    return edit


def _grad_as_dataset(f):
    del f["layers/a/grad"]
    f.create_dataset("layers/a/grad", data=np.zeros((16, 8), np.float32))


def _string_data(f):
    del f[REC]
    ds = f.create_dataset(REC, data=np.array([b"not", b"numbers"]))
    ds.attrs.update({"step": 0, "call": 0, "dtype": "float32"})


def _int_data_without_dtype(f):
    del f[REC]
    ds = f.create_dataset(REC, data=np.zeros((16, 8), np.int32))
    ds.attrs.update({"step": 0, "call": 0})


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_set_attr("/", "run", "{not json"), "root attribute 'run' is not valid JSON"),
        (_set_attr("/", "run", "[1, 2]"), "'run' is a JSON list, not an object"),
        (_set_attr("/", "steps_completed", "many"), "'steps_completed' is 'many', not an integer"),
        (_set_attr("/", "schema_version", 1.7), "no valid schema_version attribute (an integer; found 1.7)"),
        (_set_attr("/", "schema_version", "1"), "no valid schema_version attribute (an integer; found '1')"),
        (_set_attr("layers/a", "feature_axis", 5), "feature_axis 5 is out of range for shape (16, 8)"),
        (_set_attr("layers/a", "feature_axis", "last"), "feature_axis is 'last', not an integer"),
        (_set_attr("layers/a", "token_axes", "[0, 9]"), "token_axes [0, 9] are out of range"),
        (_set_attr("layers/a", "weight_shape", "{}"), "weight_shape is {}, not a list of sizes or null"),
        (_set_attr(REC, "step", "x"), "attribute 'step' is 'x', not a non-negative integer"),
        (_set_attr(REC, "dtype", "int8"), "dtype 'int8' is not one of"),
        (_grad_as_dataset, "/layers/a/grad is a dataset, not a group of records"),
        (_string_data, "data stored as |S7, which does not hold float32"),
        (_int_data_without_dtype, "dtype 'int32' is not one of"),
        (_set_attr("layers/a", "conv", '{"stride": 1}'), "conv is {'stride': 1}, not {stride, padding, dilation"),
    ],
    ids=["run-not-json", "run-list", "steps-many", "version-1.7", "version-str", "feature-axis-5",
         "feature-axis-str", "token-axes", "weight-shape", "step-x", "dtype-int8", "grad-dataset", "string-data",
         "int-data", "conv-attr"],
)
def test_hand_edited_attributes_are_refused_as_corrupt(tmp_path, edit, match):
    path = make(tmp_path / "d.h5")
    with h5py.File(path, "a") as f:
        edit(f)
    with pytest.raises(DumpError, match="corrupt|schema_version") as info:
        read_all(path)
    assert match in str(info.value) and "\n" not in str(info.value)
    assert_user_error(invoke("inspect", path), match)


def test_evaluate_refuses_a_hand_edited_dump_in_one_line(tmp_path):
    path = make(tmp_path / "d.h5")
    with h5py.File(path, "a") as f:
        f[REC].attrs["step"] = "x"
    assert_user_error(invoke("evaluate", path, "--samples", "0"), "is corrupt: /layers/a/grad/s0000000c000")


def test_corrupted_not_truncated_dumps_give_a_dump_error(tmp_path):
    """A file cut short whose superblock is patched to say that is its full size (what a half-done
    flush leaves): HDF5 opens it, then objects point past its end. Every cut gives DumpError in one
    line (raw h5py KeyErrors before)."""
    good = make(tmp_path / "good.h5", steps=3, compression="none")
    raw = good.read_bytes()
    assert raw[:8] == b"\x89HDF\r\n\x1a\n" and raw[8] == 0  # superblock v0: end-of-file address at byte 40
    assert struct.unpack("<Q", raw[40:48])[0] == len(raw)
    bad = tmp_path / "bad.h5"
    for cut in range(len(raw) - 1, 1024, -211):
        bad.write_bytes(raw[:40] + struct.pack("<Q", cut) + raw[48:cut])
        with pytest.raises(DumpError, match="corrupt") as info:
            read_all(bad)
        assert "\n" not in str(info.value)
    assert_user_error(invoke("inspect", bad), "corrupt")


def _secret(tmp_path) -> tuple:
    secret = tmp_path / "secret.bin"
    values = np.arange(16 * 8, dtype=np.float32) + 1000.0
    secret.write_bytes(values.tobytes())
    return secret, values


def test_external_storage_is_refused(tmp_path):
    path = make(tmp_path / "d.h5")
    secret, _ = _secret(tmp_path)
    with h5py.File(path, "a") as f:
        del f[REC]
        ds = f.create_dataset(REC, shape=(16, 8), dtype=np.float32, external=[(str(secret), 0, 16 * 8 * 4)])
        ds.attrs.update({"step": 0, "call": 0, "dtype": "float32"})
    with pytest.raises(DumpError, match="keeps its data in external files: refusing to read it"):
        read_all(path)
    r = invoke("evaluate", path, "--samples", "0", "--json", "-")
    assert_user_error(r, "keeps its data in external files")
    assert "1000" not in r.stdout


def test_external_links_are_refused(tmp_path):
    path = make(tmp_path / "d.h5")
    other = tmp_path / "other.h5"
    secret, values = _secret(tmp_path)
    with h5py.File(other, "w") as f:
        ds = f.create_dataset("x", data=values.reshape(16, 8))
        ds.attrs.update({"step": 0, "call": 0, "dtype": "float32"})
    with h5py.File(path, "a") as f:
        del f[REC]
        f[REC] = h5py.ExternalLink(str(other), "/x")
    with pytest.raises(DumpError, match=f"is an external link to {other}"):
        read_all(path)
    with h5py.File(path, "a") as f:  # a whole layer group in another file, and a soft link
        del f["layers/a/grad"]
        f["layers/a/grad"] = h5py.SoftLink("/layers/b/grad")
    with pytest.raises(DumpError, match="layers/a/grad is a SoftLink"):
        read_all(path)
    assert_user_error(invoke("inspect", path), "SoftLink")


def test_virtual_datasets_are_refused(tmp_path):
    path = make(tmp_path / "d.h5")
    other = tmp_path / "other.h5"
    _, values = _secret(tmp_path)
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=values.reshape(16, 8))
    layout = h5py.VirtualLayout(shape=(16, 8), dtype=np.float32)
    layout[:] = h5py.VirtualSource(str(other), "x", shape=(16, 8))
    with h5py.File(path, "a") as f:
        del f[REC]
        ds = f.create_virtual_dataset(REC, layout)
        ds.attrs.update({"step": 0, "call": 0, "dtype": "float32"})
    with pytest.raises(DumpError, match="is a virtual dataset"):
        read_all(path)
