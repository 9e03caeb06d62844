"""One backend resolver (nmgrad_cli/backend.py): what it decides, that it is the only place that
decides, that outputs record it, and that a Pattern is parsed once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import nmgrad_cli
from nmgrad_cli import patterns
from nmgrad_cli.backend import (
    FUSED_MIN_NUMEL,
    FUSED_TRAIN_MIN_NUMEL,
    backend_record,
    resolve_backend,
    resolve_gemm,
)
from nmgrad_cli.errors import NmgradError
from nmgrad_cli.kernels import cpu_fused
from nmgrad_cli.metrics import evaluate_tensor, mc_backend
from nmgrad_cli.prune import prune_with
from nmgrad_cli.train import SparseGradConfig, sparse_grad_linear

PACKAGE = Path(nmgrad_cli.__file__).parent
F32, F64 = torch.float32, torch.float64


def test_auto_on_cpu_by_size_method_pattern_dtype():
    compiler = cpu_fused.compile_available()
    big = resolve_backend("mvue", "2:4", F32, "cpu", FUSED_MIN_NUMEL)
    assert big.name == ("fused" if compiler else "reference") and big.uniforms == ("hash" if compiler else "generator")
    assert resolve_backend("mvue", "2:4", F32, "cpu", FUSED_MIN_NUMEL - 1).name == "reference"
    assert resolve_backend("mvue", "3:8", F32, "cpu", FUSED_MIN_NUMEL).name == "reference"  # no 3:8 kernel
    assert resolve_backend("mvue", "2:4", F64, "cpu", FUSED_MIN_NUMEL).name == "reference"
    assert resolve_backend("greedy", "2:4", F32, "cpu", 8).uniforms == "none"
    # training: from 2^16 elements, and "fused" is a preference
    trained = resolve_backend("mvue", "2:4", F32, "cpu", FUSED_TRAIN_MIN_NUMEL, "fused", training=True)
    assert trained.name == ("fused" if compiler else "reference")
    assert resolve_backend("mvue", "3:8", F32, "cpu", 1 << 20, "fused", training=True).name == "reference"
    # the generator stream: every backend draws torch.rand uniforms
    assert resolve_backend("mvue", "2:4", F32, "cpu", FUSED_MIN_NUMEL, stream="generator").uniforms == "generator"
    assert resolve_backend("mvue", "2:4", F32, "cpu", 8, stream="given").uniforms == "given"


def test_explicit_backends_and_their_errors():
    assert resolve_backend("mvue", "2:4", F32, "cpu", 8, "reference").name == "reference"
    assert resolve_backend("mvue", "2:4", F32, "cpu", 8, "fused").name == "fused"
    with pytest.raises(NmgradError, match="no fused kernel for mvue 3:8"):
        resolve_backend("mvue", "3:8", F32, "cpu", 8, "fused")
    with pytest.raises(NmgradError, match="no fused kernel"):
        resolve_backend("mvue", "2:4", F64, "cpu", 8, "fused")
    with pytest.raises(NmgradError, match="no Triton kernel for mvue 3:8"):
        resolve_backend("mvue", "3:8", F32, "cpu", 8, "triton")
    with pytest.raises(NmgradError, match="unknown backend 'gpu'"):
        resolve_backend("mvue", "2:4", F32, "cpu", 8, "gpu")
    # the float64 fallback of the Triton path is decided here, with its reason
    f64 = resolve_backend("mvue", "2:4", F64, "cpu", 8, "triton")
    assert f64.name == "reference" and "float32" in f64.reason


def test_env_var_stands_in_for_auto_only(monkeypatch):
    monkeypatch.setenv("NMGRAD_BACKEND", "fused")
    assert resolve_backend("mvue", "2:4", F32, "cpu", 8).name == "fused"
    assert "NMGRAD_BACKEND" in resolve_backend("mvue", "2:4", F32, "cpu", 8).reason
    assert resolve_backend("mvue", "2:4", F32, "cpu", 8, "reference").name == "reference"
    monkeypatch.setenv("NMGRAD_BACKEND", "cuda")
    with pytest.raises(NmgradError, match="NMGRAD_BACKEND='cuda' is unknown"):
        resolve_backend("mvue", "2:4", F32, "cpu", 8)


def test_prune_reports_the_backend_that_ran():
    x = torch.randn(8, 16)
    _, choice = prune_with(x, "mvue", "2:4", generator=torch.Generator().manual_seed(0))
    assert (choice.name, choice.uniforms) == ("reference", "generator")
    _, choice = prune_with(x, "mvue", "2:4", uniforms=torch.rand(32, 1), backend="reference")
    assert choice.uniforms == "given"


def test_one_place_chooses_a_backend():
    """grep: the environment variables, the compiler probe and the size thresholds are read only in
    backend.py; the pure GEMM decision (plan_gemm) lives there and is called only through resolve_gemm."""
    for path in PACKAGE.rglob("*.py"):
        if path.name == "backend.py":
            continue
        text = path.read_text()
        where = path.relative_to(PACKAGE)
        assert not re.search(r"(environ|getenv)[^\n]*NMGRAD_(BACKEND|SPARSE_FP32)", text), where
        assert not re.search(r"\bplan_gemm\(", text), where  # called via resolve_gemm, in backend.py
        assert "compile_available()" not in text or path.name == "cpu_fused.py", where
        assert not re.search(r"FUSED_(TRAIN_)?MIN_NUMEL\s*=", text), where
        assert "def _choose_backend" not in text and "def _backend" not in text, where
        assert "def draw_backend" not in text, where


def _imports(path: Path) -> set[str]:
    """The nmgrad_cli modules ``path`` imports (module level and inside functions), dotted from the package."""
    import ast

    mod = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = mod.rsplit(".", 1)[0] if path.name != "__init__.py" else mod
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [f"{target}.{a.name}" for a in node.names]
            out |= {n for n in [target, *names] if (PACKAGE.parent / (n.replace(".", "/") + ".py")).exists()
                    or (PACKAGE.parent / n.replace(".", "/") / "__init__.py").exists()}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("nmgrad_cli")}
    return out - {mod}


def test_imports_point_one_way():
    """The decision (backend) sits above the mechanics (kernels): no kernel module imports backend,
    prune or sparse_backward (a GEMM does not call the public prune API), and backend, prune,
    sparse_backward and the kernels form no import circle."""
    graph = {}
    for path in [*PACKAGE.glob("kernels/*.py"), PACKAGE / "backend.py", PACKAGE / "prune.py",
                 PACKAGE / "sparse_backward.py"]:
        mod = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        graph[mod] = _imports(path)
    for mod, deps in graph.items():
        if mod.startswith("nmgrad_cli.kernels"):
            bad = deps & {"nmgrad_cli.backend", "nmgrad_cli.prune", "nmgrad_cli.sparse_backward"}
            assert not bad, f"{mod} imports {bad}"
    assert "nmgrad_cli.kernels.sparse_gemm" in graph["nmgrad_cli.sparse_backward"]
    assert "nmgrad_cli.backend" in graph["nmgrad_cli.sparse_backward"]

    def reach(start, seen):
        for dep in graph.get(start, ()):
            if dep not in seen:
                seen.add(dep)
                reach(dep, seen)
        return seen

    for mod in graph:
        assert mod not in reach(mod, set()), f"import circle through {mod}"


def test_evaluate_monte_carlo_does_not_depend_on_the_compiler(monkeypatch):
    """The same --seed gives the same Monte-Carlo draws on the fused and reference backends (the
    generator's uniforms on both); they can differ only by float32 rounding of the kept values."""
    if not cpu_fused.compile_available():
        pytest.fail("no C++ compiler found: torch.compile cannot build the fused CPU kernels")
    g = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) ** 3
    runs = {}
    for backend in ("fused", "reference"):
        monkeypatch.setenv("NMGRAD_BACKEND", backend)
        assert mc_backend(g, "mvue", "2:4")["name"] == backend
        m = evaluate_tensor(g, "mvue", "2:4", samples=6, generator=torch.Generator().manual_seed(9), mc_check=True)
        runs[backend] = m
    a, b = runs["fused"], runs["reference"]
    for key in ("angle", "mc_mse", "mc_bias", "mc_variance"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-5), key


def test_train_config_json_and_its_capture_record_the_backend(tmp_path):
    from nmgrad_cli.dump import DumpReader
    from nmgrad_cli.train.trainer import TrainConfig, train

    cfg = TrainConfig(model="mlp", steps=1, batch_size=4, eval_batches=1, backend="reference", device="cpu",
                      capture=str(tmp_path / "g.h5"))
    train(cfg, tmp_path / "run")
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert resolved["backend"] == backend_record("mvue", "2:4", F32, "cpu", "reference", training=True)
    assert resolved["backend"]["large"] == {"name": "reference", "uniforms": "generator",
                                            "reason": "reference asked for (argument)"}
    with DumpReader(tmp_path / "g.h5") as dump:  # train --capture: the dump says what pruned the run
        assert dump.attrs["run"]["backend"] == resolved["backend"]


def test_a_capture_records_that_nothing_was_pruned(tmp_path):
    from nmgrad_cli.capture import CaptureConfig, run_capture
    from nmgrad_cli.dump import DumpReader

    r = run_capture(CaptureConfig(model="mlp", steps=1, batch_size=4, out=str(tmp_path / "c.h5")), None, False)
    with DumpReader(r.path) as dump:
        assert "backend" in dump.attrs["run"] and dump.attrs["run"]["backend"] is None  # dense training


def count_pattern_parses(monkeypatch):
    """Counts N:M strings parsed from now on (``.calls``): patterns' regex, wrapped."""
    real = patterns._PATTERN_RE

    class Counting:
        calls = 0

        def match(self, text):
            Counting.calls += 1
            return real.match(text)

    monkeypatch.setattr(patterns, "_PATTERN_RE", Counting())
    return Counting


def test_a_pattern_is_parsed_once_not_per_backward(monkeypatch):
    """A sparse layer's backward passes the config's Pattern along: no N:M string is parsed."""
    cfg = SparseGradConfig("mvue", "2:4")
    assert cfg.parsed_pattern is cfg.parsed_pattern

    parses = count_pattern_parses(monkeypatch)
    x = torch.randn(16, 8, requires_grad=True)
    w = torch.randn(12, 8, requires_grad=True)
    cfg.parsed_pattern  # noqa: B018 (parsed before the step, as a layer's config is)
    parses.calls = 0
    sparse_grad_linear(x, w, None, cfg, torch.Generator().manual_seed(0)).sum().backward()
    assert x.grad is not None and parses.calls == 0


def test_resolve_gemm_on_the_cpu_is_the_pruning_backend_and_a_dense_gemm(monkeypatch):
    choice = resolve_gemm("mvue", "2:4", F32, "cpu", 64, 256, 32)
    assert choice.prune.name == "reference" and choice.prune.uniforms == "generator"
    assert (choice.gemm, choice.reason) == ("dense", "not a CUDA tensor")
    assert resolve_gemm("mvue", "2:4", F32, "cpu", 8, 8, 8, uniforms_given=True).prune.uniforms == "given"
    monkeypatch.setenv("NMGRAD_SPARSE_FP32", "fp8")
    with pytest.raises(NmgradError, match="NMGRAD_SPARSE_FP32"):
        resolve_gemm("mvue", "2:4", F32, "cuda", 64, 256, 32)


def test_evaluate_json_records_the_monte_carlo_backend(tmp_path):
    from _dumps import make_mlp_dump

    from nmgrad_cli.evaluate import EvalConfig, evaluate

    dump = make_mlp_dump(tmp_path / "d.h5", steps=1)
    report = evaluate([dump], EvalConfig(methods=("mvue", "greedy"), samples=2)).to_dict()
    assert set(report["backend"]) == {"mvue", "greedy"}
    small = report["backend"]["mvue"]["small"]
    assert small == {"name": "reference", "uniforms": "generator", "reason": small["reason"]}
    assert report["backend"]["greedy"]["large"]["uniforms"] == "none"
    assert report["backend"]["mvue"]["large"]["uniforms"] == "generator"  # on every backend
    # what the draws really ran on: auto on the CPU is the reference at every record size (draw_backend)
    assert report["runtime"]["draw_backend"] == "reference"
    assert report["backend"]["mvue"]["large"]["name"] == "reference"
    json.dumps(report, allow_nan=False)


def test_backend_record_of_an_impossible_choice_says_why():
    from nmgrad_cli.metrics import mc_backends

    rec = mc_backends("2:8", ["mvue"], backend="fused")["mvue"]
    assert rec["choice"] == "fused" and "no fused kernel for mvue 2:8" in rec["error"]


def test_evaluate_parses_its_pattern_once_not_per_record(monkeypatch, tmp_path):
    """evaluate passes its config's Pattern to every prune and GEMM-metric call: no N:M string is
    parsed per record (the dump has X and W, so the GEMM path runs too)."""
    from _dumps import make_mlp_dump

    from nmgrad_cli.evaluate import EvalConfig, evaluate

    dump = make_mlp_dump(tmp_path / "d.h5", steps=2)
    config = EvalConfig(methods=("mvue", "greedy"), samples=2, axis="both")
    assert config.parsed_pattern is config.parsed_pattern

    parses = count_pattern_parses(monkeypatch)
    report = evaluate([dump], config)
    assert len(report.records) >= 6 and parses.calls == 0


def test_train_config_json_records_the_gemm_routes(tmp_path):
    from nmgrad_cli.backend import GEMM_ROUTES
    from nmgrad_cli.train.trainer import TrainConfig, train

    cfg = TrainConfig(model="mlp", steps=1, batch_size=4, eval_batches=1, backend="reference", device="cpu")
    GEMM_ROUTES.clear()
    train(cfg, tmp_path / "cpu")
    resolved = json.loads((tmp_path / "cpu" / "config.json").read_text())["resolved"]
    assert resolved["gemm_routes"] == [] and "dense GEMM" in resolved["gemm_routes_note"]
    # what the CUDA path decides (sparse_backward records it in the process table) reaches config.json
    GEMM_ROUTES.record((64, 4096, 4096, torch.bfloat16, "cuda:0"), "dense", "auto: measured slower sparse", 2.0, 1.0)
    try:
        train(cfg, tmp_path / "routes")
        dense = TrainConfig(model="mlp", method="dense", steps=1, batch_size=4, eval_batches=1, device="cpu")
        train(dense, tmp_path / "dense")
    finally:
        GEMM_ROUTES.clear()
    routes = json.loads((tmp_path / "routes" / "config.json").read_text())["resolved"]["gemm_routes"]
    assert routes == [{"shape": [64, 4096, 4096], "dtype": "bfloat16", "route": "dense",
                       "reason": "auto: measured slower sparse", "sparse_ms": 2.0, "dense_ms": 1.0}]
    assert "gemm_routes" not in json.loads((tmp_path / "dense" / "config.json").read_text())["resolved"]
