# Two commands do all the set-up on a fresh machine:
#   make demo   — set up, prepare the digits sample (with planted problems) and open the app
#   make test   — set up (including Chromium for the browser test) and run the whole test suite
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup setup-test peers bench-quick bench docs-bench clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the pinned torch: the local CPU wheel here, the CUDA build on a Linux machine with a GPU
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(MAKE) peers
	touch $(STAMP)

setup: $(STAMP)

# Peer libraries for the benchmark, without their declared dependencies so that none can
# replace the pinned torch; their real needs are installed explicitly.
peers:
	$(BIN)/python -m pip install -q --no-deps traker==0.3.2 kronfluence==1.0.1 dattri==0.3.0 captum==0.9.0 cleanlab==2.9.0
	$(BIN)/python -m pip install -q tqdm einconv einops opt-einsum matplotlib termcolor pyyaml psutil
	$(BIN)/python -m pip install -q --no-deps accelerate
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

# Debian's Chromium for the Playwright browser test (the playwright package drives it through
# executable_path; its own browser download is not used).
setup-test: setup
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi; }

demo: setup
	$(BIN)/proponent prepare digits --models 3
	$(BIN)/proponent app sample_projects/digits

test: setup-test
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench-quick: setup
	$(BIN)/proponent bench sample_projects/digits --quick --json docs/bench/digits-quick.json

clean:
	rm -rf $(VENV) sample_projects/*/data sample_projects/*/checkpoints sample_projects/*/weights sample_projects/*/.proponent sample_projects/*/truth.json
