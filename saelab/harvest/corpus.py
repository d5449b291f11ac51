"""Document sources: the texts a harvest reads, one string per document.

`source: default` is an offline corpus that every Python install has:

- every `.py` file under `sysconfig.get_paths()["stdlib"]`, except those with a folder
  in `EXCLUDED_DIRS` on their path (test suites and their data, installed third-party
  packages, bytecode caches) and `pydoc_data/topics.py` (its text is the topics below);
- one document per entry of `pydoc_data.topics.topics` (English reference prose).

Order: the (kind, name) entries, `("file", "json/decoder.py")` or `("topic", "assert")`,
are sorted and then shuffled with `random.Random(seed)`, so that the order depends only
on the file list and the seed, and a short run still sees a mix of prose and code.
Files are read as UTF-8 with `errors="replace"` (an undecodable byte becomes U+FFFD
rather than stopping a harvest). Documents that are empty or only whitespace are skipped.

`source: datasets` streams a Hugging Face `datasets` source: local files (a file, a glob,
or a folder's files with a known extension, recursively; read in sorted order by the one
builder their extension names, see `BUILDERS`) or, for anything else, a hub name with
`name` as its config. A `.txt` file gives one document per line (the `text` builder's
default). Rows whose text is None or empty are skipped. Undecodable bytes in `.txt` and `.csv` files
become U+FFFD, as in the default corpus; JSON must be valid UTF-8 JSON (a file its reader rejects is
an error naming it).
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from saelab.errors import SaelabError
from saelab.harvest.config import CorpusConfig

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "testing", "site-packages", "dist-packages", "__pycache__"})
DUPLICATE_FILES = frozenset({"pydoc_data/topics.py"})
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
N_NAMES_DESCRIBED = 10


def iter_documents(cfg: CorpusConfig) -> Iterator[str]:
    """Yield the texts of `cfg`'s corpus in a deterministic order."""
    if cfg.source == "default":
        for _, text in _default_documents(cfg.seed):
            yield text
    elif cfg.source == "datasets":
        yield from _dataset_documents(cfg)
    else:
        raise SaelabError(f"corpus.source must be 'default' or 'datasets', not {cfg.source!r}")


def describe_corpus(cfg: CorpusConfig) -> dict[str, Any]:
    """A JSON-able record of where the text came from, for the activation store's manifest."""
    if cfg.source == "default":
        return _describe_default(cfg.seed)
    if cfg.source == "datasets":
        return _describe_datasets(cfg)
    raise SaelabError(f"corpus.source must be 'default' or 'datasets', not {cfg.source!r}")


# --- source: default -------------------------------------------------------------------


def stdlib_root() -> Path:
    """The standard library folder the default corpus reads."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_entries(seed: int = 0) -> list[tuple[str, str]]:
    """The default corpus's (kind, name) entries in reading order (empty files included)."""
    from pydoc_data.topics import topics

    entries = [("file", name) for name in _stdlib_files(stdlib_root())]
    entries += [("topic", name) for name in topics]
    entries.sort()
    random.Random(seed).shuffle(entries)
    return entries


def _stdlib_files(root: Path) -> list[str]:
    """Relative POSIX paths of the stdlib's `.py` files, pruning excluded folders on the way."""
    names = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]
        rel = Path(folder).relative_to(root)
        names += [(rel / f).as_posix() for f in files if f.endswith(".py")]
    return [n for n in names if n not in DUPLICATE_FILES]


def default_entry_text(kind: str, name: str) -> str:
    """The text of one default-corpus entry: a stdlib file (undecodable bytes as U+FFFD) or a pydoc topic."""
    from pydoc_data.topics import topics

    if kind == "file":
        return (stdlib_root() / name).read_text(encoding="utf-8", errors="replace")
    return topics[name]


def _default_documents(seed: int) -> Iterator[tuple[str, str]]:
    """Yield ("kind:name", text) for the non-empty documents of the default corpus."""
    for kind, name in default_entries(seed):
        text = default_entry_text(kind, name)
        if text.strip():
            yield f"{kind}:{name}", text


def _describe_default(seed: int) -> dict[str, Any]:
    digest = hashlib.sha256()
    counts = {"file": 0, "topic": 0}
    first: list[str] = []
    for name, text in _default_documents(seed):
        counts[name.split(":", 1)[0]] += 1
        if len(first) < N_NAMES_DESCRIBED:
            first.append(name)
        # Length prefixes keep (name, text) boundaries unambiguous.
        for part in (name, text):
            data = part.encode("utf-8", errors="surrogatepass")
            digest.update(f"{len(data)}:".encode() + data)
    return {
        "source": "default",
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "stdlib": str(stdlib_root()),
        "excluded_dirs": sorted(EXCLUDED_DIRS),
        "excluded_files": sorted(DUPLICATE_FILES),
        "seed": seed,
        "order": "sorted (kind, name) entries shuffled with random.Random(seed)",
        "n_files": counts["file"],
        "n_topics": counts["topic"],
        "first_documents": first,
        "sha256": digest.hexdigest(),
    }


# --- source: datasets ------------------------------------------------------------------


def _dataset_documents(cfg: CorpusConfig) -> Iterator[str]:
    for row in _readable_rows(cfg):
        if cfg.text_column not in row:
            raise SaelabError(
                f"corpus.text_column {cfg.text_column!r} is not in the data; its columns are {sorted(row)}"
            )
        text = row[cfg.text_column]
        if text is None or text == "":
            continue
        if not isinstance(text, str):
            raise SaelabError(f"corpus.text_column {cfg.text_column!r} holds {type(text).__name__}, not text")
        yield text


def _readable_rows(cfg: CorpusConfig) -> Iterator[dict[str, Any]]:
    """The rows of the stream; a file its reader rejects (JSON that is not UTF-8 or holds a lone surrogate
    escape, a malformed CSV row…) is a SaelabError naming the corpus, not the reader's traceback."""
    from datasets.utils import logging as datasets_logging

    rows = iter(_load_stream(cfg))
    while True:
        verbosity = datasets_logging.get_verbosity()
        datasets_logging.set_verbosity(datasets_logging.CRITICAL)  # its log line would repeat ours
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as error:  # datasets, pyarrow and pandas each raise their own types for a bad file
            reason = " ".join(str(error).split())[:300] or type(error).__name__
            raise SaelabError(f"corpus.path {cfg.path!r} cannot be read: {reason}") from error
        finally:
            datasets_logging.set_verbosity(verbosity)
        yield row


def _load_stream(cfg: CorpusConfig) -> Any:
    """A streaming `datasets` split: local files by extension, else a hub dataset."""
    from datasets import load_dataset

    path = _require_path(cfg)
    files = _local_files(path)
    if files is None:
        return load_dataset(path, cfg.name, split=cfg.split, streaming=True)
    # Keying the files by `cfg.split` makes any split name valid for local files.
    builder = _builder(files)
    # Undecodable bytes become U+FFFD (as in the default corpus) instead of stopping the harvest.
    options = {"encoding_errors": "replace"} if builder in ("text", "json", "csv") else {}
    return load_dataset(builder, data_files={cfg.split: files}, split=cfg.split, streaming=True, **options)


def _require_path(cfg: CorpusConfig) -> str:
    if not cfg.path:
        raise SaelabError("corpus.path is required for `source: datasets`")
    return cfg.path


def _local_files(path: str) -> list[str] | None:
    """The data files `path` names on disk, or None when it should be a hub name."""
    p = Path(path).expanduser()
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in BUILDERS)
        if not files:
            raise SaelabError(f"corpus.path {path!r} holds no {'/'.join(BUILDERS)} files")
        return files
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise SaelabError(f"corpus.path {path!r} matches no files")
        return files
    if p.suffix in BUILDERS:  # Looks like a file, so a hub lookup would only confuse.
        raise SaelabError(f"corpus.path {path!r} does not exist")
    return None


def _builder(files: list[str]) -> str:
    """The one `datasets` builder that reads every file in `files`."""
    suffixes = {Path(f).suffix for f in files}
    unknown = suffixes - set(BUILDERS)
    if unknown:
        raise SaelabError(f"corpus.path has files of unknown type {sorted(unknown)}; recognised: {sorted(BUILDERS)}")
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise SaelabError(f"corpus.path mixes file types {sorted(suffixes)}; use one type")
    return builders.pop()


def _describe_datasets(cfg: CorpusConfig) -> dict[str, Any]:
    path = _require_path(cfg)
    description: dict[str, Any] = {
        "source": "datasets",
        "path": path,
        "name": cfg.name,
        "split": cfg.split,
        "text_column": cfg.text_column,
    }
    files = _local_files(path)
    if files is not None:
        description["builder"] = _builder(files)
        description["files"] = [{"path": f, "bytes": os.path.getsize(f)} for f in files]
    return description
