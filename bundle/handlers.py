"""Ignite handlers for latent-diffusion training: EMA weights, gradient clipping, sample grids, final model export."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines.utils import IterationEvents
from torch import nn

from bundle.checkpoints import load_checkpoint, save_model
from bundle.utils import atomic_path, unwrap_network

__all__ = [
    "EMAHandler",
    "GradientClipHandler",
    "SampleGridHandler",
    "GenePanelState",
    "ProgressBar",
    "make_ema",
    "save_pair_grid",
]


def make_ema(network: nn.Module) -> nn.Module:
    """A frozen copy of ``network`` to hold exponential-moving-average weights (in eval mode)."""
    ema = copy.deepcopy(network)
    ema.requires_grad_(False)
    return ema.eval()


class EMAHandler:
    """Keep an exponential moving average of a network's weights, updated after every optimiser step.

    ``ema = decay * ema + (1 - decay) * weights`` for floating-point parameters and buffers (other buffers are
    copied). Sampling uses the EMA copy, as in DDPM/LDM training. The EMA network is an ordinary module, so it is saved
    and restored by ``CheckpointSaver``/``CheckpointLoader`` like the network itself.

    Args:
        network: the network being trained.
        ema_network: its copy from :func:`make_ema`.
        decay: EMA decay per iteration. Defaults to 0.999.
        start_iteration: before this iteration the EMA copy follows the weights exactly (warm-up). Defaults to 0.
    """

    def __init__(
        self, network: nn.Module, ema_network: nn.Module, decay: float = 0.999, start_iteration: int = 0
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}.")
        self.network, self.ema_network = network, ema_network
        self.decay, self.start_iteration = decay, start_iteration

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine) -> None:
        decay = self.decay if engine.state.iteration >= self.start_iteration else 0.0
        source = unwrap_network(self.network)
        ema_state = self.ema_network.state_dict()
        for name, value in source.state_dict().items():
            target = ema_state[name]
            if target.dtype.is_floating_point:
                target.lerp_(value.to(target.dtype), 1.0 - decay)
            else:
                target.copy_(value)


class GradientClipHandler:
    """Clip the gradient norm between ``backward`` and the optimiser step (``IterationEvents.BACKWARD_COMPLETED``).

    With AMP the gradients are unscaled first, so the threshold applies to true gradient values.

    Args:
        max_norm: maximum total gradient norm. Defaults to 1.0.
    """

    def __init__(self, max_norm: float = 1.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}.")
        self.max_norm = max_norm

    def attach(self, engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)
        engine.state.metrics["grad_norm"] = float(norm)


class GenePanelState:
    """The gene panel as a checkpoint entry: saved with the weights, checked when a checkpoint is loaded.

    Put it in a ``CheckpointSaver``'s ``save_dict`` and a ``CheckpointLoader``'s ``load_dict``; loading a checkpoint
    trained on another panel raises, naming the genes that differ.

    Args:
        genes: the panel of the data in use.
        normalization: how expression was normalised (recorded, not checked).
    """

    def __init__(self, genes: Sequence[str], normalization: dict | None = None) -> None:
        self.genes = [str(g) for g in genes]
        self.normalization = dict(normalization or {})

    def state_dict(self) -> dict[str, Any]:
        return {"genes": list(self.genes), "normalization": dict(self.normalization)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from bundle.io.gene_panel import check_gene_panel

        check_gene_panel(list(state["genes"]), self.genes, what="the dataset's gene panel (against the checkpoint's)")


class SampleGridHandler:
    """Every ``interval`` iterations, generate patches for fixed validation spots and save them next to the real ones.

    The grid has two rows per group of spots: real patches on top, generated ones (same spots, fixed seed) below.
    It is written as ``<output_dir>/samples/grid_iter<iteration>.png`` (and ``grid_latest.png``) and, when a tracking
    URI is given, logged as an artifact of the open MLflow run named ``run_name`` (the run the stage's
    ``MLFlowHandler`` opened: the configs pass the same ``tracking_uri``, ``experiment_name`` and ``run_name`` ids).

    Args:
        sampler: callable ``sampler(condition, generator=...) -> (B, 3, H, W)`` images in [0, 1]
            (:class:`bundle.sampling.pipeline.ExpressionToTissuePipeline`).
        images: real patches ``(B, 3, H, W)`` in [-1, 1] (as the training transforms make them).
        condition: the same spots' conditions ``(B, ...)``.
        output_dir: folder for ``samples/``.
        interval: iterations between grids. Defaults to 500.
        seed: seed of the sampling generator (same seed, same grid for the same weights). Defaults to 0.
        tracking_uri: MLflow tracking URI; None logs nothing.
        experiment_name: MLflow experiment of the run.
        run_name: name of the run that receives the PNGs (the most recent unfinished run of that name).
        columns: spots per row. Defaults to 8.
    """

    def __init__(
        self,
        sampler: Callable[..., torch.Tensor],
        images: torch.Tensor,
        condition: torch.Tensor,
        output_dir: str | os.PathLike,
        interval: int = 500,
        seed: int = 0,
        tracking_uri: str | None = None,
        experiment_name: str = "st_ldm",
        run_name: str | None = None,
        columns: int = 8,
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1 iteration, got {interval}.")
        self.sampler, self.images, self.condition = sampler, images, condition
        self.output_dir = Path(output_dir) / "samples"
        self.interval, self.seed, self.columns = interval, seed, columns
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.last_path: Path | None = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self._final)

    def _final(self, engine) -> None:
        if self.last_path is None or f"iter{engine.state.iteration}." not in self.last_path.name:
            self(engine)

    def __call__(self, engine) -> Path:
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        generated = self.sampler(self.condition, generator=generator).float().cpu()
        real = ((self.images.float().cpu() + 1.0) / 2.0).clamp(0, 1)
        path = self.output_dir / f"grid_iter{engine.state.iteration}.png"
        save_pair_grid(real, generated, path, self.columns)
        with atomic_path(self.output_dir / "grid_latest.png") as tmp:
            shutil.copyfile(path, tmp)
        self.last_path = path
        self._log_artifact(path)
        return path

    def _log_artifact(self, path: Path) -> None:
        """Log ``path`` into the open MLflow run named ``run_name``, found the way ``MLFlowHandler`` finds it."""
        if self.tracking_uri is None or self.run_name is None:
            return
        from mlflow import MlflowClient
        from mlflow.entities import RunStatus

        client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            return
        runs = [r for r in client.search_runs(experiment.experiment_id) if r.info.run_name == self.run_name]
        runs = [r for r in runs if r.info.status == RunStatus.to_string(RunStatus.RUNNING)]
        if runs:
            client.log_artifact(runs[0].info.run_id, str(path), artifact_path="samples")


def save_pair_grid(real: torch.Tensor, generated: torch.Tensor, path: str | os.PathLike, columns: int = 8) -> Path:
    """Save real (top) and generated (below) ``(B, 3, H, W)`` [0, 1] patches as one PNG grid, atomically."""
    from bundle.sampling.grids import pair_rows, save_image_grid

    return save_image_grid(pair_rows(real, generated, columns), path, rows_per_group=2)


class ProgressBar:
    """A tqdm progress bar over each epoch's iterations that shows the loss (ignite's ``ProgressBar``).

    Args:
        output_transform: maps ``engine.state.output`` to the shown value. Defaults to the ``"loss"`` entry.
        enabled: set False on non-zero ranks.
    """

    def __init__(self, output_transform: Callable | None = None, enabled: bool = True) -> None:
        from monai.handlers import from_engine

        self.output_transform = output_transform or from_engine(["loss"], first=True)
        self.enabled = enabled

    def attach(self, engine) -> None:
        if not self.enabled:
            return
        from ignite.handlers import ProgressBar as _Bar

        _Bar(persist=False).attach(engine, output_transform=self._loss)

    def _loss(self, output) -> dict[str, float]:
        value = self.output_transform(output)
        if isinstance(value, (tuple, list)):  # from_engine([...]) returns one value per key
            value = value[0]
        return {"loss": float(value.detach()) if isinstance(value, torch.Tensor) else float(value)}


class ResumableCheckpointSaver:
    """Atomic checkpoints of everything needed to resume training, the trainer's own state included.

    Every ``save_interval`` epochs, ``save_dict`` plus the trainer (iteration, epoch) is written with ignite's
    ``Checkpoint`` to ``<save_dir>/<file_prefix>_<iteration>.pt`` through a temporary file and a rename, so a run
    killed while saving keeps its previous checkpoint intact (MONAI's ``CheckpointSaver`` writes in place). A config
    cannot put ``@train#trainer`` in the save dict of one of the trainer's own handlers (a circular reference), so the
    engine is added when the handler is attached.

    Args:
        save_dir: checkpoint folder.
        save_dict: objects with ``state_dict()`` to save (network, EMA network, optimiser, ...).
        save_interval: epochs between checkpoints. Defaults to 1.
        n_saved: checkpoints kept (older ones are deleted). Defaults to 1.
        file_prefix: file name prefix. Defaults to ``"checkpoint"``.
        trainer_key: key of the trainer's state in the checkpoint. Defaults to ``"trainer"``.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        save_interval: int = 1,
        n_saved: int = 1,
        file_prefix: str = "checkpoint",
        trainer_key: str = "trainer",
    ) -> None:
        if save_interval < 1 or n_saved < 1:
            raise ValueError(f"save_interval and n_saved must be >= 1, got {save_interval} and {n_saved}.")
        self.save_dir, self.save_dict, self.trainer_key = str(save_dir), dict(save_dict), trainer_key
        self.save_interval, self.n_saved, self.file_prefix = save_interval, n_saved, file_prefix
        self.checkpoint = None

    def attach(self, engine) -> None:
        from ignite.engine import Events
        from ignite.handlers import Checkpoint, DiskSaver

        self.checkpoint = Checkpoint(
            to_save={**self.save_dict, self.trainer_key: engine},
            save_handler=DiskSaver(self.save_dir, require_empty=False, atomic=True),
            filename_pattern=f"{self.file_prefix}_{{global_step}}.{{ext}}",
            n_saved=self.n_saved,
            global_step_transform=lambda e, _: e.state.iteration,
        )
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self._save)

    def _save(self, engine) -> None:
        self.checkpoint(engine)
        engine.logger.info(f"saved checkpoint {self.checkpoint.last_checkpoint} at iteration {engine.state.iteration}")


class ResumeCheckpointLoader:
    """Load a checkpoint written by :class:`ResumableCheckpointSaver` at the start of training, trainer state included.

    Does nothing when ``load_path`` is None (a fresh run). When attached, the file is checked with
    :func:`bundle.checkpoints.load_checkpoint` (memory-mapped, so cheap): an empty, truncated or foreign file, one
    holding code, or one without the objects to restore is refused naming the file, before training starts. Loading
    then uses MONAI's ``CheckpointLoader`` (``torch.load(..., weights_only=True)``); a :class:`GenePanelState` in
    ``load_dict`` refuses a checkpoint trained on another gene panel.

    Args:
        load_path: checkpoint file, or None.
        load_dict: objects to restore (the same keys as saved, without the trainer).
        trainer_key: key of the trainer's state. Defaults to ``"trainer"``.
        map_location: device mapping for ``torch.load``.
    """

    def __init__(
        self, load_path: str | None, load_dict: dict, trainer_key: str = "trainer", map_location: Any = None
    ) -> None:
        self.load_path, self.load_dict, self.trainer_key, self.map_location = (
            load_path,
            dict(load_dict),
            trainer_key,
            map_location,
        )

    def attach(self, engine) -> None:
        if self.load_path is None:
            return
        from monai.handlers import CheckpointLoader

        hint = (
            f"delete it to resume from an older checkpoint in {str(Path(self.load_path).parent)!r} (or to start "
            "afresh when there is none)"
        )
        keys = [*self.load_dict, self.trainer_key]
        load_checkpoint(self.load_path, "resume checkpoint", hint, map_location="cpu", mmap=True, required=keys)

        loader = CheckpointLoader(
            self.load_path, {**self.load_dict, self.trainer_key: engine}, map_location=self.map_location
        )
        loader.attach(engine)
        engine.logger.info(f"resuming from {self.load_path}")


class FinalModelSaver:
    """On ``COMPLETED``, export the (EMA) network to ``models/model.pt`` with its gene panel and scale factor.

    Args:
        path: destination (``<bundle_root>/models/model.pt``).
        network: the network to export (the EMA copy).
        genes: gene panel.
        scale_factor: latent scale factor.
        extra: more entries to store.
        enabled: set False on non-zero ranks.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        network: nn.Module,
        genes: Sequence[str],
        scale_factor: float,
        extra: dict[str, Any] | None = None,
        enabled: bool = True,
    ) -> None:
        self.path, self.network, self.genes, self.scale_factor = path, network, genes, scale_factor
        self.extra, self.enabled = dict(extra or {}), enabled

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        if self.enabled:
            save_model(
                self.path,
                self.network,
                self.genes,
                self.scale_factor,
                {**self.extra, "iteration": engine.state.iteration},
            )
