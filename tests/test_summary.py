"""The cross-scenario summary (lada.experiments.summary): spec validation, best host,
paired deltas and verdicts from finished runs only, and the README block kept equal to
what results/ holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lada.cli import main
from lada.config import ConfigError
from lada.experiments import summary as S

ROOT = Path(__file__).resolve().parents[1]


def _run(grid: Path, method: str, seed: int, slm: list[float], llm: float, done: bool = True,
         mb: float = 1.0, lada_kb: float = 0.0, chain: float | None = None) -> None:
    """A finished run with a round-0 and a final-round row per participant (``chain``:
    a linked task's chains right, on every row)."""
    d = grid / method / f"seed{seed}"
    d.mkdir(parents=True)
    rows = []
    extra = {} if chain is None else {"chain_right": chain}
    for rnd in (0, 2):
        for k, a in enumerate(slm):
            rows.append({"round": rnd, "participant": f"client-{k}", "accuracy": a / 2 if rnd == 0 else a, **extra})
        # the LLM's row carries the round's bytes (host and LaDa) and seconds
        rows.append({"round": rnd, "participant": "llm", "accuracy": llm, "seconds": 10.0,
                     "bytes_up": mb * 1e6 / 2 + lada_kb * 1e3, "bytes_down": mb * 1e6 / 2,
                     "lada_bytes_up": lada_kb * 1e3, "lada_bytes_down": 0, **extra})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if done:
        (d / "DONE").write_text("ok\n")


def _spec(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "summary.toml"
    p.write_text(body)
    return p


GRID = '''
[[grid]]
scenario = "1: test"
task = "arithmetic"
dir = "g"
seeds = [3, 4, 5]
hosts = ["cot", "fedmkt"]
'''


def test_best_host_paired_deltas_and_verdicts(tmp_path):
    g = tmp_path / "g"
    # cot alone is the better host; LaDa lifts it by 2 points on every seed (ahead) and moves
    # its LLM by +-1 point (within noise); fedmkt + LaDa has only one finished seed
    for seed, jitter in zip((3, 4, 5), (0.0, 0.01, -0.01)):
        _run(g, "cot", seed, [0.40 + jitter, 0.30 + jitter], 0.20, mb=0.1)
        _run(g, "cot+lada", seed, [0.42 + jitter, 0.32 + jitter], 0.20 + (0.01 if seed != 4 else -0.01),
             mb=0.1, lada_kb=5.0)
        _run(g, "fedmkt", seed, [0.30, 0.30], 0.15, mb=15.0)
    _run(g, "fedmkt+lada", 3, [0.20, 0.20], 0.10, mb=15.0)
    _run(g, "fedmkt+lada", 4, [0.90, 0.90], 0.90, done=False)  # interrupted: not counted
    entries = S.load_spec(_spec(tmp_path, GRID))
    headline, full = S.build(entries)
    (entry, best), = headline
    assert best["host"] == "cot" and best["seeds"] == [3, 4, 5]
    assert [round(d, 6) for d in best["d_slm"]] == [0.02, 0.02, 0.02] and best["v_slm"] == "ahead"
    assert best["v_llm"] == "within noise"
    assert best["lada_kb"] == pytest.approx([5.0, 5.0, 5.0]) and best["mb"] == pytest.approx([0.1] * 3)
    fedmkt = next(r for e, r in full if r["host"] == "fedmkt")
    assert fedmkt["seeds"] == [3] and fedmkt["v_slm"] == "one seed, not judged"
    block, page = S.render(entries, "summary.toml")
    assert "| 1: test | arithmetic | cot | 3 | 35.0 ± 1.0 | 37.0 ± 1.0 | +2.0 ± 0.0 (ahead) |" in block
    assert "LaDa on cot is ahead for the SLM mean (+2.0 ± 0.0 points) and within noise for the LLM" in block
    assert "| fedmkt | 1 of 3 | 30.0 | 20.0 | -10.0 |" in page
    assert "2 of the grid's 3 seeds are still to run" in page
    (g / "fedmkt+lada" / "seed4" / "DONE").write_text("ok\n")  # the interrupted run finishes
    _, page = S.render(S.load_spec(_spec(tmp_path, GRID)), "summary.toml")
    assert "1 of the grid's 3 seeds is still to run" in page
    assert "chains right" not in page  # the arithmetic task has no linked answer


def test_a_linked_task_states_its_chain_deltas(tmp_path):
    g = tmp_path / "g"
    for seed, gain in ((3, 0.03), (4, 0.04), (5, 0.035)):  # accuracy level, chains up on every seed
        _run(g, "cot", seed, [0.6, 0.6], 0.5, chain=0.30)
        _run(g, "cot+lada", seed, [0.6, 0.6], 0.5, chain=0.30 + gain)
    (entry, best), = S.build(S.load_spec(_spec(tmp_path, GRID)))[0]
    assert [round(d, 6) for d in best["d_chain"][0]] == [0.03, 0.04, 0.035]
    assert "In chains right (points): +3.5 ± 0.5 for the SLM mean (ahead) and +3.5 ± 0.5 for the LLM (ahead)." \
        in S.sentence(best, entry)


def test_a_consistent_loss_is_behind_and_mixed_signs_are_within_noise():
    assert S.judge([-0.03, -0.04, -0.035]) == "behind"
    assert S.judge([0.05, -0.04, 0.01]) == "within noise"
    assert S.judge([0.01]) == "one seed, not judged"
    assert S.judge([]) == "no finished seed"


def test_a_grid_without_runs_says_so(tmp_path):
    entries = S.load_spec(_spec(tmp_path, GRID))
    block, _ = S.render(entries, "summary.toml")
    assert "**1: test, arithmetic.** No host has a finished seed yet." in block


@pytest.mark.parametrize("body,needle", [
    ("", "needs at least one [[grid]] table"),
    (GRID.replace('task = "arithmetic"\n', ""), "[[grid]] #1: missing key 'task'"),
    (GRID.replace("seeds = [3, 4, 5]", "seeds = [3, 4.5]"), "[[grid]] #1: seeds must be a non-empty list of integers"),
    (GRID.replace('hosts = ["cot", "fedmkt"]', 'hosts = ["cot+lada"]'), "hosts must be a non-empty list of host names"),
    (GRID.replace('dir = "g"', 'dir = 3'), "[[grid]] #1: dir must be a str"),
    (GRID + "colour = 1\n", "unknown key(s) ['colour']"),
    ("[[grid]\n", "not valid TOML"),
])
def test_bad_specs_name_the_file_the_entry_and_the_key(tmp_path, body, needle):
    spec = _spec(tmp_path, body)
    with pytest.raises(ConfigError) as e:
        S.load_spec(spec)
    assert str(spec) in str(e.value) and needle in str(e.value)


def test_cli_writes_the_page_and_the_readme_block(tmp_path, capsys):
    _run(tmp_path / "g", "cot", 3, [0.5, 0.5], 0.2)
    _run(tmp_path / "g", "cot+lada", 3, [0.6, 0.5], 0.2)
    readme = tmp_path / "README.md"
    (tmp_path / "table.md").write_text("| a |\n|---|\n| 1 |\n")
    readme.write_text(f"# x\n\nbefore\n{S.BEGIN.format(spec='old.toml')}\nstale\n{S.END}\nafter\n"
                      "<!-- include: table.md -->\nold table\n<!-- end include -->\n")
    spec = _spec(tmp_path, GRID)
    assert main(["summary", str(spec), "--out", str(tmp_path / "s.md"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.startswith("# x\n\nbefore\n")
    assert text.endswith(f"{S.END}\nafter\n<!-- include: table.md -->\n| a |\n|---|\n| 1 |\n<!-- end include -->\n")
    assert S.stale_includes(readme) == []
    (tmp_path / "table.md").write_text("| a |\n|---|\n| 2 |\n")
    assert S.stale_includes(readme) == ["table.md"]
    assert "+5.0 points for the SLM mean" in S.readme_block(readme)
    assert (tmp_path / "s.md").read_text().startswith("# Host vs host + LaDa")
    assert main(["summary", str(spec), "--out", str(tmp_path / "s.md"), "--readme", str(readme)]) == 0
    assert "updated" in capsys.readouterr().out and S.stale_includes(readme) == []
    assert main(["summary", str(spec), "--out", str(tmp_path / "s.md"), "--readme", str(readme)]) == 0
    assert "already up to date" in capsys.readouterr().out
    doc = tmp_path / "docs" / "page.md"
    doc.parent.mkdir()
    doc.write_text(f"text\n<!-- include: ../table.md -->\nold\n<!-- end include -->\nmore\n")
    assert main(["summary", str(spec), "--out", str(tmp_path / "s.md"), "--include", str(doc)]) == 0
    assert "include blocks updated" in capsys.readouterr().out and S.stale_includes(doc) == []
    assert main(["summary", str(spec), "--out", str(tmp_path / "s.md"), "--include", str(tmp_path / "none.md")]) == 2
    readme.write_text("no markers\n")
    assert main(["summary", str(spec), "--readme", str(readme)]) == 2
    assert "no summary block" in capsys.readouterr().err


def test_the_readme_block_is_what_results_hold():
    """The README's cross-scenario table is generated from results/ (make summary)."""
    spec = "results/summary.toml"
    block, _ = S.render(S.load_spec(ROOT / spec), spec)
    assert S.readme_block(ROOT / "README.md") == block, "README out of date with results/: run `make summary`"
    assert S.stale_includes(ROOT / "README.md") == [], "README out of date with results/: run `make summary`"
    assert S.stale_includes(ROOT / "docs/experiments.md") == [], "docs out of date with results/: run `make summary`"
