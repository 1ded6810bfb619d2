"""Teacher backends: who writes the synthetic answers.

- `LocalTeacher`: a causal LM loaded by the runtime; a call runs every ask through the runtime's continuous
  batcher, so an ask that is done (its `done` test holds) frees its slot for the next one at once.
- `OpenAITeacher`: any OpenAI-compatible endpoint (vLLM, llama.cpp server, Ollama, a hosted API), through the
  `openai` client (its timeouts, and its retries with exponential backoff on connection errors, 408, 409, 429
  and 5xx, honouring Retry-After); requests go out concurrently with bounded parallelism.

Both take the same `Ask` list and return one string per ask (`None` when an ask failed for good, so
the caller counts and drops it instead of crashing).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from selfalign.config import SelfAlignConfig, TeacherKind
from selfalign.errors import SelfAlignError


@dataclass(frozen=True)
class Ask:
    messages: list[dict]
    max_new_tokens: int
    # the caller's "nothing more is needed" test on the text so far; a local teacher stops the ask there (an
    # endpoint cannot, and the caller's clean-up cuts the longer text to the same place)
    done: Callable[[str], bool] | None = None


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    seed: int


class TeacherUnavailable(SelfAlignError):
    """The teacher could not be reached after every retry."""


class LocalTeacher:
    def __init__(self, handle, batch_size: int):
        self.handle = handle
        self.batch_size = batch_size
        self.name = f"local:{handle.name}"

    def complete(self, asks: list[Ask], sampling: Sampling) -> list[str | None]:
        """Up to `batch_size` asks decode together; ask i samples from its own generator, seeded from
        (`sampling.seed`, i), so its text depends on the seed and the asks alone."""
        from selfalign.runtime.generate import complete_all

        done = complete_all(
            self.handle,
            [ask.messages for ask in asks],
            max_new_tokens=[ask.max_new_tokens for ask in asks],
            max_batch=self.batch_size,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seeds=[sampling.seed * 1000 + i for i in range(len(asks))],
            until=[ask.done for ask in asks],
        )
        return [c.text for c in done]


class OpenAITeacher:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None,
        max_concurrency: int,
        timeout_s: float,
        max_retries: int,
    ):
        import openai

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.name = f"openai:{model}@{base_url}"
        self.failures = 0  # asks answered with a refusal status or a malformed reply
        self._count_lock = threading.Lock()
        # an endpoint without a key (a local vLLM or `stage=serve`) ignores the placeholder
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "none", timeout=timeout_s, max_retries=max_retries
        )

    def _failed(self) -> None:
        with self._count_lock:
            self.failures += 1

    def _one(self, ask: Ask, sampling: Sampling, index: int) -> str | None:
        import openai

        try:
            reply = self.client.chat.completions.create(
                model=self.model,
                messages=ask.messages,
                max_tokens=ask.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=sampling.seed * 1000 + index,
            )
            content = reply.choices[0].message.content
            return content if isinstance(content, str) else None
        except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as exc:
            # refused, reset, timed out, or still overloaded after the client's retries
            raise TeacherUnavailable(
                f"teacher {self.url} unreachable after {self.max_retries + 1} tries: {exc}"
            ) from None
        except openai.APIStatusError:  # a request the server will never accept (unknown model, bad request)
            self._failed()
            return None
        except (openai.APIResponseValidationError, AttributeError, IndexError, TypeError, ValueError):
            self._failed()  # a reply that is not a chat completion
            return None

    def complete(self, asks: list[Ask], sampling: Sampling) -> list[str | None]:
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(lambda ia: self._one(ia[1], sampling, ia[0]), enumerate(asks)))


def build_teacher(cfg: SelfAlignConfig):
    """The teacher the config names; a local one loads its base model here."""
    t = cfg.teacher
    if t.kind is TeacherKind.openai:
        key = os.environ.get(t.api_key_env) if t.api_key_env else None
        return OpenAITeacher(t.base_url, t.model, key, t.max_concurrency, t.timeout_s, t.max_retries)
    from selfalign.runtime.loader import load_base

    model = t.model or cfg.base_model
    return LocalTeacher(load_base(model, cache_dir=cfg.paths.cache_dir), t.batch_size)
