# Two commands do everything on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test bench clean slurm-up slurm-down

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The tested torch first: a CPU build lies on this disk; other versions download gigabytes.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pip install -q titans-pytorch
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) bench/bench_memory.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The main job: prepare the embedded corpus, train configs/demo.yaml on 2 local processes
# (one per GPU when GPUs are present), checkpoint, sample, print the run folder.
demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m titans_pretrain train configs/demo.yaml \
		--nproc $$($(PY) -c "import torch; print(torch.cuda.device_count() or 2)") $(DEMO_ARGS)

# A one-node Slurm on this machine (root; installs slurmctld, slurmd, slurm-client, munge with apt-get
# when missing). `make test` starts it by itself for tests/launch and stops what it started.
slurm-up:
	bash launch/local_slurm.sh start

slurm-down:
	bash launch/local_slurm.sh stop
