"""Tokenise documents and pack them into fixed-length contexts.

Rules:
- Each document is tokenised without special tokens and with `split_special_tokens=True`,
  so text such as `<|endoftext|>` inside a document stays ordinary text.
- Documents are joined into one token stream with the tokenizer's EOS id between
  consecutive documents (BOS when there is no EOS). A document that gives no tokens
  (the empty string) is skipped and adds no separator.
- The stream is cut into contexts of exactly `context_size` ids: with `prepend_bos`,
  `[bos]` plus the next `context_size - 1` stream tokens; without, `context_size` stream
  tokens. Contexts cross document boundaries; the final partial context is dropped, so a
  corpus smaller than one context yields nothing (the caller reports that).
- Long documents are tokenised in chunks of at most `CHUNK_CHARS` characters, cut just
  before a space that follows a non-space character (else hard at the limit), so memory
  stays bounded. That cut is a pre-tokeniser boundary of byte-level BPE tokenizers such
  as SmolLM2's, so there the ids equal those of the whole document tokenised at once.
  The tokenizer's "longer than model_max_length" warning is silenced: contexts are cut
  afterwards, so it does not apply.
- Lone surrogates, which cannot be encoded as UTF-8, become U+FFFD before tokenising;
  everything else (null bytes, emoji, any script) goes to the tokenizer as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from saelab.errors import SaelabError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHUNK_CHARS = 100_000
_SURROGATE = re.compile("[\ud800-\udfff]")


def iter_contexts(
    documents: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    context_size: int,
    prepend_bos: bool,
) -> Iterator[list[int]]:
    """Token-id lists of length `context_size` packed from `documents` (rules above).

    Bad arguments raise `SaelabError` here, at the call, not at the first `next`.
    """
    _check_context_size(context_size, prepend_bos)
    prefix = [_bos_id(tokenizer)] if prepend_bos else []
    separator = _separator_id(tokenizer)
    return _pack(documents, tokenizer, separator, prefix, context_size - len(prefix))


def _pack(
    documents: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    separator: int,
    prefix: list[int],
    n_stream: int,
) -> Iterator[list[int]]:
    """Yield `prefix` + the next `n_stream` ids of the stream, while there are that many."""
    buffer: list[int] = []
    started = False
    for document in documents:
        for i, ids in enumerate(_tokenise(document, tokenizer)):
            if i == 0 and started:
                buffer.append(separator)
            started = True
            buffer += ids
            n_full = len(buffer) // n_stream
            for k in range(n_full):
                yield prefix + buffer[k * n_stream : (k + 1) * n_stream]
            del buffer[: n_full * n_stream]


def text_token_ids(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """`text`'s token ids as a document's are here: no special tokens added, special-token text split
    into ordinary tokens, lone surrogates replaced by U+FFFD. (Live text in the dashboard uses this too.)"""
    # verbose=False: a chunk may exceed model_max_length; packing makes that harmless.
    text = _SURROGATE.sub("\ufffd", text)
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def _tokenise(document: str, tokenizer: PreTrainedTokenizerBase) -> Iterator[list[int]]:
    """Yield the ids of `document`'s chunks, skipping chunks that give no ids."""
    for chunk in _chunks(document, CHUNK_CHARS):  # text_token_ids replaces surrogates, one character each
        ids = text_token_ids(chunk, tokenizer)
        if ids:
            yield ids


def _chunks(text: str, size: int) -> Iterator[str]:
    """Cut `text` into pieces of at most `size` characters, at a word boundary if there is one."""
    start = 0
    while len(text) - start > size:
        end = _cut(text, start, start + size)
        yield text[start:end]
        start = end
    if start < len(text):
        yield text[start:]


def _cut(text: str, start: int, stop: int) -> int:
    """The last index in (start, stop] holding a space that follows a non-space, else stop."""
    i = text.rfind(" ", start + 1, stop + 1)
    while i > start and text[i - 1].isspace():
        i = text.rfind(" ", start + 1, i)
    return i if i > start else stop


def _bos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.bos_token_id is None:
        raise SaelabError("prepend_bos is set but the tokenizer has no BOS token; set prepend_bos: false")
    return tokenizer.bos_token_id


def _separator_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id put between documents: EOS, else BOS."""
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return token_id
    raise SaelabError("the tokenizer has neither an EOS nor a BOS token to separate documents")


def _check_context_size(context_size: int, prepend_bos: bool) -> None:
    smallest = 2 if prepend_bos else 1
    if context_size < smallest:
        raise SaelabError(
            f"context_size must be at least {smallest} with prepend_bos={prepend_bos}, not {context_size}"
        )
