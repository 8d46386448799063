"""Shared test data: tiny arithmetic examples in the project's text format."""

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
