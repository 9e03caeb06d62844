"""A capture in its own process, for the fault tests (tests/test_capture_faults.py).

``python tests/_capture_child.py OUT STEPS [compression]`` captures ``wide`` (a Linear(1, F): a big
dY for next to no compute, so the writer is still busy after the last step) and prints
``DRAIN <bytes>`` on stdout once the last step is done and the writer still has that much to write;
it then waits for a line on stdin, so the test can send its signals while the file is being finished.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

F, T = 2048, 1024


def wide() -> nn.Module:
    """dY is [T, F] float32: 16 MB per step."""
    return nn.Linear(1, F)


def wide_data(seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(T, 1, generator=gen), torch.randint(0, F, (T,), generator=gen)) for _ in range(2)]


def main(out: str, steps: int, compression: str = "gzip") -> None:
    from nmgrad_cli.capture import CaptureConfig, run_capture
    from nmgrad_cli.errors import NmgradError

    def progress(p) -> None:
        if p.draining:
            print(f"DRAIN {p.bytes_recorded - p.bytes_written}", flush=True)
            sys.stdin.readline()

    cfg = CaptureConfig(model="_capture_child:wide", data="_capture_child:wide_data", steps=steps, out=out,
                        compression=compression, device="cpu")
    try:
        r = run_capture(cfg, progress)
    except NmgradError as exc:
        print(f"ERROR {exc}", flush=True)
        return
    print(f"DONE {r.stopped} {r.steps_recorded}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
