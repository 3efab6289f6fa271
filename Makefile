# Two commands set up everything on a fresh machine:
#   make demo   # venv + deps + Fashion-MNIST, then train and evaluate the quickstart MultiMax ViT on CPU
#   make test   # venv + deps + Fashion-MNIST, then the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Debian's dataset-fashion-mnist package where apt-get can install it; elsewhere the quickstart
# config (data.download=true) fetches Fashion-MNIST on first use into ~/.cache/multimax-vit/fashion-mnist.
data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	      || echo "note: could not install dataset-fashion-mnist; train.py will download Fashion-MNIST"; \
	  else echo "note: no $(FMNIST) and no apt-get as root; train.py will download Fashion-MNIST"; fi; \
	fi

# The main job: train the quickstart MultiMax ViT on Fashion-MNIST (CPU), then evaluate it.
# A rerun starts over (train.resume=none); extra overrides: make demo ARGS="train.epochs=2".
demo: setup data
	$(PY) train.py --config configs/quickstart.yaml train.resume=none $(ARGS)
	$(PY) eval.py --checkpoint runs/quickstart/last.pth --attn-stats --attn-stats-batches 4 \
	  --output runs/quickstart/eval.json

test: setup data
	OMP_NUM_THREADS=2 $(PY) -m pytest

# The tests without the slow end-to-end ones (marked slow: training child processes, torchrun,
# torch.compile, the benchmark), for a quick check while editing; `make test` runs them all.
test-fast: setup data
	OMP_NUM_THREADS=2 $(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs
