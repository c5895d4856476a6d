# make test: creates .venv if missing, installs the torch pair below and yolozu[dev] into it, runs ruff and pytest
# with YOLOZU_REQUIRE_TORCHVISION=1 (a torchvision test that cannot import torchvision fails instead of skipping).
# One environment for everything: the CPU suite, the torchvision adapter's tests, the FCOS-small tools and the GPU
# machine. The pair is the one that loads together from the index (torch's CUDA build, about 5.5 GB; it runs on
# CPU as well); it is declared here and nowhere else.
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# make setup WHEELS=DIR: offline, for a machine without network whose python already has torch and torchvision
# (the GPU machine): the venv sees that interpreter's packages, pip reads nothing but DIR (tools/gpu_wheels.sh fills
# .whl with the wheels that machine lacks), and the pair is installed from DIR only if torch or torchvision does not
# import.
WHEELS ?=

.PHONY: test setup lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(if $(WHEELS),--system-site-packages) $(VENV)
ifeq ($(WHEELS),)
	$(PY) -m pip install -q $(TORCH_PAIR)
	$(PY) -m pip install -q -e '.[dev]'
else
	$(PY) -m pip install -q --no-index --no-deps $(WHEELS)/*.whl
	$(PY) -c 'import torch, torchvision' 2>/dev/null || $(PY) -m pip install -q --no-index --find-links $(WHEELS) $(TORCH_PAIR)
	$(PY) -m pip install -q --no-index --no-deps --no-build-isolation -e .
endif
	touch $@

test: lint
	YOLOZU_REQUIRE_TORCHVISION=1 $(PY) -m pytest -q

# make lint: ruff's checks (pyproject.toml [tool.ruff]); make test runs them first.
lint: $(STAMP)
	$(PY) -m ruff check .

# make test-torchvision: only the torchvision adapter's tests (make test runs them too), in the same .venv.
.PHONY: test-torchvision
test-torchvision: $(STAMP)
	YOLOZU_REQUIRE_TORCHVISION=1 $(PY) -m pytest -q tests/test_adapter_torchvision.py tests/test_export_torchvision.py \
	  tests/test_adapter_plugins.py tests/test_tv_detector.py

# make demo-data: the offline demo shift benchmark under data/demo (clean train/val, 19 corruptions x 5 severities of val).
.PHONY: demo-data
demo-data: $(STAMP)
	$(PY) tools/make_demo_data.py

# make bench-core: functional Tent step vs classic stateful Tent vs bare forward+backward (ratios from one run).
.PHONY: bench-core
bench-core: $(STAMP)
	$(PY) tools/bench_core.py

# train: re-train the built-in detector with the defaults (CPU, ~7-10 min on 2 cores); writes
# yolozu/models/checkpoints/detector.pt and detector.json (evaluated on data/demo val when present).
.PHONY: train
train: $(STAMP)
	$(PY) tools/train_detector.py

# train-torchvision: train FCOS-small (torchvision's FCOS on a small BatchNorm backbone, yolozu/demo/tv_detector.py)
# from random init on data/demo's train split; writes
# yolozu/models/checkpoints/fcos_small.pt and fcos_small.json (clean val mAP). TRAIN_TV_ARGS adds flags, e.g.
# --device cuda or --epochs N (docs/adapters.md).
TRAIN_TV_ARGS ?=
.PHONY: train-torchvision
train-torchvision: $(STAMP)
	$(PY) tools/make_demo_data.py --root data/demo --corruptions none
	$(PY) tools/train_torchvision.py $(TRAIN_TV_ARGS)

# make export TTT=tent|mim|cotta|eata|sar|align|none [CORRUPTION=fog SEVERITY=5]: export the committed detector's predictions on a
# corrupted val split without test-time training, with BatchNorm statistics only and with TTT, evaluate them and
# print mAP50 side by side.
TTT ?= tent
CORRUPTION ?= fog
SEVERITY ?= 5
SPLIT := val-$(CORRUPTION)-$(SEVERITY)
EXPORT_DIR := runs/export
EXPORT := $(PY) tools/export_predictions.py --adapter detector --dataset data/demo --split $(SPLIT) --wrap
# the TTT settings of each method: the benchmark's online recipe (yolozu/demo/bench/recipes.py); BatchNorm statistics
# are computed on the recipes' batches too (recipes bn: --bn-stats batch --batch-size 8)
TTT_ARGS = $$($(PY) -m yolozu.demo.bench.recipes $(TTT))

.PHONY: export
export: $(STAMP)
	@case "$(TTT)" in tent|mim|cotta|eata|sar|align|none) ;; *) echo "TTT must be tent, mim, cotta, eata, sar, align or none, got '$(TTT)'" >&2; exit 2;; esac
	$(PY) tools/make_demo_data.py --root data/demo --corruptions $(CORRUPTION) --severities $(SEVERITY)
	$(EXPORT) --output $(EXPORT_DIR)/none/predictions.json
	$(EXPORT) --output $(EXPORT_DIR)/bn/predictions.json $$($(PY) -m yolozu.demo.bench.recipes bn)
	@if [ "$(TTT)" != none ]; then \
	  echo "$(EXPORT) --output $(EXPORT_DIR)/$(TTT)/predictions.json $(TTT_ARGS) --ttt-log-out $(EXPORT_DIR)/$(TTT)/ttt_log.json"; \
	  $(EXPORT) --output $(EXPORT_DIR)/$(TTT)/predictions.json $(TTT_ARGS) --ttt-log-out $(EXPORT_DIR)/$(TTT)/ttt_log.json; \
	  $(PY) tools/compare_exports.py --dataset data/demo --split $(SPLIT) none=$(EXPORT_DIR)/none/predictions.json \
	    bn-stats=$(EXPORT_DIR)/bn/predictions.json $(TTT)=$(EXPORT_DIR)/$(TTT)/predictions.json; \
	else \
	  $(PY) tools/compare_exports.py --dataset data/demo --split $(SPLIT) none=$(EXPORT_DIR)/none/predictions.json \
	    bn-stats=$(EXPORT_DIR)/bn/predictions.json; \
	fi

# make bench-streams: episodic export, the one-image loop vs K = 4, 8, 16 vmapped streams (speed and peak memory).
.PHONY: bench-streams
bench-streams: $(STAMP)
	$(PY) tools/make_demo_data.py --root data/demo --corruptions fog --severities 5
	$(PY) tools/bench_streams.py

# make bench-distributed: the export in 1 process against torchrun --nproc_per_node 2 (gloo), per mode, side by side.
.PHONY: bench-distributed
bench-distributed: $(STAMP)
	$(PY) tools/bench_distributed.py

# make bench: the quick scope (clean val and one corruption of each family at severity 5: gaussian_noise,
# defocus_blur, fog, contrast; reset per corruption, 400 images per split in batches of 8: 50 updates per
# corruption, BatchNorm statistics on the same batches; the online recipes, Tent adapting first, BatchNorm statistics
# and Tent episodic; each gain over BatchNorm statistics with a paired bootstrap 95% interval over images;
# runs/bench/quick.json and quick-matches.npz, docs/benchmarks.md with, when runs/bench/continual.json is there, the
# continual line, and, when runs/bench/quick-seed1.json is there, the data-seed spread). Its data step grows
# data/demo's val to BENCH_VAL images (--grow: the first 300 stay the same) and remakes those 4 corruptions of it.
# make bench-continual: the continual protocol at the same budget (the 15 corruptions at severity 5 as one stream,
# 400 images each in batches of 8: 50 updates per corruption, then clean val; runs/bench/continual.json,
# docs/benchmarks-continual.md). Measured: see each page's provenance line.
# make bench-gradual: severities 1-5-1 per corruption as one stream, 64 images per segment, then clean val
# (runs/bench/gradual.json, docs/benchmarks-gradual.md). make bench-full: the continual and gradual protocols,
# then every recipe on all 15 corruptions at every severity 1-5 at the same budget (docs/benchmarks-full.md); hours
# on 2 cores.
BENCH_VAL := 400
BENCH_CORRUPTIONS := gaussian_noise defocus_blur fog contrast
# ^ the reset-per-corruption scopes' images per corruption and make bench's corruptions (yolozu.demo.bench.shift's
# IMAGES and BENCH_CORRUPTIONS; a test keeps them equal), also the continual stream's images per corruption.
.PHONY: bench bench-full bench-continual bench-gradual
bench: $(STAMP)
	$(PY) tools/make_demo_data.py --root data/demo --n-val $(BENCH_VAL) --grow --corruptions $(BENCH_CORRUPTIONS) --severities 5
	$(PY) -m yolozu.demo.bench.shift --quick

bench-continual: $(STAMP)
	$(PY) tools/make_demo_data.py --root data/demo --n-val $(BENCH_VAL) --grow --corruptions all --severities 5
	$(PY) -m yolozu.demo.bench.continual

bench-gradual: $(STAMP)
	$(PY) tools/make_demo_data.py --root data/demo --corruptions all
	$(PY) -m yolozu.demo.bench.gradual

bench-full: bench-continual bench-gradual
	$(PY) tools/make_demo_data.py --root data/demo --n-val $(BENCH_VAL) --grow --corruptions all
	$(PY) -m yolozu.demo.bench.shift --full

# make bench-tv: the quick scope on another model family through --adapter (a plug-in factory and its checkpoint),
# -> runs/bench/quick-<tag>.json, docs/benchmarks-<tag>.md
# (<tag> from the adapter's module: tv_detector for FCOS-small), with the built-in detector's quick.json beside it.
# Recipes the adapter cannot run (MIM without a reconstruction head) are skipped, with the reason in the report.
TV_ADAPTER ?= yolozu.demo.tv_detector:adapter
TV_CHECKPOINT ?= yolozu/models/checkpoints/fcos_small.pt
.PHONY: bench-tv
bench-tv: $(STAMP)
	$(PY) tools/make_demo_data.py --root data/demo --corruptions all --severities 5
	$(PY) -m yolozu.demo.bench.shift --quick --adapter $(TV_ADAPTER) --checkpoint $(TV_CHECKPOINT)

# make test-gpu: only the CUDA tests (they skip without a GPU; make test runs them too, skipped, and their CPU twins).
.PHONY: test-gpu
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m cuda

# make gpu-check: CUDA tests, bench-core (ours and torchvision's ResNet-50), bench-streams, the quick shift benchmark
# on CUDA and a two-run determinism check -> runs/gpu/summary.md and .json (about 6 minutes on one H100). Without
# CUDA: a CPU dry run of the same steps on a few images. GPU_PY: the interpreter (the GPU machine's own python3
# when there is no .venv; see docs/gpu.md).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
.PHONY: gpu-check
gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) tools/gpu_check.py
