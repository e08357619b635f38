"""The ``results.json`` contract of every evaluation, with no torch import.

Written by ``moco-lincls``, ``moco-knn``, the supervised baseline and ``moco-transfer`` (one file
per trial); read by ``moco-report`` and the studies. A record is a JSON object with at least
``task`` (``lincls``, ``knn``, ``supervised``, ``detection``, ``sem_seg``) and ``metrics`` (name -> number),
then the resolved ``config`` and, for pretrained weights, ``checkpoint``, ``checkpoint_sha256`` and
``layout``; tasks add their own entries (``epoch``, ``k``, ``init``, ``trial``, ...; ``moco-transfer``
adds ``pretraining``, the provenance ``moco-convert`` wrote into the weight file, or null).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .files import atomic_write_json

RESULTS_FILE = "results.json"
REQUIRED_KEYS = ("task", "metrics")


def write_results(
    output_dir: str | Path,
    *,
    task: str,
    metrics: dict[str, float],
    config: dict[str, Any],
    weights: dict[str, str] | None = None,
    **extra: Any,
) -> Path:
    """Write ``output_dir/results.json`` atomically; returns its path.

    Args:
        task: what was measured.
        metrics: name -> value.
        config: the resolved config as plain data.
        weights: the pretrained weights' ``checkpoint`` path, ``checkpoint_sha256`` and
            ``layout`` (None: no pretrained weights).
        extra: task-specific entries.
    """
    record: dict[str, Any] = {"task": task, "metrics": metrics, **(weights or {})}
    record.update(config=config, **extra)
    path = Path(output_dir) / RESULTS_FILE
    atomic_write_json(path, record)
    return path


def read_results(path: str | Path) -> dict[str, Any]:
    """The record in ``path``.

    Raises:
        ValueError: naming ``path``: it cannot be read as JSON, is not an object with ``task`` and
            numeric ``metrics``, or has a ``protocol``, ``init``, ``config`` or ``pretraining`` of
            the wrong type.
    """
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} cannot be read as JSON ({err})") from None
    if not isinstance(record, dict) or not all(key in record for key in REQUIRED_KEYS):
        raise ValueError(f"{path} is not a results file (no 'task' and 'metrics')")
    metrics = record["metrics"]
    if not isinstance(metrics, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()
    ):
        raise ValueError(f"{path}: 'metrics' must map names to numbers")
    for key, kind in (("protocol", dict), ("init", str), ("config", dict), ("pretraining", dict)):
        if record.get(key) is not None and not isinstance(record[key], kind):
            raise ValueError(f"{path}: {key!r} must be a {kind.__name__}")
    return record
