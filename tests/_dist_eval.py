"""A rank of a 2-process gloo group running evaluate (spawned by test_evaluate_scale)."""

from __future__ import annotations

import json
import os


def rank_main(rank: int, world: int, port: int, paths: list[str], config, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    from nmgrad_cli.evaluate import evaluate

    report = evaluate(paths, config)
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(report.to_dict(), fh)
