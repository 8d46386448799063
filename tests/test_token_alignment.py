import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lada.hosts.token_alignment import (Vocab, align_sequences, align_spans, build_token_mapping, edit_distances,
                                        levenshtein, map_topk, token_starts, vocab_of)


def _wordlevel(vocab: dict[str, int], decoder, **special) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if decoder is not None:
        tok.decoder = decoder
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)


@pytest.fixture
def gpt_style():
    # byte-level markers: Ġ = space, Ċ = newline
    return _wordlevel({"<unk>": 0, "</s>": 1, "Ġcat": 2, "dog": 3, "Ċ": 4, "Ġsat": 5, "mat": 6, "Ġ": 7},
                      decoders.ByteLevel(), eos_token="</s>")


@pytest.fixture
def sp_style():
    # SentencePiece markers: ▁ = space, <0x0A> = newline byte
    dec = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                             decoders.Strip(" ", 1, 0)])
    return _wordlevel({"<unk>": 0, "▁cat": 1, "do": 2, "<0x0A>": 3, "▁sa": 4, "<|end|>": 5, "mat": 6, "▁": 7},
                      dec, eos_token="<|end|>")


def test_vocab_decodes_byte_level_and_sentencepiece_markers_to_the_same_bytes(gpt_style, sp_style):
    g, s = vocab_of(gpt_style), vocab_of(sp_style)
    assert g.pieces[2] == b" cat" and g.pieces[4] == b"\n" and g.pieces[7] == b" "
    assert s.pieces[1] == b" cat" and s.pieces[3] == b"\n" and s.pieces[7] == b" "
    assert g.roles["eos"] == 1 and s.roles["eos"] == 5
    assert 1 in g.special and 5 in s.special and 2 not in g.special


def test_mapping_exact_then_edit_distance_then_roles(gpt_style, sp_style, tmp_path):
    m = build_token_mapping(gpt_style, sp_style, cache_dir=tmp_path)
    assert m.dtype == np.int32 and m.shape == (8,)
    assert m[2] == 1  # " cat" exact
    assert m[4] == 3  # "\n" == <0x0A>
    assert m[7] == 7  # " " exact
    assert m[6] == 6  # "mat" exact
    assert m[3] == 2  # "dog" -> "do" (distance 1)
    assert m[5] == 4  # " sat" -> " sa" (distance 1)
    assert m[1] == 5  # eos -> eos by role, whatever the names
    assert m[0] == 0  # unk -> unk by role
    # cached on disk under both hashes, and reused
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1 and vocab_of(gpt_style).hash in files[0].name
    np.save(files[0], np.arange(8, dtype=np.int32)[::-1])
    assert build_token_mapping(gpt_style, sp_style, cache_dir=tmp_path)[0] == 7


def test_ties_prefer_the_longer_common_prefix_then_the_smaller_id(tmp_path):
    src = Vocab([b"abc", b"xbc"])
    dst = Vocab([b"zbc", b"ab", b"abd"])  # "abc": zbc (d1, prefix 0), ab (d1, prefix 2), abd (d1, prefix 2)
    m = build_token_mapping(src, dst, cache_dir=tmp_path)
    assert m[0] == 1  # ab and abd tie on distance and prefix; smaller id wins
    assert m[1] == 0  # "xbc": all three at distance 1 or 2; zbc (d1) vs ab (d2) vs abd (d2)


def test_normal_tokens_never_map_to_special_tokens(tmp_path):
    src = Vocab([b"</s>", b"<s"], special={0})
    dst = Vocab([b"</s>", b"q"], special={0})
    m = build_token_mapping(src, dst, cache_dir=tmp_path)
    assert m[0] == 0 and m[1] == 1


@given(st.text(alphabet="abcé ", max_size=7), st.lists(st.text(alphabet="abcé ", max_size=7), min_size=1, max_size=6))
@settings(max_examples=60, deadline=None)
def test_vectorised_edit_distance_matches_a_reference_dp(q, cands):
    def ref(a, b):
        d = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            prev, d[0] = d[0], i
            for j, cb in enumerate(b, 1):
                prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (ca != cb))
        return d[-1]

    for c in cands:
        assert levenshtein(q, c) == ref(q, c)
    same = [c for c in cands if len(c) == len(cands[0])]
    if same and same[0]:
        arr = np.stack([np.array([ord(ch) for ch in c], dtype=np.uint32) for c in same])
        assert edit_distances(q, arr).tolist() == [ref(q, c) for c in same]


def test_mapping_is_identity_between_identical_vocabularies(tmp_path):
    v = Vocab([b"a", b"b", b"ab", b" ab", b"\xc3", b"\xa9"])
    assert build_token_mapping(v, v, cache_dir=tmp_path).tolist() == list(range(6))


def test_vocab_payload_round_trip():
    v = Vocab([b"a", b"\xc3", b"", b" the"], special={2}, roles={"eos": 2})
    back = Vocab.from_payload(v.to_payload())
    assert back.pieces == v.pieces and back.special == v.special and back.roles == v.roles and back.hash == v.hash
    bad = v.to_payload()
    bad["vocab_lengths"] = np.array([1, 1, 1, 1], dtype=np.int32)
    with pytest.raises(ValueError, match="blob has"):
        Vocab.from_payload(bad)


def test_align_sequences_maps_each_source_token_to_the_covering_destination_token():
    src = ["The", " cat", " sat", "."]
    dst = ["The", " ", "cat", " s", "at."]
    assert align_sequences(src, dst) == [(0, 0), (1, 1), (2, 3), (3, 4)]
    assert align_sequences(dst, src) == [(0, 0), (1, 1), (2, 1), (3, 2), (4, 2)]
    with pytest.raises(ValueError, match="different texts"):
        align_sequences(["ab"], ["a", "c"])


def test_align_sequences_uses_byte_offsets_for_split_characters():
    # "é" is two bytes; one side keeps it whole, the other splits it across tokens
    src = [b"caf", b"\xc3\xa9", b"!"]
    dst = [b"ca", b"f\xc3", b"\xa9!"]
    assert align_sequences(src, dst) == [(0, 0), (1, 1), (2, 2)]


def test_align_spans_skips_empty_destination_tokens_and_reports_gaps():
    j = align_spans(np.array([0, 2, 9]), np.array([0, 2, 2]), np.array([2, 2, 5]))
    assert j.tolist() == [0, 2, -1]


@given(st.text(alphabet="ab c\né", min_size=1, max_size=30), st.data())
@settings(max_examples=60, deadline=None)
def test_alignment_of_random_splits_is_monotone_and_covering(text, data):
    raw = text.encode()

    def split():
        cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(raw) - 1)), max_size=8))))
        cuts = [c for c in cuts if 0 < c < len(raw)]
        bounds = [0, *cuts, len(raw)]
        return [raw[a:b] for a, b in zip(bounds, bounds[1:])]

    src, dst = split(), split()
    pairs = align_sequences(src, dst)
    assert [i for i, _ in pairs] == list(range(len(src)))  # every source token paired
    js = [j for _, j in pairs]
    assert js == sorted(js)
    d_starts = np.cumsum([0] + [len(t) for t in dst])
    s_starts = np.cumsum([0] + [len(t) for t in src])
    for i, j in pairs:
        assert d_starts[j] <= s_starts[i] < d_starts[j + 1]
    # identical tokenisations align one to one
    assert align_sequences(src, src) == [(i, i) for i in range(len(src))]


def test_token_starts_on_real_trained_tokenizers(tmp_path):
    from lada.models.tokenizers import train_tokenizer

    corpus = ["Question: Tom has 12 apples and buys 7 more.\nAnswer:\n12+7=<<12+7=19>>19\n#### 19"] * 30
    a = train_tokenizer(corpus, "tiny-llama", 300)
    b = train_tokenizer(corpus, "tiny-qwen2", 300)
    va, vb = vocab_of(a), vocab_of(b)
    text = "Tom has 12 apples\n12+7=<<12+7=19>>19\n#### 19 café"
    ia = a(text, add_special_tokens=False)["input_ids"]
    ib = b(text, add_special_tokens=False)["input_ids"]
    sa, ea = token_starts(va, ia, text)
    sb, eb = token_starts(vb, ib, text)
    assert sa[0] == 0 and ea[-1] == len(text.encode()) and (sa[1:] == ea[:-1]).all()
    j = align_spans(sa, sb, eb)
    assert (j >= 0).all()
    # The mapping between the two trained vocabularies sends shared pieces to themselves.
    m = build_token_mapping(a, b, cache_dir=tmp_path)
    shared = [i for i, p in enumerate(va.pieces) if p in vb.pieces and i not in va.special]
    assert shared and all(vb.pieces[m[i]] == va.pieces[i] for i in shared)
    assert m[a.eos_token_id] == b.eos_token_id and m[a.pad_token_id] == b.pad_token_id
    with pytest.raises(ValueError, match="decode to"):
        token_starts(va, ia, text + "x")


def test_map_topk_merges_duplicates_and_renormalises():
    mapping = np.array([2, 2, 0, 1], dtype=np.int32)
    idx = np.array([[0, 1, 2], [3, 2, 0]])
    probs = np.array([[0.4, 0.2, 0.2], [0.5, 0.3, 0.0]])
    d, p = map_topk(idx, probs, mapping, dst_vocab_size=3)
    assert d.tolist() == [[2, 2, 0], [1, 0, 2]]
    np.testing.assert_allclose(p, [[0.75, 0.0, 0.25], [0.625, 0.375, 0.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="source ids"):
        map_topk(np.array([[4]]), np.array([[1.0]]), mapping, 3)
    with pytest.raises(ValueError, match="outside the destination"):
        map_topk(idx, probs, mapping, dst_vocab_size=2)


@given(st.lists(st.integers(0, 5), min_size=4, max_size=4), st.lists(st.floats(0.01, 1), min_size=4, max_size=4),
       st.lists(st.integers(0, 3), min_size=6, max_size=6))
@settings(max_examples=60, deadline=None)
def test_map_topk_conserves_mass_per_destination_id(idx, vals, mapping):
    mapping = np.array(mapping, dtype=np.int32)
    vals = np.array(vals, dtype=np.float32)
    d, p = map_topk(np.array([idx]), vals[None], mapping, 4)
    assert abs(p.sum() - 1) < 1e-5
    want = np.zeros(4)
    np.add.at(want, mapping[idx], vals / vals.sum())
    got = np.zeros(4)
    np.add.at(got, d[0], p[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # identity mapping without duplicates is the identity (after renormalising)
    d2, p2 = map_topk(np.array([[0, 1, 2]]), np.array([[0.5, 0.3, 0.2]]), np.arange(3), 3)
    assert d2.tolist() == [[0, 1, 2]] and np.allclose(p2, [[0.5, 0.3, 0.2]])
