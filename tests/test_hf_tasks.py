"""More of Hugging Face through ``hf:`` (issue 20): ``--hf-task seq2seq-lm`` (T5, BART: decoder
inputs and labels from text blocks) and ``image-cls`` (ViT, ConvNeXt: ``--data images:FOLDER`` or the
built-in digits resized), on tiny models built from configs here (no downloads); and the reasons a
weight is not intercepted (fused RNN kernels, einsum, parametrized weights, views)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from _cli import assert_user_error, invoke

from nmgrad_cli.data.images import read_image_folder, resized_digits_data
from nmgrad_cli.errors import NmgradError
from nmgrad_cli.models.hf import text_file_data

tf = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

REPO = Path(__file__).resolve().parents[1]
TEXT = f"text:{REPO / 'sample_data' / 'pydoc_topics.txt'}"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Folders of a tiny T5, BART, ViT (1 channel, 10 labels) and ConvNeXt (RGB, 3 labels), and an
    image folder of 3 classes (png and jpg of another size than the models take)."""
    root = tmp_path_factory.mktemp("hf_tasks")
    torch.manual_seed(0)
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=0)).save_pretrained(root / "t5")
    tf.BartForConditionalGeneration(tf.BartConfig(
        vocab_size=128, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
    )).save_pretrained(root / "bart")
    tf.ViTForImageClassification(tf.ViTConfig(
        image_size=16, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=10)).save_pretrained(root / "vit")
    tf.ConvNextForImageClassification(tf.ConvNextConfig(
        image_size=16, num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3,
    )).save_pretrained(root / "convnext")
    g = np.random.default_rng(0)
    for c in ("cat", "dog", "eel"):
        (root / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(g.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(
                root / "imgs" / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "imgs" / "notes.txt").write_text("not a class")
    return root


def test_seq2seq_blocks_have_decoder_inputs_shifted_behind_the_start_id():
    d = text_file_data(TEXT, batch_size=2, vocab_size=128, block_size=16, decoder_start=7)
    b = next(iter(d.train))
    assert b["input_ids"].shape == b["labels"].shape == b["decoder_input_ids"].shape == (2, 8)
    assert (b["decoder_input_ids"][:, 0] == 7).all()
    assert torch.equal(b["decoder_input_ids"][:, 1:], b["labels"][:, :-1])
    plain = text_file_data(TEXT, batch_size=2, vocab_size=128, block_size=16)
    first = next(iter(plain.train))  # the same block order: source then target is the plain block
    assert torch.equal(torch.cat([b["input_ids"], b["labels"]], 1), first["input_ids"])


def test_t5_capture_reads_back_and_evaluates_every_projection(hf, tmp_path):
    out = tmp_path / "t5.h5"
    r = invoke("capture", "--model", f"hf:{hf / 't5'}", "--hf-task", "seq2seq-lm", "--data", TEXT, "--steps", "1",
               "--batch-size", "2", "--with-inputs", "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    r = invoke("evaluate", out, "--axis", "both", "--methods", "greedy", "--samples", "0", "--json", "-")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["layers"]
    names = {x["layer"] for x in rows}
    for want in ("encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.1.EncDecAttention.k",
                 "decoder.block.0.layer.2.DenseReluDense.wo", "lm_head"):
        assert want in names
    assert all(x["gemm"] is not None and x["gemm"]["mse"] > 0 for x in rows)


def test_bart_trains_sparse_and_reports_perplexity(hf, tmp_path):
    r = invoke("train", "--model", f"hf:{hf / 'bart'}", "--hf-task", "seq2seq-lm", "--data", TEXT, "--steps", "2",
               "--batch-size", "2", "--eval-batches", "1", "--compare", "dense,greedy", "--pattern", "1:4",
               "--backend", "reference", "--no-plot", "--out", tmp_path / "b", "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    dense, greedy = json.loads((tmp_path / "b.json").read_text())["runs"]
    assert dense["kind"] == "language-model" and dense["eval_ppl"] is not None
    assert "model.decoder.layers.0.encoder_attn.q_proj" in greedy["layers"]
    assert greedy["eval_loss"] != dense["eval_loss"]  # the sparse gradients changed the step


def test_vit_trains_on_resized_digits(hf, tmp_path):
    d = resized_digits_data(batch_size=4, seed=0, size=16, channels=3)
    b = next(iter(d.train))
    assert b["pixel_values"].shape == (4, 3, 16, 16) and b["labels"].shape == (4,)
    assert -1 <= float(b["pixel_values"].min()) and float(b["pixel_values"].max()) <= 1
    r = invoke("train", "--model", f"hf:{hf / 'vit'}", "--hf-task", "image-cls", "--data", "digits", "--steps", "2",
               "--batch-size", "8", "--eval-batches", "1", "--method", "mvue", "--backend", "reference", "--no-plot",
               "--out", tmp_path / "v", "--json", tmp_path / "v.json")
    assert r.exit_code == 0, r.output
    (run,) = json.loads((tmp_path / "v.json").read_text())["runs"]
    assert run["kind"] == "classification" and "vit.embeddings.patch_embeddings.projection" in run["layers"]


def test_image_folder_reads_classes_and_resizes(hf):
    x, y, classes = read_image_folder(f"images:{hf / 'imgs'}", 16, 3)
    assert classes == ["cat", "dog", "eel"] and x.shape == (12, 3, 16, 16)
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    gray, _, _ = read_image_folder(f"images:{hf / 'imgs'}", 8, 1)
    assert gray.shape == (12, 1, 8, 8) and float(gray.min()) >= -1 and float(gray.max()) <= 1


def test_convnext_on_an_image_folder_reads_back_with_inputs(hf, tmp_path):
    """ConvNeXt's pointwise Linears run on channels-last (B, H, W, C): the dump with X and W reads
    back and both GEMMs are evaluated, for capture and train --capture alike."""
    args = ["--model", f"hf:{hf / 'convnext'}", "--hf-task", "image-cls", "--data", f"images:{hf / 'imgs'}",
            "--steps", "1", "--batch-size", "4"]
    r = invoke("capture", *args, "--with-inputs", "--quiet", "--out", tmp_path / "c.h5")
    assert r.exit_code == 0, r.output
    r = invoke("train", *args, "--method", "dense", "--capture", tmp_path / "t.h5", "--capture-with-inputs",
               "--no-plot", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    for path in (tmp_path / "c.h5", tmp_path / "t.h5"):
        r = invoke("evaluate", path, "--axis", "both", "--methods", "greedy", "--samples", "0", "--json", "-")
        assert r.exit_code == 0, r.output
        report = json.loads(r.stdout)
        assert report["notes"] == []
        pw = [x for x in report["layers"] if x["layer"].endswith("layers.0.pwconv1")]
        assert len(pw) == 4 and all(x["gemm"]["norm2"] > 0 for x in pw)  # 2 stages x 2 axes


def test_bad_task_and_data_pairs_are_one_line(hf, tmp_path):
    imgs = f"images:{hf / 'imgs'}"
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken" / "a").mkdir(parents=True)
    (tmp_path / "broken" / "a" / "x.png").write_bytes(b"not a png")
    cases = [
        (["--model", f"hf:{hf / 'vit'}", "--hf-task", "image-cls", "--data", TEXT], "without labels for --hf-task"),
        (["--model", f"hf:{hf / 't5'}", "--hf-task", "seq2seq-lm", "--data", imgs], "use it with --hf-task image-cls"),
        (["--model", f"hf:{hf / 'convnext'}", "--hf-task", "image-cls", "--data", "digits"],
         "has 10 classes but the model 3 labels: build it with num_labels=10"),
        (["--model", f"hf:{hf / 'vit'}", "--hf-task", "image-cls", "--data", f"images:{tmp_path / 'nope'}"],
         "no folder"),
        (["--model", f"hf:{hf / 'vit'}", "--hf-task", "image-cls", "--data", f"images:{tmp_path / 'empty'}"],
         "lay it out as FOLDER/<class>/<image>.png"),
        (["--model", f"hf:{hf / 'vit'}", "--hf-task", "image-cls", "--data", f"images:{tmp_path / 'broken'}"],
         "x.png as an image"),
        (["--model", f"hf:{hf / 't5'}", "--hf-task", "image", "--data", TEXT], "choose one of causal-lm, seq-cls, "
                                                                                "seq2seq-lm, image-cls"),
    ]
    for args, match in cases:
        assert_user_error(invoke("capture", *args, "--steps", "1", "--out", tmp_path / "x.h5"), match)
        assert not (tmp_path / "x.h5").exists()
    with pytest.raises(NmgradError, match="1 \\(L\\) or 3 \\(RGB\\)"):
        read_image_folder(f"images:{hf / 'imgs'}", 8, 2)


def test_not_intercepted_reasons_name_what_a_researcher_looks_for(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "n.h5"
    r = invoke("capture", "--model", "tests.user_models:not_interceptable", "--data", "tests.user_models:tokens",
               "--steps", "1", "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    with h5py.File(out, "r") as f:
        why = json.loads(f.attrs["run"])["not_intercepted"]
    for p in ("gru.weight_ih_l0", "gru.weight_hh_l0", "lstm.weight_ih_l0", "lstm.weight_hh_l0"):
        assert why[p].startswith("fused RNN kernels (nn.GRU/nn.LSTM/nn.RNN) are not intercepted"), why[p]
    assert why["mix"].startswith("einsum is not intercepted")
    assert why["ortho.parametrizations.weight.original"].startswith("a parametrized weight (torch.nn.utils.parametri")
    assert why["tied"].startswith("the GEMM gets a view of it (t)")
    assert why["emb.weight"] == "used by embedding, not a linear/conv GEMM"
    assert not any("__get__" in v for v in why.values())
