"""Moving next-token distributions between models with different tokenizers.

Logit-level hosts (FedMKT, FedCoLLM with heterogeneous vocabularies) send top-k
next-token distributions computed on the public set. A receiver with another tokenizer
must (1) translate the sender's token ids into its own vocabulary and (2) find, for each
of its own target positions, the sender position that predicts a token starting at the
same place in the text. This module does both, without models:

* :class:`Vocab` is a tokenizer reduced to what alignment needs: the exact bytes each
  token stands for (byte-level ``Ġ``/``Ċ`` markers, SentencePiece ``▁`` and ``<0xNN>``
  byte-fallback pieces all decoded to real bytes) and the ids of the special tokens. It
  packs into a payload, so two parties can build mappings without sharing tokenizers.
* :func:`build_token_mapping` maps every source id to the destination id whose text is
  nearest in edit distance (exact matches first), cached on disk per vocabulary pair.
* :func:`token_starts` / :func:`align_spans` / :func:`align_sequences` align two
  tokenisations of one text by byte offsets.
* :func:`map_topk` moves a top-k distribution into the destination vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

MAPPING_VERSION = 1  # bump when the mapping rule changes, so cached mappings are not reused
SPECIAL_ROLES = ("eos", "bos", "pad", "unk")


# ----------------------------------------------------------------------------- vocabularies

@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet: each of the 256 bytes is shown as one
    printable character (printable Latin-1 bytes as themselves, the rest shifted past
    U+0100 in byte order), so ``Ġ`` is the space byte and ``Ċ`` the newline byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shown = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in shown:
            shown[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in shown.items()}


def _decoder_kinds(backend_json: dict) -> set[str]:
    """Names of the decoder steps of a `tokenizers` JSON config (nested sequences flattened)."""
    kinds: set[str] = set()

    def walk(d: Any) -> None:
        if not isinstance(d, dict):
            return
        kinds.add(str(d.get("type", "")))
        for sub in d.get("decoders", []) or []:
            walk(sub)

    walk(backend_json.get("decoder") or {})
    return kinds


def _piece_bytes(token: str, kinds: set[str]) -> bytes:
    """The bytes a (non-special) vocabulary entry stands for in the decoded text."""
    if "ByteLevel" in kinds:
        table = _byte_decoder()
        if all(ch in table for ch in token):
            return bytes(table[ch] for ch in token)
        return token.encode("utf-8")
    if "ByteFallback" in kinds and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    if "Metaspace" in kinds or "Replace" in kinds:
        token = token.replace("\u2581", " ")
    if "WordPiece" in kinds:  # continuation pieces carry "##"; word starts are preceded by a space
        token = token[2:] if token.startswith("##") else " " + token
    return token.encode("utf-8")


@dataclass
class Vocab:
    """A tokenizer's vocabulary as the bytes of each id, plus its special tokens.

    ``pieces[i]`` is what id ``i`` contributes to decoded text (special tokens: their
    literal name). ``special`` lists the ids of special tokens; ``roles`` maps
    ``eos``/``bos``/``pad``/``unk`` to ids where the tokenizer has them.
    """

    pieces: list[bytes]
    special: set[int] = field(default_factory=set)
    roles: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pieces)

    @property
    def texts(self) -> list[str]:
        """Pieces as str; bytes that are not valid UTF-8 on their own (a piece holding
        half a character) become lone surrogates, so distinct pieces stay distinct."""
        return [p.decode("utf-8", "surrogateescape") for p in self.pieces]

    @property
    def hash(self) -> str:
        h = hashlib.sha256()
        for p in self.pieces:
            h.update(len(p).to_bytes(4, "little"))
            h.update(p)
        h.update(json.dumps([sorted(self.special), sorted(self.roles.items())]).encode())
        return h.hexdigest()[:16]

    def to_payload(self, prefix: str = "vocab_") -> dict[str, Any]:
        """Compact wire form: one bytes blob, int32 piece lengths, special ids and roles."""
        return {
            f"{prefix}blob": b"".join(self.pieces),
            f"{prefix}lengths": np.array([len(p) for p in self.pieces], dtype=np.int32),
            f"{prefix}special": np.array(sorted(self.special), dtype=np.int32),
            f"{prefix}roles": json.dumps(self.roles, sort_keys=True),
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any], prefix: str = "vocab_") -> "Vocab":
        missing = [k for k in ("blob", "lengths", "special", "roles") if f"{prefix}{k}" not in payload]
        if missing:
            raise KeyError(f"payload has no vocabulary field(s) {[prefix + m for m in missing]}")
        blob, lengths = payload[f"{prefix}blob"], np.asarray(payload[f"{prefix}lengths"], dtype=np.int64)
        if int(lengths.sum()) != len(blob):
            raise ValueError(f"vocabulary payload: piece lengths sum to {int(lengths.sum())} but the blob has {len(blob)} bytes")
        ends = np.cumsum(lengths)
        pieces = [blob[e - n:e] for e, n in zip(ends.tolist(), lengths.tolist())]
        return cls(pieces, {int(i) for i in np.asarray(payload[f"{prefix}special"]).tolist()},
                   {k: int(v) for k, v in json.loads(payload[f"{prefix}roles"]).items()})


def vocab_of(tokenizer: Any) -> Vocab:
    """Build a :class:`Vocab` from a Hugging Face tokenizer or a `tokenizers.Tokenizer`.

    The decoding scheme (byte-level, SentencePiece/metaspace, byte fallback,
    WordPiece) is read from the tokenizer's own decoder config, so ``Ġapples`` (GPT-2
    style), ``▁apples`` (SentencePiece) and ``" apples"`` all become the same bytes.
    """
    if hasattr(tokenizer, "backend_tokenizer"):  # transformers fast tokenizer
        backend = tokenizer.backend_tokenizer
        vocab = tokenizer.get_vocab()
        special_names = set(getattr(tokenizer, "all_special_tokens", []))
        roles = {r: getattr(tokenizer, f"{r}_token_id") for r in SPECIAL_ROLES}
    elif hasattr(tokenizer, "to_str") and hasattr(tokenizer, "get_vocab"):  # tokenizers.Tokenizer
        backend = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        special_names = set()
        roles = {}
    else:
        raise TypeError(f"vocab_of: expected a fast (Rust-backed) tokenizer, got {type(tokenizer).__name__}")
    config = json.loads(backend.to_str())
    for added in config.get("added_tokens", []) or []:
        if added.get("special"):
            special_names.add(added["content"])
    kinds = _decoder_kinds(config)
    size = max(vocab.values()) + 1 if vocab else 0
    pieces = [b""] * size
    special: set[int] = set()
    for token, i in vocab.items():
        if token in special_names:
            special.add(i)
            pieces[i] = token.encode("utf-8")
        else:
            pieces[i] = _piece_bytes(token, kinds)
    return Vocab(pieces, special, {r: int(v) for r, v in roles.items() if v is not None})


# ----------------------------------------------------------------------------- edit distance

def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def edit_distances(query: str, candidates: np.ndarray) -> np.ndarray:
    """Levenshtein distance from ``query`` to every row of ``candidates`` (an
    ``[n, L]`` array of code points, all candidates of length L).

    One DP row per query character, vectorised over candidates; the insertion
    recurrence along a row is a running minimum of ``cost - j``, so no Python loop
    runs over candidate positions.
    """
    n, length = candidates.shape
    cols = np.arange(length + 1, dtype=np.int32)
    prev = np.broadcast_to(cols, (n, length + 1)).copy()
    for i, ch in enumerate(_codes(query), start=1):
        best = np.minimum(prev[:, :-1] + (candidates != ch), prev[:, 1:] + 1)  # substitute / delete
        row = np.empty_like(prev)
        row[:, 0] = i
        row[:, 1:] = best
        prev = np.minimum.accumulate(row - cols, axis=1) + cols  # insert
    return prev[:, -1]


def levenshtein(a: str, b: str) -> int:
    """Plain edit distance of two strings (insert, delete, substitute cost 1)."""
    return int(edit_distances(a, _codes(b)[None, :] if b else np.zeros((1, 0), dtype=np.uint32))[0])


class _Index:
    """Destination texts grouped by length, for nearest-neighbour search."""

    def __init__(self, texts: list[str], ids: list[int]) -> None:
        by_len: dict[int, list[tuple[int, str]]] = {}
        self.exact: dict[str, int] = {}
        for i, t in sorted(zip(ids, texts)):
            by_len.setdefault(len(t), []).append((i, t))
            self.exact.setdefault(t, i)  # smallest id wins among equal texts
        self.lengths = sorted(by_len)
        self.ids = {L: np.array([i for i, _ in v], dtype=np.int64) for L, v in by_len.items()}
        self.codes = {L: np.stack([_codes(t) for _, t in v]) if L else np.zeros((len(v), 0), dtype=np.uint32)
                      for L, v in by_len.items()}

    def nearest(self, query: str) -> int:
        """Id with the smallest (edit distance, -common prefix length, id)."""
        if query in self.exact:
            return self.exact[query]
        m = len(query)
        q = _codes(query)
        best: tuple[int, int, int] | None = None
        for L in sorted(self.lengths, key=lambda L: (abs(L - m), L)):
            if best is not None and abs(L - m) > best[0]:
                break  # |len difference| bounds the distance from below
            cand = self.codes[L]
            d = edit_distances(query, cand)
            p = min(m, L)
            prefix = np.cumprod(cand[:, :p] == q[:p], axis=1).sum(axis=1) if p else np.zeros(len(cand), dtype=np.int64)
            order = np.lexsort((self.ids[L], -prefix, d))
            k = order[0]
            key = (int(d[k]), -int(prefix[k]), int(self.ids[L][k]))
            if best is None or key < best:
                best = key
        assert best is not None
        return best[2]


# ----------------------------------------------------------------------------- token mapping

def _default_cache() -> Path:
    return Path(os.environ.get("LADA_CACHE") or Path.home() / ".cache" / "lada") / "token_maps"


def _as_vocab(x: Any) -> Vocab:
    return x if isinstance(x, Vocab) else vocab_of(x)


def build_token_mapping(src: Any, dst: Any, cache_dir: str | Path | None = None,
                        progress: bool = False) -> np.ndarray:
    """``mapping[i]`` = the destination id nearest to source id ``i`` (int32 array
    with one entry per source id).

    ``src``/``dst`` are tokenizers or :class:`Vocab`. Rules: special tokens with a
    role (eos, bos, pad, unk) map to the destination's token of that role; other
    special tokens map among the destination's special tokens by text; every other
    token maps among the destination's non-special tokens to an exact text match, else
    to the minimum edit distance, ties broken by the longer common prefix (the next
    token starts the same way), then the smaller id. The result is cached in
    ``cache_dir`` (default ``$LADA_CACHE/token_maps``) under both vocabulary hashes.
    """
    sv, dv = _as_vocab(src), _as_vocab(dst)
    if not len(dv):
        raise ValueError("build_token_mapping: the destination vocabulary is empty")
    root = Path(cache_dir) if cache_dir else _default_cache()
    path = root / f"v{MAPPING_VERSION}-{sv.hash}-to-{dv.hash}.npy"
    if path.is_file():
        cached = np.load(path)
        if cached.shape == (len(sv),):
            return cached
    mapping = _compute_mapping(sv, dv, progress)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    np.save(tmp, mapping)
    tmp.replace(path)  # atomic: concurrent builders write the same content
    return mapping


def _compute_mapping(sv: Vocab, dv: Vocab, progress: bool) -> np.ndarray:
    from tqdm.auto import tqdm

    s_texts, d_texts = sv.texts, dv.texts
    normal = [i for i in range(len(dv)) if i not in dv.special]
    specials = sorted(dv.special)
    normal_index = _Index([d_texts[i] for i in normal], normal) if normal else None
    special_index = _Index([d_texts[i] for i in specials], specials) if specials else None
    fallback = normal_index or special_index
    role_of = {i: r for r, i in sv.roles.items()}
    out = np.empty(len(sv), dtype=np.int32)
    for i in tqdm(range(len(sv)), desc="token mapping", disable=not progress, leave=False):
        if i in sv.special:
            role = role_of.get(i)
            if role is not None and role in dv.roles:
                out[i] = dv.roles[role]
            else:
                out[i] = (special_index or fallback).nearest(s_texts[i])  # type: ignore[union-attr]
        else:
            out[i] = (normal_index or fallback).nearest(s_texts[i])  # type: ignore[union-attr]
    return out


# ----------------------------------------------------------------------------- sequence alignment

def token_starts(vocab: Vocab, ids: list[int], text: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets ``(starts, ends)`` of each token of ``ids`` in ``text`` (UTF-8).

    ``ids`` must be the tokenisation of ``text`` without special tokens. A leading
    space that the tokenizer adds itself (SentencePiece's dummy prefix) is tolerated;
    any other mismatch between the pieces and the text is an error, since offsets that
    do not describe the text would silently align the wrong positions.
    """
    lengths = np.array([len(vocab.pieces[i]) for i in ids], dtype=np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    joined = b"".join(vocab.pieces[i] for i in ids)
    raw = text.encode("utf-8")
    if joined != raw:
        if joined == b" " + raw:
            starts, ends = np.maximum(starts - 1, 0), np.maximum(ends - 1, 0)
        else:
            raise ValueError(f"token_starts: the tokens decode to {joined[:60]!r}... but the text is {raw[:60]!r}...")
    return starts.astype(np.int32), ends.astype(np.int32)


def align_spans(src_starts: np.ndarray, dst_starts: np.ndarray, dst_ends: np.ndarray) -> np.ndarray:
    """For each source token, the index of the destination token whose byte span
    covers the source token's start (``-1`` if none). Spans must be in text order."""
    dst_starts, dst_ends = np.asarray(dst_starts), np.asarray(dst_ends)
    src_starts = np.asarray(src_starts)
    if not len(dst_starts):
        return np.full(len(src_starts), -1, dtype=np.int64)
    # Last destination token starting at or before each source start; zero-length
    # destination tokens never cover anything, so skip them.
    nonempty = np.flatnonzero(dst_ends > dst_starts)
    j = np.searchsorted(dst_starts[nonempty], src_starts, side="right") - 1
    ok = j >= 0
    jj = np.where(ok, nonempty[np.clip(j, 0, None)] if len(nonempty) else 0, -1)
    ok &= (jj >= 0) & (src_starts < dst_ends[np.clip(jj, 0, None)])
    return np.where(ok, jj, -1)


def _spans(tokens: list[str] | list[bytes]) -> tuple[np.ndarray, np.ndarray, bytes]:
    raw = [t if isinstance(t, bytes) else t.encode("utf-8", "surrogateescape") for t in tokens]
    lengths = np.array([len(b) for b in raw], dtype=np.int64)
    ends = np.cumsum(lengths)
    return ends - lengths, ends, b"".join(raw)


def align_sequences(src_tokens: list[str] | list[bytes], dst_tokens: list[str] | list[bytes]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``: destination token ``j`` covers the start of source token ``i``.

    Both lists are the decoded pieces of two tokenisations of the same text (str or
    bytes). Empty source pieces get no pair. Raises ValueError when the pieces do not
    spell the same text.
    """
    s0, s1, s_text = _spans(src_tokens)
    d0, d1, d_text = _spans(dst_tokens)
    if s_text != d_text:
        raise ValueError(f"align_sequences: the two tokenisations spell different texts: {s_text[:60]!r} vs {d_text[:60]!r}")
    j = align_spans(s0, d0, d1)
    return [(i, int(jj)) for i, jj in enumerate(j.tolist()) if jj >= 0 and s1[i] > s0[i]]


# ----------------------------------------------------------------------------- distributions

def map_topk(indices: np.ndarray, values: np.ndarray, mapping: np.ndarray,
             dst_vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Move top-k distributions ``[..., k]`` over source ids into destination ids.

    ``values`` are probabilities (non-negative). Source ids that map to one
    destination id are merged into the first slot holding it (their probabilities
    summed; the other slots get probability 0) and each row is renormalised to sum to
    1 (rows of all zeros stay zero). Returns ``(dst_indices int64, probs float32)``
    with the input's shape.
    """
    indices = np.asarray(indices)
    values = np.asarray(values, dtype=np.float32)
    mapping = np.asarray(mapping)
    if indices.shape != values.shape:
        raise ValueError(f"map_topk: indices {indices.shape} and values {values.shape} differ in shape")
    if indices.size and (indices.min() < 0 or indices.max() >= len(mapping)):
        raise ValueError(f"map_topk: source ids must lie in [0, {len(mapping)}), got [{indices.min()}, {indices.max()}]")
    if len(mapping) and (mapping.min() < 0 or mapping.max() >= dst_vocab_size):
        raise ValueError(f"map_topk: the mapping points outside the destination vocabulary of {dst_vocab_size}")
    if (values < 0).any():
        raise ValueError("map_topk: values must be probabilities (>= 0)")
    dst = mapping[indices].astype(np.int64)
    probs = values.copy()
    k = dst.shape[-1] if dst.ndim else 0
    for a in range(k):
        for b in range(a + 1, k):
            dup = (dst[..., b] == dst[..., a]) & (probs[..., b] > 0)
            if dup.any():
                probs[..., a] = np.where(dup, probs[..., a] + probs[..., b], probs[..., a])
                probs[..., b] = np.where(dup, 0.0, probs[..., b])
    total = probs.sum(axis=-1, keepdims=True)
    probs = np.divide(probs, total, out=np.zeros_like(probs), where=total > 0)
    return dst, probs
