"""Built-in models and data, build_task and the package.module:attr loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nmgrad_cli.data import ENV_VAR, cycle, digits, sample_data_dir, text
from nmgrad_cli.errors import ImportSpecError, NmgradError
from nmgrad_cli.models import TASKS, build_task, load_object, split_batch

REPO = Path(__file__).resolve().parents[1]


def test_digits_split_is_fixed_disjoint_and_shuffled_per_epoch():
    train, test = digits("train", 100, seed=0), digits("test", 100)
    xs = torch.cat([x for x, _ in test])
    assert xs.shape == (297, 1, 8, 8) and len(test) == 3 and len(train) == 15
    e1, e2 = [y for _, y in train], [y for _, y in train]
    assert not torch.equal(torch.cat(e1), torch.cat(e2))  # reshuffled each epoch
    again = digits("train", 100, seed=0)
    assert torch.equal(next(iter(again))[1], e1[0])  # same seed, same first epoch
    x_train = torch.cat([x for x, _ in train]).flatten(1)
    assert x_train.min() >= 0 and x_train.max() <= 1
    # no test image is in the training split (as the same index set: 1500 + 297 = 1797 distinct rows)
    from nmgrad_cli.data.digits import N_TEST, load_digits_arrays

    images, labels = load_digits_arrays()
    assert images.shape == (1797, 8, 8) and N_TEST == 297 and set(labels.tolist()) == set(range(10))


def test_text_batches_shift_by_one_and_vocab_round_trips():
    tr, va = text("train", 16, 4, seed=1), text("val", 16, 4)
    x, y = next(iter(tr))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    s = tr.vocab.decode(x[0])
    assert torch.equal(tr.vocab.encode(s), x[0]) and tr.vocab.size == 103
    xv, _ = next(iter(va))
    assert "The" in "".join(tr.vocab.decode(r) for r in torch.cat([xv for xv, _ in va])[:50])


def test_sample_data_dir_env_override(monkeypatch, tmp_path):
    assert sample_data_dir() == REPO / "sample_data"
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert sample_data_dir() == tmp_path
    with pytest.raises(NmgradError, match=f"set {ENV_VAR} to a folder holding digits.npz"):
        digits()


@pytest.mark.parametrize("name", list(TASKS))
def test_builtin_tasks_forward_backward(name):
    task = build_task(name, seed=0, batch_size=4)
    x, y = split_batch(next(task.train_batches))
    out = task.model(x)
    loss = task.loss_fn(out, y)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert task.kind == TASKS[name].kind and task.eval_batches is not None
    if name == "gpt":
        assert out.shape == (4, 64, 103)
    else:
        assert out.shape == (4, 10)


def test_same_seed_same_weights():
    a, b = build_task("cnn", seed=3), build_task("cnn", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_mlp_learns_digits():
    task = build_task("mlp", seed=0)
    opt = torch.optim.AdamW(task.model.parameters(), lr=3e-3)
    for _ in range(60):
        x, y = next(task.train_batches)
        loss = task.loss_fn(task.model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = torch.cat([(task.model(x).argmax(-1) == y).float() for x, y in task.eval_batches]).mean()
    assert acc > 0.85


def test_load_object_errors(monkeypatch):
    monkeypatch.chdir(REPO)
    assert load_object("tests.user_models:encoder", "--model").__name__ == "encoder"
    assert load_object("torch.nn:Linear") is torch.nn.Linear
    for spec, match in [
        ("no_colon", "is not of the form package.module:attr"),
        ("pkg:", "is not of the form"),
        ("nosuch_mod_xyz:f", "no module named 'nosuch_mod_xyz'"),
        ("tests.user_models:nope", "'tests.user_models' has no attribute 'nope'"),
        ("torch.nn:Linear.nope", "'torch.nn.Linear' has no attribute 'nope'"),
    ]:
        with pytest.raises(ImportSpecError, match=match):
            load_object(spec, "--model")


def test_user_task_gets_batch_size_and_seed(monkeypatch):
    monkeypatch.chdir(REPO)
    task = build_task("tests.user_models:encoder", "tests.user_models:tokens", batch_size=3, seed=1)
    x, y = next(task.train_batches)
    assert x.shape == (3, 6) and task.kind == "custom"
    assert task.spec["data"] == "tests.user_models:tokens" and task.spec["loss"] == "cross_entropy"


def test_cycle_refuses_a_used_up_iterator():
    it = cycle(iter([(1, 2)]), "--data x")
    assert next(it) == (1, 2)
    with pytest.raises(NmgradError, match="--data x yielded no batches after 1"):
        next(it)
