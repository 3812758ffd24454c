# detris-hf: `make demo` (the main job) and `make test` (the whole suite) bootstrap .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; for CUDA: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[train,dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m training.demo --output demo_output

test: install
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) demo_output .pytest_cache
