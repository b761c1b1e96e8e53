"""bench/memory.py still runs against the current code (its numbers are its output, not asserted here)."""

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_flag_of_the_memory_bench_reaches_the_trainer(tmp_path):
    spec = importlib.util.spec_from_file_location("memory_bench", REPO / "bench" / "memory.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    args = argparse.Namespace(worker="all", work_dir=str(tmp_path), batch_size=1, steps=1, device="cpu")
    result = bench.worker(args)
    assert (result["optimizer"], result["autocast"]) == ("AdamW8bit", "torch.bfloat16")
    assert result["parameters"] > 29_000_000 and result["peak_rss_mb"] >= result["setup_rss_mb"] > 0
    assert len(result["step_times_s"]) == 1


def test_the_two_process_cases_ask_for_two_workers_and_their_zero_stage(tmp_path):
    spec = importlib.util.spec_from_file_location("memory_bench", REPO / "bench" / "memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for case, stage in (("ddp", "none"), ("zero1", "zero1"), ("zero2", "zero2"), ("zero3", "zero3")):
        config = bench.case_config(case, tmp_path, 4, "cpu")
        assert (config.zero_stage, config.max_workers, config.launcher) == (stage, 2, "ray")
        assert config.unavailable_features() == []
