"""The paper's central comparison on the shipped data (not a test): train the same model from the
same seeds with dense gradients and with greedy / mvue / approx-mvue N:M-pruned neural gradients
(both backward GEMMs), and print one markdown table: per configuration the mean ± standard error
over seeds, and its difference to dense as the mean ± standard error of the per-seed differences.

    python benchmarks/train_results.py --json mlp.json            # mlp on digits, 1:2 and 2:4, 5 seeds
    python benchmarks/train_results.py --model gpt --steps 100 --patterns 2:4,1:2 --json gpt.json
    python benchmarks/train_results.py --model gpt --methods '' --patterns '' --steps 100 \
        --plans gemm=plan_gemm.json,mvue=plan_mvue.json --plans-capture-seed 100 \
        --vs 'plan gemm=plan mvue' --json plans.json          # per-site plans (`evaluate --recommend`)
    python benchmarks/train_results.py --from-json gpt.json,plans.json --vs 'plan gemm=plan mvue'

Every (pattern, seed) is one ``nmgrad_cli.train.compare``: all methods start from the same initial
weights and see the same batches; dense does not depend on the pattern and runs once per seed. At
N = 1 approx-mvue is mvue (one code path, the same draws), so it is not run twice: the row is named
``mvue = approx-mvue``. Each ``--plans`` file is one more run per seed (``nmgrad train --plan``);
``--plans-capture-seed`` names the seed of the capture the plans were made from, which the training
seeds must not contain (a plan tuned on the very run it is scored on would flatter it). The "bwd GEMM
FLOPs saved" column is 1 - N/M for a uniform pattern on both GEMMs and the plan's own figure for a
plan. ``--json`` is rewritten after every run (every run's seed and summary), so a stopped job
keeps what it finished; ``--from-json`` prints the table of saved runs without training.

The ± of a mean is the standard error s/sqrt(n) (s: the sample standard deviation over the n seeds);
a difference to dense is paired by seed (same initial weights and batches) and its ± is the standard
error of the n per-seed differences. A difference is marked ``(noise)`` when it is within two of its
standard errors of 0. With one seed no ± is printed (it cannot be estimated).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from nmgrad_cli.plan import load as load_plan
from nmgrad_cli.train.trainer import TrainConfig, compare, train

METRICS = (("eval_acc", "acc"), ("eval_loss", "eval loss"), ("final_train_loss", "train loss"))
NOISE_SE = 2.0
"""A mean difference within this many of its standard errors of 0 is marked (noise)."""


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error s/sqrt(n); the SE is None for fewer than 2 values."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, None
    return m, statistics.stdev(values) / math.sqrt(len(values))


def fmt(values: list[float], signed: bool = False, noise: bool = False) -> str:
    if not values:
        return "-"
    m, se = mean_se(values)
    text = f"{m:+.4f}" if signed else f"{m:.4f}"
    if se is None:
        return text
    text += f" ± {se:.4f}"
    if noise and abs(m) <= NOISE_SE * se:
        text += " (noise)"
    return text


def paired(runs: list[dict], base: list[dict], metric: str) -> list[float]:
    """Per-seed differences run - base of one metric, over the seeds both have (finished, not diverged)."""
    by_seed = {r["seed"]: r["summary"].get(metric) for r in base if not r["summary"].get("diverged")}
    out = []
    for r in runs:
        v, b = r["summary"].get(metric), by_seed.get(r["seed"])
        if v is not None and b is not None and not r["summary"].get("diverged"):
            out.append(v - b)
    return out


def rows_of(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs per configuration, named ``row pattern`` (``greedy 2:4``, ``plan gemm``, ``dense``)."""
    rows: dict[str, list[dict]] = {}
    for r in runs:
        name = r["row"] if r["pattern"] in ("-", "per site") else f"{r['row']} {r['pattern']}"
        rows.setdefault(name, []).append(r)
    return rows


def render(runs: list[dict], meta: dict, versus: list[tuple[str, str]]) -> str:
    """The markdown table (and the --vs lines) of saved runs."""
    rows = rows_of(runs)
    lm = any(r["summary"].get("kind") == "language-model" for r in runs)
    acc = "eval next-char acc" if lm else "eval acc"
    dense = rows.get("dense", [])
    seeds = sorted({r["seed"] for r in runs})
    lines = [f"{meta.get('model')}, {meta.get('steps')} steps, seeds {','.join(map(str, seeds))}, both GEMMs "
             "pruned; mean ± standard error over seeds; Δ: paired per-seed difference to dense ± its standard "
             f"error, (noise): within {NOISE_SE:g} standard errors of 0", ""]
    if meta.get("plans_capture_seed") is not None:
        lines[0] += f"; plans made from a capture with seed {meta['plans_capture_seed']}"
    head = ["gradients", "seeds", acc, f"Δ {acc.split()[-1]} vs dense", "eval loss",
            "Δ eval loss vs dense", "final train loss", "bwd GEMM FLOPs saved", "diverged"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rs in rows.items():
        ok = [r["summary"] for r in rs if not r["summary"].get("diverged")]
        vals = {k: [s[k] for s in ok if s.get(k) is not None] for k, _ in METRICS}
        diff = {k: ([] if name == "dense" else paired(rs, dense, k)) for k, _ in METRICS}
        saved = rs[0].get("flops_saved")
        lines.append("| " + " | ".join([
            name, str(len(rs)),
            fmt(vals["eval_acc"]), fmt(diff["eval_acc"], signed=True, noise=True),
            fmt(vals["eval_loss"]), fmt(diff["eval_loss"], signed=True, noise=True),
            fmt(vals["final_train_loss"]),
            "-" if saved is None else f"{100 * saved:.1f}%",
            f"{len(rs) - len(ok)}/{len(rs)}",
        ]) + " |")
    for a, b in versus:
        if a not in rows or b not in rows:
            lines.append(f"\n--vs {a}={b}: no runs named {a if a not in rows else b} (rows: {', '.join(rows)})")
            continue
        parts = [f"{label} {fmt(paired(rows[a], rows[b], k), signed=True, noise=True)}" for k, label in METRICS]
        lines.append(f"\n{a} - {b}, paired by seed over {len(paired(rows[a], rows[b], 'eval_loss'))} seeds: "
                     + "; ".join(parts))
    return "\n".join(lines)


def _save(path: str | None, meta: dict, runs: list[dict]) -> None:
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"kind": "nmgrad-train-results", "meta": meta, "runs": runs}, f, indent=1)
        os.replace(tmp, path)


def _parse_plans(text: str) -> list[tuple[str, str]]:
    out = []
    for item in (p for p in text.split(",") if p):
        name, _, path = item.rpartition("=")
        out.append((name or Path(path).stem, path))
    return out


def _parse_vs(text: str | None) -> list[tuple[str, str]]:
    pairs = []
    for item in (text or "").split(","):
        if item:
            a, sep, b = item.partition("=")
            if not sep:
                sys.exit(f"--vs wants 'ROW A=ROW B' (e.g. 'plan gemm=plan mvue'), got {item!r}")
            pairs.append((a.strip(), b.strip()))
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp", help="mlp, cnn, gpt or package.module:factory")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--patterns", default="1:2,2:4", help="uniform patterns ('' for none: only dense and plans)")
    ap.add_argument("--methods", default="greedy,mvue,approx-mvue", help="pruning methods besides dense")
    ap.add_argument("--no-dense", action="store_true", help="leave dense out (it is in another --json)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--eval-batches", type=int, default=0, help="held-out batches per evaluation (0: all)")
    ap.add_argument("--backend", default="reference", help="pruning backend (reference: the spec; auto: faster)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--plans", default="", help="comma-separated [NAME=]plan.json (evaluate --recommend --plan-out); "
                    "the row is 'plan NAME' (NAME: the file's stem by default)")
    ap.add_argument("--plans-capture-seed", type=int, default=None,
                    help="the seed of the capture the plans were made from (must not be a training seed)")
    ap.add_argument("--vs", default=None, help="extra paired comparisons 'ROW A=ROW B,...' ('plan gemm=plan mvue')")
    ap.add_argument("--json", default=None, help="write every run (seed, row, summary) to this file, after each run")
    ap.add_argument("--from-json", default=None, help="comma-separated --json files: print their table, train nothing")
    args = ap.parse_args()
    versus = _parse_vs(args.vs)

    if args.from_json:
        runs, meta = [], {}
        for p in args.from_json.split(","):
            data = json.loads(Path(p).read_text())
            if data.get("kind") != "nmgrad-train-results":
                sys.exit(f"{p} is not a train_results.py --json file")
            runs += data["runs"]
            meta = {**data["meta"], **{k: v for k, v in meta.items() if v is not None}}
        print(render(runs, meta, versus))
        return

    seeds = [int(s) for s in args.seeds.split(",")]
    patterns = [p for p in args.patterns.split(",") if p]
    methods = [m for m in args.methods.split(",") if m]
    plans = _parse_plans(args.plans)
    if plans and args.plans_capture_seed is None:
        sys.exit("--plans needs --plans-capture-seed: the seed of the capture the plans were made from")
    if args.plans_capture_seed in seeds:
        sys.exit(f"--plans-capture-seed {args.plans_capture_seed} is also a training seed: capture with another seed")
    saved = {p: load_plan(p).flops_saved for _, p in plans}
    torch.set_num_threads(args.threads)
    meta = {"model": args.model, "steps": args.steps, "args": vars(args), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "plans_capture_seed": args.plans_capture_seed,
            "plan_files": {f"plan {n}": p for n, p in plans}}
    runs: list[dict] = []
    t0 = time.perf_counter()

    def record(row: str, pattern: str, seed: int, s, flops: float | None) -> None:
        runs.append({"row": row, "pattern": pattern, "seed": seed, "flops_saved": flops, "summary": vars(s)})
        _save(args.json, meta, runs)
        print(f"[{time.perf_counter() - t0:6.0f} s] seed {seed} {row:<20} {pattern:<8} eval loss {s.eval_loss}"
              f" acc {s.eval_acc} ({s.wall_s:.1f} s)", file=sys.stderr, flush=True)

    for seed in seeds:
        for i, pattern in enumerate(patterns or ([] if args.no_dense else ["2:4"])):
            n, m = (int(x) for x in pattern.split(":"))
            same = n == 1 and "mvue" in methods and "approx-mvue" in methods
            todo = ([] if not patterns else [x for x in methods if not (same and x == "approx-mvue")])
            todo = (["dense"] if i == 0 and not args.no_dense else []) + todo
            cfg = TrainConfig(
                model=args.model, pattern=pattern, steps=args.steps, seed=seed, device="cpu",
                batch_size=args.batch_size, eval_batches=args.eval_batches, backend=args.backend,
            )
            for s in compare(cfg, todo, out=None):
                if s.method == "dense":
                    record("dense", "-", seed, s, 0.0)
                else:
                    row = "mvue = approx-mvue" if same and s.method == "mvue" else s.method
                    record(row, pattern, seed, s, 1 - n / m)
        for name, p in plans:
            cfg = TrainConfig(
                model=args.model, steps=args.steps, seed=seed, device="cpu", batch_size=args.batch_size,
                eval_batches=args.eval_batches, backend=args.backend, plan=p,
            )
            record(f"plan {name}", "per site", seed, train(cfg, out=None), saved[p])
    print(render(runs, meta, versus))
    print(f"\n{len(runs)} runs in {time.perf_counter() - t0:.0f} s on {meta['cpu']}, torch {torch.__version__}, "
          f"{args.threads} thread(s); {os.getloadavg()[0]:.1f} load average at the end")


if __name__ == "__main__":
    main()
