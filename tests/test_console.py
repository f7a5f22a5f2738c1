"""The console: the pipeline's own lines on stderr, the URI alone on stdout, everything else in the run's log."""

import io
import json
import logging
import re
import subprocess
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import wait_for
from pipeline import console
from pipeline.config import REPO_ROOT
from pipeline.storage import Storage


@pytest.fixture
def term():
    """A console set up as the command line does, writing to a buffer; undone afterwards."""
    stream = io.StringIO()
    yield stream, console.setup(verbose=False, every_s=0.05, stream=stream)
    console.teardown()


def test_console_shows_the_pipelines_lines_and_verbose_shows_the_rest(monkeypatch):
    quiet, loud = io.StringIO(), io.StringIO()
    library = logging.getLogger("botocore.credentials")  # any library's logger that propagates
    monkeypatch.setattr(library, "level", logging.DEBUG)  # as Ray Data sets its own
    for stream, verbose in ((quiet, False), (loud, True)):
        console.setup(verbose=verbose, stream=stream)
        try:
            logging.getLogger("pipeline").info("first samples after 3s")
            logging.getLogger("pipeline").info("only in the file", extra={"console": False})
            logging.getLogger("pipeline.run").warning("lease held by another run")
            library.info("Found credentials in environment variables.")
            library.debug("scheduling loop")  # not even with --verbose
            logging.getLogger(console.WORKERS).warning("(EngineStage pid=7) WARNING [cpu.py:1] Triton is not installed")
        finally:
            console.teardown()
    assert quiet.getvalue().splitlines() == ["first samples after 3s", "warning: lease held by another run"]
    assert loud.getvalue().splitlines() == [
        "first samples after 3s", "warning: lease held by another run",
        "[botocore.credentials] INFO Found credentials in environment variables.",
        "(EngineStage pid=7) WARNING [cpu.py:1] Triton is not installed"]


def test_worker_lines_get_their_level_and_tracebacks_are_errors(caplog):
    lines = console.WorkerLines()
    batch = {"pid": 12, "ip": "10.0.0.2", "localhost": "10.0.0.2", "actor_name": "MapWorker(MapBatches(EngineStage))"}
    with caplog.at_level(logging.DEBUG, logger=console.WORKERS):
        lines({**batch, "is_err": False, "lines": [
            "(EngineCore pid=13) INFO 11-29 17:06:32 [core.py:133] Initializing a V1 LLM engine",
            "\x1b[33m(MainProcess pid=12) WARNING 11-29 17:06:25 [vllm.py:1703] Enforce eager set\x1b[0m",
            "(MainProcess pid=12) ERROR 11-29 17:06:56 [async_llm.py:906] AsyncLLM output_handler failed.",
            "plain stdout"]})
        lines({**batch, "is_err": True, "lines": [
            "Loading safetensors checkpoint shards: 100% Completed",
            "Traceback (most recent call last):",
            '  File "resource_tracker.py", line 239, in main',
            "    cache[rtype].remove(name)",
            "KeyError: '/psm_c7019ebf'",
            "after the traceback"]})
        lines({"pid": 5, "ip": "10.0.0.3", "localhost": "10.0.0.2", "task_name": "MapBatches(read)", "is_err": False,
               "lines": ["read a shard"]})
    got = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert got == [
        ("INFO", "(EngineStage pid=12) (EngineCore pid=13) INFO 11-29 17:06:32 [core.py:133] Initializing a V1 LLM engine"),
        ("WARNING", "(EngineStage pid=12) (MainProcess pid=12) WARNING 11-29 17:06:25 [vllm.py:1703] Enforce eager set"),
        ("ERROR", "(EngineStage pid=12) (MainProcess pid=12) ERROR 11-29 17:06:56 [async_llm.py:906] AsyncLLM output_handler failed."),
        ("INFO", "(EngineStage pid=12) plain stdout"),
        ("WARNING", "(EngineStage pid=12) Loading safetensors checkpoint shards: 100% Completed"),
        ("ERROR", "(EngineStage pid=12) Traceback (most recent call last):"),
        ("ERROR", '(EngineStage pid=12)   File "resource_tracker.py", line 239, in main'),
        ("ERROR", "(EngineStage pid=12)     cache[rtype].remove(name)"),
        ("ERROR", "(EngineStage pid=12) KeyError: '/psm_c7019ebf'"),
        ("WARNING", "(EngineStage pid=12) after the traceback"),
        ("INFO", "(read pid=5 ip=10.0.0.3) read a shard"),
    ]


def test_progress_without_a_terminal_prints_a_line_every_few_seconds_and_at_the_end(term):
    stream, _ = term
    with console.Progress(total=10) as progress:
        wait_for(lambda: "waiting for the first samples" in stream.getvalue(), "a line before any result", timeout_s=30)
        progress.add(console.Counts(rows=4, accepted=1, tokens=400, reasons=Counter()))
        progress.add(console.Counts(rows=6, accepted=2, tokens=600, reasons=Counter({"truncated": 7})))
    last = stream.getvalue().splitlines()[-1]
    assert re.fullmatch(r"samples 10/10 \(100%\) \| accepted 3 \(30\.0%\) \| [\d.,]+ tok/s \| [\d.,]+ samples/s \| "
                        r"elapsed 0:\d\d \| ETA 0:00", last), last
    assert progress.reasons == {"truncated": 7}


def test_batch_counts_count_only_the_new_rows_and_what_was_accepted():
    batch = pa.table({"accepted": [True, False, True], "completion_tokens": [10, None, 5],
                      "reject_reason": [None, "truncated", None]})
    counts = console.batch_counts(batch, rows=2)
    assert (counts.rows, counts.accepted, counts.tokens, counts.reasons) == (2, 2, 15, Counter({"truncated": 1}))


def test_run_log_holds_everything_and_a_failure_shows_the_lines_that_matter(term, tmp_path):
    stream, _ = term
    logging.getLogger("vllm").warning("before the log file existed")
    path = str(tmp_path / "_pipeline" / "logs" / "run.log")
    with pytest.raises(RuntimeError, match="engine died"):
        with console.run_log(path):
            logging.getLogger(console.WORKERS).info("(EngineStage pid=1) INFO [core.py:1] engine started")
            logging.getLogger(console.WORKERS).error("(EngineStage pid=1) RuntimeError: CUDA out of memory")
            raise RuntimeError("engine died")
    text = open(path).read()
    for line in ("before the log file existed", "engine started", "CUDA out of memory", "run failed: RuntimeError"):
        assert line in text
    shown = stream.getvalue()
    assert "  (EngineStage pid=1) RuntimeError: CUDA out of memory" in shown and f"full log: {path}" in shown
    assert "engine started" not in shown and "before the log file" not in shown
    with pytest.raises(ValueError):  # nothing from engines, Ray or libraries: the error line says it all
        with console.run_log(str(tmp_path / "bad-input.log")):
            raise ValueError("no such shard")
    assert stream.getvalue() == shown


def test_log_path_is_in_the_bookkeeping_folder_locally_and_a_local_folder_for_object_storage(tmp_path, monkeypatch):
    local = Storage(str(tmp_path / "out"))
    assert console.log_path(local, "r1") == f"{local.root}/_pipeline/logs/r1.log"
    monkeypatch.setenv("DISTILL_LOG_DIR", str(tmp_path / "logs"))
    assert console.log_path(None, "c1", "curate") == str(tmp_path / "logs" / "curate" / "c1.log")


def test_summaries_name_accepted_by_domain_top_reasons_and_where_things_are(term, tmp_path):
    stream, _ = term
    storage = Storage(str(tmp_path / "out"))
    manifest = {"version": "v000002-abc", "run_id": "r2", "timings": {"total_s": 75}, "run": {"prompts_to_generate": 3, "prompts_already_committed": 9},
                "stats": {"samples": 48, "accepted": 12, "accept_rate": 0.25, "domains": {
                    "math": {"samples": 40, "accepted": 10, "accept_rate": 0.25, "prompts": 10, "prompts_with_accepted": 6,
                             "reasons": {"truncated": 20, "answer_mismatch": 10}},
                    "code": {"samples": 8, "accepted": 2, "accept_rate": 0.25, "prompts": 2, "prompts_with_accepted": 1,
                             "reasons": {"tests_failed": 6}}}}}
    console.generate_summary(manifest, storage, "/logs/run.log", "r2")
    out = stream.getvalue().splitlines()
    assert out[0] == "published v000002-abc in 1:15 (3 prompts generated now, 9 committed earlier)"
    assert re.fullmatch(r"\s+math\s+40\s+10\s+25\.0%\s+6/10", out[2]) and re.fullmatch(r"\s+all\s+48\s+12\s+25\.0%\s+7/12", out[4])
    assert "truncated 20 (41.7%), answer_mismatch 10 (20.8%), tests_failed 6 (12.5%)" in out[5]
    assert out[-3].split() == ["report", storage.url("report.md")]
    assert f'datasets.load_dataset("{storage.url()}")' in out[-2]
    stream.seek(0), stream.truncate()  # a rerun that changed nothing; a version nothing was accepted in
    empty = {**manifest, "stats": {**manifest["stats"], "accepted": 0}}
    console.generate_summary(empty, storage, "/logs/run.log", "r3")
    out = stream.getvalue().splitlines()
    assert out[0] == f"warning: no sample was accepted: v000002-abc has no training rows (see the reject reasons and {storage.url('report.md')})"
    assert out[1] == "nothing new to generate or publish: v000002-abc (run r2) is current"
    assert out[-2].split() == ["card", storage.url("README.md")]  # nothing to load_dataset
    console.prepare_summary(5, 2, {"bad_row": 2, "duplicate": 1}, ["o/prompts-00000.parquet"],
                            [{"file": "a.jsonl", "row": 2, "error": "missing field 'question'"}], "o/_prepare_report.json", most=1)
    text = stream.getvalue()
    assert "prepare: read 5, written 2, dropped 3, shards 1" in text and "a.jsonl:2: missing field 'question'" in text
    assert "... 1 more (the first 1,000 are in o/_prepare_report.json)" in text


# What the demo's console may show: the pipeline's own lines only. Ray's C++ core writes one
# ERROR-level notice to the driver's stderr itself when Ray Data creates its actors
# (ray-project/ray#53727, harmless); no Python hook reaches it, so it is the one line allowed.
RAY_CORE_NOTICE = re.compile(r"^\[[\d\- :,]+ E \d+ \d+\] core_worker\.cc:\d+: Actor with class name: .* has constructor "
                             r"arguments in the object store and max_restarts > 0")
NOISE = re.compile(r"\((EngineStage|MapWorker|EngineCore|CheckStage|RenderStage|Worker)|vllm|vLLM|Triton|INFO|WARNING|"
                   r"streaming_executor|Started a local Ray|Traceback|(^|\s)ERROR\s|\x1b\[")


@pytest.mark.slow
def test_generate_on_the_demo_shows_a_header_progress_and_summary_and_logs_the_engines(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--progress-every", "2", "generate", "--job", "jobs/demo.yaml",
         "--output", str(out), "--set", "sampling.n=2", "--set", "sampling.max_tokens=16"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [str(out)]  # the URI, alone and last
    err = proc.stderr.splitlines()
    assert err[0] == "generate: job demo, model SmolLM2-135M-Instruct (n 2, max_tokens 16, temperature 0.6)"
    assert err[1].split() == ["prompts", "12", "in", "2", "shards:", "12", "to", "generate,", "0", "already", "committed"]
    (log_line,) = [line for line in err if line.split()[:1] == ["log"] and "--verbose" in line]
    log_file = log_line.split()[1]
    assert log_file.startswith(f"{out}/_pipeline/logs/") and log_file.endswith(".log")
    assert [line for line in err if re.match(r"samples \d+/24 \(\d+%\) \| accepted \d+", line)]
    assert "first samples after" in proc.stderr
    assert any(re.fullmatch(r"published v\d{6}-\w+ in \d+:\d\d \(12 prompts generated now, 0 committed earlier\)", line)
               for line in err)
    assert [line.split()[:2] for line in err[-3:]] == [["report", f"{out}/report.md"], ["card", f"{out}/README.md"],
                                                      ["log", log_file]]
    noise = [line for line in err if NOISE.search(line) and not RAY_CORE_NOTICE.match(line)]
    assert not noise, noise
    text = open(log_file).read()
    # no traceback or error on success, fixed at the cause: not on the console, nor in the log of engines and Ray
    errors = [line for line in text.splitlines() if re.search(r"Traceback|(^|\s)ERROR\s", line)]
    assert not errors, "\n".join(errors[:40])
    (engine,) = json.loads((out / "_manifest.json").read_text())["engines"]
    # vllm.LLM's scheduler defaults on CPU (256 sequences), not AsyncLLM's engine-context 128
    assert engine["role"] == "generator" and engine["max_num_seqs"] == 256 and engine["max_num_batched_tokens"] == 8192
    assert re.search(r"workers: \(EngineStage pid=\d+\) .*INFO .*\[\w+\.py:\d+\]", text), "no engine start-up line in the log"
    assert "Started a local Ray instance" in text and "first samples after" in text
    assert "Autoscaler status" not in text  # its periodic dumps are filtered to events, as Ray's own printing does


def test_prepare_reports_progress_then_a_table_of_what_was_dropped(tmp_path):
    src = tmp_path / "gsm.jsonl"
    good = [f'{{"question": "What is {i} + 1?", "answer": "#### {i + 1}"}}' for i in range(2500)]
    src.write_text("\n".join([*good, '{"question": "no answer"}', good[0]]) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--progress-every", "1", "prepare", str(src),
                           str(tmp_path / "out"), "--format", "gsm8k"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(tmp_path / "out")]
    # progress lines every second while it runs (how many depends on the machine), the final one last
    end = proc.stderr.splitlines().index("prepare: read 2,502, written 2,500, dropped 2, shards 1")
    progress, err = proc.stderr.splitlines()[:end], proc.stderr.splitlines()[end:]
    assert progress and all(re.fullmatch(r"rows [\d,]+ \| written [\d,]+ \([\d.]+%\) \| .*rows/s.*", line) for line in progress)
    assert progress[-1].startswith("rows 2,502 | written 2,500 (99.9%) | "), progress
    assert [line.split() for line in err[1:4]] == [["dropped", "rows", "share", "of", "read"], ["bad_row", "1", "0.0%"],
                                                   ["duplicate", "1", "0.0%"]]
    assert f"    {src}:2501: missing field 'answer'" in err


@pytest.mark.slow
def test_curate_reports_progress_then_accepted_and_reject_reasons(tmp_path):
    rows = [{"id": str(i), "prompt": "What is 2+3?", "domain": "math", "answer": "5", "finish_reason": None,
             "completion": "The answer is $\\boxed{5}$." if i % 3 else "\\boxed{6}"} for i in range(9)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gen.parquet")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "curate", str(tmp_path / "gen.parquet"),
                           str(tmp_path / "cur.parquet")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [str(tmp_path / "cur.parquet")]
    err = proc.stderr.splitlines()
    assert err[-7].startswith("rows 9/9 (100%) | accepted 6 (66.7%) | ")
    assert re.fullmatch(r"curated 9 rows in 0:\d\d", err[-6])
    assert err[-4].split() == ["9", "6", "3", "66.7%"]
    assert err[-3].split() == ["rejected", "answer_mismatch", "3", "(33.3%)"]
    assert err[-2].split() == ["output", str(tmp_path / "cur.parquet")]
    assert err[-1].split()[0] == "log" and "Started a local Ray instance" in open(err[-1].split()[1]).read()
    noise = [line for line in err if NOISE.search(line) and not RAY_CORE_NOTICE.match(line)]
    assert not noise, noise
