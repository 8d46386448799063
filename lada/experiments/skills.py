"""Can a model this small learn a task's answer step on its own? A bench for task design.

A task's last step turns the value its chain reached into the answer. If a small model
cannot learn that step even in isolation, the task measures the step, not reasoning
transfer. Each skill here gives the value and asks for the answer, in the layout the
synthetic tasks use::

    compare         The answer is 75. Is the answer more than 60?  ->  75 > 60 / #### yes
    parity          The answer is 75. Is the answer even?          ->  75 is odd / #### no
    lookup          Options: 70 (A) 75 (B) ... The answer is 75.   ->  75 (B) / #### B
    lookup-last-digit  the same, the options' values differ in their last digit
    lookup-letter-first  Options: A)70 B)75 ...                    ->  75 is option B / #### B

A fresh tiny model (default: tiny-llama d96x3, a client of the paper config) trains on
20,000 items and answers 300 fresh ones greedily; chance is 50% (compare, parity) or 20%
(lookups). Wrong values in the options and thresholds lie within 10 of the answer.

    python -m lada.experiments.skills --skills compare,lookup --steps 1500 --out results/skills.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from lada.config import ModelConfig, TrainConfig
from lada.data.records import Example, example_prompt, example_target

LETTERS = "ABCDE"
NEAR = 10  # wrong option values and thresholds lie within this distance of the answer


def _options(v: int, rng: random.Random, last_digit: bool) -> list[int]:
    values = [v]
    while len(values) < 5:
        x = v + rng.randint(-NEAR, NEAR)
        if x >= 1 and x not in values and not (last_digit and x % 10 in {y % 10 for y in values}):
            values.append(x)
    rng.shuffle(values)
    return values


def make_item(skill: str, rng: random.Random, i: int = 0) -> Example:
    """One item of ``skill``: the answer's value is in the question, the gold rationale
    is the answer step alone."""
    v = rng.randint(2, 99)
    q = f"The answer is {v}."
    if skill == "compare":
        t = v + rng.choice([-1, 1]) * rng.randint(1, NEAR)
        t = t if t >= 1 else v + rng.randint(1, NEAR)
        yes = v > t
        return Example(f"skill-compare-{i}", f"{q} Is the answer more than {t}?", f"{v} {'>' if yes else '<'} {t}",
                       "yes" if yes else "no", "yesno")
    if skill == "parity":
        even = v % 2 == 0
        return Example(f"skill-parity-{i}", f"{q} Is the answer even?", f"{v} is {'even' if even else 'odd'}",
                       "yes" if even else "no", "yesno")
    if skill in ("lookup", "lookup-last-digit", "lookup-letter-first"):
        values = _options(v, rng, last_digit=skill == "lookup-last-digit")
        letter = LETTERS[values.index(v)]
        if skill == "lookup-letter-first":
            return Example(f"skill-{skill}-{i}", q, f"{v} is option {letter}", letter, "option",
                           options=tuple(f"{L}){x}" for L, x in zip(LETTERS, values)))
        return Example(f"skill-{skill}-{i}", q, f"{v} ({letter})", letter, "option",
                       options=tuple(f"{x} ({L})" for L, x in zip(LETTERS, values)))
    raise ValueError(f"unknown skill {skill!r}; known: {list(SKILLS)}")


SKILLS = ("compare", "parity", "lookup", "lookup-last-digit", "lookup-letter-first")
DEFAULT_MODEL = ModelConfig(name="tiny-llama", hidden_size=96, num_layers=3, num_heads=4, vocab_size=320)


def run_skill(skill: str, steps: int, model_cfg: ModelConfig = DEFAULT_MODEL, lr: float = 3e-3,
              batch_size: int = 16, n_train: int = 20_000, n_test: int = 300, seed: int = 0,
              cache_dir: str | Path | None = None, progress: bool | None = None) -> dict:
    """Train a fresh ``model_cfg`` on ``n_train`` items of ``skill`` for ``steps`` steps and
    return its greedy accuracy on ``n_test`` fresh items (and loss, seconds)."""
    from lada.data.answers import is_correct
    from lada.models.generation import greedy_generate
    from lada.models.loading import build_model
    from lada.models.training import train_steps

    rng = random.Random(f"lada-skills/{skill}/{seed}")
    train = [make_item(skill, rng, i) for i in range(n_train)]
    test = [make_item(skill, rng, n_train + i) for i in range(n_test)]
    pairs = [(example_prompt(ex), example_target(ex)) for ex in train]
    lm = build_model(model_cfg, [p + t for p, t in pairs[:3000]], seed, cache_dir)
    t0 = time.perf_counter()
    res = train_steps(lm, pairs, steps, TrainConfig(lr=lr, batch_size=batch_size), seed=seed, lr=lr,
                      batch_size=batch_size, progress=progress, save_final=False, desc=f"skill {skill}")
    outs = greedy_generate(lm, [example_prompt(ex) for ex in test], 24, 64, progress)
    right = sum(is_correct(o, ex.answer, ex.answer_type, ex.options) for o, ex in zip(outs, test))
    return {"skill": skill, "steps": steps, "model": f"{model_cfg.name} d{model_cfg.hidden_size}x{model_cfg.num_layers}",
            "accuracy": right / n_test, "chance": 0.5 if test[0].answer_type == "yesno" else 1 / len(LETTERS),
            "loss": res["loss"], "seconds": round(time.perf_counter() - t0, 1), "n_test": n_test, "seed": seed,
            "example": example_prompt(test[0]) + outs[0]}


def to_markdown(rows: list[dict]) -> str:
    lines = ["| skill | model | steps | accuracy | chance | final loss | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['skill']} | {r['model']} | {r['steps']} | {100 * r['accuracy']:.1f}% | "
                     f"{100 * r['chance']:.0f}% | {r['loss']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lada.experiments.skills", description=__doc__.splitlines()[0])
    p.add_argument("--skills", default=",".join(SKILLS), help=f"comma-separated, from {', '.join(SKILLS)}")
    p.add_argument("--steps", type=int, nargs="+", default=[1500], help="training steps (one run per value)")
    p.add_argument("--hidden-size", type=int, default=DEFAULT_MODEL.hidden_size)
    p.add_argument("--num-layers", type=int, default=DEFAULT_MODEL.num_layers)
    p.add_argument("--family", default=DEFAULT_MODEL.name)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/skills.json", help="JSON rows (a .md table is written beside it)")
    args = p.parse_args(argv)
    skills = [s.strip() for s in args.skills.split(",") if s.strip()]
    bad = [s for s in skills if s not in SKILLS]
    if bad:
        p.error(f"unknown skill(s) {bad}; known: {', '.join(SKILLS)}")
    model = ModelConfig(name=args.family, hidden_size=args.hidden_size, num_layers=args.num_layers,
                        num_heads=DEFAULT_MODEL.num_heads, vocab_size=DEFAULT_MODEL.vocab_size)
    model.validate("--family/--hidden-size/--num-layers")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text()) if out.exists() else []
    for steps in args.steps:
        for skill in skills:
            row = run_skill(skill, steps, model, seed=args.seed)
            print(f"{skill} ({row['model']}, {steps} steps): {100 * row['accuracy']:.1f}% "
                  f"(chance {100 * row['chance']:.0f}%), loss {row['loss']:.3f}, {row['seconds']:.0f} s", flush=True)
            rows = [r for r in rows if (r["skill"], r["steps"], r["model"], r["seed"]) !=
                    (skill, steps, row["model"], args.seed)] + [row]
            out.write_text(json.dumps(rows, indent=1) + "\n")  # after every run: a stop keeps the rest
            out.with_suffix(".md").write_text(to_markdown(rows))
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
