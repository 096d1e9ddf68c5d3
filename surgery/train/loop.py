"""Caffe's training loop (``Solver::Solve``/``Step``/``Test``) over the torch export.

:class:`Trainer` builds the TRAIN net and the TEST nets with :func:`surgery.export.torch.to_torch`
(the test nets share the train net's blobs by layer name, as Caffe's
``ShareTrainedLayersWith``), the data feeds (:mod:`surgery.train.feed`), and the optimizer
(:mod:`surgery.train.optim`) over :func:`surgery.export.torch.param_groups`. Per iteration,
as ``Solver::Step``:

1. test every ``test_interval`` iterations (at 0 only with ``test_initialization``): each
   test net runs ``test_iter`` batches, every output is averaged over them;
2. ``iter_size`` forward/backward passes accumulate the gradients; the loss is their mean,
   smoothed over the last ``average_loss`` iterations for display;
3. every ``display`` iterations print Caffe's lines (``Iteration N (...), loss = X``,
   ``Train net output #k: ...``, ``Iteration N, lr = X``) and a progress line;
4. the update (rate from the lr policy at ``iter``), ``iter += 1``;
5. snapshot every ``snapshot`` iterations; after training (``snapshot_after_train``).

A NaN or infinite loss stops training with an error naming the iteration and the last
snapshot written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from ..errors import SolverError
from ..net import Net
from . import schedule
from .feed import Feed, make_feeds
from .optim import CaffeOptimizer, make_optimizer
from .snapshot import (
    blob_table,
    check_writable,
    history_blobs,
    learnable_order,
    net_with_weights,
    restore_history,
    snapshot_paths,
)
from .solver import SolverConfig, load_solver

__all__ = ["Trainer"]

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _g(x: float) -> str:
    """A number as Caffe's ``std::ostream <<`` prints a float (6 significant digits)."""
    return f"{float(np.float32(x)):.6g}"


def _outputs(out: Any, model: Any) -> list[tuple[str, torch.Tensor]]:
    """The net's outputs in Caffe's order (blob names sorted: Caffe keeps a std::set)."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    skip = getattr(inner, "total_loss_key", None)
    if isinstance(out, torch.Tensor):
        return [(inner.output_names[0], out)]
    return sorted((k, v) for k, v in out.items() if k != skip)


class Trainer:
    """Caffe's solver in PyTorch.

    Args:
        solver: a ``solver.prototxt`` path or a :class:`~surgery.train.solver.SolverConfig`.
        weights: caffemodel(s) copied into the net by layer name before training, in order
            (``caffe train -weights a,b``); a comma-separated string or a list. The solver's own
            ``weights`` come first.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (default: CUDA when available and the
            solver says ``solver_mode: GPU``, at ``device_id``; else CPU).
        datasets: the user's own data for TRAIN data layers, by layer name (a map-style
            ``Dataset`` giving one array per top, or an iterable of batches).
        test_datasets: the same for the TEST nets' data layers.
        amp: ``"bf16"`` or ``"fp16"`` autocast (fp16 with a gradient scaler).
        compile: ``torch.compile`` the nets.
        channels_last: 4-D activations and weights in channels-last memory format.
        max_iter: overrides the solver's ``max_iter``.
        log: where Caffe's lines go (default: stdout; nothing on ranks other than 0).
        log_json: a file to append one JSON object per display and per test.
        workers: data-loading worker processes per data layer.
        rank, world_size: this process in a torchrun job (see
            :mod:`surgery.train.distributed`); the train net is wrapped in
            ``DistributedDataParallel`` when ``world_size > 1``.

    Attributes:
        model: the TRAIN ``GraphModule`` (what the optimizer updates).
        test_models: one ``GraphModule`` per test net (sharing the model's blobs).
        optimizer: the :class:`~surgery.train.optim.CaffeOptimizer`.
        iter: Caffe's ``iter_``: updates done.

    Raises:
        SolverError: the solver, the weights or the data are refused (one line each).
    """

    def __init__(
        self,
        solver: str | os.PathLike[str] | SolverConfig,
        weights: str | Sequence[str] | None = None,
        device: str | torch.device | None = None,
        *,
        datasets: Mapping[str, Any] | None = None,
        test_datasets: Mapping[str, Any] | None = None,
        amp: str | None = None,
        compile: bool = False,
        channels_last: bool = False,
        max_iter: int | None = None,
        log: Callable[[str], None] | None = None,
        log_json: str | os.PathLike[str] | TextIO | None = None,
        workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = True,
    ) -> None:
        from ..export.torch import param_groups, to_torch

        cfg = solver if isinstance(solver, SolverConfig) else load_solver(solver)
        if max_iter is not None:
            cfg = cfg.with_overrides(max_iter=int(max_iter))
        self.cfg = cfg
        self.rank, self.world_size = int(rank), int(world_size)
        self._print = log if log is not None else (print if self.rank == 0 else None)
        self._json: TextIO | None = None
        if log_json is not None and self.rank == 0:
            self._json = (open(log_json, "a", encoding="utf-8")  # noqa: SIM115
                          if isinstance(log_json, str | os.PathLike) else log_json)
        if amp not in (None, "bf16", "fp16"):
            raise SolverError(f"--amp must be bf16 or fp16, not {amp!r}")
        self.amp = amp
        self.progress = progress
        seed = cfg.random_seed if cfg.random_seed >= 0 else None
        if seed is not None:
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
        self.device = self._pick_device(device)
        for note in cfg.notes:
            self.log(note)
        net = cfg.train_net
        given = weights.split(",") if isinstance(weights, str) else list(weights or [])
        wlist = list(cfg.weights) + [w for w in given if w]
        for w in wlist:
            net = self._copy_weights(net, w)
        self.net = net
        # TRAIN net
        self.feeds = make_feeds(net, cfg.train_state, datasets=datasets, rank=self.rank,
                                world_size=self.world_size, seed=seed, workers=workers)
        shapes = self._shapes(self.feeds)
        self.model = to_torch(net, cfg.train_state, shapes, missing="fill",
                              seed=0 if seed is None else seed, metrics=True)
        if self.model.total_loss_key is None:
            raise SolverError(f"{net.source or 'the train net'}: no loss layer in TRAIN; "
                              "nothing to train")
        self.batch_size = next((t.shape[0] for f in self.feeds for t in f.peek()[:1]), 1)
        # TEST nets, sharing the TRAIN blobs by layer name
        self.test_feeds: list[list[Feed]] = []
        self.test_models: list[torch.nn.Module] = []
        for tnet, tstate in zip(cfg.test_nets, cfg.test_states, strict=True):
            feeds = make_feeds(tnet, tstate, datasets=test_datasets, seed=seed, workers=workers)
            if tnet is cfg.train_net:
                tnet = net
            gm = to_torch(tnet, tstate, self._shapes(feeds), missing="fill",
                          seed=0 if seed is None else seed, lower_losses=True, metrics=True)
            self._share(gm)
            self.test_feeds.append(feeds)
            self.test_models.append(gm)
        self.model.to(self.device)
        for gm in self.test_models:
            gm.to(self.device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        groups = param_groups(self.model, cfg.base_lr, cfg.weight_decay)
        self.optimizer: CaffeOptimizer = make_optimizer(cfg.type, groups,
                                                        **cfg.optimizer_kwargs())
        self._train_module: torch.nn.Module = self.model
        if self.world_size > 1:
            from .distributed import wrap_ddp

            self._train_module = wrap_ddp(self.model, self.device)
        if compile:
            self._train_module = torch.compile(self._train_module)
            self._test_modules = [torch.compile(m) for m in self.test_models]
        else:
            self._test_modules = list(self.test_models)
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None
        self.iter = 0
        self.smoothed_loss = 0.0
        self._losses: list[float] = []
        self._start_iter = 0
        self.last_snapshot: Path | None = None
        self.stop_requested: str | None = None  # "snapshot" or "stop" (signals)
        self._stopped_early = False
        self._t_last = time.perf_counter()
        self._iter_last = 0
        self._t0 = time.perf_counter()
        self._iter0 = 0

    # -- set-up helpers -----------------------------------------------------------------------
    def _pick_device(self, device: str | torch.device | None) -> torch.device:
        if device is not None:
            dev = torch.device(device)
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise SolverError(f"--device {device}: CUDA is not available here; use cpu")
            if dev.type == "cuda" and self.world_size > 1 and dev.index is None:
                # torchrun: init_from_env set this process's GPU (its LOCAL_RANK)
                dev = torch.device("cuda", torch.cuda.current_device())
            return dev
        if self.cfg.solver_mode == "GPU" and torch.cuda.is_available():
            if self.world_size > 1:
                return torch.device("cuda", torch.cuda.current_device())
            return torch.device("cuda", self.cfg.device_id % torch.cuda.device_count())
        return torch.device("cpu")

    def _copy_weights(self, net: Net, path: str) -> Net:
        from ..ops.transplant import transplant

        if not Path(path).is_file():
            raise SolverError(f"--weights {path}: no such file")
        self.log(f"Copying weights from {path}")
        new, _ = transplant(net, path)
        return new

    @staticmethod
    def _shapes(feeds: list[Feed]) -> dict[str, tuple[int, ...]]:
        return {top: tuple(t.shape) for f in feeds for top, t in zip(f.tops, f.peek(),
                                                                       strict=True)}

    def _share(self, gm: torch.nn.Module) -> None:
        """Point ``gm``'s blobs at the train net's of the same layer (Caffe's sharing)."""
        train = blob_table(self.model)
        names = getattr(gm, "caffe_names", {})
        for key, entry in names.items():
            if entry.get("blob") is None:
                continue
            ref = train.get((entry["layer"], int(entry["blob"])))
            if ref is None:
                continue
            mod_name, _, attr_name = key.rpartition(".")
            mod = gm.get_submodule(mod_name) if mod_name else gm
            mine = getattr(mod, attr_name)
            if tuple(mine.shape) != tuple(ref.tensor.shape):
                raise SolverError(
                    f"layer {entry['layer']!r}: blob {entry['blob']} is "
                    f"{tuple(mine.shape)} in the test net and {tuple(ref.tensor.shape)} in the "
                    "train net; Caffe shares blobs by layer name, so they must agree")
            if attr_name in mod._parameters:
                mod._parameters[attr_name] = ref.tensor  # type: ignore[assignment]
            else:
                mod._buffers[attr_name] = ref.tensor

    # -- output -------------------------------------------------------------------------------
    def log(self, line: str) -> None:
        """One line of Caffe's output (rank 0 only)."""
        if self._print is not None:
            self._print(line)

    def _log_json(self, obj: dict[str, Any]) -> None:
        if self._json is not None:
            self._json.write(json.dumps(obj) + "\n")
            self._json.flush()

    # -- one pass -----------------------------------------------------------------------------
    def _inputs(self, model: Any, feeds: list[Feed]) -> list[torch.Tensor]:
        inner = getattr(model, "module", model)
        inner = getattr(inner, "_orig_mod", inner)
        by_top: dict[str, torch.Tensor] = {}
        for f in feeds:
            for top, t in zip(f.tops, f.next(), strict=True):
                by_top[top] = t
        args = []
        for name in inner.input_names:
            t = by_top[name].to(self.device, torch.float32, non_blocking=True)
            if self.channels_last and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            args.append(t)
        return args

    def _autocast(self) -> Any:
        if self.amp is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=_AMP[self.amp])

    # -- Caffe's Test --------------------------------------------------------------------------
    def test(self, index: int | None = None) -> list[dict[str, Any]]:
        """Run the test net(s) as Caffe's ``TestAll``/``Test``: ``test_iter`` batches each,
        every output averaged over them. Returns one ``{name: mean}`` dict per test net (a
        list for multi-value outputs)."""
        results = []
        ids = range(len(self.test_models)) if index is None else [index]
        for i in ids:
            results.append(self._test_one(i))
        return results

    @torch.no_grad()
    def _test_one(self, i: int) -> dict[str, Any]:
        self.log(f"Iteration {self.iter}, Testing net (#{i})")
        gm, module = self.test_models[i], self._test_modules[i]
        gm.eval()
        n = self.cfg.test_iter[i]
        scores: list[np.ndarray] | None = None
        names: list[str] = []
        loss = np.float32(0)
        total_key = gm.total_loss_key
        for _ in range(n):
            with self._autocast():
                out = module(*self._inputs(gm, self.test_feeds[i]))
            outs = _outputs(out, gm)
            vals = [v.detach().float().reshape(-1).cpu().numpy() for _, v in outs]
            if self.cfg.test_compute_loss and total_key is not None:
                loss += np.float32(out[total_key].item())
            if scores is None:
                scores, names = [v.astype(np.float32) for v in vals], [k for k, _ in outs]
            else:
                for s, v in zip(scores, vals, strict=True):
                    s += v
        if self.cfg.test_compute_loss:
            self.log(f"Test loss: {_g(loss / np.float32(n))}")
        result: dict[str, Any] = {}
        k = 0
        for name, s in zip(names, scores or [], strict=True):
            w = gm.loss_weights.get(name, 0.0)
            means = s / np.float32(n)
            for m in means:
                extra = f" (* {_g(w)} = {_g(np.float32(w) * m)} loss)" if w else ""
                self.log(f"    Test net output #{k}: {name} = {_g(m)}{extra}")
                k += 1
            result[name] = float(means[0]) if means.size == 1 else [float(x) for x in means]
        self._log_json({"iter": self.iter, "phase": "test", "net": i, "outputs": result})
        return result

    # -- Caffe's Step --------------------------------------------------------------------------
    def _update_smoothed(self, loss: float) -> None:
        avg = self.cfg.average_loss
        if len(self._losses) < avg:
            self._losses.append(loss)
            size = len(self._losses)
            self.smoothed_loss = (self.smoothed_loss * (size - 1) + loss) / size
        else:
            idx = (self.iter - self._start_iter) % avg
            self.smoothed_loss += (loss - self._losses[idx]) / avg
            self._losses[idx] = loss

    def rate(self) -> float:
        """The lr policy's rate at the current iteration."""
        return schedule.learning_rate(self.cfg.lr_policy, self.iter, **self.cfg.lr_kwargs())

    def _forward_backward(self) -> tuple[torch.Tensor, Any]:
        module = self._train_module
        self.model.train()
        total = torch.zeros((), device=self.device)
        out: Any = None
        key = self.model.total_loss_key
        n = self.cfg.iter_size
        for i in range(n):
            sync: Any = contextlib.nullcontext()
            if self.world_size > 1 and i < n - 1 and hasattr(module, "no_sync"):
                sync = module.no_sync()
            with sync:
                with self._autocast():
                    out = module(*self._inputs(self.model, self.feeds))
                loss = out[key]
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            total += loss.detach().float()
        return total / n, out

    def step(self, iters: int) -> None:
        """Run ``iters`` iterations (Caffe's ``Solver::Step``)."""
        start = self.iter
        stop = self.iter + int(iters)
        self._losses.clear()
        self.smoothed_loss = 0.0
        self._start_iter = start
        self._t_last, self._iter_last = time.perf_counter(), self.iter
        self._t0, self._iter0 = self._t_last, self.iter
        cfg = self.cfg
        while self.iter < stop:
            self.optimizer.zero_grad(set_to_none=True)
            if (cfg.test_interval and self.iter % cfg.test_interval == 0
                    and (self.iter > 0 or cfg.test_initialization) and self.rank == 0):
                self.test()
            display = bool(cfg.display) and self.iter % cfg.display == 0
            loss_t, out = self._forward_backward()
            loss = float(loss_t.item())
            if not math.isfinite(loss):
                last = (f"the last snapshot is {self.last_snapshot} (resume with --snapshot "
                        f"{self.last_snapshot.with_suffix('.solverstate')})"
                        if self.last_snapshot else "no snapshot was written")
                raise SolverError(f"iteration {self.iter}: the loss is {loss}; training "
                                  f"stopped; {last}. Lower base_lr or check the data")
            self._update_smoothed(loss)
            if display:
                self._display(out)
            rate = self.rate()
            if display:
                self.log(f"Iteration {self.iter}, lr = {_g(rate)}")
                self._log_json({"iter": self.iter, "loss": self.smoothed_loss, "lr": rate,
                                "outputs": self._train_outputs(out)})
            self.optimizer.set_rate(rate)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.iter += 1
            self.optimizer.iteration = self.iter
            request = self.stop_requested
            if self.rank == 0 and ((cfg.snapshot and self.iter % cfg.snapshot == 0)
                                   or request == "snapshot"):
                self.snapshot()
            if request is not None:
                self._stopped_early = True
                break

    def _train_outputs(self, out: Any) -> dict[str, Any]:
        res: dict[str, Any] = {}
        for name, v in _outputs(out, self.model):
            flat = v.detach().float().reshape(-1).cpu().tolist()
            res[name] = flat[0] if len(flat) == 1 else flat
        return res

    def _display(self, out: Any) -> None:
        now = time.perf_counter()
        lapse = now - self._t_last
        per_s = (self.iter - self._iter_last) / (lapse or 1)
        self.log(f"Iteration {self.iter} ({_g(per_s)} iter/s, {_g(lapse)}s/{self.cfg.display} "
                 f"iters), loss = {_g(self.smoothed_loss)}")
        self._t_last, self._iter_last = now, self.iter
        k = 0
        for name, v in _outputs(out, self.model):
            w = self.model.loss_weights.get(name, 0.0)
            for x in v.detach().float().reshape(-1).cpu().tolist():
                extra = f" (* {_g(w)} = {_g(np.float32(w) * np.float32(x))} loss)" if w else ""
                self.log(f"    Train net output #{k}: {name} = {_g(x)}{extra}")
                k += 1
        if self.progress and self.iter > self._iter0:
            done, total = self.iter, self.cfg.max_iter
            its = (self.iter - self._iter0) / max(now - self._t0, 1e-9)
            imgs = its * self.batch_size * self.cfg.iter_size * self.world_size
            left = (total - done) / its if its > 0 else float("inf")
            eta = time.strftime("%H:%M:%S", time.gmtime(left)) if math.isfinite(left) else "?"
            bar = "#" * int(20 * done / max(total, 1))
            self.log(f"    [{bar:<20}] {done}/{total} iters, {imgs:.1f} images/s, "
                     f"{eta} left")

    # -- Caffe's Solve -------------------------------------------------------------------------
    def solve(self) -> None:
        """Train to ``max_iter`` as ``Solver::Solve``: snapshot after training, a last
        display and test at the end."""
        cfg = self.cfg
        if self.rank == 0 and (cfg.snapshot or cfg.snapshot_after_train):
            check_writable(cfg.snapshot_prefix)
        self.log(f"Solving {self.net.name}")
        self.log(f"Learning Rate Policy: {cfg.lr_policy}")
        self._stopped_early = False
        self.step(cfg.max_iter - self.iter)
        if (cfg.snapshot_after_train and self.rank == 0 and not self._stopped_early
                and (not cfg.snapshot or self.iter % cfg.snapshot != 0)):
            self.snapshot()
        if self._stopped_early:
            self.log("Optimization stopped early.")
            return
        if cfg.display and self.iter % cfg.display == 0:
            with torch.no_grad(), self._autocast():
                self.model.train()
                out = self.model(*self._inputs(self.model, self.feeds))
            self._update_smoothed(float(out[self.model.total_loss_key].item()))
            self.log(f"Iteration {self.iter}, loss = {_g(self.smoothed_loss)}")
        if cfg.test_interval and self.iter % cfg.test_interval == 0 and self.rank == 0:
            self.test()
        self.log("Optimization Done.")

    # -- snapshots -----------------------------------------------------------------------------
    def current_net(self) -> Net:
        """The train net with the current weights (what a snapshot writes)."""
        return net_with_weights(self.net, self.model)

    def snapshot(self, prefix: str | None = None) -> tuple[Path, Path]:
        """Write ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate`` (atomically)."""
        from .. import _atomic
        from ..caffe_io import save, write_solver_state

        prefix = prefix or self.cfg.snapshot_prefix
        model_path, state_path = snapshot_paths(prefix, self.iter)
        net = self.current_net()
        hist = history_blobs(self.optimizer, self.model, net, self.cfg.train_state)
        step = schedule.current_step(self.cfg.lr_policy, max(self.iter - 1, 0),
                                     stepsize=self.cfg.stepsize, stepvalue=self.cfg.stepvalue)
        self.log(f"Snapshotting to binary proto file {model_path}")
        self.log(f"Snapshotting solver state to binary proto file {state_path}")
        with _atomic.outputs():  # both files or neither
            save(net, weights=model_path)
            write_solver_state(state_path, iter=self.iter, learned_net=str(model_path),
                               history=hist, current_step=step)
        self.last_snapshot = model_path
        return model_path, state_path

    def restore(self, path: str | os.PathLike[str]) -> None:
        """Resume from a Caffe ``.solverstate`` (``caffe train -snapshot``): the iteration,
        the history blobs and, when the state names one, the learned caffemodel.

        Raises:
            SolverError: the history disagrees with the net; the caffemodel is missing.
        """
        from ..caffe_io import read_solver_state

        where = str(path)
        st = read_solver_state(path)
        net = self.current_net()
        if st["learned_net"]:
            learned = Path(st["learned_net"])
            if not learned.is_file() and not learned.is_absolute():
                alt = Path(path).parent / learned.name
                learned = alt if alt.is_file() else learned
            if not learned.is_file():
                raise SolverError(f"{where}: its learned_net {st['learned_net']!r} does not "
                                  "exist; put the caffemodel next to the solverstate")
            net = self._copy_weights(net, str(learned))
            self._load_net_into_model(net)
        restore_history(self.optimizer, self.model, net, self.cfg.train_state, st["history"],
                        where)
        self.iter = int(st["iter"])
        self.optimizer.iteration = self.iter
        self.log(f"Restored solver state from {where} at iteration {self.iter}")

    @torch.no_grad()
    def _load_net_into_model(self, net: Net) -> None:
        for (layer, i), ref in blob_table(self.model).items():
            lay = next((x for x in net.layers if x.name == layer), None)
            if lay is None or i >= len(lay.params) or lay.params[i].data is None:
                continue
            data = np.array(lay.params[i].data, np.float32)
            if ref.transform and lay.type == "BatchNorm" and len(lay.params) > 2:
                f = float(np.asarray(lay.params[2].data).reshape(-1)[0])
                data = data / f if f else np.zeros_like(data)
            ref.tensor.copy_(torch.from_numpy(data.reshape(ref.tensor.shape)))
        self.net = net

    def learnable_blobs(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """Caffe's ``learnable_params()`` order of the train net: (layer, blob, shape)."""
        return learnable_order(self.current_net(), self.cfg.train_state)

    def close(self) -> None:
        if self._json is not None and self._json is not sys.stdout:
            self._json.close()
            self._json = None

