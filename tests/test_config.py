import pytest

from pipeline.config import REPO_ROOT, ConfigError, load_job


def test_demo_job_loads_with_r1_defaults():
    job = load_job(REPO_ROOT / "jobs" / "demo.yaml")
    assert job.sampling["temperature"] == 0.6 and job.sampling["top_p"] == 0.95
    assert job.render.system_prompt is None
    assert "\\boxed{}" in job.render.instructions["math"]
    assert job.think_prefill is False
    assert all(s.startswith("/") for s in job.shards)  # relative paths made absolute for Ray workers


def test_every_shipped_job_validates():
    for path in (REPO_ROOT / "jobs").glob("*.yaml"):
        load_job(path)


def test_unknown_key_is_a_one_line_error(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("name: x\nengine:\n  tensor_paralel_size: 2\n")
    with pytest.raises(ConfigError) as e:
        load_job(p)
    assert "engine.tensor_paralel_size" in str(e.value) and "\n" not in str(e.value)


def test_missing_job_file():
    with pytest.raises(ConfigError, match="not found"):
        load_job("/nonexistent/job.yaml")


def test_reasoning_model_gets_the_think_prefill():
    assert load_job(None, model={"path": "x/y", "reasoning": True}).think_prefill is True
    assert load_job(None, model={"path": "x/y", "reasoning": True}, render={"think_prefill": False}).think_prefill is False


def test_hub_ids_are_not_turned_into_paths():
    assert load_job(None, model={"path": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"}).model.path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
