# The daemon's image, for deploy/kubernetes/ (or any container runtime).
#
#   mkdir -p models && cp /path/to/yolov8s.pt models/     # the weights model.path names
#   docker build -t registry.example.org/you/monitor:0.1.0 .
#   docker push registry.example.org/you/monitor:0.1.0
#
# What deploy/kubernetes/statefulset.yaml expects of it (tests/test_kubernetes.py
# checks that the two agree): `monitor` as the entrypoint (the StatefulSet gives
# only `run --config /etc/monitor/monitor.yaml`), uid and gid 10001, the
# weights at /opt/monitor/models/yolov8s.pt (configmap.yaml's model.path), port
# 8080, and nothing written outside /var/lib/monitor and /tmp (the root file
# system is read-only there).
FROM python:3.11-slim-bookworm

# opencv-python (an Ultralytics dependency) carries its own FFmpeg, so RTSP and
# video files need no system FFmpeg; its wheel still links libGL and GLib.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The project and its dependencies. From PyPI, torch for Linux x86_64 brings
# the CUDA runtime libraries with it (a few GB); the host or the GPU Operator
# supplies only the driver.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY monitor ./monitor
RUN pip install . && rm -rf /src

# Model weights are pickles: only this configured file is loaded, and the
# daemon logs its SHA-256 at start.
COPY models/yolov8s.pt /opt/monitor/models/yolov8s.pt

# The same uid/gid as the StatefulSet's securityContext (runAsUser,
# runAsGroup, fsGroup). /var/lib/monitor is the spool volume's mount point.
RUN groupadd --gid 10001 monitor \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/monitor \
        --shell /usr/sbin/nologin monitor \
    && mkdir -p /var/lib/monitor /etc/monitor \
    && chown 10001:10001 /var/lib/monitor
USER 10001:10001
WORKDIR /var/lib/monitor
# Writable places on a read-only root (the StatefulSet sets the same).
ENV HOME=/var/lib/monitor \
    YOLO_CONFIG_DIR=/var/lib/monitor/ultralytics \
    MPLCONFIGDIR=/tmp/matplotlib \
    CUDA_CACHE_PATH=/tmp/nv

EXPOSE 8080
ENTRYPOINT ["monitor"]
CMD ["run", "--config", "/etc/monitor/monitor.yaml"]
