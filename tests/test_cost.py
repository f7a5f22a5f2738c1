"""What a dataset cost: run ledgers summed per configuration, per accepted sample."""

import pyarrow as pa

from pipeline.cost import RUNS, Ledger, totals
from test_commits import fenced  # noqa: F401  (fixture)


def batch(domain: str, n: int) -> pa.Table:
    return pa.table({"domain": [domain] * n, "prompt_tokens": [10] * n, "completion_tokens": [100] * n})


def test_ledgers_of_one_configuration_add_up_per_domain_and_per_accepted_sample(fenced):  # noqa: F811
    a = Ledger(fenced, "run-a", "fp", engines=2, gpus_per_engine=4)
    a.add(batch("math", 3))
    a.add(batch("code", 1))
    a.save()
    rec = fenced.storage.read_json(f"{RUNS}/run-a.json")
    assert rec["gpu_s"] == round(rec["engine_s"] * 4, 1) and rec["engines"] == 2
    b = Ledger(fenced, "run-b", "fp", engines=1, gpus_per_engine=1)
    b.add(batch("math", 2))
    b.save()
    other = Ledger(fenced, "run-c", "other-fp", engines=1, gpus_per_engine=1)
    other.add(batch("math", 50))
    other.save()
    cost = totals(fenced.storage, "fp", {"math": 4, "code": 0})
    assert cost["runs"] == 2
    assert cost["prompt_tokens"] == 60 and cost["completion_tokens"] == 600
    assert cost["by_domain"]["math"] == {"samples": 5, "prompt": 50, "completion": 500, "accepted": 4,
                                         "tokens_per_accepted": 137.5}
    assert cost["by_domain"]["code"]["tokens_per_accepted"] is None
    assert cost["per_accepted_sample"]["tokens"] == 165.0
