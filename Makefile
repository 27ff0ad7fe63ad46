# Two commands for a fresh Debian/Ubuntu machine:
#   make demo    set everything up, run the main job (CNN readout, quick profile) and build its table
#   make test    set everything up and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN := $(PY) experiments/run.py
LOCK := flock /tmp/sk_cpu.lock
SEEDS3 := 0,1,2
SEEDS5 := 0,1,2,3,4
SEEDS10 := 0,1,2,3,4,5,6,7,8,9

.PHONY: setup data demo test test-slow test-cuda bench-sk tables table-cnn-readout table-vit-probe \
        table-transfer table-ddqn table-ddqn-ablation table-smoke paper-tables clean help

help:
	@sed -n 's/^#   //p' Makefile; grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*##/:/'

setup: $(STAMP) data ## create .venv with torch 2.14.1 / torchvision 0.29.1 and the project (idempotent)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[exp,rl,faiss,dev]'
	touch $(STAMP)

data: ## install Fashion-MNIST (Debian package) where possible, else explain
	@bash scripts/setup_data.sh

demo: setup table-cnn-readout ## the main job on the offline default

test: setup ## the test suite (CPU, < 10 min)
	$(PY) -m pytest -q

test-slow: setup ## the slow tests left out of `make test`
	$(PY) -m pytest -q -m slow

bench-sk: setup ## SK benchmark -> results/bench_sk.md
	$(LOCK) $(PY) scripts/bench_sk.py --out results/bench_sk.md

tables: setup ## rebuild every table that has records (no runs)
	$(PY) scripts/make_tables.py

table-ddqn-ablation: setup ## DDQN ablation of the SK component (targets, support size, k)
	$(LOCK) $(RUN) -m +exp=ddqn profile=ablation exp.agent=sk exp.sk_targets=fixed,learned seed=$(SEEDS5) $(JOBLIB2)
	$(LOCK) $(RUN) -m +exp=ddqn profile=ablation exp.agent=sk exp.support_size=64,1024 seed=$(SEEDS5) $(JOBLIB2)
	$(LOCK) $(RUN) -m +exp=ddqn profile=ablation exp.agent=sk exp.sk_k=8,32 seed=$(SEEDS5) $(JOBLIB2)
	$(PY) scripts/make_tables.py ddqn

table-smoke: setup
	$(RUN) -m +exp=smoke logger=none seed=$(SEEDS3)
	$(PY) scripts/make_tables.py smoke

JOBLIB2 := hydra/launcher=joblib hydra.launcher.n_jobs=2
DDQN_ENVS := exp.env=cartpole,acrobot,lunarlander,breakout

table-cnn-readout: setup ## CNN readout table (quick profile; PROFILE=paper for the paper's)
	$(LOCK) $(RUN) -m +exp=cnn_readout profile=$(PROFILE) seed=$(if $(filter paper,$(PROFILE)),$(SEEDS5),$(SEEDS3)) $(JOBLIB2)
	$(PY) scripts/make_tables.py cnn_readout

table-vit-probe: setup ## ViT probing table
	$(LOCK) $(RUN) -m +exp=vit_probe profile=$(PROFILE) seed=$(SEEDS3)
	$(PY) scripts/make_tables.py vit_probe

table-transfer: setup ## training-free transfer table
	$(LOCK) $(RUN) -m +exp=transfer profile=$(PROFILE) seed=$(SEEDS5)
	$(PY) scripts/make_tables.py transfer

table-ddqn: setup ## kernel-augmented Double DQN table
	$(LOCK) $(RUN) -m +exp=ddqn profile=$(PROFILE) exp.agent=sk,ddqn $(if $(filter paper,$(PROFILE)),$(DDQN_ENVS)) \
	  seed=$(if $(filter paper,$(PROFILE)),$(SEEDS10),$(SEEDS5)) $(JOBLIB2)
	$(PY) scripts/make_tables.py ddqn

paper-tables: ## every table at paper scale (GPU recommended)
	$(MAKE) table-cnn-readout table-vit-probe table-transfer table-ddqn PROFILE=paper

clean: ## remove Hydra outputs and caches (keeps results/)
	rm -rf outputs multirun .cache

PROFILE ?= quick
