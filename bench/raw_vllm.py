"""The baseline of the generation benchmark: what a plain script does with vLLM.

Same model, engine arguments, prompts (the chat template applied) and sampling as the
pipeline's run; one `LLM.generate` call on all prompts. Prints one JSON line of timings.
"""

from __future__ import annotations

import json
import sys
import time


def main(spec_path: str) -> None:
    start = time.time()
    spec = json.loads(open(spec_path).read())
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(spec["model"])
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p in spec["prompts"]]
    llm = LLM(**spec["llm_kwargs"])
    ready = time.time()
    outputs = llm.generate(prompts, SamplingParams(**spec["sampling"]), use_tqdm=False)
    done = time.time()
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    print("RESULT " + json.dumps({"startup_s": ready - start, "generate_s": done - ready, "output_tokens": tokens,
                      "sequences": sum(len(o.outputs) for o in outputs)}))


if __name__ == "__main__":
    main(sys.argv[1])
