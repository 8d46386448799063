"""Shared test data (tiny arithmetic examples in the project's text format) and helpers."""

import random

from lada.data.records import Example


def arithmetic_examples(n: int, seed: int = 0, prefix: str = "t") -> list[Example]:
    """``n`` one- or two-step problems (``a+b``, then doubled on odd indices)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        steps = [f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}"]
        if i % 2:
            steps.append(f"{a + b}*2=<<{a + b}*2={2 * (a + b)}>>{2 * (a + b)}")
        ans = a + b if len(steps) == 1 else 2 * (a + b)
        q = f"{a} plus {b}?" if len(steps) == 1 else f"{a} plus {b}, doubled?"
        out.append(Example(id=f"{prefix}{i}", question=q, rationale="\n".join(steps), answer=str(ans),
                           answer_type="number"))
    return out


def sampled_task_paths(task: str, tmp_path) -> list[tuple[object, Example]]:
    """(candidate, its example) for the paths that the cot host's sampler and verifier
    (lada.protocol.paths) draw from a d32 model that memorised four 1-2 step problems of the
    synthetic ``task`` (at least two of them verified)."""
    import dataclasses
    from pathlib import Path

    import torch

    from lada.config import DataConfig, load_config
    from lada.data.records import example_prompt, example_target
    from lada.data.synthetic import generate, tokenizer_corpus
    from lada.models.loading import build_model
    from lada.models.training import train_steps
    from lada.protocol.paths import sample_paths_verified

    torch.manual_seed(0)
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny-test.toml",
                      [f'data.task="{task}"', "generation.temperature=0.2"])
    exs = generate("general", 4, seed=0, max_steps=2, task=task)
    pairs = [(example_prompt(ex), example_target(ex)) for ex in exs]
    small = DataConfig(seed=0, train_per_client=40, test_per_client=20, public_size=30, server_test_size=20,
                       server_train_size=50, task=task)
    corpus = [p + t for p, t in pairs] * 3 + tokenizer_corpus(small, 0)[:40]
    lm = build_model(dataclasses.replace(cfg.server, hidden_size=32, num_layers=2, vocab_size=300), corpus, 0,
                     tmp_path)
    train_steps(lm, pairs, 150, dataclasses.replace(cfg.train, lr=1e-2, batch_size=4), seed=0, progress=False)
    cands = sample_paths_verified(cfg, lm, exs, seed=0, keep_wrong=True)
    assert sum(c.verified for c in cands) >= 2
    by_id = {ex.id: ex for ex in exs}
    return [(c, by_id[c.question_id]) for c in cands]


def stop_training_at(monkeypatch, n: int | None) -> dict:
    """Count training steps (LM loss calls) and stop the job (Ctrl-C) at the ``n``-th
    one, as a killed run would be. Returns ``{"calls": steps so far, "stop_at": n}``;
    set ``stop_at`` to None (and ``calls`` to 0) to let the next attempt run through."""
    from lada.models import training

    real, state = training.lm_loss, {"calls": 0, "stop_at": n}

    def loss(model, batch):
        state["calls"] += 1
        if state["calls"] == state["stop_at"]:
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(training, "lm_loss", loss)
    return state
