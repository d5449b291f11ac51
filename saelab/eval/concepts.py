"""Binary concepts on tokens, labelled offline from the default corpus: what sparse probing asks latents to find.

The default corpus is Python's standard library and its pydoc topics, so labels come for free:

- on Python source, Python's own `tokenize` gives the type of the source token that covers each
  model token's first non-space character: `keyword`, `name` (identifiers, keywords excluded),
  `string`, `comment`, `number`, `operator`; and `docstring`, a string that is a statement of its
  own (a module's, class's or function's docstring, or a bare string statement). Whitespace-only
  tokens are negatives of all of them. These concepts label code tokens only;
- `prose` labels every token: true in a pydoc topic (English reference prose), false in code.

Documents come from the end of the corpus's fixed reading order, the text a harvest of the
corpus's start (every default store) never reached; each gives one context: BOS + the tokens of a
prose document's start, or of a source file from the first line after its first third (a file's
start is mostly its licence and module docstring). A source file that `tokenize` rejects is skipped.
"""

from __future__ import annotations

import io
import keyword
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass

from saelab.errors import SaelabError
from saelab.harvest.corpus import default_entries, default_entry_text

CODE_CONCEPTS = ("keyword", "name", "string", "comment", "number", "operator", "docstring")
CONCEPTS = (*CODE_CONCEPTS, "prose")
_STATEMENT_START = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}
_SKIPPED = {tokenize.NL, tokenize.COMMENT}
DOCUMENT_CHARS = 4_000  # read this much of a document: more than a context's tokens need


@dataclass
class LabelledContext:
    """One context: `token_ids` (BOS first) and, per concept, a label per token (None: not labelled)."""

    source: str  # "file:json/decoder.py" or "topic:assert"
    token_ids: list[int]
    labels: dict[str, list[bool | None]]


def char_labels(source: str) -> dict[str, list[bool]]:
    """Per character of Python `source`, each code concept's label. A SyntaxError / TokenError if
    `tokenize` rejects it."""
    labels = {concept: [False] * len(source) for concept in CODE_CONCEPTS}
    line_starts = [0]
    for line in source.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type != tokenize.ENDMARKER]
    significant = [t for t in tokens if t.type not in _SKIPPED]
    docstrings = {
        (t.start, t.end)
        for i, t in enumerate(significant)
        if t.type == tokenize.STRING
        and (i == 0 or significant[i - 1].type in _STATEMENT_START)
        and (i + 1 == len(significant) or significant[i + 1].type == tokenize.NEWLINE)
    }
    for token in tokens:
        concept = _concept_of(token)
        if concept is None:
            continue
        start = line_starts[token.start[0] - 1] + token.start[1]
        end = line_starts[token.end[0] - 1] + token.end[1]
        for char in range(start, min(end, len(source))):
            labels[concept][char] = True
            if (token.start, token.end) in docstrings:
                labels["docstring"][char] = True
    return labels


def _concept_of(token: tokenize.TokenInfo) -> str | None:
    if token.type == tokenize.NAME:
        return "keyword" if keyword.iskeyword(token.string) else "name"
    return {
        tokenize.STRING: "string",
        tokenize.COMMENT: "comment",
        tokenize.NUMBER: "number",
        tokenize.OP: "operator",
    }.get(token.type)


def label_tokens(text: str, is_code: bool, tokenizer, n_tokens: int, bos_id: int) -> LabelledContext | None:  # noqa: ANN001
    """BOS + `n_tokens` tokens of `text` (code: from the first line after its first third), labelled;
    None when `text` is code that does not tokenize."""
    start = 0
    if is_code:
        try:
            chars = char_labels(text)
        except (SyntaxError, tokenize.TokenError):
            return None
        start = text.find("\n", len(text) // 3) + 1
    window = text[start : start + DOCUMENT_CHARS]
    encoded = tokenizer(window, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = encoded["input_ids"][:n_tokens], encoded["offset_mapping"][:n_tokens]
    labels: dict[str, list[bool | None]] = {concept: [None] for concept in CONCEPTS}  # the BOS: unlabelled
    for begin, end in spans:
        first = next((start + i for i in range(begin, end) if not window[i].isspace()), None)
        for concept in CODE_CONCEPTS:
            labels[concept].append(None if not is_code else first is not None and chars[concept][first])
        labels["prose"].append(not is_code)
    return LabelledContext("", [bos_id, *ids], labels)


def labelled_contexts(tokenizer, n_code: int, n_prose: int, n_tokens: int = 127) -> list[LabelledContext]:  # noqa: ANN001
    """`n_code` stdlib files and `n_prose` pydoc topics from the end of the default corpus's reading
    order, each BOS + its first `n_tokens` tokens, labelled (see the module docstring)."""
    if tokenizer.bos_token_id is None:
        raise SaelabError("sparse probing's contexts start with a BOS token, but the tokenizer has none")
    wanted = {"file": n_code, "topic": n_prose}
    found: list[LabelledContext] = []
    for kind, name, text in _documents_from_the_end():
        if wanted[kind] == 0:
            if not any(wanted.values()):
                break
            continue
        context = label_tokens(text, kind == "file", tokenizer, n_tokens, tokenizer.bos_token_id)
        if context is not None and len(context.token_ids) > 1:
            context.source = f"{kind}:{name}"
            found.append(context)
            wanted[kind] -= 1
    if any(wanted.values()):
        raise SaelabError(f"the default corpus has too few documents for {n_code} code and {n_prose} prose contexts")
    return found


def _documents_from_the_end() -> Iterator[tuple[str, str, str]]:
    for kind, name in reversed(default_entries()):
        text = default_entry_text(kind, name)
        if text.strip():
            yield kind, name, text
