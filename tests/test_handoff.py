"""Hand-off to fine-tuning: the published dataset loads with `datasets` and renders with the chat template."""

import time

import pytest

from pipeline.publish import publish
from pipeline.storage import Storage
from test_publish import committed, samples


def published(uri: str) -> Storage:
    storage = Storage(uri)
    committed(storage, "a", samples("a", 6))
    publish(storage, {"run_id": "r", "job": {"name": "t"}, "model": "m"}, rows_per_file=2, started=time.time())
    return storage


def test_load_dataset_and_render_with_the_default_models_chat_template(tmp_path, model_dir):
    from datasets import load_dataset
    from transformers import AutoTokenizer

    published(str(tmp_path / "ds"))
    ds = load_dataset("parquet", data_files=str(tmp_path / "ds" / "data" / "*.parquet"), split="train")
    assert ds.num_rows == 3 and ds[0]["messages"][0]["role"] == "user"
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(ds[0]["messages"], tokenize=False)
    assert "<|im_start|>user\nWhat is 0+0?<|im_end|>" in text
    assert "<|im_start|>assistant\n<think>\n0+0\n</think>\n\n\\boxed{0}<|im_end|>" in text


@pytest.mark.slow
def test_load_dataset_from_s3(s3, bucket):
    from datasets import load_dataset

    published(f"s3://{bucket}/ds")
    ds = load_dataset("parquet", data_files=f"s3://{bucket}/ds/data/*.parquet", split="train",
                      storage_options={"endpoint_url": s3["AWS_ENDPOINT_URL"]})
    assert ds.num_rows == 3 and ds[0]["messages"][1]["role"] == "assistant"
