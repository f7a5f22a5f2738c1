# Entry points for people and CI. Everything runs inside .venv (created by `make setup`).
VENV    ?= .venv
PY      := $(VENV)/bin/python
JOB     ?= jobs/demo.yaml
SHARDS  ?=
OUTPUT  ?=
S3_DIR  ?= .cache/s3
S3_PORT ?= 8333

.PHONY: setup generate curate test test-fast s3 clean

setup:
	bash scripts/setup.sh

generate:
	$(PY) -m pipeline generate --job $(JOB) $(if $(SHARDS),--shards '$(SHARDS)') $(if $(OUTPUT),--output '$(OUTPUT)')

test:
	$(PY) -m pytest tests

test-fast:
	$(PY) -m pytest tests -m "not slow"

# A local S3-compatible server (SeaweedFS) on 127.0.0.1 for development; credentials from the
# environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), then use AWS_ENDPOINT_URL=http://127.0.0.1:$(S3_PORT).
s3:
	$(PY) -m pipeline.devs3 --dir $(S3_DIR) --port $(S3_PORT)

clean:
	rm -rf out .pytest_cache
