"""Atomic file writes, and the resumable checkpoint beside a MegaDetector results file.

With ``every`` set, ``<output>.checkpoint.json`` is rewritten every ``every``
files (a video counts as one), atomically (temp file, fsync, ``os.replace``),
as ``{"info", "detection_categories", "checkpoint": [entries]}``
(MegaDetector's ``load_checkpoint`` reads it too). A run whose output has a
checkpoint beside it resumes from it, skipping the files it lists, if it was
written by the same weights and options; otherwise the run is refused. The
checkpoint is removed once the output is written, itself atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from monitor.errors import ConfigError, MonitorError
from monitor.megadetector_format import Header, MdImage, Results, document

CHECKPOINT_SUFFIX = ".checkpoint.json"


def checkpoint_path(output: Path) -> Path:
    """Where the checkpoint of ``output`` lies: beside it, ``results.json.checkpoint.json``."""
    return output.with_name(output.name + CHECKPOINT_SUFFIX)


def write_atomic(path: Path, chunks: Iterable[str]) -> None:
    """Write ``chunks`` to ``path`` through a temporary file beside it: readers see the old file or the new.

    Raises:
        MonitorError: The file cannot be written.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())  # the data is on disk before the rename makes it the file
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MonitorError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Checkpoint:
    """``<output>.checkpoint.json``: the entries done so far, to resume from.

    Args:
        path: The checkpoint file.
        every: Files between writes, or None to never write one (one found is still resumed).
    """

    def __init__(self, path: Path, every: int | None) -> None:
        self.path = path
        self.every = every
        self._since = 0

    def restore(self, header: Header, results: Results) -> int:
        """Add the checkpoint's entries to ``results``, if there is a checkpoint; how many.

        Raises:
            ConfigError: The checkpoint is unreadable, or was written with other weights,
                options or categories than ``header`` says (each difference is listed).
        """
        if not self.path.exists():
            return 0
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                [f"checkpoint {self.path}: unreadable ({exc}); delete it to start over"]
            ) from exc
        entries = data.get("checkpoint") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ConfigError([f"checkpoint {self.path}: no checkpoint list; delete it to start over"])
        differences = _differences(_identity(header.model_dump(mode="json")), _identity(data))
        if differences:
            raise ConfigError(
                [f"checkpoint {self.path} was written by another run: {d}" for d in differences]
                + ["use the same model and options to resume, or delete the checkpoint to start over"]
            )
        try:
            for item in entries:
                results.add(MdImage.model_validate(item))
        except (ValidationError, ValueError) as exc:
            raise ConfigError(
                [f"checkpoint {self.path}: invalid entry ({exc}); delete it to start over"]
            ) from exc
        return len(entries)

    def done(self, header: Header, results: Results) -> None:
        """Count one more file done; write the checkpoint when ``every`` were done since the last write."""
        if self.every is None:
            return
        self._since += 1
        if self._since >= self.every:
            write_atomic(self.path, document(header, "checkpoint", results.serialised()))
            self._since = 0

    def remove(self) -> None:
        """Delete the checkpoint (the output is complete)."""
        self.path.unlink(missing_ok=True)


def _identity(data: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it: ``info.monitor`` and the categories."""
    info = data.get("info")
    monitor = info.get("monitor") if isinstance(info, dict) else None
    return {
        **(monitor if isinstance(monitor, dict) else {"monitor": monitor}),
        "detection_categories": data.get("detection_categories"),
        "classification_categories": data.get("classification_categories"),
    }


def _differences(run: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    return [
        f"{key} {saved.get(key)!r} there, {run.get(key)!r} here"
        for key in sorted(set(run) | set(saved))
        if run.get(key) != saved.get(key)
    ]
