"""The benchmark's measures of the limit: which matrix products a model runs and their
rate alone (the shape ceiling), the round bound derived from them, and where a case's
time goes by kind of operator."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lada.experiments.bench import cpu_description, gemm_ceiling, linear_shapes, op_shares, round_bound, to_markdown


def test_linear_shapes_cover_every_matrix_product_of_the_families():
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                         tie_word_embeddings=True))
    shapes = linear_shapes(llama)
    # per layer q, k, v, o, gate, up, down; then the LM head (tied to the embedding)
    assert len(shapes) == 2 * 7 + 1
    assert shapes.count((32, 16)) == 4 and shapes.count((32, 96)) == 4 and shapes.count((96, 32)) == 2
    assert shapes[-1] == (32, 50)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, n_inner=128, vocab_size=50, n_positions=64))
    shapes = linear_shapes(gpt2)  # Conv1D keeps its weight as [in, out]
    assert len(shapes) == 3 * 4 + 1
    assert {(32, 96), (32, 32), (32, 128), (128, 32)} <= set(shapes)


def test_gemm_ceiling_is_a_positive_rate_and_backward_counts_three_products():
    fwd = gemm_ceiling([(64, 64), (64, 128)], rows=32, backward=False, seconds=0.05)
    both = gemm_ceiling([(64, 64), (64, 128)], rows=32, backward=True, seconds=0.05)
    assert math.isfinite(fwd) and fwd > 0 and math.isfinite(both) and both > 0


def _breakdown(**seconds):
    total = sum(seconds.values())
    return {"method": "cot", "round_seconds": total,
            "parts": {k: {"seconds": v, "pct": 100 * v / total} for k, v in seconds.items()}}


CASES = {
    "llm (1M): sample 10x2 paths, batch 64": {"seconds": 1, "gflops": 10, "pct_of_fp32_peak": 5,
                                               "shape_ceiling_gflops": 40, "pct_of_shape_ceiling": 25.0},
    "client-0 (0.3M): sample 10x2 paths, batch 64": {"seconds": 1, "gflops": 5, "pct_of_fp32_peak": 3,
                                                     "shape_ceiling_gflops": 50, "pct_of_shape_ceiling": 10.0},
    "llm: greedy eval of 10, batch 256": {"seconds": 1, "pct_of_shape_ceiling": 50.0},
    "llm: score 8 paths, batch 64": {"seconds": 1, "pct_of_shape_ceiling": 150.0},  # above: counts as 1
    "llm: train 20 steps @ batch 16, fp32": {"seconds": 1, "pct_of_shape_ceiling": 80.0},
    "llm: train 20 steps @ batch 16, bf16": {"seconds": 1},
}


def test_round_bound_shrinks_each_part_by_its_most_favourable_ratio():
    bd = _breakdown(sampling=10.0, scoring=2.0, training=10.0, evaluation=4.0, filter=1.0)
    # sampling: the client's 10% (most room); scoring capped at 1; training 80%; eval 50%
    assert round_bound(bd, CASES) == pytest.approx(10 * 0.1 + 2 * 1.0 + 10 * 0.8 + 4 * 0.5 + 1.0)
    assert round_bound(bd, {}) is None  # no ceilings measured: no bound claimed


def test_markdown_shows_ceilings_and_the_round_bound():
    results = {"torch_threads": 2, "cpus": 2, "torch": "x", "config": "c.toml",
               "limits": {"fp32_matmul_gflops": 200, "bf16_matmul_gflops": 400, "memory_gb_per_s": 30},
               "cases": CASES, "rounds": [_breakdown(sampling=10.0, training=10.0)]}
    md = to_markdown(results)
    assert "| llm (1M): sample 10x2 paths, batch 64 | 1.00 | 10.0 | 5% | 40 | 25% |" in md
    assert "at least **9.0 s**" in md and "**2.2x**" in md


def test_op_shares_attribute_time_to_kinds_of_operator():
    a = torch.randn(256, 256)

    def work():
        for _ in range(20):
            a @ a
        torch.sort(torch.randn(64, 4096), dim=-1)

    shares = op_shares(work)
    assert set(shares) == {"matmul", "attention", "sampling sort", "other"}
    assert sum(shares.values()) == pytest.approx(100.0)
    assert shares["matmul"] > shares["attention"] == 0.0 and shares["sampling sort"] > 0
    assert cpu_description()  # model name and vector extensions, never empty


def test_markdown_lists_the_op_shares():
    results = {"torch_threads": 2, "cpus": 2, "torch": "x", "config": "c.toml", "cpu": "X (avx2)",
               "limits": {"fp32_matmul_gflops": 200, "bf16_matmul_gflops": 400, "memory_gb_per_s": 30},
               "cases": {}, "op_shares": {"llm: train": {"matmul": 61.6, "attention": 17.0, "other": 21.4}}}
    assert "emulated" not in to_markdown(results)
    md = to_markdown(results | {"bf16_cases": False})
    assert "bf16 is emulated on this CPU" in md
    assert "CPU: X (avx2)." in md
    assert "| case | matmul | attention | other |" in md and "| llm: train | 62% | 17% | 21% |" in md
