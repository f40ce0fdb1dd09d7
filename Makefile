# sdrt: `make engines` builds the artifacts (and a sample image); `make test` runs the tests.
# Both create the virtual environment on first use.

PYTHON ?= python3
VENV ?= .venv
# The torch build to install before the project. The default is a plain release pin: on a CPU-only
# CI machine pip takes the CPU wheel that lies on disk; elsewhere PyPI's build for the platform.
# Override for another build, e.g. TORCH="torch==2.13.0 --index-url <your CPU or CUDA index>".
TORCH ?= torch==2.13.0
# The open_clip_torch wheel carries CLIP's BPE vocabulary; only that data file is used (--no-deps).
OPEN_CLIP ?= open_clip_torch==3.3.0
# The project's extras. Exactly one onnxruntime build: cpu (onnxruntime) here, or on an NVIDIA machine
# EXTRAS=gpu,export,bench,openvino,dev,serve,ray (onnxruntime-gpu, TensorRT); the two overwrite each other's files.
EXTRAS ?= cpu,export,bench,openvino,dev,serve,ray

MODEL ?=
ifeq ($(strip $(MODEL)),)
  NAME ?= tiny-sd
  SOURCE := models/tiny-sd
else
  NAME ?= $(notdir $(patsubst %/,%,$(MODEL)))
  SOURCE := $(MODEL)
endif
# fp32 or fp16 graphs (fp16 keeps float32 inputs/outputs and the parts known to overflow in fp32), or
# int8: the fp32 export (artifacts/NAME) quantized by `sdrt quantize` into artifacts/NAME-int8.
PRECISION ?= fp32
ARTIFACTS ?= artifacts/$(NAME)$(if $(filter fp32,$(PRECISION)),,-$(PRECISION))
EXPORT_ARGS ?=
# A VAE folder exported in place of the model's own, e.g. a tiny autoencoder (make taesd: TAESD's
# architecture with random weights): make engines MODEL=models/sd15-random VAE=models/taesd NAME=sd15-taesd
VAE ?=
QUANTIZE_ARGS ?=
EXPORT_PRECISION := $(if $(filter int8,$(PRECISION)),fp32,$(PRECISION))
EXPORT_OUT := $(if $(filter int8,$(PRECISION)),artifacts/$(NAME),$(ARTIFACTS))
# TensorRT engine profile (NVIDIA machines; skipped with a message elsewhere): images per call and
# image sizes in pixels, each N or MIN:OPT:MAX. The UNet's batch is doubled for guidance.
TRT_BATCH ?= 1:1:4
TRT_HEIGHT ?= 256:512:1024
TRT_WIDTH ?= 256:512:1024
TRT_PRECISION ?= fp16
ENGINE_ARGS ?=
PROMPT ?= a photograph of an astronaut riding a horse
STEPS ?= 20
SEED ?= 0

# optimum pins transformers < 4.58 and diffusers 0.39: it gets an environment of its own, used only to
# make an optimum-exported folder of the tiny model for the interop tests.
OPTIMUM_VENV ?= .venv-optimum
OPTIMUM ?= optimum-onnx[onnxruntime]==0.1.0 diffusers==0.39.0

BIN := $(VENV)/bin
SDRT := $(BIN)/sdrt
PYTEST_ARGS ?=

.PHONY: engines generate bench bench-report bench-gpu test test-slow soak load test-gpu typecheck lint clean distclean venv sd15-random taesd FORCE serve serve-ray

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	$(BIN)/pip install --quiet --no-deps $(OPEN_CLIP)
	touch $@

# The random-weight models are always asked for: sdrt rebuilds one only when its recipe or seed
# changed, and rewrites its marker file only then, so what depends on the marker rebuilds only then.
MARKER := sdrt-random-model.json
FORCE:
models/tiny-sd/$(MARKER): $(VENV)/.installed FORCE
	@$(SDRT) random-model --preset tiny --out $(@D)

# SD 1.5's architecture with random weights (no download): for full-size exports and benchmarks,
# e.g. `make sd15-random && make engines MODEL=models/sd15-random`.
sd15-random: models/sd15-random/$(MARKER)
models/sd15-random/$(MARKER): $(VENV)/.installed FORCE
	@$(SDRT) random-model --preset sd15 --out $(@D)

# TAESD's architecture with random weights, to stand in for a model's VAE (sdrt export --vae).
taesd: models/taesd/$(MARKER)
models/taesd/$(MARKER): $(VENV)/.installed FORCE
	@$(SDRT) random-model --preset taesd --out $(@D)

# Export (and quantize) always ask sdrt, which compares content hashes and does nothing when inputs are
# unchanged; `sdrt engines` builds this machine's onnxruntime CPU engines (and TensorRT engines on NVIDIA
# machines) only where missing or stale; the sample image is remade only when the manifest changed.
engines: $(VENV)/.installed $(if $(MODEL),,models/tiny-sd/$(MARKER))
	$(SDRT) export --model $(SOURCE) --out $(EXPORT_OUT) --precision $(EXPORT_PRECISION) $(if $(VAE),--vae $(VAE)) $(EXPORT_ARGS)
	$(if $(filter int8,$(PRECISION)),$(SDRT) quantize --artifacts $(EXPORT_OUT) --out $(ARTIFACTS) $(QUANTIZE_ARGS))
	$(SDRT) engines --artifacts $(ARTIFACTS) --batch $(TRT_BATCH) --height $(TRT_HEIGHT) --width $(TRT_WIDTH) \
	  --precision $(TRT_PRECISION) $(ENGINE_ARGS)
	@$(MAKE) --no-print-directory $(ARTIFACTS).png

$(ARTIFACTS).png: $(ARTIFACTS)/manifest.json
	$(SDRT) generate --artifacts $(ARTIFACTS) --prompt "$(PROMPT)" --steps $(STEPS) --seed $(SEED) --out $@

generate: $(VENV)/.installed
	$(SDRT) generate --artifacts $(ARTIFACTS) --prompt "$(PROMPT)" --steps $(STEPS) --seed $(SEED) --out $(ARTIFACTS).png

$(OPTIMUM_VENV)/.installed:
	$(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/pip install --quiet $(TORCH)
	$(OPTIMUM_VENV)/bin/pip install --quiet $(OPTIMUM)
	touch $@

# The tiny model exported by optimum-cli, for the test that the runtime reads optimum's layout.
models/tiny-sd-optimum: models/tiny-sd/$(MARKER) $(OPTIMUM_VENV)/.installed
	rm -rf $@.partial
	HF_HUB_OFFLINE=1 $(OPTIMUM_VENV)/bin/optimum-cli export onnx --model models/tiny-sd --task text-to-image $@.partial > $@.log 2>&1 \
	  || { tail -20 $@.log; exit 1; }
	rm -rf $@ && mv $@.partial $@

# Latency per component, per step and end to end, beside diffusers/PyTorch; rows go to
# benchmarks/results/<device>.jsonl. SD 1.5-sized, random weights (builds and exports it when missing):
#   make bench ARTIFACTS=artifacts/sd15-random BENCH_ARGS="--random-weights --sizes 256x256 512x512 --steps 10 --runs 3"
BENCH_ARGS ?= --batches 1 2 --sizes 256x256 --steps 20 --runs 5
bench: $(VENV)/.installed
	$(SDRT) bench --artifacts $(ARTIFACTS) $(BENCH_ARGS)

# Merge result files (from many machines) into benchmarks/report/report.md and report.png.
RESULTS ?= $(wildcard benchmarks/results/*.jsonl)
# REPORT_ARGS: e.g. --baseline DEVICE --price DEVICE=USD_PER_HOUR (devices side by side; see the README).
REPORT_ARGS ?=
bench-report: $(VENV)/.installed
	$(SDRT) bench report $(RESULTS) --out benchmarks/report $(REPORT_ARGS)

test: $(VENV)/.installed models/tiny-sd-optimum
	$(BIN)/ruff check export runtime benchmarks serve tests tools
	@$(MAKE) --no-print-directory typecheck
	SDRT_OPTIMUM_FOLDER=models/tiny-sd-optimum SDRT_OPTIMUM_PYTHON=$(OPTIMUM_VENV)/bin/python $(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# One pipeline called from 8 threads x 50 requests (a quarter invalid) on the tiny model's artifacts.
soak: engines
	$(BIN)/python -m sdrt.benchmarks.soak --artifacts $(ARTIFACTS) $(SOAK_ARGS)

# The HTTP service on this machine's artifacts (README "Serving"), e.g.
#   make serve SERVE_ARGS="--port 8000 --max-batch 4"
SERVE_ARGS ?=
serve: engines
	$(SDRT) serve --artifacts $(ARTIFACTS) $(SERVE_ARGS)

# The same API on Ray Serve, e.g. two replicas of one core each (on a cluster: `ray start --head` first;
# alone, `serve run` starts a local Ray):  make serve-ray RAY_ARGS="num_replicas=2 num_cpus=1"
RAY_ARGS ?=
serve-ray: engines
	$(BIN)/serve run sdrt.serve.ray_app:app artifacts=$(ARTIFACTS) $(RAY_ARGS)

# `sdrt serve` under closed-loop load, batching off then on; the load generator starts and stops each
# server on a free loopback port. Rows go to benchmarks/results/load_<device>.jsonl; `make bench-report`
# shows them beside the latency rows.
LOAD_ARGS ?= --concurrency 1,4,16 --requests 32 --steps 4 --size 64x64
LOAD_SERVE_ARGS ?= --batch-wait-ms 20 --queue-size 32
load: engines
	$(BIN)/python -m sdrt.benchmarks.load --serve $(ARTIFACTS) --serve-args "--max-batch 1 $(LOAD_SERVE_ARGS)" --label batching-off $(LOAD_ARGS)
	$(BIN)/python -m sdrt.benchmarks.load --serve $(ARTIFACTS) --serve-args "--max-batch 4 $(LOAD_SERVE_ARGS)" --label batching-on $(LOAD_ARGS)

# On an NVIDIA machine whose venv was made with EXTRAS=gpu,export,bench,openvino,dev,serve,ray: engines for the tiny model,
# checked against onnxruntime. Elsewhere every test is skipped with the reason.
test-gpu: $(VENV)/.installed
	$(BIN)/python -m pytest -m gpu -rs $(PYTEST_ARGS)

# One command on an NVIDIA machine (venv with EXTRAS=gpu,...): SD 1.5-shaped random weights at 512x512, TensorRT
# engines with dynamic and static profiles, `make test-gpu`, and rows for onnxruntime-cuda, onnxruntime-tensorrt
# and tensorrt beside diffusers on CUDA (25 and 50 steps), planned to fit 10 minutes (tools/bench_gpu.sh,
# benchmarks/gpu_plan.py). Elsewhere it stops at once with the reason. E.g. BENCH_GPU_ARGS="--steps 25 --runs 5"
BENCH_GPU_ARGS ?=
bench-gpu: $(VENV)/.installed
	PY=$(BIN)/python MAKE="$(MAKE)" tools/bench_gpu.sh $(BENCH_GPU_ARGS)

# mypy over the TensorRT path (it cannot run without a GPU, so it is at least type-checked). The
# symlinks give mypy the sdrt.* names the package-dir mapping gives Python.
TRT_STUBS ?= tensorrt-stubs==10.13.0.35.1
typecheck: $(VENV)/.installed build/typecheck/stubs/tensorrt
	@mkdir -p build/typecheck/sdrt
	@ln -sfn $(CURDIR)/runtime build/typecheck/sdrt/runtime
	@ln -sfn $(CURDIR)/export build/typecheck/sdrt/export
	$(BIN)/mypy

# TensorRT's API signatures for mypy, never installed into an environment (with them alone,
# `import tensorrt` would succeed with no TensorRT behind it). Offline, mypy types TensorRT as Any.
build/typecheck/stubs/tensorrt:
	@mkdir -p build/typecheck/wheels
	@$(BIN)/pip download --quiet --no-deps $(TRT_STUBS) -d build/typecheck/wheels 2>/dev/null \
	  && $(BIN)/python tools/trt_stubs.py build/typecheck/wheels/tensorrt_stubs-*.whl build/typecheck/stubs \
	  || echo "tensorrt-stubs not available: mypy checks the TensorRT path with TensorRT typed as Any"

lint: $(VENV)/.installed
	$(BIN)/ruff check export runtime benchmarks serve tests tools

clean:
	rm -rf artifacts .pytest_cache build

distclean: clean
	rm -rf $(VENV) $(OPTIMUM_VENV) models
