"""No site listed as sparse unless it is (issue 20): the convolutions the sparse path once ran dense
(an even kernel with padding='same', an unbatched input) now prune, what it still cannot take (a
complex weight) is reported with its reason, stored (config.json, summary.json; a --capture dump
carries the same entry) and refused by --strict; honest steps/s; the run's files (no empty folder
after a failed start, TensorBoard events, `nmgrad plot RUN_DIR`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _cli import assert_user_error, invoke
from torch import nn

from nmgrad_cli.sites import NotInterceptedError, ParamIndex, SiteMode, site_report
from nmgrad_cli.train.config import SparseGradConfig
from nmgrad_cli.train.sparse_grad import SparseGradSites

REPO = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "8", "--eval-batches", "1", "--backend", "reference", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def grads(model: nn.Module, x: torch.Tensor, handler=None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(output, parameter gradients, input gradient) of sum(y^2), under a SiteMode with ``handler``."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    with SiteMode(ParamIndex(model), handler):
        y = model(x)
    y.square().sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()], x.grad


CONVS = {  # (conv, input): the cases that ran dense before
    "even kernel, same": (lambda: nn.Conv2d(8, 8, 4, padding="same"), (2, 8, 6, 6)),
    "even kernel, same, dilated 1-d": (lambda: nn.Conv1d(4, 8, 4, padding="same", dilation=1), (3, 4, 9)),
    "even/odd kernel, same, 3-d": (lambda: nn.Conv3d(4, 4, (2, 3, 4), padding="same"), (1, 4, 3, 4, 5)),
    "unbatched input": (lambda: nn.Conv2d(4, 8, 3, padding=1), (4, 5, 5)),
    "unbatched, even kernel, same": (lambda: nn.Conv1d(4, 4, 2, padding="same"), (4, 7)),
}


@pytest.mark.parametrize("case", list(CONVS))
def test_convs_that_ran_dense_are_sparse_and_exact_when_nothing_is_pruned(case):
    make, shape = CONVS[case]
    torch.manual_seed(0)
    conv = make()
    x = torch.randn(shape)
    y, dense, dx = grads(conv, x)
    # grad_gemms=(): the sparse path with nothing pruned is the dense conv (the padding is right)
    exact = SparseGradSites(SparseGradConfig("greedy", "1:4", grad_gemms=(), backend="reference"))
    y0, g0, dx0 = grads(conv, x, exact)
    torch.testing.assert_close(y0, y)
    for a, b in zip([*g0, dx0], [*dense, dx]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # greedy 1:4 keeps a quarter of dY per GEMM: the site is sparse, and its gradients show it
    sites = SparseGradSites(SparseGradConfig("greedy", "1:4", backend="reference"))
    y1, g1, dx1 = grads(conv, x, sites)
    torch.testing.assert_close(y1, y)
    assert sites.sparse_sites() == list(sites.selected) == ["weight"] and sites.fallback == {}
    assert not torch.allclose(g1[0], dense[0]) and not torch.allclose(dx1, dx)


def test_a_complex_weight_runs_dense_with_its_reason_and_strict_refuses_it():
    from user_models import ComplexHead

    torch.manual_seed(0)
    model = ComplexHead()
    x = torch.randn(4, 1, 8, 8)
    sites = SparseGradSites(SparseGradConfig("greedy", "1:4", backend="reference"))
    index = ParamIndex(model)
    mode = SiteMode(index, sites)
    with mode:
        loss = model(x).square().sum()
    loss.backward()
    assert list(sites.selected) == ["body", "rot", "head"]
    assert sites.sparse_sites() == ["body", "head"]  # rot is not listed as sparse
    assert "complex64" in sites.fallback["rot"] and "ran dense" in sites.fallback["rot"]
    report = site_report(index, mode, list(sites.selected.values()), "*", ran_dense=sites.fallback)
    assert report.to_dict()["ran_dense"] == {"rot": sites.fallback["rot"]}
    with pytest.raises(NotInterceptedError, match=r"--strict: 1 selected site\(s\) ran dense: rot \(the input is"):
        site_report(index, mode, list(sites.selected.values()), "*", strict=True, ran_dense=sites.fallback)


def test_issue_reproduction_even_kernel_same_conv_trains_sparse(tmp_path, monkeypatch):
    """Issue 20: `--layers same --compare dense,greedy --pattern 1:4` on `Conv2d(8, 8, 4, padding="same")`
    gave greedy the dense loss bit for bit, while listing the site as sparse."""
    monkeypatch.chdir(REPO)
    r = invoke("train", "--model", "tests.user_models:same_conv", "--data", "digits", "--layers", "same",
               "--compare", "dense,greedy", "--pattern", "1:4", "--steps", "4", *FAST, "--no-plot",
               "--out", tmp_path / "o", "--capture", tmp_path / "c.h5")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    dense, greedy = summary
    from nmgrad_cli.dump import DumpReader

    with DumpReader(tmp_path / "c.greedy.h5") as d:  # the dump says what ran dense, too (nothing here)
        assert d.attrs["run"]["ran_dense"] == {} and [s["name"] for s in d.attrs["run"]["sites"]] == ["same"]
    assert greedy["layers"] == ["same"] and greedy["ran_dense"] == []
    assert greedy["final_train_loss"] != dense["final_train_loss"]
    resolved = json.loads((tmp_path / "o" / "greedy" / "config.json").read_text())["resolved"]
    assert resolved["layers"] == ["same"] and resolved["ran_dense"] == {}
    assert "sparse-gradient sites (1): same" in r.stdout and "runs dense" not in r.output


def test_a_fallback_is_printed_stored_in_config_and_dump_and_refused_by_strict(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    args = ["--model", "tests.user_models:complex_head", "--data", "digits", "--method", "greedy", "--pattern", "1:4",
            "--steps", "2", *FAST, "--no-plot"]
    r = invoke("train", *args, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    assert "sparse-gradient sites (2): body, head" in text
    assert "warning: rot runs dense, not sparse: the input is torch.complex64" in text
    resolved = json.loads((tmp_path / "o" / "config.json").read_text())["resolved"]
    assert resolved["layers"] == ["body", "head"] and list(resolved["ran_dense"]) == ["rot"]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [name for name, _ in summary["ran_dense"]] == ["rot"]
    # --strict refuses it, and the failed start leaves no run folder behind
    r = invoke("train", *args, "--strict", "--out", tmp_path / "strict" / "run")
    assert_user_error(r, "--strict: 1 selected site(s) ran dense: rot")
    assert not (tmp_path / "strict").exists()


def test_a_failed_start_leaves_no_folder_but_keeps_the_users_empty_one(tmp_path):
    bad = ["--model", "no_such_module_xyz:make", "--steps", "1", *FAST]
    r = invoke("train", *bad, "--out", tmp_path / "a" / "b")
    assert_user_error(r, "no_such_module_xyz")
    assert not (tmp_path / "a").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    assert_user_error(invoke("train", *bad, "--out", mine), "no_such_module_xyz")
    assert mine.is_dir()


def test_steps_per_s_leaves_out_the_warm_up_steps(monkeypatch):
    from nmgrad_cli.train import records

    clock = iter([0, 10, 10, 20, 20, 21, 21, 22, 22, 23])  # steps of 10, 10, 1, 1, 1 s
    monkeypatch.setattr(records.time, "perf_counter", lambda: next(clock))
    timer = records.StepTimer(5, torch.device("cpu"))
    for _ in range(5):
        timer.start()
        timer.stop()
    assert timer.warmup_done == 2 and timer.steps_per_s == 1.0 and timer.steps_per_s_all == 5 / 23
    one = records.StepTimer(1, torch.device("cpu"))  # a single step: nothing to leave out
    assert one.warmup == 0


def test_the_table_says_how_many_warm_up_steps_steps_per_s_leaves_out(tmp_path):
    r = invoke("train", "--model", "mlp", "--steps", "3", *FAST, "--no-plot", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "steps/s: after the first 2 steps" in " ".join(r.stdout.split())
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["warmup_steps"] == 2 and s["steps_per_s"] > 0 and s["steps_per_s_all"] > 0


def test_plot_draws_a_run_folder_and_a_compare_folder(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) draws the pictures")
    r = invoke("train", "--model", "mlp", "--compare", "dense,greedy", "--pattern", "1:2", "--steps", "2", *FAST,
               "--no-plot", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    r = invoke("plot", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "loss.png").stat().st_size > 1000
    assert_user_error(invoke("plot", tmp_path / "o"), "loss.png exists: pass --force")
    r = invoke("plot", tmp_path / "o" / "greedy", "-o", tmp_path / "g.png")
    assert r.exit_code == 0 and (tmp_path / "g.png").is_file()
    assert_user_error(invoke("plot", tmp_path), "is not a training run")
    assert_user_error(invoke("plot", tmp_path / "o" / "summary.json"), "give --out")


def test_loss_png_has_no_accuracy_panel_without_accuracy():
    from nmgrad_cli.train.plot import has_accuracy

    lm = {"run": {"step": [1, 2], "loss": [3.0, 2.0], "acc": [None, None], "eval_step": [2], "eval_loss": [2.1],
                  "eval_acc": [None]}}
    assert not has_accuracy(lm)
    lm["run"]["eval_acc"] = [0.5]
    assert has_accuracy(lm)


def test_metrics_go_to_tensorboard_when_it_is_installed(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard (the tensorboard extra) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = invoke("train", "--model", "mlp", "--steps", "3", *FAST, "--no-plot", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "o"))
    events = EventAccumulator(str(tmp_path / "o"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/steps_per_s", "eval/loss", "eval/acc"} <= set(events.Tags()["scalars"])
    lines = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([x["loss"] for x in lines if "loss" in x], rel=1e-6)
