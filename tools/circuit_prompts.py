"""Make `benchmarks/circuit_prompts.jsonl`: the circuits benchmark's prompts, three task families drawn from the
offline corpus (the default corpus's documents in its fixed order), each kept only where SmolLM2 does the task.

    bracket    Python code cut just before the bracket that closes one opened earlier on the line
               (`foo(a, b` → `)`); contrast `,` (another argument). Kept where the model's top token is it.
    repeat     Python code cut just before a name that was defined earlier in the prompt (`def name(`,
               `name =`) is used again; contrast: another name defined earlier. Kept where the model's
               top token is the name's first token.
    agreement  reference prose (pydoc topics) cut before " is" / " are" after a noun; contrast: the other
               verb form. Kept where the model puts the text's verb above the other and in its top 3.

Prompts are 16–64 tokens with the BOS, starting at a line (code) or sentence (prose) about 40 tokens before
the cut, distinct, one per document, and must tokenise back to the same tokens. Each line of the file:
family, prompt, target, contrast, source.

    python tools/circuit_prompts.py [--per-family 16] [--out benchmarks/circuit_prompts.jsonl]
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from saelab.atomic import atomic_write_text
from saelab.harvest.corpus import default_entries, default_entry_text
from saelab.harvest.packing import text_token_ids
from saelab.models import SMOLLM2_SPEC, load_model

MIN_TOKENS, MAX_TOKENS = 16, 64
CLOSING = {"(": ")", "[": "]", "{": "}"}
DEFINED = re.compile(r"^\s*(?:def|class)\s+([A-Za-z_]\w{2,})|^\s*([A-Za-z_]\w{2,})\s*=[^=]")
AGREEMENT = re.compile(r"(?<=[a-z]{3}) (is|are) ")
NOT_NOUNS = {"this", "that", "there", "what", "which", "who", "it", "its", "also", "not", "then", "thus", "here"}


def bracket_cuts(text: str) -> Iterator[tuple[int, str]]:
    """(character offset, ",") just before each line-final closing bracket whose opener is on its line."""
    offset = 0
    for line in text.splitlines(keepends=True):
        body = line.rstrip()
        if len(body) > 8 and body[-1] in CLOSING.values():
            opener = {v: k for k, v in CLOSING.items()}[body[-1]]
            inside = body[body.rfind(opener) + 1 : -1] if opener in body[:-1] else ""
            if len(inside.strip()) >= 3 and not body.lstrip().startswith("#"):
                yield offset + len(body) - 1, ","
        offset += len(line)


def repeat_cuts(text: str) -> Iterator[tuple[int, str]]:
    """(offset of a reused name, another defined name) for names defined earlier in the text."""
    defined: list[str] = []
    offset = 0
    for line in text.splitlines(keepends=True):
        for name in defined:
            found = re.search(rf"(?<![\w.]){re.escape(name)}\b", line)
            if found and not DEFINED.match(line[: found.end() + 2]):
                others = [n for n in defined if n != name]
                if others:
                    yield offset + found.start(), others[-1]
        match = DEFINED.match(line)
        if match:
            name = match.group(1) or match.group(2)
            defined = [n for n in defined if n != name][-5:] + [name]
        offset += len(line)


def agreement_cuts(text: str) -> Iterator[tuple[int, str]]:
    """(offset of " is" / " are", the other form) after a lower-case word that is not a pronoun."""
    for found in AGREEMENT.finditer(text):
        before = text[: found.start()].split()[-1:]
        if before and before[0].isalpha() and before[0].lower() not in NOT_NOUNS:
            yield found.start(), " are" if found.group(1) == "is" else " is"


def candidates(tokenizer, family: str, kind: str, name: str) -> Iterator[dict]:
    """Prompts of `family` from one corpus document: tokens up to the cut, the token at it the target."""
    text = default_entry_text(kind, name)
    cuts = {"bracket": bracket_cuts, "repeat": repeat_cuts, "agreement": agreement_cuts}[family](text)
    for cut, contrast in cuts:
        start = _context_start(text, cut, family)
        ids = text_token_ids(text[start:], tokenizer)[:MAX_TOKENS]
        spans = tokenizer(text[start:], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        at = next((i for i, (a, b) in enumerate(spans) if a <= cut - start < b), None)
        if at is None or not MIN_TOKENS - 1 <= at <= MAX_TOKENS - 1:
            continue
        prompt = tokenizer.decode(ids[:at])
        target = tokenizer.decode([ids[at]])
        if text_token_ids(prompt, tokenizer) != ids[:at] or len(text_token_ids(contrast, tokenizer)) != 1:
            continue
        if family == "repeat":
            contrast = _first_token(tokenizer, target, contrast)
        if contrast == target or not target.strip():
            continue
        yield {"family": family, "prompt": prompt, "target": target, "contrast": contrast, "source": f"{kind}:{name}"}


def _context_start(text: str, cut: int, family: str) -> int:
    """Where the prompt starts: the first line start (code) or sentence start (prose) in the ~160 characters
    (~40 tokens) before the cut, else 160 characters back."""
    earliest = max(0, cut - 160)
    if earliest == 0:
        return 0
    marks = (
        [text.find(". ", earliest, cut), text.find("\n", earliest, cut)]
        if family == "agreement"
        else [text.find("\n", earliest, cut)]
    )
    found = [m for m in marks if m >= 0]
    return min(found) + 1 if found else earliest


def _first_token(tokenizer, target: str, other: str) -> str:
    """The contrast name as the token it starts with, spaced like the target."""
    spaced = (" " if target.startswith(" ") else "") + other
    return tokenizer.decode(text_token_ids(spaced, tokenizer)[:1])


@torch.no_grad()
def model_does_it(model, item: dict) -> bool:
    """Whether SmolLM2 predicts the target (agreement: above the contrast and in its top 3)."""
    tokenizer = model.tokenizer
    ids = [tokenizer.bos_token_id, *text_token_ids(item["prompt"], tokenizer)]
    logits = model(torch.tensor([ids]))[0, -1]
    target, contrast = (text_token_ids(item[key], tokenizer)[0] for key in ("target", "contrast"))
    top = logits.topk(3).indices.tolist()
    if item["family"] == "agreement":
        return logits[target] > logits[contrast] and target in top
    return top[0] == target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-family", type=int, default=16)
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "benchmarks" / "circuit_prompts.jsonl")
    )
    args = parser.parse_args()
    model = load_model(SMOLLM2_SPEC, "cpu")
    chosen: list[dict] = []
    for family, kind in (("bracket", "file"), ("repeat", "file"), ("agreement", "topic")):
        kept, seen = [], set()
        for entry_kind, name in default_entries(0):
            if entry_kind != kind or len(kept) == args.per_family:
                continue
            for item in candidates(model.tokenizer, family, entry_kind, name):
                if item["prompt"] not in seen and model_does_it(model, item):
                    kept.append(item)
                    seen.add(item["prompt"])
                    break  # one prompt per document: the families stay varied
        print(f"{family}: {len(kept)} prompts")
        chosen += kept
    atomic_write_text(args.out, "".join(json.dumps(item) + "\n" for item in chosen))
    print(f"{len(chosen)} prompts: {args.out}")


if __name__ == "__main__":
    main()
