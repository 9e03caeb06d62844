"""One training run inside a process group: :func:`run_one` (for :func:`.trainer.train` and
:func:`.compare.compare`), and the ``_Run`` that sets it up, holds the loop's callbacks and sums
it up. The loop itself is :func:`.loop.run_steps` (shared with ``nmgrad capture``)."""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..backend import gemm_route_decisions
from ..capture.config import MODULE_TYPES
from ..capture.hooks import StepRecords
from ..capture.stream import CaptureFile
from ..errors import NmgradError
from ..models import build_task
from ..plan import load as load_plan
from ..progress import Progress
from ..sites import ParamIndex, SiteMode, site_report
from .config import DENSE
from .distributed import DistInfo, all_reduce_sum, rank_seed, wrap_ddp
from .evaluation import accuracy, eval_record
from .loop import StepCallbacks, run_steps
from .records import Hooks, RunSummary, StepTimer, call, step_info
from .run_config import TrainConfig, lr_at
from .run_files import MetricsWriter, capture_path, write_config, write_json
from .signals import CtrlC
from .sparse_grad import SparseGradSites
from .step import autocast


def title(cfg: TrainConfig, compare: bool = False) -> str:
    """loss.png's title: model, what prunes the gradients (the method and pattern, or the plan), steps, seed."""
    what = f"pattern {cfg.pattern}" if compare else cfg.label
    return f"{cfg.model} · {what} · {cfg.steps} steps · seed {cfg.seed}"


def run_one(
    cfg: TrainConfig, out: Path | None, hooks: Hooks, info: DistInfo, device: torch.device, bar: Progress
) -> RunSummary:
    """One run in an existing process group, its files into ``out`` (None: none); for :func:`train`
    and :func:`.compare.compare`."""
    return _Run(cfg, out, hooks, info, device, bar).run()


def checksum(model: nn.Module) -> str:
    """CRC32 of every tensor of ``model``'s state_dict (equal initial weights across a compare)."""
    crc = 0
    for t in model.state_dict().values():
        crc = zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes(), crc)
    return f"{crc:08x}"


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


class _Run:
    """One run: the set-up (task, sites, optimizer, files), the loop's callbacks, the summary."""

    def __init__(self, cfg: TrainConfig, out: Path | None, hooks: Hooks, info: DistInfo, device: torch.device,
                 bar: Progress):
        self.cfg, self.out, self.hooks, self.info, self.device, self.bar = cfg, out, hooks, info, device, bar
        d = cfg.defaults
        self.lr = cfg.lr or d.lr
        self.batch_size = cfg.batch_size or d.batch_size
        # each rank its own data order; DDP broadcasts rank 0's initial weights (= the 1-process run's)
        self.task = build_task(cfg.model, cfg.data, cfg.loss, seed=rank_seed(cfg.seed, info),
                               batch_size=self.batch_size, hf_task=cfg.hf_task)
        self.model = self.task.model.to(device)
        self.checksum = checksum(self.model)
        self.scfg = cfg.sparse_config()
        self.index = ParamIndex(self.model)
        per_site = self.plan = None
        if cfg.plan is not None:  # per-site configs; a plan for another model fails before the first step
            self.plan = load_plan(cfg.plan)
            self.plan.check_model(list(self.index.unique()))
            per_site = self.plan.site_configs(self.scfg)
        self.sites = SparseGradSites(self.scfg, cfg.layers, seed_offset=info.rank, per_site=per_site,
                                     missing=self.plan.missing_error if self.plan else None)
        # --capture: a recorder in front of the sparse-gradient handler records the selected sites' dY
        self.records = (StepRecords(cfg.layers, MODULE_TYPES, cfg.capture_with_inputs, compute=self.sites)
                        if cfg.capture else None)
        self.mode = SiteMode(self.index, self.records.recorder if self.records else self.sites, watch=True)
        self.net = wrap_ddp(self.model, device, info)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise NmgradError("the model has no trainable parameters (all frozen?): train needs a model that trains")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=d.weight_decay)
        self.report = None  # the first step's site report
        self.writer = MetricsWriter(out)
        self.timer = StepTimer(cfg.steps, device)
        self.ctrl_c = CtrlC()
        self.stats: list[float] = []  # this step's all-reduced loss sum, correct, counted, n, Ctrl-C
        self.recent: list[tuple[float, float | None]] = []
        self.keep = max(1, min(20, cfg.steps // 10))
        self.last_eval: dict = {"eval_loss": None, "eval_acc": None}
        self.written = 0
        self.stream = None
        self.recording = False

    # -- what config.json holds ------------------------------------------------------------------
    def layers(self) -> list[str]:
        """The sites that got sparse gradients (or a weight mask) in every call so far."""
        return self.sites.sparse_sites()

    def resolved(self) -> dict:
        """What the config resolved to, for config.json: the one place that fills it."""
        resolved = {"lr": self.lr, "batch_size": self.batch_size, "task": self.task.spec, "kind": self.task.kind,
                    "layers": self.layers()}
        resolved |= {"world_size": self.info.world_size, "device": str(self.device), "torch": torch.__version__}
        resolved["backend"] = self.scfg.backend_record(torch.float32, self.device)  # what prunes dY (backend.py)
        # config.json is written from this dict after the first step and again at the end
        if self.cfg.method != DENSE or self.plan is not None:
            # the sparse-GEMM route per backward GEMM shape (backend.py, this process's: a --compare's
            # runs share them); off CUDA there are none: the pruned dY meets a dense GEMM
            resolved["gemm_routes"] = gemm_route_decisions()
            if not resolved["gemm_routes"]:
                resolved["gemm_routes_note"] = (f"no sparse GEMM on {self.device.type}: every backward GEMM is "
                                                "the pruned dY times a dense GEMM (2:4 sparse GEMMs need CUDA)")
        if self.plan is not None:
            resolved["plan"] = self.plan.record(self.cfg.plan)
            resolved["dense_by_plan"] = list(self.sites.planned_dense)
        if self.report is not None:
            resolved |= self.report.to_dict()  # sites, not_intercepted, ran_dense
            resolved["ran_dense"] = dict(self.sites.fallback)  # a fallback found after the first step too
        return resolved

    def write_config(self) -> None:
        if self.out is not None:
            write_config(self.out, self.cfg, self.resolved())

    # -- the loop's callbacks --------------------------------------------------------------------
    def before(self, step: int) -> bool:
        self.timer.start()
        self.recording = self.records is not None and step % self.cfg.capture_every == 0
        return False

    def start(self, _step: int) -> None:
        if self.recording:
            self.records.recorder.start_step()

    def check(self, output, loss, y) -> bool:  # every rank agrees: all-reduced loss and accuracy
        tensors = isinstance(y, torch.Tensor) and isinstance(output, torch.Tensor)
        acc = accuracy(output.detach(), y) if tensors else None
        self.stats[:] = all_reduce_sum(  # the last: ranks that saw Ctrl-C, so that every rank stops after this step
            [float(loss.detach()), acc[0] if acc else 0.0, acc[1] if acc else 0, 1, float(self.ctrl_c.seen)],
            self.device, self.info,
        )
        return math.isfinite(self.stats[0] / self.stats[3])

    def stop(self, _step: int) -> None:
        if self.records is not None:
            self.records.recorder.stop_step()

    def after_backward(self, step: int) -> None:
        if self.report is None:  # after the first backward: what is selected, what ran dense, what no site covers
            self.report = site_report(self.index, self.mode, list(self.sites.selected.values()), self.cfg.layers,
                                      self.cfg.strict, ran_dense=self.sites.fallback)
            self.mode.watch = False
            self.write_config()
            if self.stream is not None:
                self.stream.set_run(**self.report.to_dict())
            call(self.hooks.sites, self.cfg.label, {"layers": self.layers(), **self.report.to_dict()})
        if self.recording:
            self.records.write(self.stream, step)

    def after(self, step: int) -> bool:
        cfg = self.cfg
        if cfg.weight_pattern and (step + 1) % cfg.weight_every == 0:
            self.sites.refresh_weight_masks_()
        self.timer.stop()
        loss_sum, correct, counted, n, _ = self.stats
        acc_val = correct / counted if counted else None
        record = {
            "step": step + 1,
            "loss": loss_sum / n,
            "acc": acc_val,
            "lr": lr_at(step, cfg.steps, self.lr),
            "steps_per_s": self.timer.steps_per_s,
            "time_s": time.perf_counter() - self.t_start,
        }
        self.writer.write(record)
        self.written = step + 1
        call(self.hooks.step, cfg.label, record)
        self.bar.update(step + 1, step_info(record))
        self.recent = (self.recent + [(loss_sum / n, acc_val)])[-self.keep:]
        is_last = step + 1 == cfg.steps
        if self.task.eval_batches is not None and (is_last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            with self.mode:  # a weight mask applies in evaluation too
                self.last_eval = eval_record(self.model, self.task, self.device, step + 1, cfg.eval_batches)
            self.writer.write(self.last_eval)
            call(self.hooks.eval, cfg.label, self.last_eval)
        return self.stats[4] > 0  # Ctrl-C on some rank: stop here, after a whole step, on every rank

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        cfg = self.cfg
        call(self.hooks.start, cfg.label, cfg.steps)
        self.bar.start(cfg.steps, cfg.label)
        diverged = interrupted = None
        self.t_start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if self.records is not None:
                cap = stack.enter_context(CaptureFile(capture_path(cfg.capture, self.info), handle_signals=False))
                run_meta = {"train": asdict(cfg), "task": self.task.spec, "task_kind": self.task.kind,
                            "rank": self.info.rank, "world_size": self.info.world_size, "device": str(self.device),
                            "every": cfg.capture_every, "recorded_by": "nmgrad train --capture",
                            "backend": self.scfg.backend_record(torch.float32, self.device)}
                self.stream = cap.open(run_meta, "none", 256 << 20)
            callbacks = StepCallbacks(before=self.before, start=self.start, check=self.check, stop=self.stop,
                                      after_backward=self.after_backward, after=self.after)
            try:
                stack.enter_context(self.ctrl_c)
                steps_done, stopped = run_steps(
                    self.net, self.task.train_batches, self.task.loss_fn, self.opt, self.mode, self.device,
                    cfg.steps, callbacks, autocast(self.device, cfg.amp), lambda step: lr_at(step, cfg.steps, self.lr),
                    cfg.defaults.grad_clip, number_from=1,
                )
                if (self.ctrl_c.seen or (self.stats and self.stats[4] > 0)) and steps_done < cfg.steps:
                    interrupted = "SIGINT"
                elif stopped:
                    diverged = (  # step numbers as in metrics.jsonl: 1 is the first step
                        f"loss became {self.stats[0] / self.stats[3]} at step {steps_done + 1}: training diverged;"
                        f" lower --lr (was {self.lr:g}); metrics so far are kept"
                    )
            except KeyboardInterrupt:  # Ctrl-C: the step in progress is dropped, what is done is summarised
                interrupted = "SIGINT"
                steps_done = self.written
            finally:
                self.writer.close()
                self.bar.close()
            if self.stream is not None:
                why = interrupted or ("diverged" if diverged else None)
                self.stream.set_run(stopped=why or "done", steps_run=steps_done, ran_dense=dict(self.sites.fallback),
                                    layers_without_gradients=self.records.silent())
                cap.finish(why)
        self.write_config()  # again: a fallback seen after the first step, or none written (a non-finite first loss)
        summary = self.summary(steps_done, diverged, interrupted)
        if self.out is not None:
            write_json(self.out / "summary.json", asdict(summary))
        call(self.hooks.end, summary)
        return summary

    def summary(self, steps_done: int, diverged: str | None, interrupted: str | None) -> RunSummary:
        cfg, recent = self.cfg, self.recent
        accs = [a for _, a in recent if a is not None]
        return RunSummary(
            label=cfg.label,
            method="plan" if cfg.plan else cfg.method,  # a plan: per-site patterns (config.json resolved.plan)
            pattern="per site" if cfg.plan else cfg.pattern,
            steps_done=steps_done,
            final_train_loss=sum(v for v, _ in recent) / len(recent) if recent else None,
            final_train_acc=sum(accs) / len(accs) if accs else None,
            eval_loss=_finite(self.last_eval.get("eval_loss")),
            eval_acc=self.last_eval.get("eval_acc"),
            eval_ppl=self.last_eval.get("eval_ppl"),
            wall_s=time.perf_counter() - self.t_start,
            steps_per_s=self.timer.steps_per_s,
            steps_per_s_all=self.timer.steps_per_s_all,
            warmup_steps=self.timer.warmup_done,
            diverged=diverged,
            interrupted=interrupted,
            kind=self.task.kind,
            layers=self.layers() if self.report is not None else [],
            ran_dense=list(self.sites.fallback.items()),
            not_intercepted=self.report.not_intercepted if self.report else [],
            init_checksum=self.checksum,
            world_size=self.info.world_size,
            out=str(self.out) if self.out is not None else None,
        )
