"""``teacher=endpoint``: the teacher of a run as a client of an OpenAI-compatible server
(:mod:`distill.serve.endpoint`), with no weights in this process."""

from __future__ import annotations

from typing import Any

from distill.models.teacher import Teacher
from distill.serve.endpoint import EndpointClient, EndpointSettings


def served_teacher(
    base_url: str,
    model: str,
    name_or_path: str,
    datamodule: object = None,
    task: Any = None,
    api_key_env: str | None = None,
    max_concurrency: int = 4,
    timeout_s: float = 120.0,
    max_retries: int = 5,
    backoff_s: float = 0.5,
    top_logprobs: int = 0,
    api: str = "completions",
    prompt_price_per_million: float = 0.0,
    completion_price_per_million: float = 0.0,
) -> Teacher:
    """``teacher=endpoint``: a teacher without weights in this process, whose client is checked by one request
    before any long stage runs. ``name_or_path`` is the served model's tokenizer (the prompts are its token ids)
    and, where a student is cut from the teacher, its weights, loaded only for the cut. ``api`` is ``completions``
    (token-id prompts) or ``chat`` (each prompt's messages, for servers that only chat). The prices (per million
    tokens) make ``generation/server_cost`` the provider's bill."""
    settings = EndpointSettings(
        base_url,
        model,
        api_key_env,
        max_concurrency,
        timeout_s,
        max_retries,
        backoff_s,
        top_logprobs,
        api,
        prompt_price_per_million,
        completion_price_per_million,
    )
    client = EndpointClient(settings, tokenizer=name_or_path)
    client.preflight()
    return Teacher(model=None, path=name_or_path, task=task, client=client)
