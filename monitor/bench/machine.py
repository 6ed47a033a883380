"""The machine ``monitor bench`` ran on, and the CPU its processes used (through psutil)."""

from __future__ import annotations

import os
import platform
from collections.abc import Collection
from pathlib import Path

import psutil
import torch

from monitor.bench.report import CpuUsage, Machine
from monitor.decoder import frame_bytes
from monitor.errors import SourceError
from monitor.settings import Settings
from monitor.slots import SLOTS

#: Where POSIX shared memory lives on Linux.
SHM_DIR = Path("/dev/shm")


def process_tree_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of this process and each live descendant, by pid.

    Descendants, not children: decoders are children of the forkserver, which is
    our child, and ``getrusage(RUSAGE_CHILDREN)`` would only count reaped ones.
    """
    me = psutil.Process()
    tree: dict[int, float] = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue  # exited while we looked
        tree[process.pid] = times.user + times.system
    return tree


def cpu_usage(
    start: dict[int, float], end: dict[int, float], seconds: float, workers: Collection[int] = ()
) -> CpuUsage:
    """Cores used over the window: in all, the main process, the tracking ``workers`` (pids), the rest."""
    if not end:
        return CpuUsage(None, None, None, None, 0)
    me = os.getpid()
    spent = {pid: cpu - start.get(pid, 0.0) for pid, cpu in end.items()}
    total = sum(spent.values()) / seconds
    cores = os.cpu_count() or 1
    main = spent.get(me, 0.0) / seconds
    tracking = sum(spent.get(pid, 0.0) for pid in workers) / seconds
    return CpuUsage(
        total, 100 * total / cores, main, total - main - tracking, len(end), workers_cores_used=tracking
    )


def machine_info() -> Machine:
    """CPU, memory, GPU and library versions of this machine."""
    import cv2
    import ultralytics

    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # psutil does not name the CPU
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: keep platform's answer
    memory = psutil.virtual_memory().total / 2**30
    gpu = gpu_memory = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        gpu_memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return Machine(
        cpu_model=cpu_model,
        cpu_cores=os.cpu_count() or 1,
        memory_gib=memory,
        gpu=gpu,
        gpu_memory_gib=gpu_memory,
        cuda=torch.version.cuda if gpu else None,
        python=platform.python_version(),
        torch=torch.__version__,
        ultralytics=ultralytics.__version__,
        opencv=cv2.__version__,
        platform=platform.platform(),
        loadavg_start=loadavg(),
    )


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def check_shared_memory(settings: Settings) -> None:
    """Fail early when /dev/shm cannot hold every stream's slots (a decoder would die of SIGBUS)."""
    if not SHM_DIR.is_dir():
        return
    letterbox = settings.model.imgsz**2 * 3  # each slot's letterbox (``decoder.slot_bytes``)
    need = sum(SLOTS * (frame_bytes(camera) + letterbox) for camera in settings.cameras.values())
    stat = os.statvfs(SHM_DIR)
    free = stat.f_bavail * stat.f_frsize
    if need > free:
        raise SourceError(
            f"{len(settings.cameras)} streams need {need / 2**20:.0f} MiB of {SHM_DIR}, "
            f"{free / 2**20:.0f} MiB are free: use smaller --width/--height, fewer --streams, "
            "or a larger /dev/shm (docker run --shm-size)"
        )
