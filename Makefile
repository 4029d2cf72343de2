# Each public target sets up its own environment, so it works on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python

# `make demo` runs the main job on the sample scene. Offline by default (tiny random models: the labels are
# meaningless, the chain is real); `make demo VLM=clip-b16 VFM=dinov3-l16-sat` uses the paper's models
# (downloaded into the Hugging Face cache on first use).
DEMO_INPUT ?= ../shared/data/oem_koeln_50.tif
VLM ?= tiny-random
VFM ?= tiny-random
CLASSES ?= building,roof;road,parking lot;tree;low vegetation,grass;water;bare soil

.PHONY: setup test test-only demo lint clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'

setup: $(PY)

test: setup
	$(MAKE) test-only

test-only:
	$(PY) -m pytest -q

demo: setup
	@test -f "$(DEMO_INPUT)" || { echo "demo input $(DEMO_INPUT) not found: run make demo DEMO_INPUT=your_scene.tif"; exit 2; }
	mkdir -p out
	$(VENV)/bin/coninfer segment "$(DEMO_INPUT)" -o out/demo.tif --classes "$(CLASSES)" --vlm $(VLM) --vfm $(VFM) \
		--overlap 64 --probabilities out/demo_probs.tif --confidence out/demo_confidence.tif --vector out/demo.gpkg \
		--preview out/demo.png --html out/demo.html --overwrite
	@echo "outputs in out/: demo.tif (class map, + .qml style, .aux.xml names), demo_probs.tif, demo_confidence.tif,"
	@echo "                 demo.gpkg, demo.png, demo.json and demo.html (reports)"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache out
