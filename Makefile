# detris-hf: `make demo` (the main job) and `make test` (the whole suite) bootstrap .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; for CUDA: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0

.PHONY: install browser demo test clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[train,dev,space]"
	touch $@

install: $(VENV)/.installed

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
	rm -rf $(VENV) demo_output .pytest_cache
