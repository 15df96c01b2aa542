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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from filelock import FileLock
from torch import Tensor, nn

from distill.utils.keys import digest
from distill.utils.sharding import is_sharded

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


@dataclass
class SamplingSettings:
    """How responses are drawn: greedy (``do_sample=False``) or sampled at ``temperature``/``top_p``,
    ``num_return_sequences`` per prompt, at most ``max_new_tokens`` each. Also the config schema of
    ``data.generation`` (distill/schemas.py)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences={self.num_return_sequences!r} must be >= 1")
        if self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError(f"num_return_sequences={self.num_return_sequences} needs do_sample=true (greedy repeats)")


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, Tensor]:
    """``input_ids``/``attention_mask`` with every prompt ending at the last column, as decoders generate."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def cut_at_end(tokens: list[int], end_ids: set[int]) -> tuple[list[int], bool]:
    """``tokens`` up to and including the first end token, and whether there was one."""
    for position, token in enumerate(tokens):
        if token in end_ids:
            return tokens[: position + 1], True
    return tokens, False


@dataclass
class Generator:
    """A model's responses to batches of prompts under ``settings``, ended by any of ``end_ids``."""

    model: nn.Module
    settings: SamplingSettings
    pad_id: int
    end_ids: set[int]
    batch_size: int = 16

    def __call__(self, prompts: Sequence[Sequence[int]]) -> list[tuple[list[int], bool]]:
        """Responses (token ids, finished), ``num_return_sequences`` per prompt, in prompt order."""
        responses = []
        for start in range(0, len(prompts), self.batch_size):
            responses += self.generate_batch(prompts[start : start + self.batch_size])
        return responses

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[Sequence[int]]) -> list[tuple[list[int], bool]]:
        settings, was_training = self.settings, self.model.training
        self.model.eval()
        inputs = left_padded(prompts, self.pad_id, next(self.model.parameters()).device)
        # top_k=0: no top-k cut beyond top_p (generation configs often default to 50).
        sampling = dict(temperature=settings.temperature, top_p=settings.top_p, top_k=0) if settings.do_sample else {}
        output = self.model.generate(
            **inputs,
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            num_return_sequences=settings.num_return_sequences,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.end_ids),
            # A sharded model's ranks step together until every rank's batch has ended.
            synced_gpus=is_sharded(self.model),
            **sampling,
        )
        self.model.train(was_training)
        generated = output[:, inputs["input_ids"].shape[1] :].tolist()
        return [cut_at_end(tokens, self.end_ids) for tokens in generated]


def end_token_ids(model: nn.Module, tokenizer: object) -> set[int]:
    """The ids that end a response: the tokenizer's EOS and the model's generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured if isinstance(configured, list) else [configured]) - {None}
    if not ids:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} and the model define no end-of-sequence token")
    return ids


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

    def build(self, generator: Generator, prompts: Sequence[Sequence[int]]) -> datasets.Dataset:
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
        self, generator: Generator, shard: int, total: int, start: int, prompts: Sequence[Sequence[int]]
    ) -> None:
        torch.manual_seed(generator.settings.seed * 1_000_003 + shard)  # the same responses, resumed or not
        started = time.perf_counter()
        per_prompt = generator.settings.num_return_sequences
        rows = [
            (start + number // per_prompt, number % per_prompt, list(prompts[number // per_prompt]), *response)
            for number, response in enumerate(generator(prompts))
        ]
        seconds = time.perf_counter() - started
        tokens = sum(len(row[3]) for row in rows)
        self._write_shard(shard, rows, {"tokens": tokens, "seconds": seconds, "responses": len(rows)})
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
        table = pa.Table.from_arrays(
            [pa.array(column, type=f.type) for column, f in zip(columns, ROW_SCHEMA, strict=True)], schema=ROW_SCHEMA
        )
        path = self.shard_path(shard)
        path.with_suffix(".json").write_text(json.dumps(stats))
        unfinished = path.with_suffix(f".tmp-{os.getpid()}")
        pq.write_table(table, unfinished)
        os.replace(unfinished, path)  # the shard exists whole or not at all

    def load(self, shards: int) -> datasets.Dataset:
        """Every row of the first ``shards`` shards, in prompt order."""
        tables = [pq.read_table(self.shard_path(shard)) for shard in range(shards)]
        return datasets.Dataset(pa.concat_tables(tables))

    def statistics(self) -> dict[str, float]:
        """Generated tokens, seconds and tokens/s summed over the shards (resumed runs included)."""
        stats = [json.loads(path.read_text()) for path in sorted(self.folder.glob("shard-*.json"))]
        tokens = sum(entry["tokens"] for entry in stats)
        seconds = sum(entry["seconds"] for entry in stats)
        responses = sum(entry["responses"] for entry in stats)
        return {
            "responses": responses,
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9),
        }


def settings_key(settings: SamplingSettings) -> str:
    """What decides the responses: greedy ones depend on neither the seed nor the sampling knobs, so runs
    of every seed share one greedy store."""
    decisive = dataclasses.asdict(settings)
    if not settings.do_sample:
        decisive = {"max_new_tokens": settings.max_new_tokens, "do_sample": False}
    return json.dumps(decisive, sort_keys=True)
