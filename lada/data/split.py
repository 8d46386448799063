"""What each participant may see, as files: private by construction.

A federation's data is split once, by whoever owns it (on one machine: the launcher,
before the run; across machines: `lada data split`, then each machine gets its part),
into one folder per participant plus the public set::

    <split dir>/split.json            what was split (data config, seed) and the sizes
    <split dir>/public.jsonl          the shared questions every participant may see
    <split dir>/server/train.jsonl    the server's own data (its warm-up and replay data)
    <split dir>/server/test.jsonl     the server's held-out test set
    <split dir>/client-K/train.jsonl  client K's private training data
    <split dir>/client-K/test.jsonl   client K's private test set
    <split dir>/client-K/general.jsonl  general problems for client K's warm-up (a copy of
                                      short problems of the server's data: the stand-in
                                      for the generic pre-training every real SLM has)

A node reads ``public.jsonl`` and its own folder, nothing else (`read_view`), so a
client machine needs only those two, and no process of a run holds another client's
shard. The split is checked against the run's ``[data]`` table and seed: a stale split
is an error, not a silent mix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lada.data.loaders import DataFormatError
from lada.data.records import Example, capped_corpus

if TYPE_CHECKING:
    from lada.config import DataConfig, RunConfig
    from lada.data.partition import FederatedData

MANIFEST = "split.json"
FORMAT = 1
# Each client's warm-up mixes its shard with this many short general problems of the
# server's data (see lada.models.warmup).
CLIENT_GENERAL_EXAMPLES = 600
CLIENT_GENERAL_MAX_STEPS = 3
TOKENIZER_CORPUS_MAX_CHARS = 2_000_000


@dataclass
class ParticipantData:
    """One participant's view: the public set and its own sets. ``who`` is ``server`` or
    ``client<k>``; the server's ``train``/``test`` are its training and held-out sets."""

    who: str
    public: list[Example]
    train: list[Example]
    test: list[Example]
    general: list[Example] = field(default_factory=list)

    def ids(self) -> set[str]:
        return {ex.id for xs in (self.public, self.train, self.test, self.general) for ex in xs}


def participants(num_clients: int) -> list[str]:
    return ["server", *(f"client{k}" for k in range(num_clients))]


def _folder(who: str) -> str:
    return "server" if who == "server" else f"client-{int(who.removeprefix('client'))}"


def client_general(server_train: list[Example]) -> list[Example]:
    """The general warm-up problems every client gets: short problems of the server's data."""
    return [ex for ex in server_train if ex.num_steps <= CLIENT_GENERAL_MAX_STEPS][:CLIENT_GENERAL_EXAMPLES]


def views(fed: "FederatedData") -> dict[str, ParticipantData]:
    """Every participant's view of a whole federation (for the data owner's tools)."""
    out = {"server": ParticipantData("server", list(fed.public), list(fed.server_train), list(fed.server_test))}
    general = client_general(fed.server_train)
    for k, shard in enumerate(fed.clients):
        out[f"client{k}"] = ParticipantData(f"client{k}", list(fed.public), list(shard.train), list(shard.test),
                                            list(general))
    return out


def data_fingerprint(data_cfg: "DataConfig", seed: int) -> str:
    """What a split depends on: the ``[data]`` table (without the split folder itself) and seed."""
    d = dataclasses.asdict(data_cfg)
    d.pop("split_dir", None)
    if d.get("task") == "arith":  # the default task keeps the fingerprints of splits made before it existed
        d.pop("task")
    blob = json.dumps([d, int(seed), FORMAT], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_jsonl(path: Path, examples: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n" for ex in examples), encoding="utf-8")
    tmp.replace(path)


def write_split(data_cfg: "DataConfig", seed: int, out_dir: str | Path) -> Path:
    """Build the federation's data from its source and write every participant's part
    (see the module doc). Returns ``out_dir``. Reuses a complete split of the same data."""
    from lada.data import build_federated_data

    out = Path(out_dir)
    fp = data_fingerprint(data_cfg, seed)
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get("fingerprint") == fp:
                return out
        except (OSError, ValueError):
            pass
    fed = build_federated_data(data_cfg, seed)
    all_views = views(fed)
    _write_jsonl(out / "public.jsonl", fed.public)
    sizes = {"public": len(fed.public)}
    for who, view in all_views.items():
        folder = out / _folder(who)
        sets = {"train": view.train, "test": view.test}
        if who != "server":
            sets["general"] = view.general
        for name, xs in sets.items():
            _write_jsonl(folder / f"{name}.jsonl", xs)
            sizes[f"{_folder(who)}/{name}"] = len(xs)
    manifest.write_text(json.dumps({"format": FORMAT, "fingerprint": fp, "seed": int(seed),
                                    "source": data_cfg.source, "num_clients": len(fed.clients),
                                    "sizes": sizes}, indent=1) + "\n")
    return out


def _read_jsonl(path: Path) -> list[Example]:
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found (this participant's part of the data split)")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(Example.from_dict(json.loads(line)))
        except (ValueError, TypeError) as e:
            raise DataFormatError(f"{path}: line {lineno}: not a split record: {e}") from None
    return out


def read_view(split_dir: str | Path, who: str, data_cfg: "DataConfig | None" = None,
              seed: int | None = None) -> ParticipantData:
    """``who``'s view, read from ``public.jsonl`` and its own folder only. With
    ``data_cfg`` and ``seed``, the split must have been made from that data."""
    root = Path(split_dir)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise DataFormatError(f"{manifest}: not a data split (make one with `lada data split CONFIG --out DIR`)")
    meta = json.loads(manifest.read_text())
    if data_cfg is not None and seed is not None and meta.get("fingerprint") != data_fingerprint(data_cfg, seed):
        raise DataFormatError(f"{root}: this data split was made from another [data] table or seed; "
                              "split again with `lada data split`")
    folder = root / _folder(who)
    general = _read_jsonl(folder / "general.jsonl") if who != "server" else []
    return ParticipantData(who, _read_jsonl(root / "public.jsonl"), _read_jsonl(folder / "train.jsonl"),
                           _read_jsonl(folder / "test.jsonl"), general)


_VIEWS: dict[tuple, ParticipantData] = {}


def participant_data(cfg: "RunConfig", who: str, data_dir: str | Path | None = None) -> ParticipantData:
    """What participant ``who`` (``server`` | ``client<k>``) may see. From ``data_dir`` (a
    node's own split folder), else ``[data] split_dir`` (set by the launcher); only a
    config without a split (the data owner's tools) builds the federation and slices it."""
    root = data_dir or cfg.data.split_dir
    key = (str(root), who, data_fingerprint(cfg.data, cfg.data.seed))
    if key not in _VIEWS:
        if root:
            _VIEWS[key] = read_view(root, who, cfg.data, cfg.data.seed)
        else:
            from lada.data import build_federated_data

            _VIEWS[key] = views(build_federated_data(cfg.data, cfg.data.seed))[who]
    v = _VIEWS[key]
    return ParticipantData(v.who, list(v.public), list(v.train), list(v.test), list(v.general))


def participant_corpus(data_cfg: "DataConfig", view: ParticipantData, seed: int) -> list[str]:
    """Texts a participant's tokenizer is trained on, from what it may see. Synthetic: the
    generator's own corpus (fresh problems of a seed no federation set uses; identical for
    everyone). File sources: prompt + target of the public set, in a seeded order, so
    every participant of a family gets the same vocabulary and no vocabulary (which
    FedMKT exchanges) is shaped by private text."""
    if data_cfg.source == "synthetic":
        from lada.data.synthetic import tokenizer_corpus as synthetic_corpus

        return synthetic_corpus(data_cfg, seed)
    return capped_corpus(sorted(view.public, key=lambda ex: ex.id), seed, TOKENIZER_CORPUS_MAX_CHARS)


def clear_views() -> None:
    _VIEWS.clear()
