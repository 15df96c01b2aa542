"""The teacher generation store: batched generation, shards, resume after a crash."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.serve.generation import Generator, SamplingSettings, cut_at_end, left_padded
from distill.stores.generations import GenerationStore
from tests.conftest import tiny_llama

END = 3
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16], [17, 18, 19]]


def generator(settings: SamplingSettings, batch_size: int = 2) -> Generator:
    return Generator(tiny_llama(40, layers=2), settings, pad_id=0, end_ids={END}, batch_size=batch_size)


class Crashing(Generator):
    """Dies on its ``crash_at``-th batch, like a process killed mid-shard."""

    def __init__(self, inner: Generator, crash_at: int) -> None:
        super().__init__(inner.model, inner.settings, inner.pad_id, inner.end_ids, inner.batch_size)
        self.calls, self.crash_at = 0, crash_at

    def generate_batch(self, prompts):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt("killed")
        return super().generate_batch(prompts)


def test_left_padding_ends_every_prompt_at_the_last_column() -> None:
    batch = left_padded([[1, 2, 3], [4]], pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_responses_end_after_the_first_end_token() -> None:
    assert cut_at_end([4, 5, END, 7, END], {END}) == ([4, 5, END], True)
    assert cut_at_end([4, 5], {END}) == ([4, 5], False)


def test_batched_greedy_generation_equals_one_prompt_at_a_time() -> None:
    settings = SamplingSettings(max_new_tokens=5)
    batched, single = generator(settings, batch_size=4), generator(settings, batch_size=1)
    assert batched(PROMPTS) == single(PROMPTS)


@pytest.mark.slow
def test_store_resumes_without_redoing_finished_shards(tmp_path: Path) -> None:
    settings = SamplingSettings(max_new_tokens=4, do_sample=True, temperature=0.9, num_return_sequences=2, seed=3)
    key = {"model": "tiny", "prompts": "six"}
    reference = GenerationStore(tmp_path / "a", "test", key, shard_size=2).build(generator(settings), PROMPTS)

    store = GenerationStore(tmp_path / "b", "test", key, shard_size=2)
    crashing = Crashing(generator(settings), crash_at=3)  # one batch per shard: dies in the third shard
    with pytest.raises(KeyboardInterrupt):
        store.build(crashing, PROMPTS)
    finished = sorted(path.name for path in store.folder.iterdir() if path.suffix == ".parquet")
    assert finished == ["shard-00000.parquet", "shard-00001.parquet"]
    assert not list(store.folder.glob("*.tmp-*"))

    resumed = Crashing(generator(settings), crash_at=0)
    rows = store.build(resumed, PROMPTS)
    assert resumed.calls == 1  # only the third shard's one batch
    assert rows.to_list() == reference.to_list()
    assert rows["prompt_index"] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert rows["sample"] == [0, 1] * 6
    assert store.statistics()["responses"] == 12


def test_store_rows_hold_prompts_and_responses(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path, "test", {"k": "v"}, shard_size=4)
    rows = store.build(generator(SamplingSettings(max_new_tokens=3)), PROMPTS)
    assert rows["prompt_ids"] == PROMPTS
    for response, finished in zip(rows["response_ids"], rows["finished"], strict=True):
        assert 1 <= len(response) <= 3
        assert finished == (response[-1] == END)
    stats = store.statistics()
    assert stats["tokens"] == sum(len(response) for response in rows["response_ids"])
    assert stats["tokens_per_s"] > 0


def test_bad_settings_and_empty_pools_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_return_sequences=2 needs do_sample=true"):
        SamplingSettings(num_return_sequences=2)
    with pytest.raises(ValueError, match="top_p=0"):
        SamplingSettings(top_p=0)
    with pytest.raises(ValueError, match="prompt pool is empty"):
        GenerationStore(tmp_path, "test", {}).build(generator(SamplingSettings()), [])
