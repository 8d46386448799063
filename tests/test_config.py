from pathlib import Path

import pytest

from lada.config import ConfigError, RunConfig, apply_override, build_dataclass, config_from_dict, dump_toml, load_config

import tomllib


def _minimal(**extra):
    d = {"data": {"num_clients": 2, "domains": ["shop", "farm"]}, "clients": [{"name": "tiny-qwen2"}, {"name": "tiny-gpt2"}]}
    d.update(extra)
    return d


def test_minimal_config_validates_and_round_trips_through_toml():
    cfg = config_from_dict(_minimal(), "mem.toml")
    again = config_from_dict(tomllib.loads(cfg.to_toml()), "again")
    assert again.to_dict() == cfg.to_dict()
    assert again.clients[1].name == "tiny-gpt2"


def test_host_and_plugin_tables_are_stored_in_full_and_compared_by_meaning():
    from lada.config import config_matches
    from lada.plugin.options import LadaConfig

    cfg = config_from_dict(_minimal(plugin={"name": "lada", "filter": {"alpha": 2.0}}), "mem.toml")
    stored = tomllib.loads(cfg.to_toml())
    # every option is written, defaults included, so the file says what ran after a default changes
    assert stored["plugin"]["reward"] == LadaConfig().reward and stored["plugin"]["filter"]["alpha"] == 2.0
    assert stored["host"] == {"name": "cot", "check_steps": True, "upward": False, "up_novel_only": True,
                              "up_questions": 0, "up_replay": 1.0}
    assert config_from_dict(stored, "again").to_dict() == cfg.to_dict()
    assert config_matches(stored, cfg)
    assert config_matches(dict(stored, name="renamed"), cfg)  # a run's name is a label
    # a table written before an option existed, or leaving out an option at its default, matches ...
    assert config_matches(dict(stored, plugin={"name": "lada", "filter": {"alpha": 2.0}}), cfg)
    assert config_matches(dict(stored, plugin={"name": "lada", "reward": LadaConfig().reward,
                                               "filter": {"alpha": 2.0}}), cfg)
    # ... an explicit other value, another name or an option that is gone does not
    other = "gain" if LadaConfig().reward != "gain" else "paper"
    assert not config_matches(dict(stored, plugin={"name": "lada", "reward": other, "filter": {"alpha": 2.0}}), cfg)
    assert not config_matches(dict(stored, plugin={"name": "none"}), cfg)
    assert not config_matches(dict(stored, plugin={**stored["plugin"], "gone": 1}), cfg)
    assert not config_matches(dict(stored, host={"name": "cot", "upward": True}), cfg)


@pytest.mark.parametrize(
    "data, needle",
    [
        (_minimal(rounds="three"), "mem.toml.rounds: expected int"),
        (_minimal(trian={}), "unknown key(s) ['trian']"),
        (_minimal(train={"lr": "fast"}), "mem.toml.train.lr: expected float"),
        (_minimal(train={"batch_size": 0}), "batch_size: must be > 0"),
        ({"data": {"num_clients": 3}, "clients": [{"name": "tiny-qwen2"}]}, "1 [[clients]] tables but data.num_clients = 3"),
        (_minimal(host={"name": "fedavg"}), "unknown host 'fedavg'"),
        (_minimal(host={"name": "cot", "check_step": True}), "unknown key(s) ['check_step']"),
        (_minimal(plugin={"name": "magic"}), "unknown plugin 'magic'"),
        (_minimal(engine={"kind": "grpc"}), "[engine].kind: must be one of"),
        ({"data": {"num_clients": 1}, "clients": [{"name": "tiny-llama", "hidden_size": 10, "num_heads": 4}]},
         "not divisible by num_heads"),
        ({"data": {"num_clients": 1}, "clients": [{"name": "tiny-llama", "num_heads": 0}]},
         "[[clients]] #0.num_heads: must be > 0"),
        (_minimal(generation={"top_p": 0.0}), "[generation].top_p: must be in (0, 1]"),
        (_minimal(data={"num_clients": 2, "source": "jsonl"}), "path: required when source = 'jsonl'"),
    ],
)
def test_bad_configs_name_the_file_and_field(data, needle):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, "mem.toml")
    assert needle in str(e.value)


def test_int_is_accepted_for_float_but_bool_is_not_int():
    cfg = config_from_dict(_minimal(train={"lr": 1}), "x")
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    with pytest.raises(ConfigError):
        config_from_dict(_minimal(rounds=True), "x")


def test_load_config_reports_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        load_config(bad)


def test_overrides_apply_nested_and_indexed_keys(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(_minimal()))
    cfg = load_config(p, ["train.lr=0.5", "clients.1.hidden_size=64", "name=abc", 'host.name="standalone"'])
    assert cfg.train.lr == 0.5 and cfg.clients[1].hidden_size == 64 and cfg.name == "abc"
    assert cfg.host_name == "standalone"
    with pytest.raises(ConfigError, match="must look like"):
        apply_override({}, "novalue")


CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(CONFIGS.glob("*.toml"))
SCENARIOS = sorted(CONFIGS.glob("scenario-*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert len(cfg.clients) == cfg.data.num_clients
    if path.stem == "scenario-homogeneous":  # one family, size and vocabulary for every client
        assert len({(c.name, c.hidden_size, c.num_layers, c.num_heads, c.vocab_size) for c in cfg.clients}) == 1
    else:  # heterogeneous: as many model families as clients, up to the three tiny families
        assert len({c.name for c in cfg.clients}) == min(3, len(cfg.clients)), "default clients must be heterogeneous"


def test_three_scenarios_ship_beside_the_paper_config():
    assert {"scenario-homogeneous", "scenario-large-gap", "scenario-small-gap"} <= {p.stem for p in SCENARIOS}


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_a_scenario_is_the_paper_config_but_for_its_models(path):
    """Same protocol and frozen testbed design as configs/paper.toml (its [data] section,
    data seed unset, rounds, host, training); only the name and the models differ."""
    paper = tomllib.loads((CONFIGS / "paper.toml").read_text())
    scen = tomllib.loads(path.read_text())
    assert scen.keys() == paper.keys()
    for key in paper.keys() - {"name", "server", "clients"}:
        assert scen[key] == paper[key], key
    assert "seed" not in scen["data"] and load_config(path, ["seed=2"]).data.seed == 2
    assert scen["server"] != paper["server"] or scen["clients"] != paper["clients"]
    # the server stays the larger model: wider or deeper than every client
    server = scen["server"]
    for c in scen["clients"]:
        assert server["hidden_size"] >= c["hidden_size"] and server["num_layers"] >= c["num_layers"]
        assert (server["hidden_size"], server["num_layers"]) != (c["hidden_size"], c["num_layers"])


def test_paper_task2_is_the_paper_config_on_the_yesno_task():
    paper = tomllib.loads((CONFIGS / "paper.toml").read_text())
    task2 = tomllib.loads((CONFIGS / "paper-task2.toml").read_text())
    assert task2["data"].pop("task") == "yesno" and task2.pop("name") == "paper-task2"
    paper.pop("name")
    assert task2 == paper
    assert load_config(CONFIGS / "paper-task2.toml").data.task == "yesno"


def test_build_dataclass_rejects_non_table():
    with pytest.raises(ConfigError, match="expected a table"):
        build_dataclass(RunConfig, [1, 2], "x")
