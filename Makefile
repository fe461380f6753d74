# attn-course: `make book` builds the site, `make test` checks everything.
# Both start by creating .venv and installing the pinned toolchain (requirements.txt)
# and the book's front-end assets (book/package.json, through npm).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed
MATHJAX_SRC := book/node_modules/mathjax/es5
MATHJAX     := book/_static/mathjax/tex-chtml.js
JB_FLAGS    := --keep-going
PORT   ?= 8000
# The browser tests drive Debian's Chromium (installed with apt-get when missing).
# CHROMIUM=playwright uses Playwright's own download instead (e.g. on GitHub's runners).
CHROMIUM ?= /usr/bin/chromium

export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Notebooks run for the book / nbval store interactive figures in their static form, and
# nbval runs every notebook in a fresh kernel with the network refused (tests/offline).
NB_ENV := ATTN_COURSE_STATIC=1 MPLBACKEND=module://matplotlib_inline.backend_inline
NO_NET := PYTHONPATH=$(CURDIR)/tests/offline

.PHONY: help setup book test unit nbval lint build-strict browser site colab notebooks stamp bench bench-reference serve clean

help:
	@echo "make book       build the site into _build/html"
	@echo "make test       unit tests, nbval on every chapter, strict book build"
	@echo "make notebooks  re-execute every chapter notebook in place"
	@echo "make colab      run every chapter live as on Colab (Colab's packages, the built wheel)"
	@echo "make bench      run the benchmarks"
	@echo "make serve      serve _build/html on http://127.0.0.1:$(PORT)"

setup: $(STAMP) $(MATHJAX)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

# MathJax comes from npm at build time and is served from the site itself (never a CDN).
$(MATHJAX): book/package.json book/package-lock.json
	npm ci --prefix book --no-audit --no-fund
	rm -rf book/_static/mathjax && mkdir -p book/_static/mathjax
	cp -r $(MATHJAX_SRC)/tex-chtml.js $(MATHJAX_SRC)/input $(MATHJAX_SRC)/output \
	      $(MATHJAX_SRC)/ui $(MATHJAX_SRC)/a11y $(MATHJAX_SRC)/adaptors book/_static/mathjax/
	cp book/node_modules/mathjax/LICENSE book/_static/mathjax/
	touch $@

book: setup
	rm -rf _build/html
	$(BIN)/jupyter-book build . $(JB_FLAGS)
	@echo "The site is in _build/html (open _build/html/index.html, or run 'make serve')."

lint: setup
	$(BIN)/ruff check src tests chapters book/_ext

# Unit, property and checker tests, with line coverage of the package (at least 95%).
unit: setup
	$(BIN)/pytest tests --ignore=tests/browser --cov=attn_course --cov-report=term:skip-covered \
	    --cov-fail-under=95
	$(BIN)/pytest -p no:cacheprovider -q tests/test_exercises.py -k sleep_past_the_time_limit

nbval: setup
	$(NB_ENV) $(NO_NET) $(BIN)/pytest -p no:cacheprovider --nbval --nbval-current-env \
	    --nbval-sanitize-with tests/nbval_sanitize.cfg chapters

build-strict: setup
	rm -rf _build/html
	$(BIN)/jupyter-book build . --all -W -n $(JB_FLAGS)

browser: setup
ifeq ($(CHROMIUM),playwright)
	$(PY) -m playwright install --with-deps chromium
else
	@test -x $(CHROMIUM) || { echo "Installing Debian's chromium for the browser tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }
endif

# The built site in a real browser, offline (needs _build/html: run after a build).
site: browser
	ATTN_COURSE_CHROMIUM=$(filter-out playwright,$(CHROMIUM)) $(BIN)/pytest tests/browser

# Colab, simulated: Colab's preinstalled packages (tests/colab/preinstalled.txt) in a venv of
# their own, the course installed from its wheel (which must change none of them), and every
# chapter run live (ipywidgets sliders, no static rendering) from outside the repository.
COLAB := _build/colab
colab: setup
	rm -rf $(COLAB) && mkdir -p $(COLAB)
	$(PYTHON) -m venv $(COLAB)/venv
	$(COLAB)/venv/bin/python -m pip install -q -r tests/colab/preinstalled.txt
	$(PY) -m pip wheel -q --no-deps -w $(COLAB)/wheel .
	$(COLAB)/venv/bin/python -m pip freeze > $(COLAB)/before.txt
	$(COLAB)/venv/bin/python -m pip install -q $(COLAB)/wheel/*.whl
	$(COLAB)/venv/bin/python -m pip freeze > $(COLAB)/after.txt
	cd $(COLAB) && env -u ATTN_COURSE_STATIC -u PYTHONPATH -u MPLBACKEND venv/bin/python \
	    $(CURDIR)/tests/colab/run_chapters.py --repo $(CURDIR) --before before.txt --after after.txt

test: lint unit nbval build-strict site colab

notebooks: setup
	$(PY) -m attn_course.authoring execute

stamp: setup
	$(PY) -m attn_course.authoring stamp

# Optional baselines for the benchmark (not runtime dependencies): pyproject's [bench] extra.
bench: setup
	$(PY) -m pip install -q "local-attention==1.11.2"
	$(PY) -m attn_course.bench --out _build/bench

# Store this machine's run as the reference the chapter shows (then `make notebooks`).
bench-reference: bench
	cp _build/bench/sparse.json src/attn_course/results/sparse_cpu.json
	cp _build/bench/flash.json src/attn_course/results/flash_cpu.json
	cp _build/bench/distributed.json src/attn_course/results/distributed_cpu.json
	if [ -f _build/bench/flash_gpu.json ]; then cp _build/bench/flash_gpu.json src/attn_course/results/flash_gpu.json; fi

serve:
	@test -f _build/html/index.html || { echo "No site yet: run 'make book' first."; exit 1; }
	$(PYTHON) -m http.server $(PORT) --bind 127.0.0.1 --directory _build/html

clean:
	rm -rf _build book/_static/mathjax
