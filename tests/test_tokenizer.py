"""Tokenizer tests: parity with Meta's llama_models tokenizer (tiktoken), round trips, special tokens, file format,
training, robustness. References are imported here only, never in the package."""
import random, sysconfig
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llama32_nb.core import data_dir
from llama32_nb.bpe import (LLAMA3_PATTERN, bpe_encode, bpe_merge_simple, bpe_merge_heap, train_bpe, pretokenize,
    read_tiktoken_bpe, write_tiktoken_bpe, llama3_model_path)
from llama32_nb.batch_bpe import BatchBPE, bpe_merge_ids, NOT_A_TOKEN, is_bmp, split_pretokens, _key
from llama32_nb.tokenizer import (Tokenizer, LLAMA3_SPECIAL_TOKENS, LLAMA3_NAMED_SPECIAL_TOKENS, split_long_runs,
    encode_segments, token_spans, render_tokens_html, MAX_RUN_CHARS)


LANGS = ["en", "de", "fr", "it", "pt", "hi", "es", "th"]


@pytest.fixture(scope="module")
def meta():
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    return MetaTokenizer.get_instance()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.llama3()


def stdlib_sources(max_bytes: int) -> list[str]:
    "Deterministic selection of Python stdlib sources: top-level *.py files in name order, up to `max_bytes`."
    out, total = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        s = p.read_text(encoding="utf-8", errors="replace")
        out.append(s); total += len(s.encode())
        if total >= max_bytes: break
    return out


def synthetic_texts() -> list[str]:
    rng = random.Random(1234)
    emoji = "😀👍🏽👨‍👩‍👧‍👦🇫🇷🧑🏿‍🚀❤️‍🔥✨🫠"
    combining = ("e\u0301a\u0308o\u0302\u0323n\u0303 Z\u0335\u0337\u0316a\u0352\u034a\u0344l\u0334g\u0315o\u0489 "
                 "ก\u0e34\u0e49 क\u094d\u0937")
    pool = list(emoji) + list(combining) + list("abc XYZ 0123456789 \t\n\r  .,;!?'\"()[]{}<>|_-=+*/\\€ßçñ¿¡") + \
        ["'s", "'LL", "'Re", "\u00a0", "\u3000", "\u2028", "\u0085", "\x0b", "\x1c", "１２３", "٣٤٥", "Ⅻ", "½"]
    texts = [emoji * 50, combining * 50,
             "".join(rng.choice(pool) for _ in range(100_000))]
    # long runs around Meta's 25k limit, digits, whitespace of several kinds
    texts += ["a" * 30_000, "7" * 25_001 + " x", " " * 25_000 + "y", "\n" * 60_000, "\u3000" * 26_000 + "q" * 3,
              "1234567890" * 7_000, "x" + " \t" * 20_000 + "\u2003" * 12_000 + "y" * 24_999 + "z" * 2,
              "".join(rng.choice(["a" * rng.randint(1, 40_000), " " * rng.randint(1, 30_000), "b c"])
                      for _ in range(30))]
    # more than 400k characters: window cuts inside words
    texts.append(("Hello world's 12345 abc\n\n  def  !!?\r\n x " * 12_000)[:450_001])
    return texts


def parity_corpus() -> list[str]:
    d = data_dir()
    texts = [(d / "tinyshakespeare.txt").read_text(encoding="utf-8")]
    texts += [(d / "lang" / f"{l}.txt").read_text(encoding="utf-8") for l in LANGS]
    texts += stdlib_sources(700_000)
    texts += synthetic_texts()
    return texts


def test_parity_with_meta_on_3mb(tok, meta):
    texts = parity_corpus()
    total = sum(len(t.encode("utf-8")) for t in texts)
    assert total >= 3_000_000, total
    for i, t in enumerate(texts):
        ours, ref = tok.encode(t), meta.encode(t, bos=False, eos=False)
        assert ours == ref, f"text {i} ({len(t)} chars) differs"
    assert tok.encode("hi", bos=True, eos=True) == meta.encode("hi", bos=True, eos=True)


def test_test_vectors(tok):
    assert tok.encode("system") == [9125] and tok.encode("user") == [882] and tok.encode("assistant") == [78191]
    assert tok.encode("ipython") == [23799, 4690] and tok.encode("\n\n") == [271]
    assert tok.encode("Hello world") == [9906, 1917]
    assert tok.encode("Hello, world! 12345") == [9906, 11, 1917, 0, 220, 4513, 1774]
    assert tok.encode("I'm") == [40, 2846] and tok.encode("   spaces") == [256, 12908]
    assert tok.encode("😀") == [76460, 222]
    assert len(tok.encode("a" * 30_000)) == 3_750
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_pretokenize_example():
    assert pretokenize("Hello world's 12345 abc\n\n  def  !!?\r\n x") == [
        'Hello', ' world', "'s", ' ', '123', '45', ' abc', '\n\n', ' ', ' def', ' ', ' !!?\r\n', ' x']


text_strategy = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200)
bmp_strategy = st.text(alphabet=st.characters(max_codepoint=0xFFFF, exclude_categories=("Cs",)), max_size=200)


@settings(max_examples=1000, deadline=None)
@given(text_strategy)
def test_roundtrip_hypothesis(s):
    tok = Tokenizer.llama3()
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=300, deadline=None)
@given(text_strategy)
def test_parity_hypothesis(s):
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    assert Tokenizer.llama3().encode(s) == MetaTokenizer.get_instance().encode(s, bos=False, eos=False)


def test_every_code_point_pretokenizes_like_meta(tok, meta):
    "Each code point in contexts that expose its letter/digit/other class: ours == Meta (incl. Unicode 17.0 additions)."
    cps = [c for c in range(0x80, 0x110000) if not 0xD800 <= c < 0xE000]
    probes = lambda c: (chr(c) + ":A", "1" + chr(c) + "1", "a" + chr(c) + "a", " " + chr(c) + "!")
    bad = []
    for i in range(0, len(cps), 512):
        block = cps[i:i + 512]
        s = "\n".join(p for c in block for p in probes(c))
        if tok.encode(s) != meta.encode(s, bos=False, eos=False):
            bad += [hex(c) for c in block
                    if any(tok.encode(p) != meta.encode(p, bos=False, eos=False) for p in probes(c))]
    assert not bad, f"{len(bad)} code points pre-tokenize differently from Meta, e.g. {bad[:10]}"


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=300))
def test_ascii_fast_path_parity(s):
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    assert split_pretokens(s) == pretokenize(s)
    assert Tokenizer.llama3().encode(s) == MetaTokenizer.get_instance().encode(s, bos=False, eos=False)


contraction_strategy = st.lists(st.sampled_from(["'", "s", "S", "\u017f", "t", "re", "RE", "ve", "m", "ll", "lL",
                                                 "d", "D", " ", "  ", "\n", "\r\n", "\t", "\u3000", "\u00a0", "a",
                                                 "\u00e9", "1", "!"]),
                                max_size=40).map("".join)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(text_strategy, contraction_strategy, bmp_strategy))
def test_array_pretokenizer_splits_like_pretokenize(s):
    "The pattern as array operations over character classes gives `pretokenize`'s pieces for any text within the BMP."
    if is_bmp(s): assert split_pretokens(s) == pretokenize(s)
    else: assert any(ord(c) > 0xFFFF for c in s)


def test_token_table_is_the_vocabulary(tok):
    "Every token of at most 15 bytes is found by its key, and byte strings that are not tokens are not."
    table = tok.engine.table
    toks = [b for b in tok.mergeable_ranks if len(b) <= 15]
    rng = random.Random(0)
    others = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 15))) for _ in range(20_000)]
    others = [b for b in others if b not in tok.mergeable_ranks] + [b"\x00" * k for k in range(2, 16)]
    for group, want in [(toks, [tok.mergeable_ranks[b] for b in toks]), (others, [-1] * len(others))]:
        k = [_key(b) for b in group]
        got = table.lookup(np.array([a for a, _ in k], np.int64), np.array([b for _, b in k], np.int64))
        assert got.tolist() == want


def test_lone_surrogates_like_tiktoken(tok, meta):
    for s in ["a\ud800b", "\udfff", "x\ud83d\ude00y", "ok \udc80" * 3]:
        assert tok.encode(s) == meta.encode(s, bos=False, eos=False)


def test_special_text_never_special_by_default(tok, meta):
    assert len(LLAMA3_SPECIAL_TOKENS) == 256
    assert tok.special_tokens == meta.special_tokens                     # names and ids exactly as Meta's
    for name in LLAMA3_SPECIAL_TOKENS:
        s = f"before {name}after{name}\n{name}"
        ids = tok.encode(s)
        assert max(ids) < 128_000, name
        assert ids == meta.encode(s, bos=False, eos=False)
        assert tok.decode(ids) == s
    assert tok.encode("<|eot_id|>") == [27, 91, 68, 354, 851, 91, 29]
    assert tok.encode(" <|eot_id|>") == [83739, 68, 354, 851, 91, 29]


def test_allowed_and_disallowed_special(tok, meta):
    s = "x<|eot_id|>y <|begin_of_text|><|reserved_special_token_24|>z<|image|>"
    for allowed in ["all", {"<|eot_id|>"}, {"<|image|>", "<|reserved_special_token_24|>"}, set()]:
        assert tok.encode(s, allowed_special=allowed) == meta.encode(s, bos=False, eos=False, allowed_special=allowed)
    assert tok.encode("<|eot_id|>", allowed_special="all") == [128009]
    with pytest.raises(ValueError, match="disallowed"):
        tok.encode("a <|eot_id|>", disallowed_special="all")
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode("a", allowed_special={"<|nope|>"})
    assert tok.encode("a <|eot_id|>", allowed_special={"<|eot_id|>"}, disallowed_special="all") == [64, 220, 128009]


def test_attributes(tok, meta):
    assert tok.n_words == tok.vocab_size == meta.n_words == 128_256
    for a in ["bos_id", "eos_id", "eot_id", "eom_id", "pad_id", "python_tag_id", "stop_tokens"]:
        assert getattr(tok, a) == getattr(meta, a), a
    assert Tokenizer.llama3() is tok


def test_decode_matches_meta(tok, meta):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tok.n_words) for _ in range(rng.randint(0, 60))]
        assert tok.decode(ids) == meta.decode(ids)
    assert tok.decode(np.array([9906, 1917])) == "Hello world"
    import torch
    assert tok.decode(torch.tensor([9906, 1917])) == "Hello world"
    assert tok.decode([np.int64(9906)]) == "Hello"


def test_bpe_heap_equals_simple_and_tiktoken(tok, meta):
    rng = random.Random(0)
    ranks = tok.mergeable_ranks
    alphabet = "aab  \n\t.-_0123éü€😀ไกदि"
    for _ in range(400):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120))).encode()
        ref = meta.model._encode_single_piece(s)
        assert bpe_merge_simple(s, ranks) == ref
        assert bpe_merge_heap(s, ranks) == ref
    long = b"ab" * 5000 + b"a" * 3000
    assert bpe_merge_heap(long, ranks) == meta.model._encode_single_piece(long)


def test_batch_bpe_equals_tiktoken(tok, meta):
    "numpy lock-step BPE (packed hash lookups: vectorised probing or the dict; Python hand-off; heap for long pieces)."
    bb = tok.engine.batch
    q = np.concatenate([np.fromiter(bb.table, np.int64)[::7],
                        np.random.default_rng(1).integers(0, 1 << (2 * bb.shift), 50_000)])
    a, b = q >> bb.shift, q & ((1 << bb.shift) - 1)
    want = [bb.table.get(x, NOT_A_TOKEN) for x in q.tolist()]
    assert bb.lookup(a, b).tolist() == want and bb.lookup(a[:100], b[:100]).tolist() == want[:100]
    rng = random.Random(1)
    alphabet = "aab  \n\t.-_0123éü€😀ไกदि"
    for n_pieces in (3, 15, 16, 47, 600):
        pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 160))).encode() for _ in range(n_pieces)]
        pieces += [b"", b"a", b" the", b"x" * 300]                     # empty, one byte, a whole token, a long run
        assert bb(pieces) == [tuple(meta.model._encode_single_piece(p)) if p else () for p in pieces]
    words = list(dict.fromkeys(p.encode() for p in pretokenize((data_dir() / "lang" / "th.txt").read_text()[:60_000])))
    assert bb(words) == [tuple(meta.model._encode_single_piece(w)) for w in words]
    ids = [bb.byte_ids[c] for c in b" unbelievably"]
    assert bpe_merge_ids(ids, bb.table, bb.shift) == meta.model._encode_single_piece(b" unbelievably")


def test_batch_bpe_separator_and_merge(tok, meta):
    "The separator id is never a token (also for a power-of-two vocabulary); `new=True` skips the whole-token check."
    bb = tok.engine.batch
    assert len(tok.mergeable_ranks) <= bb.sep < 1 << bb.shift
    words = [w for w in dict.fromkeys(p.encode()
                                      for p in pretokenize((data_dir() / "lang" / "hi.txt").read_text()[:20_000]))
             if w not in tok.mergeable_ranks and 2 <= len(w) <= bb.max_len]
    assert len(words) >= 48 and bb(words, new=True) == [tuple(meta.model._encode_single_piece(w)) for w in words]
    ranks = {bytes([i]): i for i in range(256)}                 # 256 tokens: the old shift would make 255 the separator
    small = BatchBPE(ranks)
    assert small.sep >= 256
    pieces = [bytes([i, 255, 255 - i]) for i in range(100)]
    assert small(pieces) == [tuple(p) for p in pieces]


def test_cold_cache_encode_matches_meta(tok, meta):
    "A fresh piece cache (every pre-token a miss, merged in batches) and the plain reference give Meta's ids."
    texts = [(data_dir() / "lang" / f"{l}.txt").read_text()[:40_000] for l in LANGS]
    tok.engine.reset()
    ref = [meta.encode(t, bos=False, eos=False) for t in texts]
    assert [tok.encode(t) for t in texts] == ref
    plain = Tokenizer.llama3(fast=False)
    assert plain.engine is None and [plain.encode(t) for t in texts] == ref
    assert [bpe_encode(t, tok.mergeable_ranks) for t in texts] == ref


def test_split_long_runs_matches_meta(meta):
    every_space = "".join(c for c in map(chr, range(0x110000)) if c.isspace())      # the cut classes cover str.isspace
    assert split_long_runs(every_space * 3, 7) == list(meta._split_whitespaces_or_nonwhitespaces(every_space * 3, 7))
    rng = random.Random(0)
    for _ in range(500):
        s = "".join(rng.choice(["a", " ", "\n", "\u3000", "bc", "\u00a0"]) * rng.randint(1, 12)
                    for _ in range(rng.randint(0, 30)))
        ref = list(meta._split_whitespaces_or_nonwhitespaces(s, 7))
        got = split_long_runs(s, 7)
        assert got == ref or (len(s) <= 7 and got == [s] and ref == [s])
    for s in ["a" * 75_001, " " * 50_000 + "b" * 50_001]:
        assert split_long_runs(s) == list(meta._split_whitespaces_or_nonwhitespaces(s, MAX_RUN_CHARS))
    assert encode_segments("") == [] and encode_segments("abc") == ["abc"]


def naive_merges(counts, n_merges):
    "Reference trainer: recount everything each merge (same tie-break: highest count, then smallest pair)."
    from collections import Counter
    words = {tuple(w.encode()): c for w, c in counts.items()}
    vocab = [bytes([i]) for i in range(256)]
    out = []
    for new_id in range(256, 256 + n_merges):
        pairs = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]): pairs[p] += c
        if not pairs: break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        vocab.append(vocab[best[0]] + vocab[best[1]]); out.append(vocab[-1])
        nw = {}
        for w, c in words.items():
            o, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best: o.append(new_id); i += 2
                else: o.append(w[i]); i += 1
            nw[tuple(o)] = nw.get(tuple(o), 0) + c
        words = nw
    return out


def test_incremental_training_equals_naive():
    from collections import Counter
    text = ((data_dir() / "tinyshakespeare.txt").read_text()[:60_000]
            + (data_dir() / "lang" / "th.txt").read_text()[:20_000])
    counts = Counter(pretokenize(text))
    ranks = train_bpe(counts, 150)
    ours = [b for b, r in sorted(ranks.items(), key=lambda kv: kv[1])][256:]
    ref = naive_merges(counts, 150)
    assert len(set(ref)) == len(ref)            # no duplicate bytes here, so merge lists must agree exactly
    assert ours == ref


def test_train_vocab_size_and_specials():
    text = (data_dir() / "lang" / "de.txt").read_text()
    t = Tokenizer.train([text], 600)
    assert t.n_words == 600 and len(t.mergeable_ranks) == 600 - len(LLAMA3_NAMED_SPECIAL_TOKENS)
    assert t.bos_id == 588 and t.eot_id == 597 and t.stop_tokens == [589, 596, 597]
    assert t.decode(t.encode(text)) == text
    t2 = Tokenizer.train(text, 300, special_tokens=())
    assert t2.n_words == 300 and t2.special_tokens == {} and t2.bos_id is None
    for bad in [255, 256 + 11, -5, 300.0, True, "512"]:
        with pytest.raises(ValueError, match="vocab_size"):
            Tokenizer.train([text], bad)
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train([text], 260, special_tokens=[f"<|s{i}|>" for i in range(5)])
    with pytest.raises(TypeError, match="bytes"):
        Tokenizer.train([b"abc"], 300)


@pytest.fixture(scope="module")
def trained():
    d = data_dir()
    texts = [(d / "tinyshakespeare.txt").read_text()[:300_000]] + [(d / "lang" / f"{l}.txt").read_text()[:30_000]
                                                                   for l in LANGS]
    return Tokenizer.train(texts, 1024)


def sample_texts():
    d = data_dir()
    return [(d / "tinyshakespeare.txt").read_text()[500_000:560_000]] + \
        [(d / "lang" / f"{l}.txt").read_text()[-20_000:] for l in LANGS] + stdlib_sources(50_000)[:3]


def test_trained_save_load_roundtrip(trained, tmp_path):
    p = trained.save(tmp_path / "bpe1024.tiktoken")
    again = Tokenizer.load(p)
    assert again.mergeable_ranks == trained.mergeable_ranks and again.special_tokens == trained.special_tokens
    assert again.pattern == trained.pattern and again.n_words == 1024
    for s in sample_texts():
        assert again.encode(s) == trained.encode(s)
        assert again.decode(again.encode(s)) == s
    s = "<|begin_of_text|>hi<|eot_id|>"
    assert again.encode(s, allowed_special="all") == trained.encode(s, allowed_special="all") == \
        [trained.bos_id] + trained.encode("hi") + [trained.eot_id]
    # saving again writes identical files
    p2 = again.save(tmp_path / "again.tiktoken")
    assert p2.read_bytes() == p.read_bytes()


def test_trained_file_loads_in_tiktoken(trained, tmp_path):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    p = trained.save(tmp_path / "bpe1024.tiktoken")
    enc = tiktoken.Encoding("ours", pat_str=LLAMA3_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(p)),
                            special_tokens=trained.special_tokens)
    for s in sample_texts():
        assert enc.encode_ordinary(s) == trained.encode(s)
    s = "x<|eot_id|>y"
    assert enc.encode(s, allowed_special="all") == trained.encode(s, allowed_special="all")


def test_llama_vocab_file_rewrites_identically(tok, tmp_path):
    p = write_tiktoken_bpe(tok.mergeable_ranks, tmp_path / "tokenizer.model")
    assert p.read_bytes() == llama3_model_path().read_bytes()
    t = Tokenizer.load(p, special_tokens=LLAMA3_SPECIAL_TOKENS)
    assert t.special_tokens == tok.special_tokens and t.encode("Hello world") == [9906, 1917]
    assert Tokenizer.load(p).special_tokens == {}


# ---- robustness -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [b"bytes", None, 123, ["a"], bytearray(b"x")])
def test_encode_type_errors(tok, bad):
    with pytest.raises(TypeError, match=type(bad).__name__):
        tok.encode(bad)


@pytest.mark.parametrize("ids,match", [([-1], "out of range"), ([128_256], "out of range"),
                                       ([1, 2, 10**9], "out of range"),
                                       ([1.5], "ints"), (["a"], "ints"), ([True], "ints"), ([None], "ints"),
                                       ([1, 2.0], "ints")])
def test_decode_value_errors(tok, ids, match):
    with pytest.raises(ValueError, match=match):
        tok.decode(ids)


def test_decode_type_errors(tok):
    for bad in ["abc", b"abc", 5]:
        with pytest.raises(TypeError):
            tok.decode(bad)


def good_lines():
    import base64
    return [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)] + \
           [f"{base64.b64encode(b'ab').decode()} 256", f"{base64.b64encode(b'abc').decode()} 257"]


def test_good_file_loads(tmp_path):
    p = tmp_path / "ok.tiktoken"; p.write_text("\n".join(good_lines()) + "\n\n")
    assert len(read_tiktoken_bpe(p)) == 258


@pytest.mark.parametrize("edit,match", [
    (lambda L: L.__setitem__(256, "YW!! 256"), r"line 257: bad base64"),
    (lambda L: L.__setitem__(256, "YWI= 25x"), r"line 257: rank '25x' is not"),
    (lambda L: L.__setitem__(256, "YWI= -3"), r"line 257: rank '-3' is not"),
    (lambda L: L.__setitem__(257, "YWJj 256"), r"line 258: duplicate rank 256"),
    (lambda L: L.__setitem__(257, "YWI= 257"), r"line 258: duplicate token"),
    (lambda L: L.__setitem__(257, "YWJj 300"), r"not contiguous"),
    (lambda L: L.__setitem__(65, "YWJjZA== 65"), r"not byte-complete.*0x41"),
    (lambda L: L.__setitem__(257, "YWJj"), r"line 258: expected '<base64> <rank>'"),
    (lambda L: L.__setitem__(257, "YWJj 257 9"), r"line 258: expected"),
    (lambda L: L.__setitem__(10, "= 10"), r"line 11: bad base64|line 11: empty token"),
])
def test_malformed_vocab_files(tmp_path, edit, match):
    lines = good_lines(); edit(lines)
    p = tmp_path / "bad.tiktoken"; p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match) as e:
        read_tiktoken_bpe(p)
    assert "bad.tiktoken" in str(e.value)
    with pytest.raises(ValueError):
        Tokenizer.load(p)


def test_bad_sidecar_and_specials(tmp_path, trained):
    p = trained.save(tmp_path / "t.tiktoken")
    (tmp_path / "t.tiktoken.json").write_text("{not json")
    with pytest.raises(ValueError, match="t.tiktoken.json"):
        Tokenizer.load(p)
    with pytest.raises(ValueError, match="duplicate special"):
        Tokenizer(trained.mergeable_ranks, ["<|a|>", "<|a|>"])
    with pytest.raises(ValueError, match="special token ids"):
        Tokenizer(trained.mergeable_ranks, {"<|a|>": 5})


# ---- teaching helpers ---------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(text_strategy)
def test_token_spans_join_back(s):
    tok = Tokenizer.llama3()
    spans = token_spans(tok, s)
    assert "".join(p for p, _ in spans) == s and [i for _, i in spans] == tok.encode(s)


def test_render_html_escapes(tok):
    h = render_tokens_html(token_spans(tok, "<b>&x</b>\n"))
    assert "<b>" not in h and "&lt;b" in h and "&amp;" in h and 'title="id ' in h
