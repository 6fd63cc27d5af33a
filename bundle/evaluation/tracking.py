"""MLflow tracking of an evaluation: one run with the summary numbers, the settings and the report files.

mlflow is imported when a run is logged.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["log_to_mlflow", "log_evaluation"]


def log_to_mlflow(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    metrics: Mapping[str, float],
    params: Mapping[str, Any],
    artifacts: Sequence[str | os.PathLike] = (),
) -> str:
    """Record an evaluation as one MLflow run (metrics, parameters, artifacts) and return its run id.

    A new experiment keeps its artifacts in ``mlruns/`` next to a SQLite store, as MONAI's ``MLFlowHandler`` does.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from monai.utils import path_to_uri

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            from urllib.parse import unquote

            location = path_to_uri(Path(unquote(tracking_uri[len("sqlite:///") :])).parent / "mlruns")
        experiment_id = client.create_experiment(experiment_name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags={"stage": "evaluation"})
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        items = [Metric(_safe_metric(k), float(v), now, 0) for k, v in metrics.items()]
        for lo in range(0, len(items), 500):
            client.log_batch(run_id, metrics=items[lo : lo + 500])
        plist = [Param(_safe_metric(k), str(v)[:6000]) for k, v in params.items()]
        for lo in range(0, len(plist), 100):
            client.log_batch(run_id, params=plist[lo : lo + 100])
        for artifact in artifacts:
            if Path(artifact).is_file():
                client.log_artifact(run_id, str(artifact))
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def _safe_metric(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def log_evaluation(
    metrics: Mapping[str, Any],
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    artifacts: Sequence[str | os.PathLike] = (),
) -> str:
    """Log an evaluation's ``metrics`` (the ``metrics.json`` dictionary) as one MLflow run and return its run id.

    Metrics: the summary numbers and each gene's ``ceiling_r/<gene>`` and ``fidelity_r/<gene>``. Parameters: the
    settings with a plain value (and the lists ``edits`` and ``encoders``).
    """
    numbers = dict(metrics["summary"])
    fidelity = metrics.get("fidelity", {})
    for gene, ceiling, generated in zip(
        fidelity.get("genes", []), fidelity.get("ceiling_r", []), fidelity.get("fidelity_r", [])
    ):
        if ceiling is not None:
            numbers[f"ceiling_r/{gene}"] = ceiling
        if generated is not None:
            numbers[f"fidelity_r/{gene}"] = generated
    params = {
        k: v for k, v in metrics["settings"].items() if not isinstance(v, (dict, list)) or k in ("edits", "encoders")
    }
    return log_to_mlflow(tracking_uri, experiment_name, run_name, numbers, params, artifacts)
