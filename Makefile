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
PROFILE ?= quick
# Backbones of the paper profiles. ViT-S/16 pretrained on ImageNet-21k and fine-tuned on ImageNet-1k (timm's
# AugReg weights; scripts/paper_data.py fetches them into the hub cache), or VIT_CHECKPOINT=/path/to/file.
VIT_S16 := vit_small_patch16_224.augreg_in21k_ft_in1k
VIT_PAPER := backbone=timm backbone.model=$(VIT_S16) backbone.img_size=224$(if $(VIT_CHECKPOINT), backbone.checkpoint_path=$(VIT_CHECKPOINT))
EFFNET_PAPER := backbone=efficientnet_lite0 backbone.img_size=224

.PHONY: setup data demo test test-slow test-cuda bench-sk bench-sk-scale tables table-cnn-readout table-vit-probe \
        table-transfer table-ddqn table-ddqn-ablation ddqn-random ddqn-tune ddqn-cartpole ddqn-acrobot \
        ddqn-lunarlander ddqn-breakout ddqn-cost table-smoke paper-data paper-tables clean help

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

# The newcomer's first run: the main job (CNN readout, quick profile) end to end for one seed, two torch threads,
# into outputs/demo/ (records, table, figure); results/ is left alone. The full table: make table-cnn-readout.
# Wall-clock here (2-core AMD EPYC, 2026-12-02, commit 8677cfb, set-up already done): 4 min 7 s.
DEMO := outputs/demo
demo: setup ## the main job on the offline default, one seed end to end (a table and its figure in outputs/demo/)
	$(RUN) +exp=cnn_readout seed=0 threads=2 logger=none paths.runs=$(DEMO)/runs
	$(PY) scripts/make_tables.py cnn_readout --runs $(DEMO)/runs --out $(DEMO) --allow-uncommitted
	@echo "demo: table $(DEMO)/cnn_readout.md, figure $(DEMO)/cnn_readout.png (one seed). The full table (10 seeds): make table-cnn-readout"

test: setup ## the test suite (CPU, < 10 min)
	$(PY) -m pytest -q

test-slow: setup ## the slow tests left out of `make test` (end to end: every experiment's smoke profile to its table)
	$(PY) -m pytest -q -m slow

test-cuda: setup ## the CUDA tests (marked cuda, or cuda in their name); without a CUDA device it says so and exits 0
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  $(PY) -m pytest -q -k cuda; \
	else \
	  echo "make test-cuda: no CUDA device here (torch.cuda.is_available() is False), so no test ran."; \
	  echo "Run it on a machine with a GPU; 'make test' skips the CUDA tests, each with its reason."; \
	fi

# Wall-clock here: bench-sk 4.3 min (2-core Intel Xeon, 2026-12-08, commit 1fe9e5f); bench-sk-scale 6.4 min
# (2-core AMD EPYC, 2026-12-02, commit 8677cfb).
bench-sk: setup ## SK benchmark -> results/bench_sk.md (and results/bench_sk_cuda.md where CUDA is present)
	$(LOCK) $(PY) scripts/bench_sk.py --out results/bench_sk.md --cuda-out results/bench_sk_cuda.md

bench-sk-scale: setup ## SK at scale (IVF/HNSW index, file bank, 2-process sharded SK; N=10M) -> results/bench_sk_scale.md
	$(LOCK) $(PY) scripts/bench_sk_scale.py --out results/bench_sk_scale.md

tables: setup ## rebuild every table that has records (no runs)
	$(PY) scripts/make_tables.py

# The SK head's ablation on CartPole (configs/profile/ddqn/ablation.yaml), 3 seeds, with its own Double DQN
# reference: design 1 as first built (agent sk): its targets (fixed, learned), support size (64, 256, 1024) and k
# (8, 16, 32). Not part of the study (ddqn-*); its variants' differences are Holm-corrected together.
table-ddqn-ablation: setup ## Double DQN ablation of the SK head on CartPole (targets, support size, k)
	$(LOCK) $(RUN) -m +exp=ddqn profile=ablation exp.agent=sk exp.agents.sk.targets=fixed,learned seed=$(SEEDS3) $(JOBLIB2)
	$(LOCK) $(RUN) -m +exp=ddqn profile=ablation exp.agent=sk sk.head.support_size=64,1024 seed=$(SEEDS3) $(JOBLIB2)
	$(LOCK) $(RUN) -m +exp=ddqn profile=ablation exp.agent=sk sk.head.k=8,32 seed=$(SEEDS3) $(JOBLIB2)
	$(LOCK) $(RUN) -m +exp=ddqn profile=ablation exp.agent=ddqn seed=$(SEEDS3) $(JOBLIB2)
	$(PY) scripts/make_tables.py ddqn

table-smoke: setup
	$(RUN) -m +exp=smoke logger=none seed=$(SEEDS3)
	$(PY) scripts/make_tables.py smoke

JOBLIB2 := hydra/launcher=joblib hydra.launcher.n_jobs=2

# PROFILE=paper runs the paper's setting; the quick profiles keep Fashion-MNIST and the offline backbones.
# CNN readout, paper: CIFAR-10 with the CIFAR ResNet-18, 5 seeds, one job at a time (they share the GPU).
# Wall-clock of the quick profile here (commit 8677cfb, two one-thread jobs at a time, nothing else running):
# seeds 0-3 in 15 min on the AMD EPYC (2026-12-02), seeds 4-9 in 22 min on the Intel Xeon (2026-12-08): ~37 min.
table-cnn-readout: setup ## CNN readout table (quick profile; PROFILE=paper: CIFAR-10, ResNet-18)
ifeq ($(PROFILE),paper)
	$(LOCK) $(RUN) -m +exp=cnn_readout profile=paper data=cifar10 backbone=resnet18 seed=$(SEEDS10)
else
	$(LOCK) $(RUN) -m +exp=cnn_readout profile=$(PROFILE) seed=$(SEEDS10) $(JOBLIB2)
endif
	$(PY) scripts/make_tables.py cnn_readout

# Wall-clock of the quick profile here (commit 8677cfb, Intel Xeon, 2026-12-08, two jobs at a time): 16 min.
# ViT probing, paper: the pretrained timm ViT-S/16 probed on CIFAR-10 and on CIFAR-100 (two sweeps).
table-vit-probe: setup ## ViT probing table (PROFILE=paper: timm ViT-S/16 on CIFAR-10 and CIFAR-100)
ifeq ($(PROFILE),paper)
	$(LOCK) $(RUN) -m +exp=vit_probe profile=paper data=cifar10 $(VIT_PAPER) seed=$(SEEDS5)
	$(LOCK) $(RUN) -m +exp=vit_probe profile=paper data=cifar100 $(VIT_PAPER) seed=$(SEEDS5)
else
	$(LOCK) $(RUN) -m +exp=vit_probe profile=$(PROFILE) seed=$(SEEDS5) $(JOBLIB2)
endif
	$(PY) scripts/make_tables.py vit_probe

# Wall-clock of the quick profile here (commit 8677cfb, Intel Xeon, 2026-12-08, two jobs at a time): 65 min.
# Transfer, paper: EfficientNet-Lite0 and ViT-S/16 at their native 224 px to CIFAR-10, CIFAR-100 and
# Fashion-MNIST; the within-Fashion-MNIST part (small CNN, classes 0-4 -> 5-9) runs once, in the first sweep.
table-transfer: setup ## training-free transfer table (PROFILE=paper: pretrained backbones at 224 px to CIFAR-10/100, Fashion-MNIST)
ifeq ($(PROFILE),paper)
	$(LOCK) $(RUN) -m +exp=transfer profile=paper data=fashion_mnist $(EFFNET_PAPER) seed=$(SEEDS10)
	$(LOCK) $(RUN) -m +exp=transfer profile=paper data=cifar10,cifar100 $(EFFNET_PAPER) exp.within=false seed=$(SEEDS10)
	$(LOCK) $(RUN) -m +exp=transfer profile=paper data=cifar10,cifar100,fashion_mnist $(VIT_PAPER) exp.within=false seed=$(SEEDS10)
else
	$(LOCK) $(RUN) -m +exp=transfer profile=$(PROFILE) seed=$(SEEDS10) $(JOBLIB2)
endif
	$(PY) scripts/make_tables.py transfer

# Double DQN: the study of configs/exp/ddqn.yaml (exp.tuning: its agents, what each tunes, the tuning envs and
# seeds), driven by scripts/ddqn_study.py, one step a target. Run them one after another with nothing else on the
# machine (plan, budgets and measured times: configs/profile/ddqn/quick.yaml), in this order:
#   make ddqn-random ddqn-tune ddqn-cartpole ddqn-acrobot ddqn-lunarlander ddqn-breakout ddqn-cost tables
# (table-ddqn runs them all). Paper: the study's agents with their default settings, 10 seeds at the full budgets
# on a GPU machine (devices: exp.envs.<env>.device; the MLP envs run on its CPU cores), DDQN_JOBS jobs at a time.
DDQN := $(LOCK) $(PY) scripts/ddqn_study.py
DDQN_AGENTS := exp.agent=ddqn,ddqn_mc,sk_td,sk_episodic
DDQN_JOBS ?= 8
ddqn-random: setup ## Double DQN study: the uniform random policy's scores, every env (the 0 of the normalised scores)
	$(DDQN) random
ddqn-tune: setup ## Double DQN study: every agent's settings on the tuning seeds, CartPole then Acrobot
	$(DDQN) tune --env cartpole
	$(DDQN) tune --env acrobot
ddqn-cartpole: setup ## Double DQN study: CartPole, each agent with its tuned setting, 10 seeds
	$(DDQN) run --env cartpole --seeds 0-9
ddqn-acrobot: setup ## Double DQN study: Acrobot, 10 seeds
	$(DDQN) run --env acrobot --seeds 0-9
ddqn-lunarlander: setup ## Double DQN study: LunarLander, 5 seeds
	$(DDQN) run --env lunarlander --seeds 0-4
ddqn-breakout: setup ## Double DQN study: MinAtar Breakout, 5 seeds
	$(DDQN) run --env breakout --seeds 0-4
ddqn-cost: setup ## Double DQN study: every agent's time per env step, one run at a time (clean timings)
	$(DDQN) cost
table-ddqn: setup ## kernel-augmented Double DQN table: the whole study, then the table (PROFILE=paper: 10 seeds, full budgets)
ifeq ($(PROFILE),paper)
	$(LOCK) $(RUN) -m +exp=ddqn profile=paper $(DDQN_AGENTS) exp.env=cartpole,acrobot,lunarlander,breakout \
	  seed=$(SEEDS10) hydra/launcher=joblib hydra.launcher.n_jobs=$(DDQN_JOBS)
else
	$(MAKE) ddqn-random ddqn-tune ddqn-cartpole ddqn-acrobot ddqn-lunarlander ddqn-breakout ddqn-cost
endif
	$(PY) scripts/make_tables.py ddqn

paper-data: $(STAMP) ## fetch CIFAR-10/100 (and Fashion-MNIST) into SK_DATA and the ViT-S/16 weights into the hub cache (network)
	$(PY) scripts/paper_data.py

paper-tables: $(STAMP) ## every table at paper scale (GPU); stops at once, offline, if data or weights are missing
	$(PY) scripts/paper_data.py --check $(if $(VIT_CHECKPOINT),--vit-checkpoint $(VIT_CHECKPOINT))
	$(MAKE) table-cnn-readout table-vit-probe table-transfer table-ddqn PROFILE=paper

clean: ## remove Hydra outputs and caches (keeps results/)
	rm -rf outputs multirun .cache
