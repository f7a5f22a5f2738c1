"""The plan's placement rules, checked before any actor starts: per node, an engine's GPUs on one node."""

import pytest

from pipeline.config import ConfigError, judge_problems, load_job
from pipeline.run import check_fits, engine_pool, engine_tasks


def test_a_plan_that_cannot_be_placed_fails_clearly_instead_of_hanging():
    job = load_job(None, resources={"engine_actors": 2, "engine_cpus": 1})
    with pytest.raises(ConfigError, match="render actor or read task 1 of 2 needs 0.5 CPUs and 0 GPUs on one node"):
        check_fits(job, [{"CPU": 2.0}], use_gpu=False)
    check_fits(job, [{"CPU": 8.0}], use_gpu=False)


def test_an_engine_needs_its_gpus_on_one_node_not_somewhere_in_the_cluster():
    job = load_job(None, engine={"tensor_parallel_size": 4}, resources={"engine_actors": 2})
    one_gpu_pods = [{"CPU": 8.0, "GPU": 1.0}] * 8  # 8 GPUs in total, as in a RayJob of 1-GPU workers
    with pytest.raises(ConfigError, match="no node has 4 GPUs and an engine cannot span nodes"):
        check_fits(job, one_gpu_pods, use_gpu=True)
    with pytest.raises(ConfigError, match="engine|generator"):
        check_fits(job, [{"CPU": 64.0, "GPU": 4.0}], use_gpu=True)  # room for one engine, not two
    check_fits(job, [{"CPU": 32.0, "GPU": 4.0}] * 2, use_gpu=True)
    check_fits(job, [{"CPU": 64.0, "GPU": 8.0}], use_gpu=True)


def test_pipeline_parallel_stages_count_as_gpus_of_the_same_node():
    job = load_job(None, engine={"tensor_parallel_size": 2, "kwargs": {"pipeline_parallel_size": 2}})
    assert job.engine.gpus == 4
    with pytest.raises(ConfigError, match="no node has 4 GPUs"):
        check_fits(job, [{"CPU": 16.0, "GPU": 2.0}] * 2, use_gpu=True)
    check_fits(job, [{"CPU": 16.0, "GPU": 4.0}], use_gpu=True)


def test_data_parallel_engines_are_more_actors_not_an_engine_argument():
    with pytest.raises(ConfigError, match="data_parallel_size: each engine actor is one data-parallel replica"):
        load_job(None, engine={"kwargs": {"data_parallel_size": 2}})
    with pytest.raises(ConfigError, match="as engine.<key>"):
        load_job(None, engine={"kwargs": {"tensor_parallel_size": 2}})


def test_the_judge_inherits_the_generators_engine_and_needs_its_own_gpus():
    job = load_job(None, engine={"tensor_parallel_size": 2, "max_model_len": 34816},
                   judge={"enabled": True, "engine": {"gpu_memory_utilization": 0.8}})
    assert (job.judge_engine.tensor_parallel_size, job.judge_engine.max_model_len) == (2, 34816)
    assert job.judge_engine.gpu_memory_utilization == 0.8
    with pytest.raises(ConfigError, match="judge 1 of 1 needs 1 CPUs and 2 GPUs"):
        check_fits(job, [{"CPU": 16.0, "GPU": 2.0}], use_gpu=True)
    check_fits(job, [{"CPU": 16.0, "GPU": 4.0}], use_gpu=True)


def test_a_reasoning_judge_with_a_small_token_budget_is_refused():
    job = load_job(None, model={"reasoning": True}, judge={"enabled": True})
    assert any("replies would end mid-thought" in p for p in judge_problems(job))
    job.judge.sampling = {"temperature": 0.6, "max_tokens": 8192}
    assert judge_problems(job) == []
    job.engine.max_model_len = 4096
    assert any("leaves no room for a grading prompt" in p for p in judge_problems(job))
    assert judge_problems(load_job(None, judge={"enabled": True})) == []  # a non-reasoning judge answers at once


def test_engine_tasks_offer_one_and_a_half_times_the_running_capacity():
    job = load_job(None, sampling={"n": 4, "max_tokens": 64})
    assert engine_tasks(job.engine, 8, 4) == 48  # 1.5 x 1,024 (vLLM's largest default) / (8 prompts x 4)
    job.engine.kwargs["max_num_seqs"] = 256
    assert engine_tasks(job.engine, 8, 4) == 12


def test_vllm_ray_workers_get_a_placement_group_instead_of_the_actors_gpus():
    job = load_job(None, engine={"tensor_parallel_size": 4, "kwargs": {"distributed_executor_backend": "ray"}})
    args = engine_pool(job, "generator", True, None)
    assert args["num_gpus"] == 0 and args["ray_remote_args_fn"].args == (4, 1) and args["max_restarts"] == 3
    plain = engine_pool(load_job(None, engine={"tensor_parallel_size": 4}), "generator", True, None)
    assert plain["num_gpus"] == 4 and "ray_remote_args_fn" not in plain
    assert plain["runtime_env"]["env_vars"]["RAY_kill_child_processes_on_worker_exit"] == "0"
    with pytest.raises(ConfigError, match="ray places vLLM's workers on GPUs"):
        check_fits(job, [{"CPU": 8.0}], use_gpu=False)
