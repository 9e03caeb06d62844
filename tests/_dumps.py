"""Dumps built with DumpWriter from a real tiny model's backward pass (used until capture exists).

The neural gradient dY of each layer is taken with a hook on the layer's output tensor; the input X
with a forward hook; the weight W as it was during the forward pass.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nmgrad_cli.dump import DumpWriter

IN, HIDDEN, OUT = 12, 10, 6
BATCH, SEQ = 3, 5  # T = 15 tokens: not a multiple of 4, and F = 10 is not either (padding both ways)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUT))


def capture(model: nn.Module, batch: torch.Tensor, target: torch.Tensor, steps: int) -> list[dict]:
    """Per step: {layer name: {"grad": dY, "input": X, "weight": W, "module": module}} of every
    Linear/Conv2d, from ``steps`` SGD steps of cross-entropy on a fixed batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    out = []

    def hook(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        seen[name]["input"] = x.detach().clone()
        y.register_hook(lambda dy: seen[name].__setitem__("grad", dy.detach().clone()))  # dY = dL/dY

    for _ in range(steps):
        seen: dict[str, dict] = {n: {"module": m, "weight": m.weight.detach().clone()} for n, m in layers.items()}
        handles = []
        for name, mod in layers.items():
            handles.append(mod.register_forward_hook(lambda m, inp, o, name=name: hook(name, inp[0], o)))
        logits = model(batch)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        for h in handles:
            h.remove()
        out.append(seen)
    return out


def write_dump(path: Path, steps: list[dict], dtype=torch.float32, with_inputs: bool = True, **kw) -> Path:
    with DumpWriter(path, run={"model": "tiny", "seed": 0}, **kw) as w:
        for step, layers in enumerate(steps):
            for name, rec in layers.items():
                mod = rec["module"]
                conv = isinstance(mod, nn.Conv2d)
                g = rec["grad"]
                w.add_layer(
                    name, type(mod).__name__, feature_axis=1 if conv else -1,
                    token_axes=[0, 2, 3] if conv else list(range(g.dim() - 1)),
                    weight_shape=tuple(mod.weight.shape),
                )
                w.write(name, "grad", step, 0, g.to(dtype))
                if with_inputs:
                    w.write(name, "input", step, 0, rec["input"].to(dtype))
                    w.write(name, "weight", step, 0, rec["weight"].to(dtype))
            w.step_done(step)
    return path


def mlp_steps(steps: int = 2, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    batch = torch.randn(BATCH, SEQ, IN, generator=gen)
    target = torch.randint(0, OUT, (BATCH, SEQ), generator=gen)
    return capture(mlp(seed), batch, target, steps)


def make_mlp_dump(path: Path, steps: int = 2, dtype=torch.float32, with_inputs: bool = True) -> Path:
    """A dump of a 2-layer MLP (layers "0": 12->10 and "2": 10->6) on a fixed batch of 3x5 tokens."""
    return write_dump(path, mlp_steps(steps), dtype, with_inputs)


def make_conv_dump(path: Path) -> Path:
    """A dump of Conv2d(3, 8, 3) -> flatten -> Linear, one step, with inputs and weights."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(2, 3, 6, 6, generator=gen)
    target = torch.randint(0, 5, (2,), generator=gen)
    return write_dump(path, capture(model, batch, target, 1))
