"""The detector: one forward pass for a batch of frames from any cameras.

Weights load through Ultralytics' ``AutoBackend``, so ``.pt`` and exported
formats (ONNX, OpenVINO, TensorRT) work the same. Everything around the
network happens in torch on the model's device instead of per image in numpy:

* a camera's frame arrives letterboxed by its decoder child (``Frame.net``,
  checked against this detector's own geometry), so its full-resolution
  pixels are never read here; other images are letterboxed here (cv2 on the
  CPU; on CUDA uint8 goes to the device as it is, then is flipped to RGB,
  resized and padded there); fp16 on CUDA;
* frames of one shape get Ultralytics' minimal rectangle (e.g. 256x320 for
  4:3 at imgsz 320), mixed shapes share the largest rectangle of the batch;
* NMS runs batched on the device (Ultralytics' ``non_max_suppression``);
  only the kept boxes come back to the CPU, mapped to frame pixels.

Output is one ``sv.Detections`` per frame, built only here, with the class
name (after ``model.labels``) in ``data["class_name"]``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import supervision as sv
import torch
import torch.nn.functional as F

from monitor.detections import trusted
from monitor.errors import DetectorError
from monitor.letterbox import PAD_VALUE, BatchBuffer, Letterboxed, NetInput, Placement, place, put
from monitor.runtime import choose_runtime, exported_model, model_task, resolve_device, sha256_of
from monitor.settings import ModelSettings

logger = logging.getLogger(__name__)

#: Batch sizes compiled ahead with ``model.compile``; a batch is padded up to the next one.
_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _bucket(size: int) -> int:
    return next(b for b in _BUCKETS if b >= size)


@dataclass(frozen=True, slots=True)
class BatchTimings:
    """Seconds one batch spent in each of the detector's stages (zero when not measured)."""

    preprocess: float
    inference: float
    postprocess: float

    def stages(self) -> dict[str, float]:
        """``{stage: seconds}`` under the names of ``monitor_stage_duration_seconds{stage=...}``."""
        return {"preprocess": self.preprocess, "inference": self.inference, "postprocess": self.postprocess}


@dataclass(frozen=True, slots=True)
class Detected:
    """What one ``detect_timed`` call returns: a ``sv.Detections`` per image, in order, and the timings."""

    detections: list[sv.Detections]
    timings: BatchTimings


class Detector:
    """Batched YOLO detection on one device.

    Args:
        settings: The ``model`` section.
        max_batch: The most frames one ``detect`` call gets (``detect.max_batch``): with
            ``model.compile``, the largest batch bucket compiled ahead.

    Raises:
        DetectorError: The weights are missing, unreadable or not a detection model.
    """

    def __init__(self, settings: ModelSettings, max_batch: int) -> None:
        from ultralytics.nn.autobackend import AutoBackend  # heavy import, only here

        self.settings = settings
        path = settings.path
        if not path.exists():
            raise DetectorError(f"model.path {str(path)!r} does not exist")
        self.sha256 = sha256_of(path)
        self.device = resolve_device(settings.device)
        self.half = self.device.type == "cuda"
        self.dtype = torch.float16 if self.half else torch.float32
        self.runtime = choose_runtime(settings.backend, self.device, path)
        if self.runtime != "torch" and path.suffix == ".pt":
            path = exported_model(path, self.runtime, settings.imgsz, self.sha256)
        try:
            self.backend = AutoBackend(
                str(path),
                device=self.device,
                fp16=self.half,
                fuse=True,
                verbose=False,
                channels_last=True if self.device.type == "cuda" and self.runtime == "torch" else None,
            )
        except Exception as exc:  # Ultralytics raises many kinds; all mean "unusable file"
            raise DetectorError(
                f"model.path {str(path)!r} could not be loaded as a YOLO model: {type(exc).__name__}: {exc}"
            ) from exc
        self.backend.eval()
        task = model_task(self.backend)
        if task != "detect":
            raise DetectorError(f"model.path {str(path)!r} is a {task!r} model; a 'detect' model is needed")
        stride = self.backend.stride
        self.stride = int(max(stride) if isinstance(stride, (list, tuple)) else stride)
        self.model_names: dict[int, str] = dict(self.backend.names)
        self.names: dict[int, str] = {i: settings.labels.get(n, n) for i, n in self.model_names.items()}
        metadata = getattr(self.backend, "metadata", None) or {}
        self.rect = self.backend.format == "pt" or bool(metadata.get("dynamic"))
        if not self.rect:
            exported = metadata.get("imgsz")
            if exported and list(exported) != [settings.imgsz, settings.imgsz]:
                raise DetectorError(
                    f"model.path {str(path)!r} was exported for imgsz {list(exported)}; "
                    f"set model.imgsz to {exported[0]} or export again with imgsz={settings.imgsz}"
                )
        self._pinned: dict[tuple[int, ...], torch.Tensor] = {}
        self._cpu_batch = BatchBuffer()
        self.max_batch = max_batch
        self.compiled = False
        if settings.compile:
            self._compile()
        self.label = f"{settings.path.name}@{self.sha256[:12]}"
        logger.info(
            "model %s loaded on %s with %s (%s, sha256 %s, classes %s)",
            path,
            self.device,
            self.runtime,
            "fp16" if self.half else "fp32",
            self.sha256,
            sorted(set(self.names.values())),
        )

    def _compile(self) -> None:
        """torch.compile the network (CUDA graphs, static shapes per batch bucket); torch runtime only."""
        if self.runtime != "torch" or self.device.type != "cuda":
            logger.warning(
                "model.compile needs the torch runtime on CUDA (have %s on %s): ignored",
                self.runtime,
                self.device,
            )
            return
        import torch._dynamo

        # One graph per bucket: let dynamo keep them all instead of falling back to eager.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(
                    torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), len(_BUCKETS) + 2)
                )
        network = self.backend.backend.model
        self.backend.backend.model = torch.compile(network, mode="reduce-overhead", dynamic=False)
        self.compiled = True
        logger.info(
            "model compiled (batch buckets %s up to %d); warm-up compiles each", _BUCKETS, self.max_batch
        )

    def memory_bytes(self) -> float:
        """Device memory held by this process (CUDA caching allocator), 0 on the CPU."""
        if self.device.type != "cuda":
            return 0.0
        return float(torch.cuda.memory_reserved(self.device))

    def warmup(self, height: int = 576, width: int = 768) -> float:
        """Run one frame through every step so the first real batch is not slow.

        Returns:
            Seconds the warm-up took.
        """
        start = time.perf_counter()
        frame = np.full((height, width, 3), PAD_VALUE, np.uint8)
        for size in _BUCKETS if self.compiled else (1,):  # compile every batch bucket before readiness
            if size > _bucket(self.max_batch):
                break
            self.detect([frame] * size)
        return time.perf_counter() - start

    def detect(self, images: list[np.ndarray], conf: float | None = None) -> list[sv.Detections]:
        """Detect objects in frames of any sizes, in one forward pass.

        Args:
            images: HxWx3 uint8 BGR frames.
            conf: Confidence floor for this call (default ``model.conf``). NMS never lets a
                weaker box suppress a stronger one, so callers may filter higher afterwards.

        Returns:
            One ``sv.Detections`` per frame: xyxy in frame pixels, confidence,
            class_id, and ``data["class_name"]`` after ``model.labels``.
        """
        return self._run(images, conf, timed=False).detections

    def detect_timed(
        self,
        images: list[np.ndarray],
        conf: float | None = None,
        keys: Sequence[str | None] | None = None,
        prepared: Sequence[Letterboxed | None] | None = None,
    ) -> Detected:
        """``detect``, and the seconds each stage took (on CUDA, synchronised between stages).

        Args:
            images: As for ``detect``; with ``prepared``, only their sizes are read.
            conf: As for ``detect``.
            keys: Each image's camera, for the bench's null runtime; the model ignores it.
            prepared: Each image already letterboxed (a camera frame's ``Frame.net``), or None.
                One made for another geometry than this detector's is made again here.
        """
        return self._run(images, conf, timed=True, prepared=prepared)

    @property
    def net_input(self) -> NetInput:
        """The input geometry the decoder children letterbox frames into for this detector."""
        return NetInput(self.settings.imgsz, self.stride, self.rect)

    def _run(
        self,
        images: list[np.ndarray],
        conf: float | None,
        timed: bool,
        prepared: Sequence[Letterboxed | None] | None = None,
    ) -> Detected:
        if not images:
            return Detected([], BatchTimings(0.0, 0.0, 0.0))
        clock = time.perf_counter
        t0 = t1 = t2 = clock()
        with torch.inference_mode():
            batch, placements = self._preprocess(images, prepared)
            if timed:
                self._sync()
                t1 = clock()
            raw = self.backend(batch)
            if self.compiled and batch.shape[0] > len(images):  # drop the bucket's padding rows
                raw = raw[0][: len(images)] if isinstance(raw, (list, tuple)) else raw[: len(images)]
            if timed:
                self._sync()
                t2 = clock()
            floor = self.settings.conf if conf is None else conf
            sizes = [(im.shape[0], im.shape[1]) for im in images]
            results = self._postprocess(raw, placements, sizes, floor)
        t3 = clock() if timed else t2
        return Detected(results, BatchTimings(t1 - t0, t2 - t1, t3 - t2))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _preprocess(
        self, images: list[np.ndarray], prepared: Sequence[Letterboxed | None] | None = None
    ) -> tuple[torch.Tensor, list[Placement]]:
        """The batch tensor, and where each image sits in it (for mapping boxes back)."""
        imgsz = self.settings.imgsz
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise DetectorError(
                    f"expected an HxWx3 uint8 BGR image, got shape {image.shape} {image.dtype}"
                )
        placements = [place(im.shape[0], im.shape[1], imgsz, self.stride, self.rect) for im in images]
        if prepared is not None:
            # A letterbox goes in as it is: at the top left, its own padding included.
            net = self.net_input
            inputs = list(images)
            layout = list(placements)
            for i, box in enumerate(prepared):
                if box is not None and box.net == net and box.placement == placements[i]:
                    p = box.placement
                    inputs[i] = box.image
                    layout[i] = Placement(0, 0, p.input_width, p.input_height, p.input_width, p.input_height)
            return self._assemble(inputs, layout, placements), placements
        return self._assemble(images, placements, placements), placements

    def _assemble(
        self, images: list[np.ndarray], layout: list[Placement], placements: list[Placement]
    ) -> torch.Tensor:
        """Each image resized and padded into one batch, where ``layout`` says."""
        imgsz = self.settings.imgsz
        height = max(p.input_height for p in placements)
        width = max(p.input_width for p in placements)
        if self.device.type == "cpu":
            return self._preprocess_cpu(images, layout, height, width)
        if self.compiled:
            height = width = imgsz  # one static shape per batch bucket: compiled graphs are reused
        rows = _bucket(len(images)) if self.compiled else len(images)
        batch = torch.full((rows, 3, height, width), PAD_VALUE / 255, dtype=self.dtype, device=self.device)
        for i, (image, p) in enumerate(zip(images, layout, strict=True)):
            # uint8 goes up as it is (a third of float32's bytes), from pinned memory so the
            # copy is asynchronous; the staging buffers are reused batch after batch.
            staging = self._staging(i, image.shape)
            staging.numpy()[...] = image
            tensor = staging.to(self.device, non_blocking=True)
            tensor = tensor.permute(2, 0, 1).flip(0).unsqueeze(0).to(self.dtype)  # 1x3xHxW RGB
            if (p.height, p.width) != image.shape[:2]:
                tensor = F.interpolate(tensor, size=(p.height, p.width), mode="bilinear", align_corners=False)
                tensor = tensor.round_().clamp_(0, 255)  # what cv2's uint8 resize hands Ultralytics
            batch[i, :, p.top : p.top + p.height, p.left : p.left + p.width] = tensor[0] / 255
        return batch.contiguous(memory_format=torch.channels_last)

    def _staging(self, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        key = (index, *shape)
        buffer = self._pinned.get(key)
        if buffer is None:
            buffer = self._pinned[key] = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        return buffer

    def _preprocess_cpu(
        self, images: list[np.ndarray], placements: list[Placement], height: int, width: int
    ) -> torch.Tensor:
        """On the CPU, cv2's uint8 resize into one padded batch: faster than torch, and Ultralytics' own."""
        batch = self._cpu_batch.take(len(images), height, width)
        for row, image, p in zip(batch, images, placements, strict=True):
            put(row, image, p)
        tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).flip(1)  # BGR -> RGB, NCHW
        return tensor.float().div_(255).contiguous()  # a copy: the buffer is free for the next batch

    def _postprocess(
        self, raw: Any, placements: list[Placement], sizes: list[tuple[int, int]], conf: float
    ) -> list[sv.Detections]:
        from ultralytics.utils.nms import non_max_suppression
        from ultralytics.utils.ops import scale_boxes

        kept = non_max_suppression(
            raw,
            conf,
            self.settings.iou,
            max_det=self.settings.max_det,
            end2end=bool(getattr(self.backend, "end2end", False)),
        )
        results = []
        for boxes, p, (height, width) in zip(kept, placements, sizes, strict=True):
            array = boxes.float().cpu().numpy()
            # Back to frame pixels as Ultralytics maps its own predictions (each side's own
            # gain, as LetterBox rounds each side), clipped to the frame.
            gains = (p.height / height, p.width / width)
            xyxy = np.asarray(
                scale_boxes((0, 0), array[:, :4].copy(), (height, width), ratio_pad=(gains, (p.left, p.top)))
            )
            class_id = array[:, 5].astype(int)
            names = np.array([self.names[c] for c in class_id], dtype=object)
            results.append(trusted(xyxy.astype(np.float32), array[:, 4].astype(np.float32), class_id, names))
        return results
