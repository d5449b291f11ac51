"""Odd text, harvested through the real CLI: empty documents, a document of one token, a very long document,
bytes that are not UTF-8, null bytes, mixed scripts and emoji, a corpus smaller than one context. Each
follows the rule the README states under "Odd text" (and `saelab/harvest/packing.py`, `corpus.py`):

- an empty document (an empty line of a `.txt`, `""` in JSON) is skipped and adds no separator;
- a one-token document is that token between two separators;
- a long document is tokenised in 100k-character pieces with the ids of the whole document;
- undecodable bytes of a `.txt`/`.csv` file become U+FFFD; JSON that is not valid UTF-8 JSON (or holds a
  lone surrogate escape) is a one-line error naming the file;
- null bytes, any script and emoji are text like any other;
- a corpus smaller than one context is a one-line error that says so, and leaves no store folder.
(Lone surrogates from Python callers become U+FFFD: tests/test_packing.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from faultlib import in_process_cli, one_line_error
from pipeline import HOOK

from saelab.harvest.config import CorpusConfig
from saelab.harvest.corpus import iter_documents
from saelab.harvest.packing import text_token_ids
from saelab.harvest.store import ActivationStore

LONG = " ".join(f"word{i % 997} ünïcödé" for i in range(12_000))  # ~170k characters: two 100k cuts
LINES = [
    b"An ordinary first line of English text, long enough to matter.",
    b"",  # empty
    b"Hello",  # one token
    b"bad bytes \xff\xfe here and \xed\xa0\x80 a UTF-8-encoded surrogate",
    b"null\x00bytes\x00\x00in the middle",
    "Mixed: Ελληνικά, русский, 日本語のテキスト, العربية, हिन्दी — emoji 😀👩‍👩‍👧‍👦🇫🇷 and ZWJ".encode(),
    b"",
    LONG.encode(),
    b"   ",  # whitespace only: a document of whitespace tokens (a .txt line is kept as it is)
    b"<|endoftext|> stays text, as does <|im_start|>",
    b"last line",
]


def harvest(tmp_path: Path, model_dir: Path, corpus: Path, out: Path) -> tuple[int, str]:
    args = [f"model={model_dir}", f"hooks=[{HOOK}]", f"out={out}", "n_tokens=1000000", "context_size=32"]
    args += ["batch_size=32", "shard_contexts=256", "device=cpu", "corpus.source=datasets", f"corpus.path={corpus}"]
    code, _, stderr = in_process_cli("harvest", "--quiet", *args)
    return code, stderr


def test_odd_documents_are_harvested_by_the_stated_rules(tiny_model, tiny_model_dir, tmp_path):
    corpus = tmp_path / "odd.txt"
    corpus.write_bytes(b"\n".join(LINES) + b"\n")
    documents = list(iter_documents(CorpusConfig(source="datasets", path=str(corpus))))
    expected = [line.decode("utf-8", errors="replace") for line in LINES if line]
    assert documents == expected  # empty lines skipped; undecodable bytes → U+FFFD; NUL, scripts, emoji kept
    assert "\ufffd" in documents[2] and "\x00" in documents[3] and "😀" in documents[4]

    code, stderr = harvest(tmp_path, tiny_model_dir, corpus, tmp_path / "store")
    assert code == 0, stderr
    store = ActivationStore(tmp_path / "store")
    assert store.complete and store.n_contexts > 0  # the corpus ran out before n_tokens: all of it was stored

    tokenizer = tiny_model.tokenizer
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    pieces = [text_token_ids(document, tokenizer) for document in documents]  # whole documents, not 100k cuts
    stream = [token for ids in pieces for token in [eos, *ids]][1:]
    contexts = [[bos, *stream[i : i + 31]] for i in range(0, len(stream) - 30, 31)]
    stored = [store.context_tokens(c).tolist() for c in range(store.n_contexts)]
    assert stored == contexts  # every rule at once: separators, skipped empties, the long document's ids

    hello = text_token_ids("Hello", tokenizer)
    assert len(hello) == 1 and [eos, *hello, eos] in [stream[i : i + 3] for i in range(len(stream) - 2)]
    decoded = tokenizer.decode(stream)
    assert "\x00" in decoded and "\ufffd" in decoded and "日本語" in decoded and "😀" in decoded
    assert "<|endoftext|> stays text" in decoded and stream.count(eos) == len(documents) - 1


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"far too short", "the corpus yields no full context of 32 tokens"),
        (b"\n\n\n", "the corpus yields no full context of 32 tokens"),  # only empty documents
    ],
)
def test_a_corpus_smaller_than_one_context_is_one_line_and_leaves_nothing(tiny_model_dir, tmp_path, content, expected):
    corpus = tmp_path / "small.txt"
    corpus.write_bytes(content)
    code, stderr = harvest(tmp_path, tiny_model_dir, corpus, tmp_path / "store")
    assert expected in one_line_error((code, stderr))
    assert not (tmp_path / "store").exists()


def test_json_the_reader_rejects_is_one_line_naming_the_file(tiny_model_dir, tmp_path):
    good = [{"text": "fine \u0000 text 😀 " * 40}]
    for name, raw in [
        ("surrogate.jsonl", b'{"text": "a lone \\ud800 surrogate"}\n'),
        ("bytes.jsonl", b'{"text": "not utf-8 \xff\xfe"}\n'),
        ("torn.jsonl", json.dumps(good[0]).encode()[:-5] + b"\n"),
    ]:
        corpus = tmp_path / name
        corpus.write_bytes(json.dumps(good[0]).encode() + b"\n" + raw)
        code, stderr = harvest(tmp_path, tiny_model_dir, corpus, tmp_path / name.replace(".jsonl", ""))
        line = one_line_error((code, stderr))
        assert f"corpus.path {str(corpus)!r} cannot be read" in line, line
        assert not (tmp_path / name.replace(".jsonl", "")).exists()
