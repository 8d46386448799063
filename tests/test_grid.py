"""Method grids without training: method names -> configs, and the table/plot written
from metric rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lada.config import ConfigError, RunConfig
from lada.experiments.grid import all_methods, apply_method, budget_note, method_config, parse_methods, write_report

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method,host,plugin", [
    ("standalone", "standalone", {"name": "none"}),
    ("fedmkt+lada", "fedmkt", {"name": "lada"}),
    ("cot+lada-no-filter", "cot", {"name": "lada", "filter": {"kind": "none"}}),
    ("fedmkt+lada-relative-reward", "fedmkt", {"name": "lada", "reward": "relative"}),
    ("cot+lada-gain-reward", "cot", {"name": "lada", "reward": "gain"}),
    ("cot+lada-paper-reward", "cot", {"name": "lada", "reward": "paper"}),
    ("cot+lada-receiver-reward", "cot", {"name": "lada", "reward": "receiver"}),
    ("fedmkt+lada-receiver-share-reward", "fedmkt", {"name": "lada", "reward": "receiver",
                                                     "reward_attribution": "share"}),
    ("fedmkt+lada-loss-filter-no-contrastive", "fedmkt", {"name": "lada", "filter": {"kind": "loss"},
                                                          "distill": "sft"}),
])
def test_method_names_set_host_and_plugin(method, host, plugin):
    cfg = RunConfig(host={"name": "fedcollm"})  # another host than the method's: its options are not carried over
    apply_method(cfg, method)
    assert cfg.host == {"name": host} and cfg.plugin == plugin


def test_a_method_on_the_base_configs_host_keeps_its_options():
    cfg = method_config(ROOT / "configs/default.toml", "cot+lada", 0, Path("out"), [])
    assert cfg.host == {"name": "cot", "upward": True} and cfg.plugin == {"name": "lada"}
    assert method_config(ROOT / "configs/default.toml", "cot", 0, Path("out"), []).host == cfg.host
    assert method_config(ROOT / "configs/default.toml", "fedmkt", 0, Path("out"), []).host == {"name": "fedmkt"}


def test_fedcollm_methods_give_every_client_client_0s_model():
    cfg = method_config(ROOT / "configs/default.toml", "fedcollm+lada", 3, Path("out"), [])
    assert len({c.name for c in cfg.clients}) == 1 and cfg.clients[0].name == "tiny-qwen2"
    assert cfg.seed == 3 and cfg.run_dir.endswith("out/fedcollm+lada/seed3")


@pytest.mark.parametrize("spec,msg", [("fedavg", "unknown host 'fedavg'"), ("cot+peft", "unknown plug-in 'peft'"),
                                      ("cot+lada-no-filtr", "unknown ablation 'no-filtr'"),
                                      ("standalone+lada", "no collaboration"), (" , ", "no method")])
def test_bad_method_names_are_refused_before_running(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_methods(spec)


def test_all_comes_from_the_registry_and_the_capabilities():
    everything = ["centralised", "standalone", "cot", "cot+lada", "fedmkt", "fedmkt+lada", "fedcollm", "fedcollm+lada",
                  "cot+lada-no-filter", "cot+lada-random-filter", "cot+lada-no-contrastive"]
    assert all_methods("cot") == everything
    assert parse_methods("all", "cot") == everything
    assert parse_methods("cot, fedmkt+lada") == ["cot", "fedmkt+lada"]
    # the reward-selection grid (docs/lada.md, "Reward"): every name parses and validates
    rewards = "cot+lada,cot+lada-gain-reward,cot+lada-paper-reward,cot+lada-receiver-reward,cot+lada-receiver-share-reward"
    assert parse_methods(rewards, "cot") == rewards.split(",")
    for m in rewards.split(","):
        method_config(ROOT / "configs/default.toml", m, 0, Path("out"), [])
    assert parse_methods("all,cot,fedmkt+lada-relative-reward", "cot") == [*everything, "fedmkt+lada-relative-reward"]
    assert all_methods("fedmkt")[-1] == "fedmkt+lada-no-contrastive"
    assert not any(m.startswith("standalone+") for m in all_methods("standalone"))
    assert parse_methods("centralised,cot") == ["centralised", "cot"]


def rows(seed_shift: float, filter_s: float = 0.0) -> list[dict]:
    out = []
    for rnd in range(3):
        out.append({"round": rnd, "participant": "llm", "accuracy": 0.2 + seed_shift, "bytes_up": 1e6,
                    "bytes_down": 2e6, "lada_bytes_up": 200, "lada_bytes_down": 100, "seconds": 10.0 * (rnd > 0),
                    "acc_general": 0.8, "acc_shop": 0.1 + seed_shift, "acc_farm": 0.05 + seed_shift,
                    **({"lada_up0_filter_seconds": filter_s} if rnd else {})})
        for k, acc in enumerate((0.5, 0.3)):
            out.append({"round": rnd, "participant": f"client-{k}", "accuracy": acc + seed_shift + 0.1 * rnd,
                        "bytes_up": 0, "bytes_down": 0, "seconds": 0.0})
    return out


def test_report_gives_mean_and_std_over_seeds(tmp_path):
    results = {"cot": {0: rows(0.0), 1: rows(0.1)}, "cot+lada": {0: rows(0.0, filter_s=2.0)}}
    budget = budget_note(method_config(ROOT / "configs/default.toml", "cot", 0, Path("out"), []))
    table = write_report(results, tmp_path, Path("configs/default.toml"), [0, 1], budget).read_text()
    assert "`train.transfer_epochs = 2` passes" in table.splitlines()[1]
    main_table = table.split("Paired differences")[0]
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in main_table.splitlines() if ln.startswith("| cot")}
    # final round: client-0 0.7 and 0.8 -> 75.0 +- 7.1; SLM mean (0.6, 0.7) -> 65.0 +- 7.1; LaDa bytes 0.3 KB
    # LLM client domains: mean of acc_shop and acc_farm (general left out) -> 7.5 and 17.5
    assert "| 75.0 ± 7.1 | 55.0 ± 7.1 | 65.0 ± 7.1 | 25.0 ± 7.1 | 12.5 ± 7.1 | 3.00 | 0.3 | 10 | - |" in lines["cot"]
    assert lines["cot+lada"].endswith("| 2.0 (20%) |")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cot"]["slm_mean"] == pytest.approx([0.6, 0.7])
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    assert "Chains right" not in table  # the arithmetic task has no linked answer


def test_report_shows_chains_on_a_linked_task(tmp_path):
    def linked(seed_shift: float) -> list[dict]:
        return [{**r, "chain_right": 0.1 + seed_shift + 0.1 * (r["participant"] == "client-1")} for r in rows(seed_shift)]
    results = {"cot": {0: linked(0.0), 1: linked(0.1)}, "standalone": {0: rows(0.0)}}
    table = write_report(results, tmp_path, Path("configs/default.toml"), [0, 1]).read_text()
    # SLM mean chains: (0.1 + 0.2) / 2 and (0.2 + 0.3) / 2 -> 20.0 ± 7.1; LLM 0.1 and 0.2 -> 15.0 ± 7.1
    assert "| cot | 20.0 ± 7.1 | 15.0 ± 7.1 |" in table.split("Chains right")[1]
    assert "| standalone |" not in table.split("Chains right")[1]  # no chains reported: no row


def test_report_pairs_each_plugin_row_with_its_host_and_each_ablation_with_the_full_plugin(tmp_path):
    from lada.experiments.grid import comparisons

    assert comparisons(["centralised", "standalone", "cot", "cot+lada", "cot+lada-no-filter", "fedmkt+lada"]) == [
        ("cot+lada", "cot"), ("cot+lada-no-filter", "cot+lada"), ("cot+lada-no-filter", "cot")]
    assert comparisons(["cot", "fedmkt"]) == []
    # SLM means by seed: cot 0.6 / 0.7 / 0.8; cot+lada 0.55 / 0.62 / 0.76 -> -5, -8, -4 points
    results = {"cot": {s: rows(0.1 * s) for s in range(3)},
               "cot+lada": {0: rows(-0.05), 1: rows(0.02), 2: rows(0.16)},
               "cot+lada-no-filter": {1: rows(0.1)}}
    table = write_report(results, tmp_path, Path("configs/default.toml"), [0, 1, 2]).read_text()
    paired = {tuple(c.strip() for c in ln.strip("|").split("|")[:2]): ln
              for ln in table.split("Paired differences")[1].splitlines() if ln.startswith("| cot")}
    assert "| 3 | -5.7 ± 2.1 (behind) | -5.7 ± 2.1 (behind) |" in paired[("cot+lada", "cot")]
    assert "| 1 | +8.0 | +8.0 |" in paired[("cot+lada-no-filter", "cot+lada")]  # one seed: not judged
    assert "| 1 | +0.0 | +0.0 |" in paired[("cot+lada-no-filter", "cot")]


def test_plugin_settings_reach_every_method_with_a_plugin_and_win_over_ablations():
    """``lada grid --set plugin.X=...`` used to be dropped: the method replaces the base
    config's [plugin]. Now it is applied on top of the method's plug-in."""
    sets = ["plugin.filter.alpha=2.5", 'plugin.reward="relative"', "train.local_steps=7"]
    lada = method_config(ROOT / "configs/default.toml", "cot+lada-no-filter", 0, Path("out"), sets)
    assert lada.plugin == {"name": "lada", "filter": {"kind": "none", "alpha": 2.5}, "reward": "relative"}
    assert lada.train.local_steps == 7
    host = method_config(ROOT / "configs/default.toml", "cot", 0, Path("out"), sets)
    assert host.plugin == {"name": "none"} and host.train.local_steps == 7
    with pytest.raises(ConfigError, match="method names the plug-in"):
        method_config(ROOT / "configs/default.toml", "cot+lada", 0, Path("out"), ['plugin.name="none"'])
    with pytest.raises(ConfigError, match="alpah"):  # a misspelt option is refused, not ignored
        method_config(ROOT / "configs/default.toml", "cot+lada", 0, Path("out"), ["plugin.filter.alpah=1"])


def test_hosts_with_their_own_training_form_say_so_in_the_budget():
    from lada.experiments.grid import host_budget_note

    note = host_budget_note(method_config(ROOT / "configs/default.toml", "fedmkt+lada", 0, Path("out"), []))
    assert "`[host] epochs = 1` passes" in note and "lora_r = 8" in note and "llm_lora_r = 8" in note
    assert host_budget_note(method_config(ROOT / "configs/default.toml", "cot", 0, Path("out"), [])) == ""


@pytest.mark.parametrize("config", ["tiny-test", "default", "paper"])
def test_finished_runs_are_reused_across_added_options_but_not_changes(tmp_path, config):
    from lada.experiments.grid import _same_config

    cfg = method_config(ROOT / f"configs/{config}.toml", "cot+lada", 1, tmp_path, [])
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    assert _same_config(path, cfg)  # what the runner writes reads back as the same config
    moved = method_config(ROOT / f"configs/{config}.toml", "cot+lada", 1, tmp_path / "elsewhere", [])
    assert _same_config(path, moved)  # runs copied to another folder (results/) are still found
    older = "\n".join(ln for ln in cfg.to_toml().splitlines() if not ln.startswith("task = "))
    path.write_text(older)  # a run made before that option existed
    assert _same_config(path, cfg)
    assert not _same_config(path, method_config(ROOT / f"configs/{config}.toml", "cot+lada", 1, tmp_path,
                                                ["train.lr=0.123"]))
    assert not _same_config(path, method_config(ROOT / f"configs/{config}.toml", "cot", 1, tmp_path, []))
    path.write_text("not toml [")
    assert not _same_config(path, cfg)


def test_an_interrupted_run_is_resumed_after_its_committed_round_not_started_over(tmp_path, monkeypatch):
    import lada.experiments.grid as grid
    from lada.protocol.commit import write_commit

    cfg = method_config(ROOT / "configs/tiny-test.toml", "cot", 0, tmp_path, [])
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    calls = []

    def finish(run_dir, engine=None):
        calls.append(("resume", Path(run_dir)))
        (Path(run_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(0.0)))
        (Path(run_dir) / "DONE").write_text("done\n")

    monkeypatch.setattr(grid, "resume", finish)
    monkeypatch.setattr(grid, "run", lambda cfg, **kw: calls.append(("run", cfg.run_dir)))
    monkeypatch.setattr(grid, "plot_grid", lambda results, out: out)
    write_commit(run_dir, {"run_id": "x", "round": 1, "clients": {}})
    grid.run_grid(ROOT / "configs/tiny-test.toml", ["cot"], [0], tmp_path)
    assert calls == [("resume", run_dir)]
    grid.run_grid(ROOT / "configs/tiny-test.toml", ["cot"], [0], tmp_path)  # now finished: reused
    assert calls == [("resume", run_dir)]


def test_report_only_runs_nothing_and_names_every_missing_cell(tmp_path, monkeypatch):
    import lada.experiments.grid as grid

    calls = []
    monkeypatch.setattr(grid, "run", lambda cfg, **kw: calls.append(cfg.run_dir))
    monkeypatch.setattr(grid, "resume", lambda run_dir, **kw: calls.append(run_dir))
    monkeypatch.setattr(grid, "plot_grid", lambda results, out: out)
    base, out = ROOT / "configs/tiny-test.toml", tmp_path / "out"
    done = method_config(base, "cot", 0, out, [])
    Path(done.run_dir).mkdir(parents=True)
    (Path(done.run_dir) / "config.toml").write_text(done.to_toml())
    (Path(done.run_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(0.0)))
    (Path(done.run_dir) / "DONE").write_text("done\n")
    with pytest.raises(grid.GridIncomplete, match=r"3 of 4 cell\(s\).*: cot seed 1 .*; cot\+lada seed 0 .*; "
                                                  r"cot\+lada seed 1 "):
        grid.run_grid(base, ["cot", "cot+lada"], [0, 1], out, report_only=True)
    assert calls == [] and not (out / "results.md").exists()
    with pytest.raises(grid.GridIncomplete, match="1 of 1 cell"):  # another engine is another config
        grid.run_grid(base, ["cot"], [0], out, engine="inline", report_only=True)
    grid.run_grid(base, ["cot"], [0], out, report_only=True)
    assert calls == [] and "| cot |" in (out / "results.md").read_text()
    # a tagged report lives beside the untagged one and leaves it alone
    (out / "results.md").write_text("kept\n")
    grid.run_grid(base, ["cot"], [0], out, report_only=True, tag="seed0")
    assert (out / "results.md").read_text() == "kept\n" and "| cot |" in (out / "results-seed0.md").read_text()
    assert (out / "summary-seed0.json").is_file()


def test_a_stopped_centralised_bound_goes_on_with_the_participants_it_has_not_trained(tmp_path, monkeypatch):
    import lada.experiments.premises as pm
    from lada.experiments import grid

    calls = []

    def fake_cell(ctx, who):
        calls.append(who)
        if who == "client1" and calls.count("client1") == 1:
            raise KeyboardInterrupt  # the job is stopped while client 1 trains
        return {"accuracy": 0.5, "n": 10, "train_steps": 3, "by_domain": {"general": {"accuracy": 0.4, "n": 5}}}

    monkeypatch.setattr(pm, "cell_central", fake_cell)
    cfg = method_config(ROOT / "configs/tiny-test.toml", "centralised", 0, tmp_path / "g", [])
    with pytest.raises(KeyboardInterrupt):
        grid.run_centralised(cfg)
    assert calls == ["server", "client0", "client1"]
    cfg = method_config(ROOT / "configs/tiny-test.toml", "centralised", 0, tmp_path / "g", [])
    run_dir = grid.run_centralised(cfg)
    assert calls == ["server", "client0", "client1", "client1", "client2"]  # server and client 0 were kept
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["participant"] for r in rows] == ["llm", "client-0", "client-1", "client-2"]
    assert all(r["accuracy"] == 0.5 and r["acc_general"] == 0.4 and r["seconds"] >= 0 for r in rows)
    assert (run_dir / "DONE").exists()
    # a finished bound run again (a --overwrite of the grid cell) starts over
    cfg = method_config(ROOT / "configs/tiny-test.toml", "centralised", 0, tmp_path / "g", [])
    grid.run_centralised(cfg)
    assert calls[5:] == ["server", "client0", "client1", "client2"]


def test_the_centralised_bound_takes_matching_cells_from_a_premises_folder(tmp_path, monkeypatch, caplog):
    import lada.experiments.premises as pm
    from lada.experiments import grid

    calls = []

    def fake_cell(ctx, who):
        calls.append(who)
        return {"accuracy": 0.25 if who == "client1" else 0.5, "n": 10, "train_steps": 3, "by_domain": {}}

    monkeypatch.setattr(pm, "cell_central", fake_cell)
    base = ROOT / "configs/tiny-test.toml"
    pm.measure(base, tmp_path / "prem", [0], parts=("central",), log=lambda m: None)
    assert calls == ["server", "client0", "client1", "client2"]
    # one stored cell was measured under another training budget: that one is trained again
    stored = tmp_path / "prem" / "seed0" / "central-client2.json"
    record = json.loads(stored.read_text())
    record["config"]["train"]["lr"] *= 2
    stored.write_text(json.dumps(record))

    cfg = method_config(base, "centralised", 0, tmp_path / "g", [])  # host, plug-in and engine differ: no matter
    assert cfg.plugin_name == "none"
    with caplog.at_level("INFO", logger=grid.log.name):
        run_dir = grid.run_centralised(cfg, premises=tmp_path / "prem")
    assert calls[4:] == ["client2"]
    assert "central-client2.json was measured under another config" in caplog.text
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["accuracy"] for r in rows] == [0.5, 0.5, 0.25, 0.5]
    adopted = json.loads((run_dir / "cells" / "seed0" / "central-client1.json").read_text())
    assert adopted["reused_from"].endswith("central-client1.json")
    # another seed has no premises cells: all of it is trained
    cfg = method_config(base, "centralised", 1, tmp_path / "g", [])
    grid.run_centralised(cfg, premises=tmp_path / "prem")
    assert calls[5:] == ["server", "client0", "client1", "client2"]


def test_grid_status_says_where_every_cell_stands_and_runs_nothing(tmp_path, capsys, monkeypatch):
    from lada.cli import main
    from lada.experiments import grid
    from lada.experiments.runner import prepare_run_dir
    from lada.protocol.commit import write_commit

    monkeypatch.setattr(grid, "run", lambda *a, **k: pytest.fail("--status ran a method"))
    base, out = ROOT / "configs/tiny-test.toml", tmp_path / "g"
    done = prepare_run_dir(method_config(base, "cot", 0, out, []))
    (done / "DONE").write_text("")
    write_commit(prepare_run_dir(method_config(base, "cot", 1, out, [])), {"run_id": "x", "round": 1, "clients": {}})
    other = method_config(base, "cot+lada", 0, out, [])
    other.rounds += 1  # a run of another config sits where this cell goes
    prepare_run_dir(other)
    bound = prepare_run_dir(method_config(base, "centralised", 1, out, []))
    (bound / "cells" / "seed1").mkdir(parents=True)
    (bound / "cells" / "seed1" / "central-server.json").write_text("{}")

    assert main(["grid", str(base), "--methods", "centralised,cot,cot+lada", "--seeds", "0", "1",
                 "--out", str(out), "--status"]) == 0
    table = capsys.readouterr().out
    rounds = method_config(base, "cot", 0, out, []).rounds
    assert "| centralised | - | 1/4 participants |" in table
    assert f"| cot | done | round 1/{rounds} |" in table
    assert "| cot+lada | other config | - |" in table
    assert "1 of 6 cell(s) done" in table


def test_grid_premises_must_be_a_folder(tmp_path):
    from lada.cli import main

    assert main(["grid", str(ROOT / "configs/tiny-test.toml"), "--methods", "centralised", "--seeds", "0",
                 "--out", str(tmp_path / "g"), "--premises", str(tmp_path / "missing")]) == 2


def test_a_tag_that_cannot_name_a_file_is_refused_in_one_line(tmp_path, capsys):
    from lada.cli import main

    assert main(["grid", str(ROOT / "configs/tiny-test.toml"), "--methods", "cot", "--seeds", "0",
                 "--out", str(tmp_path), "--report-only", "--tag", "a/b"]) == 2
    err = capsys.readouterr().err
    assert err == "config error: --tag: letters, digits, '.', '_' and '-' only (it names files), got 'a/b'\n"
    assert not any(tmp_path.iterdir())  # refused before anything ran or was written


def test_export_publishes_each_finished_cell_without_checkpoints_and_only_once(tmp_path, monkeypatch, caplog):
    import lada.experiments.grid as grid

    def fake_run(cfg, **kw):
        d = Path(cfg.run_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.toml").write_text(cfg.to_toml())
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(0.01 * cfg.seed)))
        (d / "summary.md").write_text("summary\n")
        (d / "checkpoints").mkdir()
        (d / "checkpoints" / "client-0.pt").write_bytes(b"weights")
        (d / "run.log").write_text("log\n")
        (d / "DONE").write_text("done\n")
        calls.append(cfg.run_dir)

    calls = []
    monkeypatch.setattr(grid, "run", fake_run)
    monkeypatch.setattr(grid, "plot_grid", lambda results, out: out)
    base, out, pub = ROOT / "configs/tiny-test.toml", tmp_path / "scratch", tmp_path / "results"
    grid.run_grid(base, ["cot"], [0, 1], out, export=pub)
    assert len(calls) == 2
    for seed in (0, 1):
        cell = pub / "cot" / f"seed{seed}"
        assert sorted(p.name for p in cell.iterdir()) == ["DONE", "config.toml", "metrics.jsonl", "summary.md"]
        assert (cell / "metrics.jsonl").read_bytes() == (out / "cot" / f"seed{seed}" / "metrics.jsonl").read_bytes()
    assert "| cot |" in (out / "results.md").read_text()
    assert not (pub / "results.md").exists()  # a results folder's own reports are left alone
    # the published folder is a grid of its own: a report-only run there finds every cell
    grid.run_grid(base, ["cot"], [0, 1], pub, report_only=True, tag="check")
    assert "| cot |" in (pub / "results-check.md").read_text()
    # resumed: the cells are reused and, being published already, not copied again
    (pub / "cot" / "seed0" / "summary.md").write_text("edited\n")
    with caplog.at_level("INFO", logger="lada.grid"):
        grid.run_grid(base, ["cot"], [0, 1], out, export=pub)
    assert len(calls) == 2 and "exported" not in caplog.text
    assert (pub / "cot" / "seed0" / "summary.md").read_text() == "edited\n"
    # a finished cell of another config in the way is replaced, with a warning
    other = method_config(base, "cot", 1, pub, ["train.lr=0.123"])
    (pub / "cot" / "seed1" / "config.toml").write_text(other.to_toml())
    caplog.clear()
    with caplog.at_level("INFO", logger="lada.grid"):
        grid.run_grid(base, ["cot"], [0, 1], out, export=pub)
    assert "replacing" in caplog.text and "cot seed 1: exported" in caplog.text and "cot seed 0: exported" not in caplog.text
    assert grid._finished(pub / "cot" / "seed1", method_config(base, "cot", 1, pub, []))


def test_grid_export_must_be_a_folder(tmp_path, capsys):
    from lada.cli import main

    (tmp_path / "file").write_text("x")
    assert main(["grid", str(ROOT / "configs/tiny-test.toml"), "--methods", "cot", "--seeds", "0",
                 "--out", str(tmp_path / "g"), "--export", str(tmp_path / "file")]) == 2
    assert "--export" in capsys.readouterr().err and not (tmp_path / "g").exists()
