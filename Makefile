# detris-hf: `make demo` (the main job) and `make test` (the whole suite) bootstrap .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
comma := ,
# CPU build by default; for CUDA: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0

# requirements/lock.txt pins every package at the version the suite passed with (made by `make lock`, pip-tools);
# installs use it as a constraints file, so a CUDA build of the same torch release satisfies it too.
LOCK := requirements/lock.txt
EXTRAS := train,dev,space
PIP_TOOLS_SPEC ?= pip-tools==7.7.0
LATEST_VENV ?= .venv-latest

.PHONY: install lock test-latest browser demo test clean

$(VENV)/.installed: setup.cfg pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) $(TORCH_SPEC)
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# Re-resolve the lock from setup.cfg's ranges (newest allowed versions; torch from requirements/torch.txt), then
# reinstall. Commit the new lock only with `make test` green on it.
lock:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIP_TOOLS_SPEC)
	$(VENV)/bin/pip-compile --quiet --upgrade --strip-extras --no-emit-index-url --no-emit-find-links \
	  $(foreach e,$(subst $(comma), ,$(EXTRAS)),--extra $(e)) --constraint requirements/torch.txt --output-file $(LOCK) setup.cfg
	sed -i -E 's/^(torch==[0-9.]+)\+[a-z0-9]+$$/\1/' $(LOCK)
	rm -f $(VENV)/.installed
	$(MAKE) install

# A fresh environment from the newest versions setup.cfg allows (no lock), then the whole suite: a breaking upstream
# release shows here before a user meets it. LATEST_EXTRA="transformers==5.25.0" tries a version outside the ranges.
test-latest: browser
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]"
	$(if $(LATEST_EXTRA),$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade $(LATEST_EXTRA))
	$(LATEST_VENV)/bin/python -m pip list --format freeze | grep -iE '^(torch|transformers|peft|accelerate|datasets|huggingface.hub|safetensors|evaluate)=='
	$(LATEST_VENV)/bin/python -m pytest tests

demo: install
	$(PY) -m training.demo --output demo_output

# Debian's chromium for the browser test of the Space (tests/test_space_browser.py drives it with Playwright; browser
# downloads by `playwright install` are not used). Skipped when a chromium is already on PATH; apt-get (with sudo when
# not root) otherwise. Without apt-get the browser test skips with its reason, except where DETRIS_REQUIRE_BROWSER=1.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    echo "installing chromium with apt-get (for tests/test_space_browser.py)"; \
	    $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
	      || echo "could not install chromium: the browser test will skip (and fail where DETRIS_REQUIRE_BROWSER=1)"; \
	  else echo "no chromium and no apt-get: the browser test will skip (and fail where DETRIS_REQUIRE_BROWSER=1)"; fi; }

test: install browser
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) $(LATEST_VENV) demo_output .pytest_cache

# The acceptance run on a CUDA machine (about 5 minutes, at most 8): golden parity on the GPU, DETRIS-B/-L bf16
# throughput and utilisation, a 10,834-sentence evaluation, DETRIS-L training memory at batch 32, and the gaps to the
# GPU targets -> benchmarks/results/gpu.{json,md}. Install the CUDA build first (see TORCH_SPEC above).
# `make gpu-check GPU_CHECK_ARGS=--dry-run` runs every step with tiny sizes on any machine (tests/test_gpu_check.py).
.PHONY: gpu-check
gpu-check: install
	$(PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)
