"""A served teacher: an OpenAI-compatible server (llama.cpp's llama-server, vLLM, a frontier model's API)
answers the prompt pool in place of an in-process model.

``api=completions`` (the default) posts token-id prompts to ``/v1/completions``: the prompts are token ids
already (the data module applied the chat template), and a text round trip could re-tokenize them differently
from the student's view. ``api=chat`` posts each prompt's messages to ``/v1/chat/completions``, for servers that
only chat (OpenAI's newer models); the server applies its own template. Either way the answer is read as the
teacher's token ids by :func:`distill.serve.answers.parse_answer` (ids where the server gives them, else its
tokens' text looked up in the teacher's vocabulary), with, for ``top_logprobs`` > 0, each generated token's
top-k log-probabilities. An answer out of contract is malformed, named with its request, and nothing of its
shard is stored (:class:`~distill.stores.generations.GenerationStore`).

Transient answers (429, 5xx, timeouts, refused connections) are retried with exponential back-off up to
``max_retries``; then one error names the URL, the status and the start of the body. The API key is read from
the environment variable ``api_key_env`` at each request: it never sits in the config, the logs or an error.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from distill.serve.answers import Response, TokenTable, parse_answer
from distill.serve.generation import SamplingSettings

TRANSIENT = {429, 500, 502, 503, 504}
APIS = ("completions", "chat")
Messages = list[dict[str, str]]


class EndpointError(RuntimeError):
    """A served teacher that cannot answer: unreachable, refusing, or answering out of contract."""


@dataclass(frozen=True)
class EndpointSettings:
    """Where the served teacher is and how hard to press it (``conf/teacher/endpoint.yaml``)."""

    base_url: str
    model: str
    api_key_env: str | None = None
    max_concurrency: int = 4
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_s: float = 0.5
    top_logprobs: int = 0
    api: str = "completions"
    # What the provider bills per million tokens (0: a local server): the run's cost, counted as it generates.
    prompt_price_per_million: float = 0.0
    completion_price_per_million: float = 0.0

    def __post_init__(self) -> None:
        for name in ("prompt_price_per_million", "completion_price_per_million"):
            if getattr(self, name) < 0:
                raise ValueError(f"teacher.{name}={getattr(self, name)!r} must be >= 0")
        if self.api not in APIS:
            raise ValueError(f"teacher.api={self.api!r} must be one of {APIS}")
        if self.max_concurrency < 1:
            raise ValueError(f"teacher.max_concurrency={self.max_concurrency!r} must be >= 1")
        if self.max_retries < 0:
            raise ValueError(f"teacher.max_retries={self.max_retries!r} must be >= 0")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"teacher.top_logprobs={self.top_logprobs!r} must be in [0, 20] (OpenAI's bound)")


@dataclass
class Counters:
    """What the server cost, for metrics.json: requests (retries included), tokens (as the server bills them,
    ``usage``, where it reports it), seconds waited, and the bill at the configured prices."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cost: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **amounts: float) -> None:
        with self.lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def as_dict(self) -> dict[str, float]:
        names = ("requests", "retries", "prompt_tokens", "completion_tokens", "seconds", "cost")
        return {name: getattr(self, name) for name in names}


class EndpointClient:
    """Requests to one server, retried on transient failures, counted in :attr:`counters`."""

    def __init__(self, settings: EndpointSettings, tokenizer: str | None = None) -> None:
        self.settings, self.tokenizer = settings, tokenizer
        self._tokens: TokenTable | None = None
        self._tokens_lock = threading.Lock()
        self.url = settings.base_url.rstrip("/")
        self.counters = Counters()
        self.http = httpx.Client(timeout=settings.timeout_s)
        # httpx logs every request at INFO: thousands of lines per generation stage, which metrics.json counts.
        logging.getLogger("httpx").setLevel(logging.WARNING)

    def tokens(self) -> TokenTable | None:
        """The teacher's vocabulary by token text, read on first need: only answers that name their tokens by
        text (chat APIs, OpenAI's completions) need it."""
        with self._tokens_lock:
            if self._tokens is None and self.tokenizer is not None:
                from distill.utils.references import load_tokenizer

                self._tokens = TokenTable(load_tokenizer(self.tokenizer))
            return self._tokens

    def headers(self) -> dict[str, str]:
        name = self.settings.api_key_env
        if name is None:
            return {}
        key = os.environ.get(name)
        if not key:
            raise EndpointError(f"teacher.api_key_env={name!r}: the environment variable is unset or empty")
        return {"Authorization": f"Bearer {key}"}

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON answer to one request, after up to ``max_retries`` retries of transient failures."""
        url = f"{self.url}{path}"
        for attempt in range(self.settings.max_retries + 1):
            problem = self._attempt(method, url, body)
            if isinstance(problem, dict):
                return problem
            if attempt < self.settings.max_retries:
                self.counters.add(retries=1)
                time.sleep(self.settings.backoff_s * 2**attempt)
        raise EndpointError(f"{method} {url} failed {self.settings.max_retries + 1} times, last: {problem}")

    def _attempt(self, method: str, url: str, body: dict[str, Any] | None) -> dict[str, Any] | str:
        """The JSON answer, or what went wrong transiently; a permanent failure raises at once."""
        self.counters.add(requests=1)
        started = time.perf_counter()
        try:
            answer = self.http.request(method, url, json=body, headers=self.headers())
        except (httpx.TimeoutException, httpx.TransportError) as error:
            return f"{type(error).__name__}: {error}"
        finally:
            self.counters.add(seconds=time.perf_counter() - started)
        if answer.status_code in TRANSIENT:
            return f"status {answer.status_code}: {answer.text[:200]!r}"
        if answer.status_code != 200:
            raise EndpointError(f"{method} {url}: status {answer.status_code}: {answer.text[:200]!r}")
        try:
            return answer.json()
        except ValueError as error:
            raise EndpointError(f"{method} {url}: malformed answer, not JSON ({answer.text[:200]!r})") from error

    def preflight(self) -> None:
        """One cheap request before any long stage: the server answers, serves ``model`` and, when top-k
        log-probabilities are wanted, returns them."""
        models = self.request("GET", "/v1/models")
        served = {entry.get("id") for entry in models.get("data", [])} | {
            entry.get("model") for entry in models.get("models", [])
        }
        if self.settings.model not in served:
            names = sorted(map(str, served))
            raise EndpointError(f"teacher.model={self.settings.model!r} is not served by {self.url}: it serves {names}")
        if self.settings.top_logprobs or self.settings.api == "chat":
            probe = SamplingSettings(max_new_tokens=1)
            # raises, naming the request, when the answer lacks top-k log-probabilities or cannot be read
            self.complete([1], probe, messages=[{"role": "user", "content": "Hello"}])

    def complete(
        self, prompt: Sequence[int], settings: SamplingSettings, seed: int = 0, messages: Messages | None = None
    ) -> Response:
        """One response to a prompt (its token ids; with ``api=chat``, its ``messages``): (token ids, finished,
        top-k ids, top-k log-probabilities)."""
        chat = self.settings.api == "chat"
        if chat and messages is None:
            raise EndpointError("teacher.api=chat sends each prompt's messages, and this prompt pool gave none")
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = self.request_body(prompt, settings, seed, messages)
        answer = self.request("POST", path, body)
        try:
            response = parse_answer(answer, self.settings.top_logprobs, self.tokens)
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise EndpointError(
                f"POST {self.url}{path}: malformed answer ({type(error).__name__}: {error}) to a request "
                f"of {len(prompt)} prompt tokens: {str(answer)[:200]!r}"
            ) from error
        usage = answer.get("usage") or {}
        prompt_tokens = usage.get("prompt_tokens", len(prompt))
        completion_tokens = usage.get("completion_tokens", len(response[0]))
        price = self.settings.prompt_price_per_million, self.settings.completion_price_per_million
        cost = (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6
        self.counters.add(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost=cost)
        return response

    def request_body(
        self, prompt: Sequence[int], settings: SamplingSettings, seed: int, messages: Messages | None
    ) -> dict[str, Any]:
        sampling = (
            {"temperature": settings.temperature, "top_p": settings.top_p, "seed": seed}
            if settings.do_sample
            else {"temperature": 0.0}
        )
        top_k = self.settings.top_logprobs
        if self.settings.api == "chat":
            # No log-probabilities unless a top-k is stored: some chat models refuse them; the text suffices.
            scores = {"logprobs": True, "top_logprobs": top_k} if top_k else {}
            return {
                "model": self.settings.model,
                "messages": messages,
                "max_tokens": settings.max_new_tokens,
                **scores,
                **sampling,
            }
        return {
            "model": self.settings.model,
            "prompt": [int(token) for token in prompt],
            "max_tokens": settings.max_new_tokens,
            # at least 1: the entries carry the generated token ids, which the text alone does not
            "logprobs": max(1, top_k),
            **sampling,
        }

    def close(self) -> None:
        self.http.close()


class EndpointGenerator:
    """The served teacher's responses to prompts, with :class:`~distill.serve.generation.Generator`'s call
    contract (``num_return_sequences`` per prompt, in prompt order), ``max_concurrency`` requests at a time.
    ``messages`` holds each prompt's conversation by its token ids, for ``api=chat``."""

    def __init__(
        self,
        client: EndpointClient,
        settings: SamplingSettings,
        messages: dict[tuple[int, ...], Messages] | None = None,
    ) -> None:
        self.client, self.settings, self.messages = client, settings, messages or {}

    def __call__(self, prompts: Sequence[Sequence[int]]) -> list[Response]:
        per_prompt = self.settings.num_return_sequences
        jobs = [(prompt, self.settings.seed * 1_000_003 + sample) for prompt in prompts for sample in range(per_prompt)]
        pool = ThreadPoolExecutor(self.client.settings.max_concurrency, thread_name_prefix="endpoint")
        try:
            futures = [
                pool.submit(self.client.complete, prompt, self.settings, seed, self.messages.get(tuple(prompt)))
                for prompt, seed in jobs
            ]
            return [future.result() for future in futures]
        finally:  # a failed request ends the shard: the queued ones are not sent
            pool.shutdown(cancel_futures=True)

    def cost(self) -> dict[str, float]:
        """The client's counters so far, named for the generation statistics (``server_seconds`` sums the
        requests' own waits, so it exceeds the shard's wall time when requests overlap)."""
        return {f"server_{name}": value for name, value in self.client.counters.as_dict().items()}

    def store_key(self) -> dict[str, str]:
        """What decides a served teacher's responses in place of its weights: where it is served, the model it
        serves, how many top-k log-probabilities each token carries and, for chat, the API (the server's template)."""
        served = self.client.settings
        key = {"teacher_url": self.client.url, "teacher_model": served.model, "top_logprobs": str(served.top_logprobs)}
        return key | ({"api": served.api} if served.api != "completions" else {})
