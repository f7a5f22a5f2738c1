"""Hand-off to fine-tuning: the published dataset loads with `datasets` and renders with the chat template."""

import pytest

from pipeline.storage import Storage
from test_publish import committed, held, run_publish, samples


def published(uri: str) -> dict:
    fenced = held(Storage(uri))
    committed(fenced, samples("a", 6))
    return run_publish(fenced, rows_per_file=2)


def test_load_dataset_and_render_with_the_default_models_chat_template(tmp_path, model_dir):
    from datasets import load_dataset
    from transformers import AutoTokenizer

    manifest = published(str(tmp_path / "ds"))
    ds = load_dataset(str(tmp_path / "ds"), split="train")  # follows the card to the current version
    assert ds.num_rows == 3 and ds[0]["messages"][0]["role"] == "user"
    assert sorted(ds["id"]) == ["a-0", "a-2", "a-4"]
    assert manifest["files"]["data"][0].startswith(f"data/{manifest['version']}/")
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(ds[0]["messages"], tokenize=False)
    assert "<|im_start|>user\nWhat is 0+0?<|im_end|>" in text
    assert "<|im_start|>assistant\n<think>\n0+0 (0)\n</think>\n\n\\boxed{0}<|im_end|>" in text


@pytest.mark.slow
def test_load_dataset_from_s3(s3, bucket):
    from datasets import load_dataset

    manifest = published(f"s3://{bucket}/ds")
    files = [f"s3://{bucket}/ds/{rel}" for rel in manifest["files"]["data"]]  # the manifest names the version's files
    ds = load_dataset("parquet", data_files=files, split="train",
                      storage_options={"endpoint_url": s3["AWS_ENDPOINT_URL"]})
    assert ds.num_rows == 3 and ds[0]["messages"][1]["role"] == "assistant"
