# The two set-up commands of a fresh machine: `make train` and `make test`.
# Each creates .venv if missing and installs the project into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU machines take torch's CPU build (a bare `torch` requirement would pull a multi-GB
# CUDA build); machines with a GPU driver keep the torch they install by the range.
TORCH_CPU := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: train test test-unit test-slow test-all lint env clean-runs extrapolation adaptive-span act kernelized sparse lsh-lowrank early-exit long-context

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/lmtrain train configs/default.yaml $(ARGS)

# The default suite: lint, then unit and integration tests (CPU; the `slow` marker excluded).
test: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Length extrapolation (issues 3 and 21): train ten ways of using positions at L=128 (the
# fixed schemes, the learned distance schemes and the DA-Transformer; auto-resumes), then
# evaluate all of them on the same tokens up to 32x the training length.
EXTRAP_SCHEMES := alibi rope sinusoidal learned none exp_decay gaussian kerple_log rel_buckets distance_aware
EXTRAP_LENGTHS := 128,256,512,1024,2048,4096
EXTRAP_OUT     := runs/extrapolation
extrapolation: $(STAMP)
	for p in $(EXTRAP_SCHEMES); do \
	  $(VENV)/bin/lmtrain train configs/experiments/extrapolation/$$p.yaml $(ARGS) || exit 1; done
	for m in sliding nonoverlap; do \
	  $(VENV)/bin/lmtrain eval-length $(foreach p,$(EXTRAP_SCHEMES),runs/extrap-$(p)) --mode $$m \
	    --lengths $(EXTRAP_LENGTHS) --max-tokens 16384 --out $(EXTRAP_OUT) || exit 1; done
	@echo "results: $(EXTRAP_OUT)/length_sliding.md, $(EXTRAP_OUT)/length_nonoverlap.md and the PNG plots there"

# Adaptive attention span (issue 5): learned spans against spans fixed at S, same model,
# same steps (auto-resumes); then the span table of the adaptive run.
adaptive-span: $(STAMP)
	$(VENV)/bin/lmtrain train configs/experiments/adaptive_span/adaptive.yaml $(ARGS)
	$(VENV)/bin/lmtrain train configs/experiments/adaptive_span/fixed_span.yaml $(ARGS)
	$(VENV)/bin/lmtrain inspect runs/adaptive-span
	@echo "validation: runs/adaptive-span/summary.json vs runs/fixed-span/summary.json"

# Universal Transformer with ACT halting and its all-steps control (same model and data);
# then the steps-per-token distribution and what halting saves in step time.
act: $(STAMP)
	$(VENV)/bin/lmtrain train configs/experiments/act.yaml $(ARGS)
	$(VENV)/bin/lmtrain train configs/experiments/act_all_steps.yaml $(ARGS)
	$(VENV)/bin/lmtrain inspect runs/act
	$(VENV)/bin/lmtrain bench act runs/act
	@echo "validation: runs/act/summary.json vs runs/act-all-steps/summary.json"

# Kernelized attention: Performer FAVOR+ against exact softmax attention, same model, data and
# steps (auto-resumes); then time and memory of both from L = 1k to 32k.
kernelized: $(STAMP)
	$(VENV)/bin/lmtrain train configs/experiments/performer.yaml $(ARGS)
	$(VENV)/bin/lmtrain train configs/experiments/performer_softmax.yaml $(ARGS)
	$(VENV)/bin/lmtrain bench attention --kind performer --rounds 1 --repeats 2
	@echo "validation: runs/performer/summary.json vs runs/performer-softmax/summary.json"

# Structured sparse attention (issue 18): each pattern against dense attention at equal steps,
# at L=2048 on the stdlib corpus (auto-resumes), then perplexity against length; the copy
# probe at L=1024 for each (the same budget) and passkey retrieval.
SPARSE_PRESETS := dense window
COPY_PRESETS   := dense window strided bigbird fixed shift
SPARSE_OUT     := runs/sparse
sparse: $(STAMP)
	for p in $(SPARSE_PRESETS); do \
	  $(VENV)/bin/lmtrain train configs/experiments/sparse/$$p.yaml $(ARGS) || exit 1; done
	$(VENV)/bin/lmtrain eval-length $(foreach p,$(SPARSE_PRESETS),runs/sparse-$(p)) --lengths 512,1024,2048,4096 \
	  --max-tokens 16384 --out $(SPARSE_OUT)
	for p in $(COPY_PRESETS); do \
	  $(VENV)/bin/lmtrain train configs/experiments/sparse/copy_$$p.yaml $(ARGS) || exit 1; done
	$(VENV)/bin/lmtrain eval-retrieval $(foreach p,$(COPY_PRESETS),runs/copy-$(p)) --task copy \
	  --lengths 256,512,1024 --trials 16 --out $(SPARSE_OUT)
	$(VENV)/bin/lmtrain eval-retrieval $(foreach p,$(SPARSE_PRESETS),runs/sparse-$(p)) --lengths 512,1024,2048 \
	  --trials 10 --out $(SPARSE_OUT)
	@echo "results: $(SPARSE_OUT)/ (length_nonoverlap.md, retrieval_copy.md, retrieval_passkey.md and plots)"

# LSH and causal low-rank attention (issue 22): dense, window-only (own segment), lowrank_causal
# and LSH at equal steps at L = 2048 on the stdlib corpus (auto-resumes), then perplexity against
# length; the copy probe with LSH at 1, 2 and 4 rounds beside full attention; the Reformer
# recipe at L = 16384; and the kernels' speed against dense SDPA from 1k to 32k.
LSH_PRESETS  := dense window lowrank lsh
LSH_OUT      := runs/lsh_lowrank
lsh-lowrank: $(STAMP)
	for p in $(LSH_PRESETS); do \
	  $(VENV)/bin/lmtrain train configs/experiments/lsh_lowrank/$$p.yaml $(ARGS) || exit 1; done
	$(VENV)/bin/lmtrain eval-length $(foreach p,$(LSH_PRESETS),runs/lsh-lowrank-$(p)) --lengths 1024,2048,4096 \
	  --max-tokens 16384 --out $(LSH_OUT)
	for p in shared_qk lsh1 lsh2 lsh4 dense; do \
	  $(VENV)/bin/lmtrain train configs/experiments/lsh_lowrank/copy_$$p.yaml $(ARGS) || exit 1; done
	$(VENV)/bin/lmtrain eval-retrieval runs/copy128-dense runs/copy128-shared-qk runs/copy128-lsh1 runs/copy128-lsh2 \
	  runs/copy128-lsh4 --task copy --lengths 128 --trials 256 --out $(LSH_OUT)
	for r in 1 2 4 8; do \
	  $(VENV)/bin/lmtrain eval-retrieval runs/copy128-lsh1 runs/copy128-lsh2 runs/copy128-lsh4 --task copy \
	    --lengths 128 --trials 256 \
	    --set model.attention.rounds=$$r --out $(LSH_OUT) || exit 1; \
	  $(VENV)/bin/lmtrain eval-retrieval runs/copy128-shared-qk --task copy --lengths 128 --trials 256 \
	    --set model.attention.buckets=0 --set model.attention.chunk=16 --set model.attention.rounds=$$r \
	    --out $(LSH_OUT) || exit 1; done
	$(VENV)/bin/lmtrain train configs/experiments/lsh_lowrank/reformer.yaml $(ARGS)
	$(VENV)/bin/lmtrain bench attention --kind lsh --rounds 1 --repeats 3
	$(VENV)/bin/lmtrain bench attention --kind lowrank_causal --rounds 1 --repeats 3
	@echo "results: $(LSH_OUT)/ and runs/*/summary.json (docs/results/lsh_lowrank.md)"

# Early exit (issue 23): the fixed-depth control and three early-exit trainings of the same
# 8-layer model (CALM's weights; aligned with halting units; aligned with exits in training),
# auto-resuming; loss against exit depth, calibrated thresholds, decode speed.
EE_OUT := runs/early-exit
early-exit: $(STAMP)
	for p in fixed calm aligned adaptive; do \
	  $(VENV)/bin/lmtrain train configs/experiments/early_exit/$$p.yaml $(ARGS) || exit 1; done
	$(VENV)/bin/lmtrain eval-exit runs/ee-calm --measure state --thresholds 0.999,0.998,0.995,0.99,0.98,0.95,0.9
	$(VENV)/bin/lmtrain eval-exit runs/ee-calm --measure softmax
	$(VENV)/bin/lmtrain eval-exit runs/ee-aligned --measure halting --thresholds 0.9,0.8,0.7,0.6,0.5,0.4,0.3
	$(VENV)/bin/lmtrain eval-exit runs/ee-adaptive --measure softmax
	$(VENV)/bin/lmtrain calibrate-exit runs/ee-calm --measure state --delta 0.05 --epsilon 0.05
	$(VENV)/bin/lmtrain calibrate-exit runs/ee-adaptive --measure softmax --delta 0.05 --epsilon 0.05 --prompts 1024
	$(VENV)/bin/lmtrain bench decode runs/ee-adaptive --exit softmax --rounds 5
	@echo "results: runs/ee-*/summary.json, runs/ee-*/eval/, runs/ee-{calm,adaptive}/exit/ (docs/results/early_exit.md)"

clean-runs:
	rm -rf runs

# Long-context training speed against the peers at 4k, 8k and 16k (docs/benchmarks.md; about 40 minutes on 2 cores).
long-context: $(STAMP)
	$(VENV)/bin/lmtrain bench train configs/default.yaml model.n_layers=6 model.d_model=512 model.n_heads=8 \
	  model.d_ff=2048 model.bias=false data.batch_size=1 --lengths 4096,8192,16384 --vs mpt,xtransformers \
	  --variant trainer.activation_checkpointing=true --variant "model.attention=performer model.position=rope" \
	  --variant "model.attention=sparse model.attention.window=512" --steps 2 --warmup 1 --rounds 1 --threads 2 \
	  --out runs/bench_train_lengths.json
