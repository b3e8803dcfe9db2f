# Two commands do all setup on a fresh machine: `make demo` and `make test`.
# Both create .venv if missing and (re)install the project when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.anytopo-installed

.PHONY: install demo test test-slow test-cluster slurm-deps slurm-cluster s3-server bench bench-quick gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest

# The long fault, cluster and trajectory runs kept out of `make test` (README, "Setup"); .ci/run runs both.
test-slow: install
	$(PY) -m pytest -m slow

# Against a real two-node Slurm cluster the tests start and stop (tests/_slurm.py); root, Debian's Slurm 22.05.
test-cluster: install slurm-deps
	$(PY) -m pytest -m cluster

slurm-deps:
	@command -v slurmctld >/dev/null && command -v munged >/dev/null || { \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge; }

# A cluster to try things by hand: prints how to reach it, stays up until Ctrl-C.
slurm-cluster: install slurm-deps
	cd tests && PYTHONPATH=../bench ../$(PY) _slurm.py up

# An S3 server (SeaweedFS, from the test extra) to try --checkpoint-dir s3://... by hand; Ctrl-C stops it.
s3-server: install
	$(PY) bench/_s3.py up

# Performance ratios, measured side by side (minutes; not part of `make test`). Results: bench/results/.
bench: install
	$(PY) bench/ckpt_io.py
	$(PY) bench/train_loop.py
	$(PY) bench/ddp_step.py
	$(PY) bench/s3_io.py

bench-quick: install
	$(PY) bench/ckpt_io.py --quick
	$(PY) bench/train_loop.py --quick
	$(PY) bench/ddp_step.py --quick
	$(PY) bench/s3_io.py --quick

# CUDA paths (nccl DDP, DP on 1 GPU, AMP, channels_last, cuda->cpu, FSDP2, SyncBatchNorm, pinned async saves); on a GPU machine.
gpu-check: install
	bash bench/gpu_check.sh

clean:
	rm -rf demo-output .pytest_cache bench/results
