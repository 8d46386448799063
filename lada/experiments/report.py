"""Tables and plots from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """Read metrics.jsonl; a malformed line is an error naming the file and line."""
    rows = []
    path = Path(path)
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON: {e}") from None
    return rows


def participants(rows: list[dict]) -> list[str]:
    names = sorted({r["participant"] for r in rows}, key=lambda p: (p != "llm", p))
    return names


def accuracy_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and body of a round x participant accuracy table, plus traffic per round."""
    parts = participants(rows)
    rounds = sorted({r["round"] for r in rows})
    by = {(r["round"], r["participant"]): r for r in rows}
    header = ["round"] + parts + ["SLM mean", "MB up", "MB down", "s/round"]
    body = []
    for rnd in rounds:
        accs = [by.get((rnd, p), {}).get("accuracy") for p in parts]
        slm = [a for p, a in zip(parts, accs) if p != "llm" and a is not None]
        llm = by.get((rnd, "llm"), {})
        cells = [f"{a:.3f}" if a is not None else ("missing" if by.get((rnd, p), {}).get("status") == "missing" else "-")
                 for p, a in zip(parts, accs)]
        body.append([str(rnd)] + cells
                    + [f"{sum(slm) / len(slm):.3f}" if slm else "-",
                       f"{llm.get('bytes_up', 0) / 1e6:.3f}", f"{llm.get('bytes_down', 0) / 1e6:.3f}",
                       f"{llm.get('seconds', 0.0):.1f}"])
    return header, body


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], title: str = "accuracy per round") -> None:
    from rich.console import Console
    from rich.table import Table

    header, body = accuracy_table(rows)
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="right")
    for row in body:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped or logged: do not squeeze columns to 80 characters
        console = Console(width=max(120, 14 * len(header)))
    console.print(table)


def plot_accuracy(rows: list[dict], out: str | Path, title: str = "") -> Path:
    """Accuracy per round, one line per participant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in participants(rows):
        pts = sorted((r["round"], r["accuracy"]) for r in rows if r["participant"] == p and r.get("accuracy") is not None)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p, linestyle="--" if p == "llm" else "-")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
