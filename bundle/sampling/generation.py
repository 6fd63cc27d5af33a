"""Generation: load a trained model, read spots' expression, generate one H&E patch per spot, write PNGs + manifest.

``configs/inference.json`` wires these pieces into a MONAI ``SupervisedEvaluator``: :func:`bundle.io.spots.read_spots`
reads a Space Ranger folder, an ``.h5ad`` or a CSV and normalises it like the training data, :func:`spot_datalist`
makes one dictionary per spot (condition with neighbours, seed), :class:`PipelineInferer` runs the
:class:`~bundle.sampling.pipeline.ExpressionToTissuePipeline` of :func:`load_pipeline` with one seeded generator per
spot, and :class:`PatchWriter` writes the PNGs and ``manifest.csv`` into a staging folder that becomes the output
folder only when everything is written. :func:`read_inference_config` merges the configs for the scripts.

Under ``torchrun`` (``configs/multi_gpu_inference.json``), :func:`shard_datalist` gives each rank its batches of spots,
every :class:`PatchWriter` writes into rank 0's staging folder, and rank 0 writes the one manifest and commits the folder
once every rank has finished (:func:`run_generation` also lets a rank without spots take part).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer
from torch import nn

from bundle.distributed import broadcast_object, gather_objects, rank, rank0_first, shard, world_size
from bundle.io.spots import SpotExpression
from bundle.sampling.grids import to_uint8
from bundle.sampling.pipeline import ExpressionToTissuePipeline, seeded_generators
from bundle.utils import StagingDir, check_writable, jsonable, no_space_errors

logger = logging.getLogger(__name__)


def load_pipeline(
    model_path: str | os.PathLike,
    autoencoder_path: str | os.PathLike,
    network: nn.Module,
    scheduler,
    device: str | torch.device = "cpu",
    num_inference_steps: int = 50,
    guidance_scale: float | None = 3.0,
    eta: float = 0.0,
    architecture: dict[str, Any] | None = None,
    batched_guidance: bool = True,
    expression_guidance_scale: float = 0.0,
    expression_reader_path: str | os.PathLike | None = None,
) -> ExpressionToTissuePipeline:
    """Build an :class:`ExpressionToTissuePipeline` from the two model-zoo checkpoints.

    Args:
        model_path: ``models/model.pt`` (EMA weights, gene panel, scale factor, latent shape).
        autoencoder_path: ``models/autoencoder.pt`` (the autoencoder is built from the settings it records).
        network: the config's ``network_def`` (weights are loaded into it; a mismatch is refused with the names).
        scheduler: a MONAI scheduler configured like training (``num_train_timesteps``, schedule, prediction type).
        device: where to run.
        num_inference_steps: default denoising steps.
        guidance_scale: default classifier-free guidance scale.
        eta: DDIM noise.
        architecture: the config's architecture settings, compared with the ones training recorded.
        batched_guidance: CFG as one batched forward (default) or two.
        expression_guidance_scale: step size of expression guidance (:mod:`bundle.expression_guidance`); 0 (default)
            is off and reads no reader.
        expression_reader_path: ``models/expression_reader.pt`` of the same training run; read only when
            ``expression_guidance_scale`` > 0 (refused when it was made for another panel or autoencoder).
    """
    from bundle.autoencoder import load_autoencoder_checkpoint
    from bundle.checkpoints import load_model

    info = load_model(model_path, network, architecture=architecture)
    prediction = info.get("prediction_type")
    if prediction is not None and getattr(scheduler, "prediction_type", prediction) != prediction:
        raise ValueError(
            f"{str(model_path)!r} was trained with prediction_type={prediction!r} but the scheduler uses "
            f"{scheduler.prediction_type!r}; set prediction_type to {prediction!r}."
        )
    autoencoder, scale_factor = load_autoencoder_checkpoint(autoencoder_path, map_location=device)
    if abs(scale_factor - float(info["scale_factor"])) > 1e-6 * max(1.0, abs(scale_factor)):
        raise ValueError(
            f"{str(autoencoder_path)!r} (scale factor {scale_factor:.6g}) is not the autoencoder that {str(model_path)!r} "
            f"was trained with (scale factor {float(info['scale_factor']):.6g}); use the pair from the same training run."
        )
    network = network.to(device).eval()
    for module in (network, autoencoder):
        module.requires_grad_(False)
    pipeline = ExpressionToTissuePipeline(
        network,
        autoencoder,
        scheduler,
        scale_factor=scale_factor,
        latent_shape=info["latent_shape"],
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        eta=eta,
        batched_guidance=batched_guidance,
    )
    if expression_guidance_scale:
        from bundle.expression_guidance import load_expression_reader

        if expression_reader_path is None:
            raise ValueError(
                "expression_guidance_scale > 0 needs expression_reader_path (models/expression_reader.pt)."
            )
        reader = load_expression_reader(expression_reader_path, info["gene_panel"], scale_factor, device)
        pipeline.set_expression_guidance(reader, expression_guidance_scale)
    pipeline.info = info
    return pipeline


def read_inference_config(config_files: Sequence[str | os.PathLike], overrides: Mapping[str, Any] | None = None):
    """The bundle configs merged in order (later files override earlier ones), with the ``overrides`` that are not None.

    The scripts take the pipeline, the spots and the settings from it, as ``configs/inference.json`` defines them.

    Returns:
        a ``monai.bundle.ConfigParser``.
    """
    from monai.bundle import ConfigParser

    missing = [str(f) for f in config_files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"config file(s) {missing} do not exist; pass existing files to --config-file.")
    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    for key, value in (overrides or {}).items():
        if value is not None:
            parser[key] = value
    return parser


def build_conditions(spots: SpotExpression, num_neighbors: int, indices: Sequence[int] | None = None) -> torch.Tensor:
    """The model's conditions ``(N, 1 + K, G)``: each spot followed by its ``K`` neighbours (as ``SpatialContextd``).

    A missing neighbour (``-1``: off the array, not in tissue, or no positions at all) is filled with the spot's own
    expression, as in training.

    Args:
        spots: from :func:`bundle.io.spots.read_spots`.
        num_neighbors: the model's ``num_neighbors`` (0: the spot alone, ``(N, 1, G)``).
        indices: rows of ``spots`` to build conditions for (default: all); neighbours may be any spot of ``spots``.
    """
    expression = torch.from_numpy(np.asarray(spots.expression, dtype=np.float32))
    rows = np.arange(len(spots)) if indices is None else np.asarray(indices, dtype=np.int64)
    centre = expression[torch.from_numpy(rows)]
    if num_neighbors == 0:
        return centre[:, None].clone()
    out = centre[:, None].repeat(1, 1 + num_neighbors, 1)
    if spots.neighbors is None:
        return out
    neighbors = np.asarray(spots.neighbors, dtype=np.int64)
    if neighbors.ndim != 2 or neighbors.shape[1] != num_neighbors:
        raise ValueError(
            f"the model uses {num_neighbors} neighbouring spots but the input gives {neighbors.shape[-1]} per spot "
            "(6 on the Visium hex lattice); use a model trained with num_neighbors 6 or 0."
        )
    chosen = neighbors[rows]
    present = chosen >= 0
    if present.any():
        centre_index, slot = np.nonzero(present)
        out[torch.from_numpy(centre_index), torch.from_numpy(slot + 1)] = expression[torch.from_numpy(chosen[present])]
    return out


EVERY_SPOT = ("all", "none", "null")


def parse_num_spots(value: Any, key: str = "num_spots") -> int | None:
    """A number of spots as a config or the command line gives it: a positive count, or None for every spot.

    MONAI's command line drops an override whose value is None (``--num_spots None`` leaves the config's default), so
    every spot is also written ``0`` or ``"all"`` (``"none"``/``"null"`` too, in any case).

    Args:
        value: the setting.
        key: its name, for the message.

    Raises:
        ValueError: naming the setting and the value, for anything else (negative, fractional, other text).
    """
    if value is None:
        return None
    count = value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in EVERY_SPOT:
            return None
        count = int(text) if text.isdigit() else None
    elif isinstance(value, float) and value.is_integer():
        count = int(value)
    if isinstance(count, (int, np.integer)) and not isinstance(count, bool) and count >= 0:
        return int(count) or None
    raise ValueError(
        f"{key} must be a positive number of spots, or 0 or 'all' for every spot (--{key} all), got {value!r}."
    )


def select_spots(
    spots: SpotExpression, spot_ids: Sequence[str] | str | None = None, num_spots: int | None = None
) -> np.ndarray:
    """Rows of ``spots`` to generate: the ones named in ``spot_ids`` (in that order), else all; at most ``num_spots``.

    ``num_spots`` keeps that many spots spread evenly over the selection (in input order), so a preview of a slide
    covers all of it; None, 0 or ``"all"`` keeps all (:func:`parse_num_spots`).
    """
    if spot_ids is not None:
        spot_ids = [spot_ids] if isinstance(spot_ids, str) else [str(s) for s in spot_ids]
        index = {s: i for i, s in enumerate(spots.ids)}
        unknown = [s for s in spot_ids if s not in index]
        if unknown:
            raise ValueError(
                f"{len(unknown)} requested spot(s) are not in {spots.source or 'the input'}: {unknown[:10]}; ids look "
                f"like {spots.ids[:3]} (in-tissue spots only)."
            )
        rows = np.asarray([index[s] for s in dict.fromkeys(spot_ids)], dtype=np.int64)
    else:
        rows = np.arange(len(spots), dtype=np.int64)
    num_spots = parse_num_spots(num_spots)
    if num_spots is not None and num_spots < len(rows):
        rows = rows[np.unique(np.linspace(0, len(rows) - 1, num_spots).round().astype(np.int64))]
    if len(rows) == 0:
        raise ValueError(f"no spot selected from {spots.source or 'the input'}.")
    return rows


def spot_seeds(seed: int, indices: Sequence[int]) -> list[int]:
    """Per-spot seeds: ``seed + the spot's row in the input``, so a spot keeps its patch in any subset or batch."""
    return [int(seed) + int(i) for i in indices]


def load_gene_sets(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """The built-in gene sets, plus (overriding them) those of a JSON or GMT file when ``path`` is given."""
    from bundle.sampling.edits import builtin_gene_sets, read_gene_sets

    sets = builtin_gene_sets()
    if path:
        sets.update(read_gene_sets(path))
    return sets


def _as_list(value: Sequence[str] | str | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def spot_datalist(
    spots: SpotExpression,
    num_neighbors: int,
    seed: int = 0,
    spot_ids: Sequence[str] | str | None = None,
    num_spots: int | None = None,
    edits: Sequence[str] | str | None = None,
    gene_sets: Mapping[str, Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """One dictionary per spot to generate, for a MONAI ``Dataset``.

    Each holds ``condition`` (``(1 + K, G)`` float32, edits applied to the spot and its neighbours), ``spot_id``,
    ``spot_index`` (row in the input), ``seed`` (``seed + spot_index``), ``sample``, ``x_um``/``y_um`` (NaN when
    unknown) and ``edits`` (``;``-joined).

    Args:
        spots: from :func:`bundle.io.spots.read_spots`.
        num_neighbors: the model's ``num_neighbors``.
        seed: base seed.
        spot_ids: ids to generate (default: all), see :func:`select_spots`.
        num_spots: at most this many spots, spread over the selection.
        edits: counterfactual edits (``"immune*4"``, ``"CD3E=2"``; :mod:`bundle.sampling.edits`) applied to every spot.
        gene_sets: named gene sets the edits may use (default: the built-in ones).
    """
    from bundle.sampling.edits import apply_edits, parse_edit, resolve_edit

    rows = select_spots(spots, spot_ids, num_spots)
    conditions = build_conditions(spots, num_neighbors, rows)
    if spots.neighbors is None and num_neighbors > 0:
        logger.info(
            f"{spots.source or 'the input'} gives no spot positions: each spot stands in for its {num_neighbors} "
            "missing neighbours, as SpatialContextd does for spots at the tissue edge."
        )
    edits = [str(parse_edit(e)) for e in _as_list(edits)]
    if edits:
        sets = load_gene_sets() if gene_sets is None else gene_sets
        for edit in edits:
            touched = [spots.genes[i] for i in resolve_edit(parse_edit(edit), spots.genes, sets)]
            logger.info(f"edit {edit}: {len(touched)} gene(s) {touched[:12]}{' ...' if len(touched) > 12 else ''}")
        conditions = torch.from_numpy(apply_edits(conditions.numpy(), spots.genes, edits, sets))
    positions = spots.positions_um
    items = []
    for k, (row, spot_seed) in enumerate(zip(rows, spot_seeds(seed, rows))):
        items.append(
            {
                "condition": conditions[k],
                "spot_id": spots.ids[row],
                "spot_index": int(row),
                "seed": spot_seed,
                "sample": spots.sample,
                "x_um": float(positions[row, 0]) if positions is not None else float("nan"),
                "y_um": float(positions[row, 1]) if positions is not None else float("nan"),
                "edits": ";".join(edits),
            }
        )
    return items


def shard_datalist(items: Sequence[Mapping[str, Any]], block: int = 1) -> list[dict[str, Any]]:
    """This rank's share of :func:`spot_datalist` under ``torchrun``; all of it in a single process.

    Blocks of ``block`` spots (the batch size) are dealt round-robin (:func:`bundle.distributed.shard`), so each rank runs
    exactly the batches one process would run, with the same per-spot seeds. Each item gets ``position``, its place in
    ``items``: :class:`PatchWriter` writes the manifest rows of all ranks in that order. A rank may get no spot (more
    ranks than batches); :func:`run_generation` lets it still take its part in the writing.
    """
    return [{**items[i], "position": i} for i in shard(len(items), block=block)]


def default_input(demo_dir: str | os.PathLike, fov_um: float = 128.0) -> str:
    """The demo study's validation sample (its Space Ranger folder), generating the demo study on first use (by rank 0
    first under torchrun: every rank must call it)."""
    from bundle.io.dataset import read_manifest
    from bundle.training import ensure_demo_dataset

    rank0_first(ensure_demo_dataset, demo_dir, fov_um=fov_um)
    rows = read_manifest(Path(demo_dir) / "raw" / "manifest.csv")
    row = next((r for r in rows if r.split == "val"), rows[-1])
    logger.info(f"no --input given: generating for the demo study's validation sample {row.sample_id} ({row.st_path}).")
    return str(row.st_path)


def select_scheduler(name: str, **schedulers: Any) -> Any:
    """The scheduler called ``name`` (case-insensitive) among ``schedulers``, e.g. ``ddim=..., ddpm=...``."""
    key = str(name).lower()
    if key not in schedulers:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(schedulers)} (--scheduler).")
    return schedulers[key]


class SpotPrepareBatch:
    """``prepare_batch`` for a ``SupervisedEvaluator`` over :func:`spot_datalist` items.

    Returns ``(condition, None, (), {"seeds": [...]})``, so the inferer gets each spot's seed.
    """

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None, tuple, dict[str, Any]]:
        condition = torch.as_tensor(batchdata["condition"], dtype=torch.float32)
        condition = condition.to(device=device, non_blocking=non_blocking)
        return condition, None, (), {"seeds": [int(s) for s in batchdata["seed"]]}


class PipelineInferer(Inferer):
    """Inferer that generates patches with an :class:`ExpressionToTissuePipeline`, one seeded generator per spot.

    Args:
        pipeline: the sampling pipeline (:func:`load_pipeline`).
        num_inference_steps: denoising steps (default: the pipeline's).
        guidance_scale: classifier-free guidance scale (default: the pipeline's; 1.0 = none).
        progress: show a progress bar over the denoising steps of each batch.
    """

    def __init__(
        self,
        pipeline: ExpressionToTissuePipeline,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        progress: bool = False,
    ) -> None:
        self.pipeline, self.num_inference_steps, self.guidance_scale = pipeline, num_inference_steps, guidance_scale
        self.progress = progress

    def __call__(
        self, inputs: torch.Tensor, network: Any = None, *args: Any, seeds: Sequence[int] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Patches ``(B, 3, H, W)`` in [0, 1] for conditions ``inputs``; ``network`` is the pipeline's own."""
        generator = seeded_generators(seeds) if seeds is not None else None
        return self.pipeline(
            inputs,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=generator,
            progress=self.progress,
        )


def patch_filename(index: int, spot_id: str) -> str:
    """``<index>_<id>.png`` with characters other than letters, digits, ``.``, ``-`` and ``_`` replaced."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(spot_id)).strip("._") or "spot"
    return f"{int(index):06d}_{safe[:80]}.png"


MANIFEST_SPOT_COLUMNS = ("spot_id", "png", "sample", "spot_index", "seed", "x_um", "y_um", "edits")


class PatchWriter:
    """Ignite handler that writes each generated patch as a PNG and, at the end, ``manifest.csv``.

    Everything is written into a hidden staging folder next to ``output_dir`` (``.<name>.partial-*``), which is
    renamed to ``output_dir`` only after the last patch and the manifest are written; on an error it is deleted. So
    ``output_dir`` is either the complete result or untouched. An existing ``output_dir`` is replaced only when it is
    empty or holds a previous result (a ``manifest.csv``); otherwise the run is refused before anything is generated.

    ``manifest.csv`` has one row per patch: ``spot_id``, ``png`` (file name in ``output_dir``), ``sample``,
    ``spot_index`` (row in the input), ``seed``, ``x_um``, ``y_um``, ``edits``, then the ``metadata`` entries
    (guidance scale, steps, scheduler, checkpoint paths, ...). ``generation.json`` records the same settings for the
    whole run.

    With a process group of several ranks (``configs/multi_gpu_inference.json``), the writers of all ranks act as one:
    rank 0 checks ``output_dir`` and makes the staging folder, every rank writes its PNGs into it, and at the end rank
    0 gathers the manifest rows (ordered by the ``position`` :func:`shard_datalist` gives each spot), writes the
    manifest and renames the folder. When any rank fails, rank 0 deletes the staging folder and every rank raises: the
    ``output_dir`` is untouched. Only rank 0 shows a progress bar.

    Args:
        output_dir: folder to create.
        metadata: run settings added to every manifest row and to ``generation.json``.
        progress: show a progress bar over the spots.
        pred_key: key of the generated images in ``engine.state.output``. Defaults to ``"pred"``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        metadata: Mapping[str, Any] | None = None,
        progress: bool = True,
        pred_key: str = "pred",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.metadata = dict(metadata or {})
        self.progress, self.pred_key = progress, pred_key
        self.staging: Path | None = None
        self._stage = None  # the bundle.utils.StagingDir behind ``staging``
        self.rows: list[dict[str, Any]] = []
        self._positions: list[int | None] = []  # each row's place among all ranks' spots (see shard_datalist)
        self._joined = False  # True while the ranks share rank 0's staging folder (the last collective is pending)
        self._bar = None
        self._start = 0.0

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def check_output_dir(self) -> None:
        """Refuse an ``output_dir`` that cannot be written, and an existing one that is neither empty nor a previous
        result."""
        out = self.output_dir
        check_writable(out, "generation output_dir")
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"output_dir {str(out)!r} is a file; choose a folder (--output_dir).")
        if out.is_dir() and any(out.iterdir()) and not (out / "manifest.csv").is_file():
            raise FileExistsError(
                f"output_dir {str(out)!r} exists and holds files that are not a previous generation (no manifest.csv); "
                "choose another --output_dir or empty it."
            )

    def started(self, engine) -> None:
        self.rows, self._positions, self._joined = [], [], False
        self._start = time.perf_counter()
        if world_size() > 1:
            self._share_staging()
        else:
            self.staging = self._create_staging()
        total = len(getattr(engine.data_loader, "dataset", []) or []) or None
        if self.progress and rank() == 0:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="generating", unit="spot")

    def _create_staging(self) -> Path:
        self.check_output_dir()
        # stale staging folders of killed runs are removed (and logged); an ordinary folder (umask permissions)
        self._stage = StagingDir(self.output_dir, "generation output_dir")
        return self._stage.create()

    def _share_staging(self) -> None:
        """Rank 0 makes the staging folder and tells every rank where it is (or why it could not)."""
        path, error = None, None
        if rank() == 0:
            try:
                path = str(self._create_staging())
            except Exception as err:  # the other ranks wait in the broadcast below: tell them
                error = err
        path, message = broadcast_object((path, None if error is None else f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(
                f"rank 0 could not prepare the generation output_dir {str(self.output_dir)!r}: {message}"
            )
        self.staging, self._joined = Path(path), True

    def write(self, engine) -> None:
        from PIL import Image

        batch = engine.state.batch
        images = engine.state.output[self.pred_key]
        for i in range(images.shape[0]):
            spot_id, index = str(batch["spot_id"][i]), int(batch["spot_index"][i])
            name = patch_filename(index, spot_id)
            Image.fromarray(to_uint8(images[i])).save(self.staging / name, format="PNG")
            row = {
                "spot_id": spot_id,
                "png": name,
                "sample": str(batch["sample"][i]),
                "spot_index": index,
                "seed": int(batch["seed"][i]),
                "x_um": _number(batch["x_um"][i]),
                "y_um": _number(batch["y_um"][i]),
                "edits": str(batch["edits"][i]),
            }
            self.rows.append({**row, **self.metadata})
            self._positions.append(int(batch["position"][i]) if "position" in batch else None)
        if self._bar is not None:
            self._bar.update(images.shape[0])

    def completed(self, engine) -> None:
        self._close_bar()
        if self._joined:
            self._finish_shared(engine, None)
            return
        self._write_manifest(engine, self.rows)

    def _write_manifest(self, engine, rows: list[dict[str, Any]]) -> None:
        """Write ``manifest.csv`` and ``generation.json`` into the staging folder and rename it to ``output_dir``."""
        columns = list(MANIFEST_SPOT_COLUMNS) + [k for k in self.metadata if k not in MANIFEST_SPOT_COLUMNS]
        # plain writes: nothing in the staging folder is visible under output_dir before the rename below
        with (self.staging / "manifest.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        seconds = time.perf_counter() - self._start
        summary = {**jsonable(self.metadata), "num_patches": len(rows), "seconds": round(seconds, 2)}
        if world_size() > 1:
            summary["world_size"] = world_size()
        (self.staging / "generation.json").write_text(json.dumps(summary, indent=2) + "\n")
        self._stage.commit()
        self._stage, self.staging = None, None
        engine.logger.info(
            f"wrote {len(rows)} patches and manifest.csv to {self.output_dir} in {seconds:.1f} s "
            f"({seconds / max(1, len(rows)):.2f} s per patch)."
        )

    def _finish_shared(self, engine, error: BaseException | None) -> None:
        """The ranks' last collective: rank 0 gathers every rank's rows (or failure), writes the manifest and commits,
        or deletes the staging folder when a rank failed; then tells the others. Raises on ranks other than the
        failing one when nothing was committed (the failing rank re-raises its own error)."""
        self._joined = False
        failure = None if error is None else f"{type(error).__name__}: {error}"
        parts = gather_objects({"rows": self.rows, "positions": self._positions, "error": failure})
        own_error, outcome = None, None
        if parts is not None:
            try:
                failed = {r: part["error"] for r, part in enumerate(parts) if part["error"]}
                if failed:
                    raise RuntimeError(
                        f"generation failed on rank(s) {failed}; nothing was written to {self.output_dir}."
                    )
                self._write_manifest(engine, merge_rank_rows(parts))
            except Exception as err:  # the other ranks wait in the broadcast below: tell them
                self._discard()
                own_error, outcome = err, f"{type(err).__name__}: {err}"
        outcome = broadcast_object(outcome)
        self.staging = None
        if error is not None:
            return
        if own_error is not None:
            raise own_error
        if outcome is not None:
            raise RuntimeError(f"rank 0 did not write the generation output_dir {str(self.output_dir)!r}: {outcome}")

    def exception_raised(self, engine, error: BaseException) -> None:
        """Delete the staging folder and re-raise (ignite only re-raises when no handler is registered); a full disk
        is re-raised naming ``output_dir``. Under torchrun the other ranks learn of the failure and commit nothing."""
        self._close_bar()
        if self._joined:
            self._finish_shared(engine, error)
        self._discard()
        with no_space_errors(self.output_dir, "the generation output_dir"):
            raise error

    def _discard(self) -> None:
        if self._stage is not None:
            self._stage.discard()
            self._stage, self.staging = None, None

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def merge_rank_rows(parts: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The manifest rows of all ranks (``parts[r]``: ``{"rows": [...], "positions": [...]}``) in the order of their
    ``position`` (:func:`shard_datalist`), i.e. the order one process writes them.

    Raises:
        ValueError: when rows carry no position (the datalist was not sharded) or a position comes twice.
    """
    pairs = [(position, row) for part in parts for position, row in zip(part["positions"], part["rows"])]
    if any(position is None for position, _ in pairs):
        raise ValueError(
            "the ranks' spots carry no 'position': the datalist was not sharded with "
            "bundle.sampling.generation.shard_datalist, so every rank would write every spot; run with "
            "configs/multi_gpu_inference.json layered last."
        )
    positions = [position for position, _ in pairs]
    if len(set(positions)) != len(positions):
        raise ValueError("several ranks generated the same spot; shard the datalist once (shard_datalist).")
    return [row for _, row in sorted(pairs, key=lambda pair: pair[0])]


def run_generation(evaluator, handlers: Sequence[Any] = ()) -> None:
    """``evaluator.run()``, except on a rank whose share of the spots is empty (more ranks than batches), where MONAI
    would skip the run: there the :class:`PatchWriter` handlers still take their part in the ranks' shared writing."""
    if len(evaluator.data_loader) > 0:
        evaluator.run()
        return
    logger.info(f"rank {rank()} of {world_size()} has no spot to generate (more ranks than batches); it only joins.")
    for writer in [h for h in handlers if isinstance(h, PatchWriter)]:
        try:
            writer.started(evaluator)
            writer.completed(evaluator)
        except Exception as error:
            writer.exception_raised(evaluator, error)


def _number(value: Any) -> float | str:
    value = float(value)
    return "" if math.isnan(value) else round(value, 3)
