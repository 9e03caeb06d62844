"""Hugging Face models built from tiny random configs (saved locally, no network): capture,
evaluate and train through ``--model hf:<folder>``, every projection a GEMM site (issue 8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _cli import assert_user_error, invoke

tf = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Folders of a tiny GPT-2, Llama and BERT (seq-cls), and a text file."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)).save_pretrained(
        root / "gpt2")
    tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32)).save_pretrained(root / "llama")
    tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3)).save_pretrained(root / "bert")
    (root / "t.txt").write_text("hello world, this is a tiny text for a tiny model.\n" * 40, encoding="utf-8")
    (root / "empty").mkdir()
    return root


def gpt2_projections(n=2):
    names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    return [f"transformer.h.{i}.{p}" for i in range(n) for p in names]


def llama_projections(n=2):
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    return [f"model.layers.{i}.{p}" for i in range(n) for p in names]


@pytest.mark.parametrize(("model", "names"), [("gpt2", gpt2_projections()), ("llama", llama_projections())])
def test_capture_every_projection_and_evaluate_gemm_errors(hf, tmp_path, model, names):
    out = tmp_path / f"{model}.h5"
    r = invoke("capture", "--model", f"hf:{hf / model}", "--data", f"text:{hf / 't.txt'}", "--steps", "2",
               "--with-inputs", "--batch-size", "2", "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    from nmgrad_cli.dump import DumpReader

    with DumpReader(out) as d:
        layers = d.layers
        assert list(layers) == [*names, "lm_head"]
        if model == "gpt2":  # Conv1D's W (I, F) is stored as (F, I): c_attn maps 16 -> 48
            assert layers["transformer.h.0.attn.c_attn"].weight_shape == (48, 16)
            assert d.attrs["run"]["not_intercepted"] == {
                "transformer.wpe.weight": "used by embedding, not a linear/conv GEMM"}  # wte is tied to lm_head
    r = invoke("evaluate", out, "--axis", "both", "--methods", "greedy,mvue", "--samples", "2", "--json",
               tmp_path / "e.json")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "e.json").read_text())["layers"]
    for name in [*names, "lm_head"]:
        for axis in ("features", "tokens"):
            row = next(x for x in rows if x["layer"] == name and x["axis"] == axis and x["method"] == "greedy")
            assert row["gemm"]["mse"] > 0 and row["gemm"]["target"] == ("dX" if axis == "features" else "dW")


def test_train_gpt2_greedy_differs_from_dense_and_llama_trains(hf, tmp_path):
    from nmgrad_cli.train.trainer import TrainConfig, compare

    base = dict(model=f"hf:{hf / 'gpt2'}", data=f"text:{hf / 't.txt'}", steps=3, batch_size=2, pattern="1:2",
                backend="reference", device="cpu", eval_batches=1)
    dense, greedy = compare(TrainConfig(**base), ["dense", "greedy"], tmp_path / "g", plot=False)
    assert greedy.layers == [*gpt2_projections(), "lm_head"] and dense.layers == []
    curve = [[json.loads(x)["loss"] for x in (tmp_path / "g" / m / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)] for m in ("dense", "greedy")]
    assert curve[0][0] == curve[1][0] and curve[0][1:] != curve[1][1:]
    assert dense.kind == "language-model" and dense.eval_loss is not None
    (run,) = compare(TrainConfig(**base | {"model": f"hf:{hf / 'llama'}"}), ["mvue"], tmp_path / "l", plot=False)
    assert run.layers == [*llama_projections(), "lm_head"] and run.diverged is None


def test_bert_sequence_classification_with_dict_batches(hf, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    r = invoke("train", "--model", f"hf:{hf / 'bert'}", "--hf-task", "seq-cls", "--data",
               "tests.user_models:classify_batches", "--method", "mvue", "--steps", "2", "--backend", "reference",
               "--device", "cpu", "--out", tmp_path / "b", "--json", tmp_path / "b.json", "--no-plot")
    assert r.exit_code == 0, r.output
    (run,) = json.loads((tmp_path / "b.json").read_text())["runs"]
    assert "bert.encoder.layer.0.attention.self.query" in run["layers"] and "classifier" in run["layers"]
    assert run["kind"] == "classification"
    r = invoke("capture", "--model", f"hf:{hf / 'bert'}", "--hf-task", "seq-cls", "--data",
               "tests.user_models:classify_batches", "--steps", "1", "--quiet", "--out", tmp_path / "b.h5")
    assert r.exit_code == 0, r.output
    assert "bert.encoder.layer.1.output.dense" in r.stdout


def test_bad_hf_inputs_are_one_line(hf, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = f"text:{hf / 't.txt'}"
    cases = [
        (["--model", "hf:nobody/no-such-model-xyz", "--data", text],
         "in the local Hugging Face cache (nmgrad loads offline)"),
        (["--model", f"hf:{hf / 'empty'}", "--data", text], "holds no Hugging Face model (no config.json)"),
        (["--model", f"hf:{hf / 't.txt'}", "--data", text], "is a file; give the folder"),
        (["--model", f"hf:{hf / 'gpt2'}"], "needs --data: text:<file>"),
        (["--model", f"hf:{hf / 'gpt2'}", "--data", "tests.user_models:unlabelled_batches"],
         "a data batch has no 'labels' (keys: input_ids, attention_mask) and the model returned no loss"),
        (["--model", f"hf:{hf / 'gpt2'}", "--data", f"text:{hf / 'none.txt'}"], "no such file"),
        (["--model", f"hf:{hf / 'gpt2'}", "--data", text, "--hf-task", "masked"], "--hf-task 'masked' is unknown"),
        (["--model", f"hf:{hf / 'bert'}", "--hf-task", "seq-cls", "--data", text], "without labels for --hf-task"),
    ]
    for args, match in cases:
        assert_user_error(invoke("capture", *args, "--steps", "1", "--out", tmp_path / "x.h5"), match)
        assert not (tmp_path / "x.h5").exists()
    assert_user_error(invoke("train", *cases[4][0], "--steps", "1", "--out", tmp_path / "t"), cases[4][1])


def test_real_conv1d_records_dy_and_trains_exactly(hf):
    from nmgrad_cli.capture import SiteRecorder
    from nmgrad_cli.prune import prune
    from nmgrad_cli.sites import ParamIndex, SiteMode
    from nmgrad_cli.train.config import SparseGradConfig
    from nmgrad_cli.train.sparse_grad import SparseGradSites

    torch.manual_seed(1)
    conv = tf.pytorch_utils.Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs, W (8, 12)
    x = torch.randn(2, 4, 8)
    got = {}
    rec = SiteRecorder(None, ("Linear",), lambda s, kind, call, t: got.__setitem__(kind, t), True)
    rec.start_step()
    with SiteMode(ParamIndex(conv), rec):
        y = conv(x)
    (ref,) = torch.autograd.grad(y.square().sum(), [y], retain_graph=True)
    y.square().sum().backward()
    assert torch.equal(got["grad"], ref.reshape(-1, 12)) and torch.equal(got["weight"], conv.weight.t())
    torch.testing.assert_close(got["grad"].t() @ got["input"], conv.weight.grad.t())
    conv.zero_grad()
    with SiteMode(ParamIndex(conv), SparseGradSites(SparseGradConfig("greedy", "1:2", backend="reference"))):
        y = conv(x)
    y.square().sum().backward()
    want = prune(got["grad"], "greedy", "1:2", dim=0, backend="reference").t() @ got["input"]  # (F, I)
    torch.testing.assert_close(conv.weight.grad, want.t())
