import pytest

from pipeline.config import ConfigError, load_job
from pipeline.run import check_fits


def test_a_plan_that_cannot_be_placed_fails_clearly_instead_of_hanging():
    job = load_job(None, resources={"engine_actors": 2, "engine_cpus": 1})
    with pytest.raises(ConfigError, match="needs 3.5 CPUs"):
        check_fits(job, {"CPU": 2.0}, use_gpu=False)
    check_fits(job, {"CPU": 8.0}, use_gpu=False)


def test_gpu_plan_counts_tensor_parallel_gpus():
    job = load_job(None, engine={"tensor_parallel_size": 4}, resources={"engine_actors": 2})
    with pytest.raises(ConfigError, match="need 8 GPUs"):
        check_fits(job, {"CPU": 64.0, "GPU": 4.0}, use_gpu=True)
    check_fits(job, {"CPU": 64.0, "GPU": 8.0}, use_gpu=True)
