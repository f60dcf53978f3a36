# FlashDesk — the README's commands. Everything installs into .venv; nothing is installed by hand.
#
#   make run     create .venv if missing, install FlashDesk, open the app
#   make test    the same venv plus the dev tools, then the whole test suite
#   make bench   every benchmark in benchmarks/, each printed as a ratio against its bound
#   make lint    ruff
#   make dist    build a wheel and an sdist into dist/
#
# Torch: the default is the CPU build 2.13.0. With an NVIDIA GPU, pick a CUDA build, e.g.
#   make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
SOURCES := pyproject.toml setup.py $(wildcard engine/csrc/*.c engine/csrc/*.h)

.PHONY: run test bench lint dist clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip "setuptools>=77" wheel
	$(PIP) install --quiet "$(firstword $(TORCH))" $(wordlist 2,99,$(TORCH))
	touch $@

# Editable install: the C extension is rebuilt whenever its sources or the build files change.
$(VENV)/.installed: $(VENV)/.created $(SOURCES)
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -e ".[dev]"
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/flashdesk

test: $(VENV)/.installed-dev
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(VENV)/bin/flashdesk bench --all

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

dist: $(VENV)/.installed
	$(PIP) wheel --quiet --no-deps -w dist .
	ls -l dist

clean:
	rm -rf build dist *.egg-info engine/_kernels*.so engine/_kernels*.pyd
