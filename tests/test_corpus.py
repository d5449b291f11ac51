"""Document sources: the offline default corpus and local `datasets` files."""

from __future__ import annotations

import itertools
import json
from pathlib import Path, PurePosixPath
from pydoc_data.topics import topics

import pytest
from datasets import Dataset

from saelab.errors import SaelabError
from saelab.harvest.config import CorpusConfig
from saelab.harvest.corpus import (
    default_entries,
    describe_corpus,
    iter_documents,
    stdlib_root,
)

# Spelled out rather than imported, so that shrinking EXCLUDED_DIRS fails a test.
TEST_AND_THIRD_PARTY = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
ROWS = ["first document", "", "second document\nwith two lines", None, "third"]
TEXTS = ["first document", "second document\nwith two lines", "third"]


def first(cfg: CorpusConfig, n: int = 40) -> list[str]:
    return list(itertools.islice(iter_documents(cfg), n))


# --- source: default -------------------------------------------------------------------


def test_default_is_deterministic():
    assert first(CorpusConfig()) == first(CorpusConfig())
    assert default_entries(0) == default_entries(0)


def test_seed_changes_order_not_content():
    assert first(CorpusConfig(seed=1)) != first(CorpusConfig(seed=0))
    assert sorted(default_entries(1)) == sorted(default_entries(0))


def test_default_excludes_test_folders():
    names = [name for kind, name in default_entries() if kind == "file"]
    assert "json/decoder.py" in names and "unittest/case.py" in names
    for name in names:
        assert not TEST_AND_THIRD_PARTY & set(PurePosixPath(name).parts[:-1]), name
    assert "pydoc_data/topics.py" not in names  # its text is already there as topics
    assert (stdlib_root() / "test").is_dir()  # so the exclusion above had work to do


def test_default_mixes_prose_and_code():
    docs = first(CorpusConfig(), 60)
    prose = set(topics.values())
    assert any(doc in prose for doc in docs)
    assert any("def " in doc and doc not in prose for doc in docs)
    assert all(doc.strip() for doc in docs)
    kinds = {kind for kind, _ in default_entries()}
    assert kinds == {"file", "topic"}


def test_describe_default_is_json_and_stable():
    description = describe_corpus(CorpusConfig())
    assert json.loads(json.dumps(description)) == description
    assert description == describe_corpus(CorpusConfig())
    assert description["n_topics"] == len(topics)
    assert description["n_files"] > 500
    assert len(description["sha256"]) == 64
    assert description["sha256"] != describe_corpus(CorpusConfig(seed=1))["sha256"]


# --- source: datasets ------------------------------------------------------------------


def write_jsonl(path: Path, rows: list, column: str = "text") -> None:
    path.write_text("".join(json.dumps({column: r, "id": i}) + "\n" for i, r in enumerate(rows)))


def datasets_cfg(path: Path | str, **kw) -> CorpusConfig:
    return CorpusConfig(source="datasets", path=str(path), **kw)


def test_local_jsonl(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    assert list(iter_documents(datasets_cfg(tmp_path / "a.jsonl"))) == TEXTS


def test_local_json_array(tmp_path):
    rows = [{"text": r} for r in ROWS]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert list(iter_documents(datasets_cfg(tmp_path / "a.json"))) == TEXTS


def test_local_parquet(tmp_path):
    Dataset.from_dict({"text": ROWS}).to_parquet(str(tmp_path / "a.parquet"))
    assert list(iter_documents(datasets_cfg(tmp_path / "a.parquet"))) == TEXTS


def test_local_txt_is_one_document_per_line(tmp_path):
    (tmp_path / "a.txt").write_text("line one\n\nline two\n")
    assert list(iter_documents(datasets_cfg(tmp_path / "a.txt"))) == ["line one", "line two"]


def test_local_csv(tmp_path):
    (tmp_path / "a.csv").write_text('id,text\n1,hello\n2,"a, b"\n')
    assert list(iter_documents(datasets_cfg(tmp_path / "a.csv"))) == ["hello", "a, b"]


def test_glob_and_folder_read_files_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ["from b"])
    write_jsonl(tmp_path / "a.jsonl", ["from a"])
    (tmp_path / "notes.md").write_text("ignored in a folder")
    want = ["from a", "from b"]
    assert list(iter_documents(datasets_cfg(tmp_path / "*.jsonl"))) == want
    assert list(iter_documents(datasets_cfg(tmp_path))) == want


def test_any_split_name_works_for_local_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["x"])
    assert list(iter_documents(datasets_cfg(tmp_path / "a.jsonl", split="validation"))) == ["x"]


def test_custom_text_column(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS, column="content")
    cfg = datasets_cfg(tmp_path / "a.jsonl", text_column="content")
    assert list(iter_documents(cfg)) == TEXTS


def test_missing_column_names_the_columns(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS, column="content")
    with pytest.raises(SaelabError, match=r"'text'.*\['content', 'id'\]"):
        list(iter_documents(datasets_cfg(tmp_path / "a.jsonl")))


def test_missing_path_is_an_error():
    cfg = CorpusConfig(source="datasets")
    with pytest.raises(SaelabError, match=r"corpus\.path is required for `source: datasets`"):
        list(iter_documents(cfg))
    with pytest.raises(SaelabError, match=r"corpus\.path is required"):
        describe_corpus(cfg)


def test_missing_local_file_is_an_error(tmp_path):
    with pytest.raises(SaelabError, match="does not exist"):
        list(iter_documents(datasets_cfg(tmp_path / "absent.jsonl")))
    with pytest.raises(SaelabError, match="matches no files"):
        list(iter_documents(datasets_cfg(tmp_path / "*.parquet")))


def test_mixed_or_unknown_file_types_are_errors(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["x"])
    (tmp_path / "b.txt").write_text("y\n")
    (tmp_path / "c.xml").write_text("<z/>")
    with pytest.raises(SaelabError, match="mixes file types"):
        list(iter_documents(datasets_cfg(tmp_path)))
    with pytest.raises(SaelabError, match="unknown type"):
        list(iter_documents(datasets_cfg(tmp_path / "c.xml")))


def test_describe_local_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    description = describe_corpus(datasets_cfg(tmp_path / "*.jsonl", text_column="text"))
    assert json.loads(json.dumps(description)) == description
    assert description["builder"] == "json"
    assert description["files"] == [{"path": str(tmp_path / "a.jsonl"), "bytes": (tmp_path / "a.jsonl").stat().st_size}]
    assert (description["split"], description["text_column"]) == ("train", "text")


def test_describe_hub_name_reads_nothing():
    description = describe_corpus(datasets_cfg("someone/some-corpus", name="en"))
    assert description["path"] == "someone/some-corpus" and description["name"] == "en"
    assert "files" not in description
