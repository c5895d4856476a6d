# make test: creates .venv if missing (torch==2.13.0 first: the CPU wheel), installs yolozu[dev], runs pytest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

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
