"""A served teacher: an OpenAI-compatible completions server (llama.cpp's llama-server, vLLM, ...) answers the
prompt pool in place of an in-process model.

Why ``/v1/completions`` with token-id prompts: the prompts are token ids already (the data module applied the
chat template), and a text round trip could re-tokenize them differently from the student's view. The response's
token ids and, with ``top_logprobs`` > 0, each generated token's top-k log-probabilities come from the
``logprobs.content`` entries (llama.cpp returns each token's ``id``); an answer without them is malformed, named
with its request, and nothing of its shard is stored (:class:`~distill.stores.generations.GenerationStore`).

Transient answers (429, 5xx, timeouts, refused connections) are retried with exponential back-off up to
``max_retries``; then one error names the URL, the status and the start of the body. The API key is read from
the environment variable ``api_key_env`` at each request: it never sits in the config, the logs or an error.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from distill.serve.generation import SamplingSettings

TRANSIENT = {429, 500, 502, 503, 504}
Response = tuple[list[int], bool, list[list[int]], list[list[float]]]


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

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"teacher.max_concurrency={self.max_concurrency!r} must be >= 1")
        if self.max_retries < 0:
            raise ValueError(f"teacher.max_retries={self.max_retries!r} must be >= 0")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"teacher.top_logprobs={self.top_logprobs!r} must be in [0, 20] (OpenAI's bound)")


@dataclass
class Counters:
    """What the server cost, for metrics.json: requests (retries included), tokens, seconds waited."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **amounts: float) -> None:
        with self.lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def as_dict(self) -> dict[str, float]:
        names = ("requests", "retries", "prompt_tokens", "completion_tokens", "seconds")
        return {name: getattr(self, name) for name in names}


class EndpointClient:
    """Requests to one server, retried on transient failures, counted in :attr:`counters`."""

    def __init__(self, settings: EndpointSettings) -> None:
        self.settings = settings
        self.url = settings.base_url.rstrip("/")
        self.counters = Counters()
        self.http = httpx.Client(timeout=settings.timeout_s)

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
        if self.settings.top_logprobs:
            probe = SamplingSettings(max_new_tokens=1)
            self.complete([1], probe)  # raises, naming the request, when the answer lacks top-k log-probabilities

    def complete(self, prompt: Sequence[int], settings: SamplingSettings, seed: int = 0) -> Response:
        """One response to a token-id prompt: (token ids, finished, top-k ids, top-k log-probabilities)."""
        body = self.completion_body(prompt, settings, seed)
        answer = self.request("POST", "/v1/completions", body)
        try:
            response = parse_completion(answer, self.settings.top_logprobs)
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise EndpointError(
                f"POST {self.url}/v1/completions: malformed answer ({type(error).__name__}: {error}) to a request "
                f"of {len(prompt)} prompt tokens: {str(answer)[:200]!r}"
            ) from error
        self.counters.add(prompt_tokens=len(prompt), completion_tokens=len(response[0]))
        return response

    def completion_body(self, prompt: Sequence[int], settings: SamplingSettings, seed: int) -> dict[str, Any]:
        sampling = (
            {"temperature": settings.temperature, "top_p": settings.top_p, "seed": seed}
            if settings.do_sample
            else {"temperature": 0.0}
        )
        return {
            "model": self.settings.model,
            "prompt": [int(token) for token in prompt],
            "max_tokens": settings.max_new_tokens,
            # at least 1: the entries carry the generated token ids, which the text alone does not
            "logprobs": max(1, self.settings.top_logprobs),
            **sampling,
        }

    def close(self) -> None:
        self.http.close()


def parse_completion(answer: dict[str, Any], top_logprobs: int) -> Response:
    """Token ids, finished, and the top-k ids and log-probabilities of each generated token."""
    choice = answer["choices"][0]
    entries = choice["logprobs"]["content"]
    tokens = [int(entry["id"]) for entry in entries]
    top_ids, top_values = [], []
    for entry in entries[: len(entries) if top_logprobs else 0]:
        alternatives = entry["top_logprobs"]
        if len(alternatives) < top_logprobs:
            raise ValueError(f"{len(alternatives)} top_logprobs where {top_logprobs} were asked for")
        top_ids.append([int(item["id"]) for item in alternatives[:top_logprobs]])
        top_values.append([float(item["logprob"]) for item in alternatives[:top_logprobs]])
    return tokens, choice["finish_reason"] == "stop", top_ids, top_values


class EndpointGenerator:
    """The served teacher's responses to prompts, with :class:`~distill.serve.generation.Generator`'s call
    contract (``num_return_sequences`` per prompt, in prompt order), ``max_concurrency`` requests at a time."""

    def __init__(self, client: EndpointClient, settings: SamplingSettings) -> None:
        self.client, self.settings = client, settings

    def __call__(self, prompts: Sequence[Sequence[int]]) -> list[Response]:
        per_prompt = self.settings.num_return_sequences
        jobs = [(prompt, self.settings.seed * 1_000_003 + sample) for prompt in prompts for sample in range(per_prompt)]
        pool = ThreadPoolExecutor(self.client.settings.max_concurrency, thread_name_prefix="endpoint")
        try:
            futures = [pool.submit(self.client.complete, prompt, self.settings, seed) for prompt, seed in jobs]
            return [future.result() for future in futures]
        finally:  # a failed request ends the shard: the queued ones are not sent
            pool.shutdown(cancel_futures=True)

    def cost(self) -> dict[str, float]:
        """The client's counters so far, named for the generation statistics (``server_seconds`` sums the
        requests' own waits, so it exceeds the shard's wall time when requests overlap)."""
        return {f"server_{name}": value for name, value in self.client.counters.as_dict().items()}

    def store_key(self) -> dict[str, str]:
        """What decides a served teacher's responses in place of its weights: where it is served, the model it
        serves and how many top-k log-probabilities each token carries."""
        served = self.client.settings
        return {"teacher_url": self.client.url, "teacher_model": served.model, "top_logprobs": str(served.top_logprobs)}
