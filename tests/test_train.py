"""The trainer library: every built-in model under every method, same init across a compare,
reproducibility, NaN stop, weight sparsity, outputs, custom factories."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from nmgrad_cli import METHODS
from nmgrad_cli.errors import MethodError, NmgradError, OutputExistsError, PatternError
from nmgrad_cli.train.trainer import TrainConfig, TrainingDiverged, compare, lr_at, train

ALL_METHODS = ["dense", *METHODS]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(model: str, **kw) -> TrainConfig:
    """A few steps with small batches and one eval batch; reference pruning (no compile wait)."""
    base = {"model": model, "steps": 3, "batch_size": 4, "eval_batches": 1, "backend": "reference", "device": "cpu"}
    return TrainConfig(**(base | kw))


@pytest.mark.parametrize("model", ["mlp", "cnn", "gpt"])
def test_every_builtin_model_trains_under_every_method(model, tmp_path):
    runs = compare(tiny(model, pattern="2:4"), ALL_METHODS, tmp_path, plot=False)
    assert [r.method for r in runs] == ALL_METHODS
    for r in runs:
        assert r.steps_done == 3 and r.diverged is None
        assert math.isfinite(r.final_train_loss) and math.isfinite(r.eval_loss)
        assert 0 <= r.eval_acc <= 1
        assert (r.layers == []) == (r.method == "dense")
    assert len({r.init_checksum for r in runs}) == 1  # the same initial weights for every method
    kinds = {r.kind for r in runs}
    assert kinds == {"language-model" if model == "gpt" else "classification"}
    if model == "gpt":
        assert all(r.eval_ppl == pytest.approx(math.exp(r.eval_loss)) for r in runs)
        assert "lm_head" in runs[1].layers and "blocks.0.attn.q" in runs[1].layers
    if model == "cnn":
        assert "stem.0" in runs[1].layers and "fc" in runs[1].layers
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["method"] for s in summary] == ALL_METHODS
    for m in ALL_METHODS:
        lines = (tmp_path / m / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 3 + 1  # 3 steps, 1 evaluation


def test_runs_are_repeatable_from_the_seed_and_methods_differ(tmp_path):
    def losses(method, seed, name):
        train(tiny("mlp", method=method, seed=seed, steps=4), tmp_path / name, plot=False)
        return [json.loads(x).get("loss") for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    a, b = losses("mvue", 1, "a"), losses("mvue", 1, "b")
    assert a == b
    assert losses("mvue", 2, "c") != a
    dense, greedy = losses("dense", 1, "d"), losses("greedy", 1, "e")
    assert dense[0] == greedy[0] == a[0]  # same init and first batch: the same first loss
    assert dense[1] != greedy[1]  # the pruned first update changes what follows


def test_pruned_gradients_change_training_and_dense_equals_no_gemms(tmp_path):
    d = train(tiny("mlp", method="dense", steps=5), tmp_path / "d", plot=False)
    none = train(tiny("mlp", method="mvue", grad_gemms=(), steps=5), tmp_path / "n", plot=False)
    assert none.final_train_loss == pytest.approx(d.final_train_loss, rel=1e-6)
    dx = train(tiny("mlp", method="mvue", grad_gemms="dx", steps=5), tmp_path / "x", plot=False)
    assert dx.final_train_loss != pytest.approx(d.final_train_loss, rel=1e-6)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_metrics(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at step \d+.*lower --lr"):
        train(tiny("mlp", lr=1e6, steps=100), tmp_path, plot=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert 1 <= len(lines) < 100
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["diverged"].startswith("loss became") and summary["steps_done"] == len(lines)
    assert json.loads((tmp_path / "config.json").read_text())["config"]["lr"] == 1e6


def test_compare_keeps_going_after_a_divergence(tmp_path):
    runs = compare(tiny("mlp", lr=1e6, steps=50), ["dense", "mvue"], tmp_path, plot=False)
    assert all(r.diverged for r in runs) and len(runs) == 2


def test_weight_pattern_trains_with_nm_weights(tmp_path):
    from nmgrad_cli.models import build_task
    from nmgrad_cli.train import refresh_weight_masks_, sparse_grad_layers, sparsify_gradients_

    r = train(tiny("mlp", method="mvue", weight_pattern="2:4", weight_every=2, steps=4), tmp_path, plot=False)
    assert r.diverged is None and r.label == "mvue 2:4 +W2:4"
    task = build_task("mlp", batch_size=4)
    sparsify_gradients_(task.model, "mvue", "2:4", weight_pattern="2:4")
    assert refresh_weight_masks_(task.model) == 3
    for _, layer in sparse_grad_layers(task.model):
        w = (layer.weight * layer.weight_mask).reshape(layer.weight.shape[0], -1, 4)
        assert ((w != 0).sum(-1) <= 2).all()


def test_custom_model_and_data_factories(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def make():
                return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

            def data(batch_size=5, seed=0):
                g = torch.Generator().manual_seed(seed)
                x = torch.randn(4 * batch_size, 6, generator=g)
                y = torch.randint(0, 3, (4 * batch_size,), generator=g)
                return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    r = train(tiny("mymodels:make", data="mymodels:data", layers="2"), tmp_path / "run", plot=False)
    assert r.layers == ["2"] and r.kind == "custom" and r.eval_loss is None


def test_bad_configs_raise_one_line_errors(tmp_path):
    with pytest.raises(MethodError, match="unknown method 'mvu': choose one of dense, greedy"):
        TrainConfig(method="mvu")
    with pytest.raises(PatternError, match="not defined for pattern 1:4"):
        TrainConfig(method="mvue12", pattern="1:4")
    with pytest.raises(PatternError, match="malformed"):
        TrainConfig(pattern="2-4")
    with pytest.raises(NmgradError, match="--steps must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(NmgradError, match="choose from dx, dw"):
        TrainConfig(grad_gemms="dx,dz")
    with pytest.raises(MethodError, match="unknown method 'nope'"):
        compare(tiny("mlp"), ["dense", "nope"], tmp_path / "c")
    assert not (tmp_path / "c").exists()  # validated before anything ran
    with pytest.raises(NmgradError, match=r"no GEMM site matches --layers 'blocks.\*': the names are fc1, fc2, fc3"):
        train(tiny("mlp", layers="blocks.*"), tmp_path / "l")
    with pytest.raises(NmgradError, match="--model 'resnet9' is neither a built-in model"):
        train(tiny("resnet9"), tmp_path / "m")


def test_existing_out_needs_force_and_user_files_survive(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="pass --force"):
        train(tiny("mlp"), tmp_path)
    train(tiny("mlp"), tmp_path, force=True, plot=False)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "summary.json").exists()


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    steps, peak = 100, 1.0
    assert lr_at(0, steps, peak) == pytest.approx(0.2)  # 5 warm-up steps
    assert lr_at(4, steps, peak) == pytest.approx(1.0)
    assert lr_at(5, steps, peak) == pytest.approx(1.0)
    assert lr_at(99, steps, peak) == pytest.approx(0.1, abs=1e-3)
    lrs = [lr_at(s, steps, peak) for s in range(5, steps)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_loss_plot_is_written_when_matplotlib_is_there(tmp_path):
    pytest.importorskip("matplotlib")
    compare(tiny("mlp", steps=3), ["dense", "mvue"], tmp_path)
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_every_writes_eval_records(tmp_path):
    train(tiny("mlp", steps=4, eval_every=2), tmp_path, plot=False)
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert [e["step"] for e in evals] == [2, 4]
    assert torch.tensor([e["eval_loss"] for e in evals]).isfinite().all()
