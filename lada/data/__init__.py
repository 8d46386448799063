"""Data layer: records, loaders, answer checking, partitions, and the one entry point
``build_federated_data`` that turns a ``[data]`` config table into client shards."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import TYPE_CHECKING

from lada.data.answers import StepCheck, check_steps, extract_answer, is_correct, verify_path
from lada.data.loaders import (
    DataFormatError,
    LoadReport,
    default_path,
    load_aqua,
    load_dataset,
    load_gsm8k,
    load_jsonl,
    load_strategyqa,
)
from lada.data.partition import ClientShard, FederatedData, PartitionError, partition_examples
from lada.data.records import Example, capped_corpus, example_prompt, example_target, format_prompt, format_target

if TYPE_CHECKING:
    from lada.config import DataConfig

__all__ = [
    "ClientShard", "DataFormatError", "Example", "FederatedData", "LoadReport", "PartitionError", "StepCheck",
    "build_federated_data", "check_steps", "clear_cache", "default_path", "example_prompt", "example_target", "extract_answer",
    "format_prompt", "format_target", "is_correct", "load_aqua", "load_dataset", "load_gsm8k", "load_jsonl",
    "load_strategyqa", "partition_examples", "tokenizer_corpus", "verify_path",
]

# Built partitions, keyed by (config, seed): every node of a simulated federation asks
# for the same split, and loading + partitioning should happen once per process.
_CACHE: dict[tuple[str, int], FederatedData] = {}
_LOADED: dict[tuple[str, str, bool], list[Example]] = {}


def _load(data_cfg: "DataConfig") -> list[Example]:
    """``load_dataset`` for a config, parsed once per process (partitions of several seeds
    and the tokenizer corpus all read the same file)."""
    key = (data_cfg.source, str(data_cfg.path), bool(data_cfg.skip_bad_lines))
    if key not in _LOADED:
        report = LoadReport()
        _LOADED[key] = load_dataset(data_cfg.source, data_cfg.path, skip_bad=data_cfg.skip_bad_lines, report=report)
        logging.getLogger(__name__).info("%s %s: %s", data_cfg.source, data_cfg.path or "(shipped copy)", report)
    return list(_LOADED[key])


def _key(data_cfg: "DataConfig", seed: int) -> tuple[str, int]:
    return json.dumps(dataclasses.asdict(data_cfg), sort_keys=True), int(seed)


def _copy(data: FederatedData) -> FederatedData:
    """A copy with fresh lists, so a caller that edits a list cannot change the cache."""
    return FederatedData(
        clients=[ClientShard(list(c.train), list(c.test)) for c in data.clients],
        public=list(data.public), server_test=list(data.server_test), server_train=list(data.server_train))


def build_federated_data(data_cfg: "DataConfig", seed: int) -> FederatedData:
    """Client shards, public set and server sets for a ``[data]`` config (any source).

    File sources use ``data_cfg.domains`` as client domains only when the data has all
    of them; otherwise domains come from the data. Data without several domains (GSM8K,
    StrategyQA, AQuA) needs ``partition = "dirichlet"`` or ``"iid"``.
    """
    key = _key(data_cfg, seed)
    if key not in _CACHE:
        if data_cfg.source == "synthetic":
            from lada.data.synthetic import build_synthetic  # lazy: the generator is optional here

            data = build_synthetic(data_cfg, seed)
        else:
            examples = _load(data_cfg)
            present = {ex.domain for ex in examples}
            wanted = list(data_cfg.domains[: data_cfg.num_clients])
            client_domains = wanted if wanted and set(wanted) <= present else None
            try:
                data = partition_examples(
                    examples, data_cfg.num_clients, data_cfg.train_per_client, data_cfg.test_per_client,
                    data_cfg.public_size, data_cfg.server_test_size, data_cfg.server_train_size,
                    mode=data_cfg.partition, alpha=data_cfg.dirichlet_alpha, seed=seed,
                    client_domains=client_domains)
            except PartitionError as e:
                raise PartitionError(f"[data] source {data_cfg.source!r}: {e}") from None
        data.check_disjoint()
        _CACHE[key] = data
    return _copy(_CACHE[key])


def tokenizer_corpus(data_cfg: "DataConfig", seed: int, max_chars: int = 2_000_000) -> list[str]:
    """Texts to train tokenizers on: prompt + target of every example of the source,
    in a seeded random order, cut at ``max_chars`` characters in total."""
    if data_cfg.source == "synthetic":
        from lada.data.synthetic import tokenizer_corpus as synthetic_corpus

        return synthetic_corpus(data_cfg, seed)
    return capped_corpus(_load(data_cfg), seed, max_chars)


def clear_cache() -> None:
    """Forget loaded files and built partitions (tests, or after editing a data file in-process)."""
    _CACHE.clear()
    _LOADED.clear()
