"""Teacher generations over a prompt pool, stored in shards: the data of sequence-level KD.

Contract:

* Prompts are token-id lists (chat template applied by the data module). They are generated in
  left-padded batches with the model's KV-cached ``generate``, greedy or sampled
  (:class:`SamplingSettings`); each shard of ``shard_size`` prompts is seeded from the settings' seed
  and its own number, so a resumed store holds the same responses as one that never stopped.
* A response is cut after its first end token (kept: training on it teaches the student to stop)
  or at ``max_new_tokens``; ``finished`` says which.
* The store is a folder keyed by the model's weights, the tokenizer, the prompts, the settings and
  the shard size. A shard is a parquet file, written under a temporary name and renamed when
  complete, so a killed process leaves only whole shards: the next one skips them. The folder is a
  ``datasets`` dataset: ``load_dataset("parquet", data_files=f"{folder}/shard-*.parquet")``.
* Each shard's generated tokens and seconds sit beside it (``shard-*.json``); :func:`tokens_per_second`
  sums them, so resumed stores report their whole generation cost.
* A served teacher's store (:class:`~distill.serve.endpoint.EndpointGenerator`) adds ``top_ids`` and
  ``top_logprobs`` per response token, ``(len(response), k)``: the top-K contract of
  :func:`served_topk_targets`, the rest bucket holding the mass outside the k.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from filelock import FileLock

from distill.losses.topk import TopKTargets, log1mexp
from distill.serve.endpoint import EndpointClient, EndpointGenerator
from distill.serve.generation import Generator, SamplingSettings
from distill.stores.teacher_logits import TeacherLogitStore
from distill.utils.keys import digest
from distill.utils.scratch import written_whole

log = logging.getLogger(__name__)
ROW_SCHEMA = pa.schema(
    [
        ("prompt_index", pa.int64()),
        ("sample", pa.int64()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("finished", pa.bool_()),
    ]
)
# A served teacher's shards (distill.serve.endpoint) add each response token's top-k ids and log-probabilities.
TOPK_SCHEMA = ROW_SCHEMA.append(pa.field("top_ids", pa.list_(pa.list_(pa.int32())))).append(
    pa.field("top_logprobs", pa.list_(pa.list_(pa.float32())))
)
SERVED = ("prompt_ids", "top_ids", "top_logprobs")


class GenerationStore:
    """The shards of one model's responses to one prompt pool under one set of settings.

    Args:
        cache_dir: where stores live (``<cache_dir>/generations/<name>-<key>``).
        name: a readable prefix of the folder name.
        key: what decides the responses (weights, tokenizer, prompts, settings); repeated in ``key.json``.
        shard_size: prompts per shard, the unit a restart skips.
    """

    def __init__(self, cache_dir: str | Path, name: str, key: dict[str, str], shard_size: int = 256) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size={shard_size!r} must be >= 1")
        self.key = {**key, "shard_size": str(shard_size)}
        self.shard_size = shard_size
        self.folder = Path(cache_dir).expanduser() / "generations" / f"{name}-{digest(self.key)}"

    def shard_path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.parquet"

    def build(self, generator: Generator | EndpointGenerator, prompts: Sequence[Sequence[int]]) -> datasets.Dataset:
        """Generate the shards this folder lacks (one process at a time) and return every row."""
        if not prompts:
            raise ValueError("the prompt pool is empty: no prompts to generate responses for")
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.folder) + ".lock"):
            (self.folder / "key.json").write_text(json.dumps(self.key, indent=1, sort_keys=True))
            shards = range(-(-len(prompts) // self.shard_size))
            for shard in shards:
                if self.shard_path(shard).is_file():
                    continue
                start = shard * self.shard_size
                chunk = prompts[start : start + self.shard_size]
                self._generate_shard(generator, shard, len(shards), start, chunk)
        return self.load(len(shards))

    def _generate_shard(
        self,
        generator: Generator | EndpointGenerator,
        shard: int,
        total: int,
        start: int,
        prompts: Sequence[Sequence[int]],
    ) -> None:
        torch.manual_seed(generator.settings.seed * 1_000_003 + shard)  # the same responses, resumed or not
        started, spent = time.perf_counter(), server_cost(generator)
        per_prompt = generator.settings.num_return_sequences
        rows = [
            (start + number // per_prompt, number % per_prompt, list(prompts[number // per_prompt]), *response)
            for number, response in enumerate(generator(prompts))
        ]
        seconds = time.perf_counter() - started
        tokens = sum(len(row[3]) for row in rows)
        cost = {name: value - spent[name] for name, value in server_cost(generator).items()}
        self._write_shard(shard, rows, {"tokens": tokens, "seconds": seconds, "responses": len(rows), **cost})
        log.info(
            "Generation shard %d/%d: %d responses, %d tokens, %.1f tokens/s",
            shard + 1,
            total,
            len(rows),
            tokens,
            tokens / max(seconds, 1e-9),
        )

    def _write_shard(self, shard: int, rows: list[tuple], stats: dict[str, float]) -> None:
        columns = list(zip(*rows, strict=True))
        schema = TOPK_SCHEMA if len(columns) == len(TOPK_SCHEMA) else ROW_SCHEMA
        table = pa.Table.from_arrays(
            [pa.array(column, type=f.type) for column, f in zip(columns, schema, strict=True)], schema=schema
        )
        path = self.shard_path(shard)
        path.with_suffix(".json").write_text(json.dumps(stats))
        with written_whole(path) as unfinished:  # the shard exists whole or not at all
            pq.write_table(table, unfinished)

    def load(self, shards: int) -> datasets.Dataset:
        """Every row of the first ``shards`` shards, in prompt order."""
        tables = [pq.read_table(self.shard_path(shard)) for shard in range(shards)]
        return datasets.Dataset(pa.concat_tables(tables))

    def statistics(self) -> dict[str, float]:
        """Generated tokens, seconds and tokens/s summed over the shards (resumed runs included), and a served
        teacher's requests, retries, tokens and request seconds (``server_*``)."""
        stats = [json.loads(path.read_text()) for path in sorted(self.folder.glob("shard-*.json"))]
        names = dict.fromkeys(name for entry in stats for name in entry)  # in order: the served counters last
        totals = {name: sum(entry.get(name, 0) for entry in stats) for name in names}
        return totals | {"tokens_per_s": totals["tokens"] / max(totals["seconds"], 1e-9)}


def server_cost(generator: Generator | EndpointGenerator) -> dict[str, float]:
    """A served teacher's counters so far (the shard stores their growth); an in-process one costs no requests."""
    return generator.cost() if isinstance(generator, EndpointGenerator) else {}


def settings_key(settings: SamplingSettings) -> str:
    """What decides the responses: greedy ones depend on neither the seed nor the sampling knobs, so runs
    of every seed share one greedy store."""
    decisive = dataclasses.asdict(settings)
    if not settings.do_sample:
        decisive = {"max_new_tokens": settings.max_new_tokens, "do_sample": False}
    return json.dumps(decisive, sort_keys=True)


def served_generator(
    teacher: object, settings: SamplingSettings, messages: dict[tuple[int, ...], list[dict[str, str]]] | None = None
) -> tuple[dict[str, str], EndpointGenerator] | tuple[dict[str, str], None]:
    """A served teacher's generator and what keys its store (URL, model, top_logprobs), where weights key an
    in-process teacher's; ``({}, None)`` for an in-process one, which the data module builds its own generator for.
    ``messages`` are the prompts' conversations by token ids, which a chat API is sent instead."""
    if not isinstance(teacher, EndpointClient):
        return {}, None
    generator = EndpointGenerator(teacher, settings, messages)
    return generator.store_key(), generator


def served_topk_targets(top_ids: Sequence[Sequence[int]], top_logprobs: Sequence[Sequence[float]]) -> TopKTargets:
    """One response's served top-k as :class:`~distill.losses.topk.TopKTargets` at temperature 1: the
    log-probabilities stand for the logits (softmax is blind to the offset) and the rest bucket holds what they
    leave out, ``log(1 - sum_k p_k)``."""
    values = torch.tensor(top_logprobs, dtype=torch.float32)
    rest = log1mexp(values.logsumexp(-1).clamp(max=0.0))  # rounding may put the sum a hair above 1
    return TopKTargets(values, torch.tensor(top_ids, dtype=torch.long), rest, 1.0)


def served_row_targets(rows: datasets.Dataset, width: int) -> TopKTargets:
    """The served top-k of every response in ``rows`` laid out as the packed ``prompt + response`` rows of
    ``width`` tokens (:func:`distill.data.rows.pack_responses`) are: ``(N, width, k)``, the targets of the
    position that predicts each response token (one before it). Prompt and padding positions carry no labels,
    so the loss never reads them; they hold a uniform k-way distribution, finite for the masked sum."""
    k = len(rows[0]["top_ids"][0])
    values = torch.zeros(len(rows), width, k)
    indices = torch.arange(k).repeat(len(rows), width, 1)
    rest = torch.full((len(rows), width), float("-inf"))
    for row, (prompt, top_ids, top_logprobs) in enumerate(zip(*(rows[name] for name in SERVED), strict=True)):
        targets = served_topk_targets(top_ids, top_logprobs)
        at = slice(len(prompt) - 1, min(len(prompt) - 1 + len(top_ids), width))
        count = at.stop - at.start
        values[row, at], indices[row, at], rest[row, at] = (
            targets.values[:count],
            targets.indices[:count],
            targets.rest_log_mass[:count],
        )
    return TopKTargets(values, indices, rest, 1.0)


def served_logit_store(responses: datasets.Dataset, train: datasets.Dataset, width: int) -> TeacherLogitStore:
    """A top-K teacher-logit store of the served top-k, by training-example index, in memory: the generation store
    is its cache. The training rows are a seeded subset of the responses (``data.train_tokens``), each matched to
    its response by its tokens, so the store needs nothing of how the data module chose them."""
    ids, mask = (np.asarray(train.with_format("numpy")[name]) for name in ("input_ids", "attention_mask"))
    wanted = [row[: int(length)].tobytes() for row, length in zip(ids, mask.sum(axis=1), strict=True)]
    pairs = zip(responses["prompt_ids"], responses["response_ids"], strict=True)
    source = {
        np.asarray([*prompt, *response], dtype=ids.dtype).tobytes(): number
        for number, (prompt, response) in enumerate(pairs)
    }
    targets = served_row_targets(responses.select([source[row] for row in wanted]), width)
    rest = targets.rest_log_mass.unsqueeze(-1)  # at one temperature, 1
    tensors = {"values": targets.values, "indices": targets.indices, "rest_log_mass": rest}
    return TeacherLogitStore(tensors, {"num_examples": str(len(wanted)), "temperatures": "1.0", "source": "served"})
