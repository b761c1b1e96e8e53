"""bench/train_throughput.py still runs against the current code (no timings asserted: those are its output).

The benchmark builds Trainers, prepared data and bare loops through the library's own APIs; this keeps an
API change from breaking it unnoticed (it takes 11 minutes, so nobody runs it on every change).
"""

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "bench" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer(bench, tmp_path_factory):
    return bench.train_tokenizer(tmp_path_factory.mktemp("bench-tokenizer"))


# bf16 lanes take the same code path with autocast on (and a minute of CI on a CPU without bf16 matmuls).
@pytest.mark.parametrize("variant", ["fp32:trainer", "fp32:bare"])
def test_a_variant_builds_and_steps_alone(bench, tokenizer, tmp_path, variant):
    args = argparse.Namespace(variant=variant, shape="d256", work_dir=str(tmp_path), tokenizer=str(tokenizer),
                              reference=None)
    result = bench.rss_worker(args)
    assert result["peak_rss_mb"] >= result["setup_rss_mb"] > 0


def test_the_flop_count_matches_torchs_counter_for_the_bare_step(bench, tokenizer, tmp_path):
    steps, facts = bench.build_variants("d256", tmp_path, tokenizer, None, [("fp32", False)], only="bare")
    (step,) = steps.values()
    step()
    analytic = bench.step_flops(facts["config"], facts["batch_size"], "aios")
    counted = bench.counted_flops(step)
    assert analytic["total"] == analytic["forward"] + analytic["backward"]
    assert math.isclose(analytic["total"], counted, rel_tol=0.01), (analytic, counted)
