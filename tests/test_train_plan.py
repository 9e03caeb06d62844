"""`nmgrad train --plan`: each site's dX and dW GEMMs pruned as the plan says."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from _cli import assert_user_error, invoke

from nmgrad_cli import plan as plan_lib
from nmgrad_cli.evaluate import EvalConfig
from nmgrad_cli.prune import prune
from nmgrad_cli.train.config import SparseGradConfig
from nmgrad_cli.train.gemm import grad_gemms

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "mlp_digits.h5"
FAST = ["--model", "mlp", "--steps", "4", "--batch-size", "16", "--eval-batches", "1", "--backend", "reference",
        "--device", "cpu", "--no-plot"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plan_dict(one_thread) -> dict:
    return plan_lib.recommend([SAMPLE], "variance<=0.05", "1:2,2:4,2:8,1:4", config=EvalConfig(threads=1)).to_dict()


def _uniform(plan: dict, dx: tuple[str, str | None], dw: tuple[str, str | None]) -> dict:
    p = copy.deepcopy(plan)
    for entry in p["layers"].values():
        for gemm, (method, pattern) in (("dx", dx), ("dw", dw)):
            entry[gemm].update(method=method, pattern=pattern)
    return p


def _write(tmp_path: Path, name: str, payload: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(payload))
    return path


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line and "eval_loss" not in line]


@pytest.mark.parametrize("dx,dw", [(("greedy", "2:8"), ("dense", None)), (("dense", None), ("greedy", "1:2")),
                                   (("greedy", "1:4"), ("greedy", "2:4"))])
def test_each_gemm_gets_its_own_pattern(dx, dw, gen):
    """grad_gemms with a per-GEMM config: dX = prune_F(dY) @ W and dW = prune_T(dY)^T X, each as its own."""
    dy, x, w = torch.randn(16, 24, generator=gen), torch.randn(16, 8, generator=gen), torch.randn(24, 8, generator=gen)
    cfg = SparseGradConfig(method=dx[0], pattern=dx[1] or "2:4", dw_method=dw[0], dw_pattern=dw[1] or "2:4")
    got_dx, got_dw = grad_gemms(dy, x, w, cfg, None)
    want_dx = (dy if dx[1] is None else prune(dy, "greedy", dx[1], dim=-1)) @ w
    want_dw = (dy if dw[1] is None else prune(dy, "greedy", dw[1], dim=0)).t() @ x
    torch.testing.assert_close(got_dx, want_dx, rtol=0, atol=0)
    torch.testing.assert_close(got_dw, want_dw, rtol=0, atol=0)
    assert cfg.prunes and cfg.prunes_gemm("dx") == (dx[1] is not None) and cfg.prunes_gemm("dw") == (dw[1] is not None)


def test_plan_round_trip_on_the_sample_dump(plan_dict, tmp_path):
    path = _write(tmp_path, "plan.json", plan_dict)
    r = invoke("train", *FAST, "--plan", path, "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "plan variance<=0.05" in r.stdout
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert resolved["plan"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert resolved["plan"]["budget"] == "variance<=0.05"
    # fc1: its dX never runs and its dW stays dense within the budget, so it is not a sparse site
    assert resolved["layers"] == ["fc2", "fc3"] and resolved["dense_by_plan"] == ["fc1"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["method"], summary["pattern"], summary["label"]) == ("plan", "per site", "plan variance<=0.05")


def test_uniform_plan_is_the_uniform_run_and_all_dense_is_dense(plan_dict, tmp_path):
    """A plan giving every GEMM mvue 2:4 trains exactly as --method mvue --pattern 2:4 (same per-site
    streams); an all-dense plan exactly as --method dense; a greedy plan differs from dense."""
    runs = {
        "uniform": ("--method", "mvue", "--pattern", "2:4"),
        "plan_uniform": ("--plan", _write(tmp_path, "u.json", _uniform(plan_dict, ("mvue", "2:4"), ("mvue", "2:4")))),
        "dense": ("--method", "dense"),
        "plan_dense": ("--plan", _write(tmp_path, "d.json", _uniform(plan_dict, ("dense", None), ("dense", None)))),
        "plan_greedy": ("--plan", _write(tmp_path, "g.json", _uniform(plan_dict, ("dense", None), ("greedy", "1:4")))),
    }
    losses = {}
    for name, args in runs.items():
        r = invoke("train", *FAST, *args, "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
        losses[name] = _losses(tmp_path / name)
    assert len(losses["uniform"]) == 4
    assert losses["plan_uniform"] == losses["uniform"]
    assert losses["plan_dense"] == losses["dense"]
    assert losses["plan_greedy"][0] == losses["dense"][0]  # same init and first batch
    assert losses["plan_greedy"][1:] != losses["dense"][1:]  # pruned dW gradients change the trajectory


def test_bad_plans(plan_dict, tmp_path):
    foreign = copy.deepcopy(plan_dict)
    foreign["layers"] = {f"blocks.0.attn.{k}": v for k, v in zip("qkv", plan_dict["layers"].values())}
    foreign["sources"][0]["model"] = "gpt"
    r = invoke("train", *FAST, "--plan", _write(tmp_path, "f.json", foreign), "--out", tmp_path / "f")
    assert_user_error(r, "the plan is for another model (gpt)")
    missing = copy.deepcopy(plan_dict)
    del missing["layers"]["fc2"]
    r = invoke("train", *FAST, "--plan", _write(tmp_path, "m.json", missing), "--out", tmp_path / "m")
    assert_user_error(r, "no entry for the site fc2")
    # leaving fc2 out with --layers is what the message suggests: it then trains
    r = invoke("train", *FAST, "--plan", tmp_path / "m.json", "--layers", "fc1,fc3", "--out", tmp_path / "m2")
    assert r.exit_code == 0, r.output
    assert_user_error(invoke("train", *FAST, "--plan", tmp_path / "nope.json"), "no such plan file")
    assert_user_error(invoke("train", *FAST, "--plan", SAMPLE), "is not a plan")
    r = invoke("train", *FAST, "--plan", _write(tmp_path, "p.json", plan_dict), "--compare", "dense,mvue")
    assert_user_error(r, "without --compare")


def test_a_plan_prunes_each_gemm_with_its_own_method_and_pattern(plan_dict, tmp_path):
    """A plan giving dX (approx-mvue 2:8) and dW (random 1:2) different methods: its dX-only half trains
    exactly as --grad-gemms dx with that method and pattern, its dW-only half as --grad-gemms dw, and
    the whole differs from both (each GEMM gets its own, not one method for the site)."""
    dx, dw = ("approx-mvue", "2:8"), ("random", "1:2")
    runs = {
        "plan_dx": ("--plan", _write(tmp_path, "x.json", _uniform(plan_dict, dx, ("dense", None)))),
        "flag_dx": ("--grad-gemms", "dx", "--method", dx[0], "--pattern", dx[1]),
        "plan_dw": ("--plan", _write(tmp_path, "w.json", _uniform(plan_dict, ("dense", None), dw))),
        "flag_dw": ("--grad-gemms", "dw", "--method", dw[0], "--pattern", dw[1]),
        "plan_both": ("--plan", _write(tmp_path, "b.json", _uniform(plan_dict, dx, dw))),
    }
    losses = {}
    for name, args in runs.items():
        r = invoke("train", *FAST, *args, "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
        losses[name] = _losses(tmp_path / name)
    assert losses["plan_dx"] == losses["flag_dx"] and losses["plan_dw"] == losses["flag_dw"]
    assert losses["plan_dx"][1:] != losses["plan_dw"][1:]
    assert losses["plan_both"][1:] != losses["plan_dx"][1:] and losses["plan_both"][1:] != losses["plan_dw"][1:]
