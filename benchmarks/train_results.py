"""The paper's central comparison on the shipped data (not a test): train the same model from the
same seeds with dense gradients and with greedy / mvue / approx-mvue N:M-pruned neural gradients
(both backward GEMMs), and print mean ± std over seeds of the final metrics as a markdown table.

    python benchmarks/train_results.py                       # mlp on digits, 1:2 and 2:4, 5 seeds
    python benchmarks/train_results.py --model gpt --steps 150 --seeds 0,1,2 --patterns 2:4
    python benchmarks/train_results.py --model gpt --methods mvue --patterns 2:4,1:2 \
        --plans plan_v05.json,plan_v02.json          # + per-site plans (`evaluate --recommend`)

Every (pattern, seed) is one ``nmgrad_cli.train.compare``: all methods start from the same initial
weights and see the same batches; dense does not depend on the pattern and runs once per seed. Each
``--plans`` file is one more run per seed (``nmgrad train --plan``), from the same seed. The "bwd
GEMM FLOPs saved" column is 1 - N/M for a uniform pattern on both GEMMs and the plan's own estimate
(from the layers' shapes) for a plan.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from nmgrad_cli.plan import load as load_plan
from nmgrad_cli.train.trainer import TrainConfig, compare, train


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def _record(results: dict, key: tuple[str, str], s, seed: int, t0: float) -> None:
    results.setdefault(key, []).append(s)
    print(f"[{time.perf_counter() - t0:6.0f} s] seed {seed} {s.label:<16} eval loss {s.eval_loss}"
          f" acc {s.eval_acc} ({s.wall_s:.1f} s)", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp", help="mlp, cnn, gpt or package.module:factory")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--patterns", default="1:2,2:4")
    ap.add_argument("--methods", default="greedy,mvue,approx-mvue", help="pruning methods besides dense")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--eval-batches", type=int, default=0, help="held-out batches per evaluation (0: all)")
    ap.add_argument("--backend", default="reference", help="pruning backend (reference: the spec; auto: faster)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--plans", default="", help="comma-separated plan files (evaluate --recommend --plan-out)")
    ap.add_argument("--json", default=None, help="also write every run's summary to this file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    patterns = args.patterns.split(",")
    methods = args.methods.split(",")
    plans = [p for p in args.plans.split(",") if p]
    saved = {p: load_plan(p).flops_saved for p in plans}
    results: dict[tuple[str, str], list] = {}
    flops: dict[tuple[str, str], float | None] = {}
    t0 = time.perf_counter()
    for seed in seeds:
        for i, pattern in enumerate(patterns):
            cfg = TrainConfig(
                model=args.model, pattern=pattern, steps=args.steps, seed=seed, device="cpu",
                batch_size=args.batch_size, eval_batches=args.eval_batches, backend=args.backend,
            )
            todo = (["dense"] if i == 0 else []) + methods
            for s in compare(cfg, todo, out=None):
                key = ("dense", "-") if s.method == "dense" else (s.method, pattern)
                n, m = (int(x) for x in pattern.split(":"))
                flops[key] = 0.0 if s.method == "dense" else 1 - n / m
                _record(results, key, s, seed, t0)
        for p in plans:
            cfg = TrainConfig(
                model=args.model, steps=args.steps, seed=seed, device="cpu", batch_size=args.batch_size,
                eval_batches=args.eval_batches, backend=args.backend, plan=p,
            )
            s = train(cfg, out=None)
            key = (s.label, "per site")
            flops[key] = saved[p]
            _record(results, key, s, seed, t0)
    total = time.perf_counter() - t0

    lm = any(s.kind == "language-model" for runs in results.values() for s in runs)
    acc_name = "eval next-char acc" if lm else "eval acc"
    print(f"\n{args.model}, {args.steps} steps, seeds {args.seeds}, both GEMMs pruned; mean ± std over seeds\n")
    head = ["gradients", "pattern", acc_name, "eval loss", "final train loss", "bwd GEMM FLOPs saved", "diverged"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for (method, pattern), runs in results.items():
        ok = [s for s in runs if not s.diverged]
        row = [
            method, pattern,
            mean_std([s.eval_acc for s in ok if s.eval_acc is not None]),
            mean_std([s.eval_loss for s in ok if s.eval_loss is not None]),
            mean_std([s.final_train_loss for s in ok]),
            "-" if flops.get((method, pattern)) is None else f"{100 * flops[(method, pattern)]:.1f}%",
            f"{len(runs) - len(ok)}/{len(runs)}",
        ]
        print("| " + " | ".join(row) + " |")
    n_runs = sum(len(r) for r in results.values())
    cpu = platform.processor() or platform.machine()
    print(f"\n{n_runs} runs in {total:.0f} s on {cpu}, torch {torch.__version__}, {args.threads} thread(s)")
    if args.json:
        payload = {f"{m} {p}": [vars(s) for s in runs] for (m, p), runs in results.items()}
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": payload}, f, indent=2)


if __name__ == "__main__":
    main()
