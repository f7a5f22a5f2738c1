# Entry points for people and CI. Everything runs inside .venv (created by `make setup`).
VENV    ?= .venv
PY      := $(VENV)/bin/python
JOB     ?= jobs/demo.yaml
SHARDS  ?=
OUTPUT  ?=
SET     ?=
S3_DIR  ?= .cache/s3
S3_PORT ?= 8333
GPU_JOB ?= jobs/r1-distill-qwen-7b-math.yaml
BENCH_ARGS ?=

.PHONY: setup generate prepare demo-shards test test-fast bench bench-cpu bench-gpu gpu-estimates calibrate calibrate-traces s3 clean

setup:
	bash scripts/setup.sh

# With RAY_ADDRESS set, the run is submitted to that cluster (`ray job submit`, stable submission id).
# SET='sampling.n=8 sampling.max_tokens=512' overrides job keys (one --set each).
generate:
	$(PY) -m pipeline $(if $(RAY_ADDRESS),submit,generate) --job $(JOB) $(if $(SHARDS),--shards '$(SHARDS)') $(if $(OUTPUT),--output '$(OUTPUT)') $(foreach s,$(SET),--set '$(s)')

# make prepare SOURCE=gsm8k.jsonl FORMAT=gsm8k OUTPUT=prompts/gsm8k [ARGS='--rows-per-shard 5000']
ifdef OUT
$(warning OUT= is deprecated: use OUTPUT=, as for generate)
OUTPUT := $(OUT)
endif
prepare:
	$(PY) -m pipeline prepare '$(SOURCE)' '$(OUTPUT)' --format $(FORMAT) $(ARGS)

# The demo shards shipped in the repo, rebuilt from demo/prompts.jsonl.
demo-shards:
	rm -f demo/shards/*.parquet
	$(PY) -m pipeline prepare demo/prompts.jsonl demo/shards --format generic --name demo \
		--map prompt=prompt --map answer=answer --const domain=math --rows-per-shard 6
	rm -f demo/shards/_prepare_report.json

test:
	$(PY) -m pytest tests

test-fast:
	$(PY) -m pytest tests -m "not slow"

# Every performance figure against its target (~8 min here): generation vs raw vLLM, CPU stages,
# 1M-row memory soak; writes bench/results/latest.{json,md} and the table in docs/performance.md.
bench:
	$(PY) bench/run.py

# Only the CPU stages (filters, math throughput and accuracy, sandbox overhead): bench/results/cpu_stages.json
bench-cpu:
	$(PY) bench/cpu_stages.py

# make bench's GPU mode, on one GPU node after `make setup`: one engine of GPU_JOB's model, pipeline vs raw
# vLLM with R1-length outputs (128 prompts x 4 x 8192 tokens), next to the estimate; prints the table row
# for docs/gpu-estimates.md and writes bench/results/gpu-*.json. BENCH_ARGS='--prompts 64 --tokens 16384'
bench-gpu:
	$(PY) bench/gpu.py --job $(GPU_JOB) $(BENCH_ARGS)

# Estimated decode tokens/s per engine for R1-length traces (pipeline/estimate.py; docs/gpu-estimates.md);
# BENCH_ARGS='--model r1-distill-qwen-14b --gpu h100 --output-tokens 14000' for one case.
gpu-estimates:
	$(PY) -m pipeline.estimate $(if $(BENCH_ARGS),$(BENCH_ARGS),--table)

# Readability thresholds measured on real English and Chinese text (downloads the Chinese corpus
# once into .cache/calibration); SAMPLES='out/run/samples/*.parquet' adds a run's real model output.
# Writes bench/results/readability_calibration.json
calibrate:
	$(PY) bench/calibrate_readability.py $(if $(SAMPLES),--samples '$(SAMPLES)')

# Filters and math verifier on 440 real long-CoT traces (../shared/real_traces, or REAL_TRACES=dir;
# never copied into the repo): false rejects, loops caught, agreement with the source's labels.
# Writes bench/results/real_traces_calibration.json
calibrate-traces:
	$(PY) bench/calibrate_real_traces.py

# A local S3-compatible server (SeaweedFS) on 127.0.0.1 for development; credentials from the
# environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), then use AWS_ENDPOINT_URL=http://127.0.0.1:$(S3_PORT).
s3:
	$(PY) -m pipeline.devs3 --dir $(S3_DIR) --port $(S3_PORT)

# make mix MIX=mixes/r1-style.yaml [OUTPUT=s3://bucket/datasets/r1-style]: one dataset from several published ones
.PHONY: mix
mix:
	$(PY) -m pipeline mix '$(MIX)' $(if $(OUTPUT),--output '$(OUTPUT)')

clean:
	rm -rf out .pytest_cache
