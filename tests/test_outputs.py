"""Output files: never one of the inputs, never two outputs on one file, never left truncated."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import pytest
from _cli import assert_user_error, invoke
from _dumps import make_mlp_dump

from nmgrad_cli.errors import OutputError
from nmgrad_cli.outputs import atomic_open, check_distinct, write_text


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """RLIMIT_FSIZE for this process (Python ignores SIGXFSZ, so a write past it fails with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    return make_mlp_dump(tmp_path_factory.mktemp("out") / "mlp.h5", steps=1)


def test_json_onto_the_input_dump_is_refused_even_with_force(dump, tmp_path):
    before = dump.read_bytes()
    link = tmp_path / "link.h5"
    link.symlink_to(dump)
    for target in (dump, link, dump.parent / ".." / dump.parent.name / dump.name):
        for flag in ("--json", "--csv"):
            for force in (["--force"], []):  # refused first, not "exists: pass --force"
                r = invoke("evaluate", dump, "--samples", "0", flag, target, *force)
                assert_user_error(r, "is one of the input files")
    assert dump.read_bytes() == before


def test_json_and_csv_on_one_file_is_refused(dump, tmp_path):
    out = tmp_path / "both.txt"
    assert_user_error(invoke("evaluate", dump, "--samples", "0", "--json", out, "--csv", out), "are the same file")
    assert not out.exists()
    # different paths are fine, and stdout is not a file
    with pytest.raises(OutputError, match="same file"):
        check_distinct({"--json": out, "--csv": tmp_path / "." / "both.txt"})
    check_distinct({"--json": "-", "--csv": "-"})
    check_distinct({"--json": out, "--csv": tmp_path / "other.csv"}, inputs=[dump])


def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(OutputError, match=f"cannot write {path}: File too large"), file_size_limit(4096):
        write_text(path, "x" * 100_000)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    write_text(path, "new")  # and a write that fits replaces it, with the usual permissions
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 != 0o600


def test_an_error_in_the_writer_leaves_the_old_file(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("old")
    with pytest.raises(ZeroDivisionError), atomic_open(path) as fh:
        fh.write("half")
        _ = 1 / 0
    assert path.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_device_outputs_are_written_in_place_and_errors_name_them(dump):
    r = invoke("evaluate", dump, "--samples", "0", "--json", "/dev/full", "--force")
    assert_user_error(r, "cannot write /dev/full: No space left on device")
    assert Path("/dev/full").exists() and not Path("/dev/full").is_file()
    r = invoke("evaluate", dump, "--samples", "0", "--csv", "/dev/null", "--force")
    assert r.exit_code == 0, r.output
