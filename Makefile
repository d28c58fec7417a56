# Two entry points, both self-contained on a fresh machine:
#   make demo       the demo: global-only, slime and slime at gamma = 1 on a generated detail task
#   make demo-full  the full ablation (adds slime-joint and local-only, 3 seeds each)
#   make test   runs the whole test suite (make test-install: the fresh-venv install check)
# Each creates .venv when it is missing or when pyproject.toml changed since it was built.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.slime-installed
# torch is named in the same pip command as everything else: a later install of a package that
# asks for torch would otherwise be free to replace the CPU build with a multi-GB CUDA one.
TORCH  ?= torch==2.13.0

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM := false

.PHONY: all venv test test-unit test-install test-openclip test-lmms-eval demo demo-full bench clean

all: test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)" -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# the whole suite: the unit and recipe tests in .venv, then the checks that need a venv of their
# own (a fresh install, open_clip, lmms-eval); each extra venv is built once, then reused
test: test-unit test-install test-openclip test-lmms-eval

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests

# a fresh venv, `pip install ".[recipes]"`, slime-train / slime-chat from another folder: about
# 4 minutes on a 2-core machine (pip fetches and unpacks ~1.3 GB)
test-install:
	PYTHON=$(PYTHON) TORCH="$(TORCH)" bash tests/install_check.sh

# open_clip needs torchvision, which does not import beside the CPU torch of .venv: its own venv
# with the pair that works here (a CUDA build that runs on the CPU; the default suite skips it)
OPENCLIP_VENV  := .venv-openclip
OPENCLIP_STAMP := $(OPENCLIP_VENV)/.slime-installed
OPENCLIP_TORCH ?= torch==2.14.1 torchvision==0.29.1

$(OPENCLIP_STAMP): pyproject.toml
	test -x $(OPENCLIP_VENV)/bin/python || $(PYTHON) -m venv $(OPENCLIP_VENV)
	$(OPENCLIP_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(OPENCLIP_TORCH) -e ".[hf,open-clip,test]"
	touch $(OPENCLIP_STAMP)

test-openclip: $(OPENCLIP_STAMP)
	$(OPENCLIP_VENV)/bin/python -m pytest -q tests/test_openclip.py

# lmms-eval (the `eval` extra) and its tests in their own venv: lmms-eval 0.7.3 pulls in torchvision,
# which does not import beside the CPU torch wheel (and then breaks transformers' model classes),
# so the venv drops it (lmms-eval's core and the slime model do not use it); lmms-eval 0.7.3 needs
# filelock < 4 (it patches filelock._api). Measured on a busy 2-core machine: 7 min cold (141 s of
# CPU: pip about 5.5 min, the tests 86 s); warm, the tests alone.
LMMS_VENV  ?= .venv-lmms
LMMS_STAMP := $(LMMS_VENV)/.slime-installed

$(LMMS_STAMP): pyproject.toml
	test -x $(LMMS_VENV)/bin/python || $(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check "$(TORCH)" \
		"filelock<4" -e ".[dev,eval]"
	$(LMMS_VENV)/bin/python -m pip uninstall --quiet --disable-pip-version-check -y torchvision
	touch $(LMMS_STAMP)

test-lmms-eval: $(LMMS_STAMP)
	HF_DATASETS_OFFLINE=1 $(LMMS_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_eval_lmms.py tests/test_eval.py tests/test_eval_metrics.py tests/test_eval_task.py

demo: $(STAMP)
	$(BIN)/python -m recipes.demo

demo-full: $(STAMP)
	$(BIN)/python -m recipes.demo --ablation --out runs/demo-full

# results go to an ignored folder (BENCH_OUT); copy the ones to keep into benchmarks/results
BENCH_OUT ?= runs/bench
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all --out $(BENCH_OUT)

clean:
	rm -rf $(VENV) $(OPENCLIP_VENV) $(LMMS_VENV) .pytest_cache .hypothesis
