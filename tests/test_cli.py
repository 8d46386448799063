"""The command line end to end on the tiny config (inline engine: no Flower start-up)."""

import json
from pathlib import Path

import pytest

from lada.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny-test.toml")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    assert main(["run", TINY, "--engine", "inline", "--run-dir", str(run_dir), "--set", "rounds=1",
                 "--set", "generation.max_new_tokens=32"]) == 0
    return run_dir


def test_run_writes_a_complete_run_directory(tiny_run):
    for name in ("config.toml", "metrics.jsonl", "run.log", "summary.md", "accuracy.png", "DONE"):
        assert (tiny_run / name).exists(), name
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert {r["participant"] for r in rows} == {"llm", "client-0", "client-1", "client-2"}
    assert {r["round"] for r in rows} == {0, 1}
    for who in ("server", "client-0", "client-1", "client-2"):  # every participant's checkpoint
        assert (tiny_run / "nodes" / who / "model" / "lada_model.json").exists(), who
    assert "| round | llm | client-0 |" in (tiny_run / "summary.md").read_text()
    llm = [r for r in rows if r["participant"] == "llm"]  # one-way CoT never trains the LLM:
    assert [r["eval_cached"] for r in llm] == [0.0, 1.0]  # round 1 reuses round 0's answers
    assert llm[0]["accuracy"] == llm[1]["accuracy"]


def test_existing_run_dir_is_not_overwritten_silently(tiny_run, capsys):
    assert main(["run", TINY, "--engine", "inline", "--run-dir", str(tiny_run)]) == 1
    assert "already holds a run" in capsys.readouterr().err


def test_eval_scores_a_checkpoint_on_its_own_test_set_and_on_gsm8k(tiny_run, capsys):
    assert main(["eval", str(tiny_run / "nodes" / "client-1" / "model")]) == 0
    assert "client-1 @" in capsys.readouterr().out
    assert main(["eval", str(tiny_run / "nodes" / "server" / "model"), "--data", "gsm8k", "--limit", "4"]) == 0
    assert "on 4 examples" in capsys.readouterr().out


def test_report_rewrites_table(tiny_run):
    (tiny_run / "summary.md").unlink()
    assert main(["report", str(tiny_run)]) == 0
    assert (tiny_run / "summary.md").exists()


def test_bad_config_is_one_clear_message(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = 2\n[trian]\nlr = 1\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "trian" in err


def test_python_dash_m_lada_is_the_lada_command():
    """``python -m lada`` works in a checkout that is not pip-installed (the warm-up
    docs use it); it must reach the same parser as ``lada``."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "lada", "warmup", "--help"], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: lada warmup")
