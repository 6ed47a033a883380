"""What the model workflow hands back: the model card of a trained model and the validation table.

``ModelCard`` is written next to ``best.pt`` as ``model_card.json`` by
``monitor train``; ``ValReport`` (detection: precision, recall, mAP) and
``ClassifyValReport`` (classification: top-1 and top-5 accuracy) are
``monitor val``'s per-class tables, as JSON or in Ultralytics' fixed-width
layout. Plain values, no Ultralytics: ``monitor.training`` and
``monitor.training_classify`` run Ultralytics and build them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MODEL_CARD = "model_card.json"
_TABLE_NAME = "%22s"
_TABLE_HEADER = _TABLE_NAME + "%11s" * 6
_TABLE_ROW = _TABLE_NAME + "%11i" * 2 + "%11.3g" * 4
_CLASSIFY_HEADER = _TABLE_NAME + "%11s" * 3
_CLASSIFY_ROW = _TABLE_NAME + "%11i" + "%11.3g" * 2


class ModelCard(BaseModel):
    """What a trained ``best.pt`` is and how it came to be; written next to it as ``model_card.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: str = Field(description="File name of the weights this card describes.")
    weights_sha256: str = Field(description="SHA-256 of the weights file (as ``monitor.detector`` logs it).")
    task: Literal["detect", "classify"] = Field(
        "detect", description="What the model does: detect objects, or classify crops."
    )
    classes: list[str] = Field(description="Class names in class-id order.")
    metrics: dict[str, float] = Field(
        description="On the val split: precision, recall, mAP50, mAP50-95 (detect); top1, top5 "
        "accuracy (classify; top5 is 1.0 with five classes or fewer)."
    )
    data: str = Field(description="The data set trained on: a YAML (detect) or a folder (classify).")
    data_sha256: str = Field(
        description="SHA-256 over the data YAML and its train/val image and label files (detect), "
        "or over the image files of the folder's splits (classify)."
    )
    base_model: str = Field(description="Starting point: local .pt weights or a YAML architecture.")
    epochs: int
    imgsz: int
    batch: int
    ultralytics: str = Field(description="Ultralytics version that trained the model.")
    created: datetime = Field(description="When training finished (UTC).")


@dataclass(frozen=True, slots=True)
class ValRow:
    """One line of the validation table: one class, or ``all``.

    Attributes:
        name: Class name, or ``all`` for the whole split.
        images: Images containing the class (all images for ``all``).
        instances: Labelled boxes of the class.
        precision: Box precision at the confidence of best F1.
        recall: Box recall at that confidence.
        map50: Mean average precision at IoU 0.5.
        map50_95: Mean average precision over IoU 0.5 to 0.95.
    """

    name: str
    images: int
    instances: int
    precision: float
    recall: float
    map50: float
    map50_95: float

    def to_dict(self) -> dict[str, Any]:
        """The row with Ultralytics' column names."""
        return {
            "class": self.name,
            "images": self.images,
            "instances": self.instances,
            "precision": self.precision,
            "recall": self.recall,
            "mAP50": self.map50,
            "mAP50-95": self.map50_95,
        }


@dataclass(frozen=True, slots=True)
class ValReport:
    """The per-class table Ultralytics prints after validation.

    Attributes:
        model: The weights validated.
        data: The data set YAML.
        imgsz: Validation size.
        rows: The ``all`` row first, then one per class that has labels in the val split.
    """

    model: str
    data: str
    imgsz: int
    rows: tuple[ValRow, ...]

    def to_json(self) -> str:
        """The report as indented JSON, rows keyed by Ultralytics' column names."""
        return json.dumps(
            {
                "model": self.model,
                "data": self.data,
                "imgsz": self.imgsz,
                "rows": [row.to_dict() for row in self.rows],
            },
            indent=2,
        )


def format_table(report: ValReport) -> str:
    """The report as Ultralytics' fixed-width table (Class Images Instances P R mAP50 mAP50-95)."""
    lines = [_TABLE_HEADER % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")]
    lines += [
        _TABLE_ROW % (row.name, row.images, row.instances, row.precision, row.recall, row.map50, row.map50_95)
        for row in report.rows
    ]
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class ClassifyValRow:
    """One line of the classification table: one class, or ``all``.

    Attributes:
        name: Class name, or ``all`` for the whole split.
        images: Images of the class in the split (all images for ``all``).
        top1: Share of them whose top class is right (for a class: its recall).
        top5: Share of them whose right class is among the top five.
    """

    name: str
    images: int
    top1: float
    top5: float

    def to_dict(self) -> dict[str, Any]:
        """The row as ``class``, ``images``, ``top1``, ``top5``."""
        return {"class": self.name, "images": self.images, "top1": self.top1, "top5": self.top5}


@dataclass(frozen=True, slots=True)
class ClassifyValReport:
    """Top-1 and top-5 accuracy of a classification model on a split, overall and per class.

    Attributes:
        model: The weights validated.
        data: The data set folder.
        imgsz: Validation size.
        rows: The ``all`` row first, then one per class of the split, in class-id order.
    """

    model: str
    data: str
    imgsz: int
    rows: tuple[ClassifyValRow, ...]

    @property
    def top1(self) -> float:
        """Top-1 accuracy over the whole split."""
        return self.rows[0].top1

    @property
    def top5(self) -> float:
        """Top-5 accuracy over the whole split."""
        return self.rows[0].top5

    def to_json(self) -> str:
        """The report as indented JSON: task, overall top1 and top5, and the rows."""
        return json.dumps(
            {
                "model": self.model,
                "data": self.data,
                "imgsz": self.imgsz,
                "task": "classify",
                "top1": self.top1,
                "top5": self.top5,
                "rows": [row.to_dict() for row in self.rows],
            },
            indent=2,
        )


def format_classify_table(report: ClassifyValReport) -> str:
    """The report as a fixed-width table in Ultralytics' layout (Class Images top1_acc top5_acc)."""
    lines = [_CLASSIFY_HEADER % ("Class", "Images", "top1_acc", "top5_acc")]
    lines += [_CLASSIFY_ROW % (row.name, row.images, row.top1, row.top5) for row in report.rows]
    return "\n".join(lines)


def model_card_path(weights: Path) -> Path:
    """Where the model card of ``weights`` lives."""
    return weights.with_name(MODEL_CARD)
