"""Command line: `lada run | eval | warmup | grid | premises | summary | federation | data | report`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


USER_ERRORS: tuple[type[BaseException], ...] = ()


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", datefmt="%X",
                        handlers=[RichHandler(show_path=False, markup=False)])
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(args) -> "RunConfig":  # noqa: F821
    from lada.config import load_config

    overrides = list(args.set or [])
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    if getattr(args, "run_dir", None):
        overrides.append(f"run_dir={json.dumps(str(args.run_dir))}")
    if getattr(args, "root_certificates", None):
        overrides.append(f"engine.root_certificates={json.dumps(str(args.root_certificates))}")
    if getattr(args, "insecure", False):
        overrides.append("engine.insecure=true")
    return load_config(args.config, overrides)


def cmd_run(args) -> int:
    from lada.experiments.runner import resume, run

    if args.resume:
        if args.config or args.set or args.seed is not None or args.run_dir or args.overwrite:
            raise SystemExit("lada run --resume RUN_DIR takes the run directory's own config: "
                             "no CONFIG, --set, --seed, --run-dir or --overwrite")
        resume(args.resume, engine=args.engine, superlink=args.superlink)
        return 0
    if not args.config:
        raise SystemExit("lada run: give a CONFIG file (or --resume RUN_DIR)")
    cfg = _load(args)
    run(cfg, engine=args.engine, superlink=args.superlink, overwrite=args.overwrite)
    return 0


def cmd_eval(args) -> int:
    from lada.config import ConfigError, load_config
    from lada.data import LoadReport, build_federated_data
    from lada.data.loaders import LOADERS, DataFormatError, load_dataset
    from lada.models.generation import evaluate
    from lada.models.loading import load_model

    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt}: no such model directory")
    if args.limit is not None and args.limit < 0:
        raise ConfigError(f"--limit: must be >= 0 (0: every example), got {args.limit}")
    cfg_path = Path(args.config) if args.config else _find_run_config(ckpt)
    cfg = load_config(cfg_path)
    part = args.participant or _participant_of(ckpt)
    valid = ["llm", *(f"client-{k}" for k in range(len(cfg.clients)))]
    if part not in valid:
        raise ConfigError(f"--participant: {part!r} is not a participant of {cfg_path}; choose from {valid}")
    model_cfg = cfg.server if part == "llm" else cfg.clients[int(part.split("-")[1])]
    if args.data:  # read the data before the model: a bad --data fails fast
        source, _, path = args.data.partition(":")
        if source not in LOADERS:
            raise ConfigError(f"--data: unknown source {source!r}; choose from {sorted(LOADERS)} "
                              "(SOURCE or SOURCE:PATH; the synthetic task is evaluated without --data)")
        if source == "jsonl" and not path:
            raise ConfigError("--data: source 'jsonl' needs a path: --data jsonl:FILE")
        report = LoadReport()
        examples = load_dataset(source, path, report=report)
        print(f"{args.data}: {report}", file=sys.stderr)
    else:
        data = build_federated_data(cfg.data, cfg.data.seed)
        examples = data.server_test if part == "llm" else data.clients[int(part.split("-")[1])].test
    if args.limit:
        examples = examples[: args.limit]
    if not examples:
        raise DataFormatError(f"no examples to evaluate {part} on")
    lm = load_model(model_cfg, ckpt)
    res = evaluate(lm, examples, cfg.generation)
    print(f"{part} @ {ckpt}: accuracy {res.accuracy:.4f} on {res.n} examples")
    for steps, acc in sorted(getattr(res, "by_steps", {}).items()):
        print(f"  {steps} step(s): {acc:.3f}")
    return 0


def _find_run_config(ckpt: Path) -> Path:
    for parent in [ckpt, *ckpt.parents]:
        if (parent / "config.toml").exists() and (parent / "metrics.jsonl").exists():
            return parent / "config.toml"
    raise FileNotFoundError(f"{ckpt}: no run directory above it; pass --config")


def _participant_of(ckpt: Path) -> str:
    for part in (ckpt, *ckpt.parents):
        if part.name == "server":
            return "llm"
        if part.name.startswith("client-"):
            return part.name
    raise FileNotFoundError(f"{ckpt}: cannot tell whose checkpoint this is; pass --participant llm|client-K")


def cmd_warmup(args) -> int:
    from lada.models.warmup import run

    return run(args, args.parser)


def cmd_federation(args) -> int:
    from lada.engines.local import federation_down, federation_up

    state = Path(args.state_dir)
    if args.action == "up":
        info = federation_up(args.clients, state, workspace=args.workspace, tls=args.tls or args.auth, auth=args.auth)
        how = ("TLS + SuperNode authentication" if info.get("auth") else "TLS" if info.get("tls")
               else "no TLS (this machine only)")
        print(f"SuperLink at {info.get('superlink')} with {args.clients} SuperNode(s), {how}; state in {state}")
        flag = f"--root-certificates {info['root_certificates']}" if info.get("tls") else "--insecure"
        print(f"run with: lada run CONFIG --engine deployment --superlink {info.get('superlink')} {flag}")
    else:
        federation_down(state)
        print("local federation stopped")
    return 0


def cmd_data(args) -> int:
    from lada.data.split import write_split

    cfg = _load(args)
    out = write_split(cfg.data, cfg.data.seed, Path(args.out))
    meta = json.loads((out / "split.json").read_text())
    print(f"data split of {args.config} in {out}:")
    for name, n in meta["sizes"].items():
        print(f"  {name}: {n} examples")
    print("give each client machine public.jsonl and its own client-K/ folder (--node-config \"data-dir=DIR\"), "
          "the SuperLink's machine public.jsonl and server/ ([data] split_dir = DIR)")
    return 0


def cmd_grid(args) -> int:
    from lada.experiments.grid import main_grid

    return main_grid(args.config, args.methods, args.seeds, args.out, args.engine, list(args.set or []),
                     args.report_only, args.tag, args.premises, args.status, args.export)


def cmd_premises(args) -> int:
    from lada.experiments.premises import main_premises

    return main_premises(args.config, args.out, args.seeds, list(args.set or []), args.epochs, args.parts)


def cmd_report(args) -> int:
    from lada.experiments.report import read_metrics
    from lada.experiments.runner import finish_run, read_run_state

    run_dir = Path(args.run_dir)
    state = read_run_state(run_dir) or {}
    incomplete = ""
    if not (run_dir / "DONE").exists() or state.get("status", "done") != "done":
        incomplete = (f"status {state.get('status', 'unknown')}"
                      + (f" ({state['reason']})" if state.get("reason") else "")
                      + (f"; last committed round {state['committed_round']} of {state.get('rounds', '?')}"
                         if state.get("committed_round") is not None else "")
                      + f"; continue with: lada run --resume {run_dir}")
        print(f"INCOMPLETE RUN: {incomplete}")
    title = run_dir.name + (" (INCOMPLETE)" if incomplete else "")
    if not (run_dir / "metrics.jsonl").exists():
        raise SystemExit(f"{run_dir}: no metrics.jsonl (no round finished)")
    finish_run(run_dir, read_metrics(run_dir / "metrics.jsonl"), title=title, incomplete=incomplete)
    return 0


def cmd_summary(args) -> int:
    from lada.experiments.summary import main_summary

    return main_summary(args.spec, args.out, args.readme, list(args.include or []))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lada", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a federation from a TOML config")
    r.add_argument("config", nargs="?")
    r.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue an interrupted or failed run after its last committed round")
    r.add_argument("--engine", choices=["simulation", "deployment", "inline"], default=None,
                   help="default: [engine].kind of the config")
    r.add_argument("--superlink", default=None, help="deployment: SuperLink control address (host:port)")
    r.add_argument("--root-certificates", default=None, metavar="CA.pem",
                   help="deployment: CA certificate that signed the SuperLink's TLS certificate "
                        "(= [engine] root_certificates)")
    r.add_argument("--insecure", action="store_true",
                   help="deployment: connect to the SuperLink without TLS (= [engine] insecure = true; "
                        "warns unless the SuperLink is on this machine)")
    r.add_argument("--run-dir", default=None)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=1e-3")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("eval", help="score a saved checkpoint on a dataset")
    e.add_argument("checkpoint", help="a model directory, e.g. runs/demo/nodes/client-0/model")
    e.add_argument("--config", default=None, help="run config (default: the run directory's config.toml)")
    e.add_argument("--participant", default=None, help="llm or client-K (default: from the path)")
    e.add_argument("--data", default=None, help="SOURCE[:PATH], e.g. gsm8k or jsonl:my.jsonl (default: the participant's test set)")
    e.add_argument("--limit", type=int, default=0, help="evaluate the first N examples only (0: all)")
    e.set_defaults(func=cmd_eval)

    w = sub.add_parser("warmup", help="warm up every participant of a config (cached) and print their accuracies "
                       "(also `python -m lada warmup`)")
    w.add_argument("config", help="run config TOML")
    w.add_argument("--cache-dir", default="", help="warm-up cache (default: the config's cache_dir, "
                   "else LADA_CACHE or ~/.cache/lada)")
    w.add_argument("--ship", action="store_true",
                   help="ignore shipped checkpoints and copy the results into the repo's checkpoints/")
    w.add_argument("--only", default="", help="comma-separated participants, e.g. server,client0")
    w.add_argument("--no-eval", action="store_true", help="skip the accuracy columns")
    w.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    w.add_argument("--seed", type=int, default=None,
                   help="the run seed (where [data] seed is unset, it also draws the data split these "
                        "warm-ups train on: the warm-ups a `lada run --seed N` uses)")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    w.set_defaults(func=cmd_warmup, parser=w)

    f = sub.add_parser("federation", help="bring a local SuperLink + SuperNodes up or down")
    f.add_argument("action", choices=["up", "down"])
    f.add_argument("--clients", type=int, default=3)
    f.add_argument("--state-dir", default=".lada-federation")
    f.add_argument("--tls", action="store_true", help="up: make a CA and SuperLink certificate, run everything over TLS")
    f.add_argument("--auth", action="store_true",
                   help="up: SuperNode authentication (implies --tls): a key pair per SuperNode, registered "
                        "with the SuperLink; unregistered SuperNodes are refused")
    f.add_argument("--workspace", default=None,
                   help="clients keep their state here (under each run's id), as SuperNodes on other machines do")
    f.set_defaults(func=cmd_federation)

    d = sub.add_parser("data", help="split a config's data into one folder per participant")
    d.add_argument("action", choices=["split"])
    d.add_argument("config")
    d.add_argument("--out", required=True, help="folder for split.json, public.jsonl, server/, client-K/")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    d.set_defaults(func=cmd_data)

    g = sub.add_parser("grid", help="run methods x seeds on one config; write a results table and plot")
    g.add_argument("config")
    g.add_argument("--methods", default="all",
                   help="comma-separated <host>[+lada[-<ablation>]] names, e.g. fedmkt+lada-no-filter; "
                        "'all' stands for the default set")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    g.add_argument("--out", default="results/grid")
    g.add_argument("--engine", choices=["simulation", "deployment", "inline"], default=None)
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of the base config")
    g.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild the table and plot from finished runs, or fail naming the missing ones")
    g.add_argument("--tag", default="", help="write results-TAG.md, summary-TAG.json, accuracy-TAG.png instead of "
                   "results.md, ... (reports of other seed or method subsets in the same --out)")
    g.add_argument("--status", action="store_true",
                   help="run nothing: print where every method x seed stands (done, round k/N, not started)")
    g.add_argument("--premises", default=None, metavar="DIR",
                   help="a `lada premises --out` folder of the same config: the centralised bound takes its "
                        "central-* cells where they match instead of training them again")
    g.add_argument("--export", default=None, metavar="DIR",
                   help="copy each finished cell's config, metrics, summary and plot into DIR/<method>/seed<N> "
                        "as it finishes (no checkpoints or logs): run a grid in a scratch --out and publish "
                        "into a results folder, then `--report-only --out DIR --tag NAME` writes its table there")
    g.set_defaults(func=cmd_grid)

    pm = sub.add_parser("premises", help="measure the testbed's premises (transfer headroom both ways, "
                        "learnability by path length, bounds) before any method runs; resumable")
    pm.add_argument("config")
    pm.add_argument("--out", required=True, help="folder for one JSON per measured cell, premises.json and premises.md")
    pm.add_argument("--seeds", type=int, nargs="+", default=[0])
    pm.add_argument("--epochs", type=float, default=None,
                    help="passes over every training mix (default: train.transfer_epochs x rounds)")
    pm.add_argument("--parts", default="", help="comma-separated subset of base,down,up,learn,central (default: all)")
    pm.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of the config")
    pm.set_defaults(func=cmd_premises)

    sm = sub.add_parser("summary", help="host vs host + LaDa across the scenario x task grids a spec lists "
                        "(a table from finished runs; --readme writes its headline block into the README)")
    sm.add_argument("spec", help="TOML with one [[grid]] table per grid, e.g. results/summary.toml")
    sm.add_argument("--out", default=None, help="the summary page (default: the spec's path with .md)")
    sm.add_argument("--readme", default=None, help="also rewrite this file's lada summary block")
    sm.add_argument("--include", action="append", metavar="DOC",
                    help="also refresh the <!-- include: PATH --> blocks of this page (repeatable)")
    sm.set_defaults(func=cmd_summary)

    rp = sub.add_parser("report", help="rewrite a run's table and plot from its metrics.jsonl")
    rp.add_argument("run_dir")
    rp.set_defaults(func=cmd_report)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe a problem with the user's input or environment: printed as
    one message, without a traceback (``-v`` shows it)."""
    from lada.data.loaders import DataFormatError
    from lada.data.partition import PartitionError
    from lada.engines.launch import EngineError
    from lada.experiments.runner import RunDirError
    from lada.protocol.driver import FederationError

    from lada.models.training import NonFiniteError

    return (FileNotFoundError, DataFormatError, PartitionError, EngineError, RunDirError, FederationError,
            NonFiniteError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from lada.config import ConfigError

    global USER_ERRORS
    USER_ERRORS = () if args.verbose else _user_errors()
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        from lada.experiments.runner import Interrupted

        print("terminated" if isinstance(e, Interrupted) else "interrupted", file=sys.stderr)
        return 143 if isinstance(e, Interrupted) else 130


if __name__ == "__main__":
    sys.exit(main())
