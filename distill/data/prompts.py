"""Prompts and the teacher's responses to them, for sequence-level KD, as a LightningDataModule.

Contract:

* The prompt pool is real text: passages of a plain-text corpus (:class:`~distill.data.text.TextDataModule`,
  split by whole documents), each wrapped in ``instruction`` and, with ``chat_template``, in the
  tokenizer's chat template as a user turn awaiting the assistant's answer. Passages are runs of
  whole lines of at least ``passage_tokens`` tokens; ``prompts[split]`` of them are drawn per split
  with ``pool_seed``, so held-out prompts come from held-out documents only.
* Responses are the teacher's (:mod:`distill.stores.generations`), made once by :meth:`attach_teacher` (the
  run's generation stage) and cached: every split's prompts, held-out ones included, since the
  teacher's held-out responses are what the student is scored against.
* Every row is ``prompt + response``, right-padded to ``max_prompt_tokens + max_new_tokens``, with
  labels -100 on the prompt and the padding: no prompt token counts in any loss or metric.
* ``train_on=corpus`` trains on the corpus's blocks instead (the token-level baselines) and keeps the
  held-out prompt/response rows, so every recipe is scored the same way. ``train_tokens`` caps the
  training rows at the first (seeded order) whose counted tokens reach it: recipes compare at equal tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
from torch import nn
from torch.utils.data import DataLoader

from distill.data.base import DataModule
from distill.data.chat import ChatDataModule
from distill.data.documents import HELD_OUT, SPLITS
from distill.data.rows import pack_responses
from distill.data.split_loaders import check_batch_sizes
from distill.data.text import BLOCK_FEATURES, IGNORE_INDEX, TextDataModule
from distill.serve.endpoint import EndpointClient
from distill.serve.generation import Generator, SamplingSettings, end_token_ids
from distill.stores.generations import GenerationStore, served_generator, settings_key
from distill.utils.keys import EXAMPLE_INDEX, digest, weights_fingerprint
from distill.utils.settings import settings_of

log = logging.getLogger(__name__)
TRAIN_SOURCES = ("responses", "corpus")
# Prompts drawn per split unless `prompts` says otherwise.
PROMPT_COUNTS = {"train": 1024, "validation": 64, "test": 128}


Messages = list[dict[str, str]]


def user_turn(instruction: str, passage: str) -> Messages:
    return [{"role": "user", "content": instruction.format(passage=passage)}]


def awaiting(messages: Sequence[dict]) -> Messages | None:
    """A conversation up to its last user turn (``None`` if it has none): what the teacher answers."""
    last_user = max((turn for turn, message in enumerate(messages) if message["role"] == "user"), default=None)
    return None if last_user is None else [dict(message) for message in messages[: last_user + 1]]


def passages(text: str, tokenizer: Any, min_tokens: int) -> list[str]:
    """Runs of consecutive non-blank lines of ``text`` (blank lines dropped) of at least ``min_tokens`` tokens."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    counts = tokenizer(lines, add_special_tokens=False)["input_ids"]
    found, current, tokens = [], [], 0
    for line, ids in zip(lines, counts, strict=True):
        current.append(line)
        tokens += len(ids)
        if tokens >= min_tokens:
            found.append("\n".join(current))
            current, tokens = [], 0
    return found


class PromptResponseDataModule(DataModule):
    """Teacher responses to passage-continuation prompts (and, for baselines, the corpus itself).

    Args:
        corpus: the text the prompts are cut from (and the blocks ``train_on=corpus`` trains on), or the
            conversations (a :class:`~distill.data.chat.ChatDataModule`) whose openings are the prompts.
        instruction: the user turn; ``{passage}`` stands for the passage.
        prompts: how many prompts each split draws (``train``, ``validation``, ``test``).
        passage_tokens: the least tokens of a passage.
        max_prompt_tokens: the longest prompt accepted, template included (longer ones are an error).
        chat_template: wrap prompts in the tokenizer's chat template (an error if it has none).
        generation: :class:`~distill.serve.generation.SamplingSettings` of the teacher's responses.
        shard_size / generation_batch_size: prompts per store shard / per ``generate`` call.
        train_on: ``responses`` (sequence-level KD) or ``corpus`` (token-level baselines).
        train_tokens: cap on counted training tokens (``None``: all rows).
    """

    task = "causal_lm"
    prompt_pool = True

    def __init__(
        self,
        corpus: TextDataModule | ChatDataModule,
        cache_dir: str,
        instruction: str = "{passage}",
        prompts: dict[str, int] | None = None,
        passage_tokens: int = 48,
        max_prompt_tokens: int = 128,
        chat_template: bool = True,
        generation: SamplingSettings | None = None,
        shard_size: int = 256,
        generation_batch_size: int = 16,
        train_on: str = "responses",
        train_tokens: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        seed: int = 0,
        pool_seed: int = 0,
    ) -> None:
        super().__init__()
        self.check_settings(
            train_on, train_tokens, instruction, prompts, max_prompt_tokens, batch_size, eval_batch_size
        )
        self.counts = dict(prompts or PROMPT_COUNTS)
        self.corpus, self.cache_dir, self.instruction = corpus, cache_dir, instruction
        self.passage_tokens, self.max_prompt_tokens = passage_tokens, max_prompt_tokens
        self.chat_template = chat_template
        self.settings = settings_of(SamplingSettings, generation)
        self.shard_size, self.generation_batch_size = shard_size, generation_batch_size
        self.train_on, self.train_tokens = train_on, train_tokens
        self.batch_size, self.eval_batch_size, self.seed, self.pool_seed = batch_size, eval_batch_size, seed, pool_seed
        self.tokenizer, self.pad_id, self.num_workers = corpus.tokenizer, corpus.pad_id, corpus.num_workers
        self.max_length = max_prompt_tokens + self.settings.max_new_tokens
        # Held-out references are the teacher's greedy responses only when the teacher answered greedily.
        self.references_are_teachers = not self.settings.do_sample
        self.responses: dict[str, datasets.Dataset] = {}
        self.splits: dict[str, datasets.Dataset] = {}
        self.store: GenerationStore | None = None

    @property
    def positions_per_example(self) -> int:
        return self.block_size

    @property
    def block_size(self) -> int:
        """Positions per training row (a token store's row): the corpus's blocks, or prompt + response."""
        return self.corpus.positions_per_example if self.train_on == "corpus" else self.max_length

    @staticmethod
    def check_settings(
        train_on: str,
        train_tokens: int | None,
        instruction: str,
        prompts: dict[str, int] | None,
        max_prompt_tokens: int,
        batch_size: int,
        eval_batch_size: int,
    ) -> None:
        """The constructor's range checks, which :func:`distill.config.schemas.validate` also runs on ``data``."""
        if train_on not in TRAIN_SOURCES:
            raise ValueError(f"data.train_on={train_on!r} must be one of {TRAIN_SOURCES}")
        if train_tokens is not None and train_tokens < 1:
            raise ValueError(f"data.train_tokens={train_tokens!r} must be a positive number of tokens or null")
        if "{passage}" not in instruction:
            raise ValueError(f"data.instruction={instruction!r} must contain {{passage}}, where the passage goes")
        counts = prompts or PROMPT_COUNTS
        for split in SPLITS:
            if counts.get(split, 0) < 1:
                raise ValueError(
                    f"data.prompts.{split}={counts.get(split)!r}: the prompt pool needs >= 1 prompt per split"
                )
        if max_prompt_tokens < 2:
            raise ValueError(f"data.max_prompt_tokens={max_prompt_tokens!r} must be >= 2")
        check_batch_sizes(batch_size, eval_batch_size)

    # The prompt pool.

    def prompt_conversations(self, split: str) -> list[Messages]:
        """``prompts[split]`` conversations awaiting the assistant, drawn with ``pool_seed``: passages of
        ``split``'s documents in ``instruction``, each a user turn, or, from a corpus of conversations
        (``data=chat_prompts``), each conversation up to its last user turn (its last answer is the teacher's
        to give; earlier answers stay as context)."""
        if isinstance(self.corpus, ChatDataModule):
            found = [opening for messages in self.corpus.conversations(split) if (opening := awaiting(messages))]
            kind = "conversations with a user turn"
        else:
            texts = self.corpus.document_texts(split)
            found = [
                user_turn(self.instruction, p) for t in texts for p in passages(t, self.tokenizer, self.passage_tokens)
            ]
            kind = f"passages of {self.passage_tokens}+ tokens"
        wanted = self.counts[split]
        if len(found) < wanted:
            raise ValueError(
                f"data.prompts.{split}={wanted} but the {split} documents hold {len(found)} {kind}: ask for fewer"
                " prompts (or, for passages, shorter ones: data.passage_tokens)"
            )
        picked = np.random.default_rng([self.pool_seed, SPLITS.index(split)]).choice(len(found), wanted, replace=False)
        return [found[i] for i in sorted(picked)]

    def encode_prompt(self, messages: Messages) -> list[int]:
        if self.chat_template:
            if self.tokenizer.chat_template is None:
                raise ValueError(
                    f"data.chat_template=true but tokenizer {self.tokenizer.name_or_path!r} has no chat "
                    "template: use an instruction model's tokenizer or set data.chat_template=false"
                )
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        elif len(messages) == 1:
            text = messages[0]["content"]
        else:
            raise ValueError("data.chat_template=false sends a prompt as plain text: a conversation needs the template")
        ids = self.tokenizer(text, add_special_tokens=not self.chat_template)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(
                f"a prompt of {len(ids)} tokens exceeds data.max_prompt_tokens={self.max_prompt_tokens}:"
                f" {text[:80]!r}...; raise data.max_prompt_tokens or lower data.passage_tokens"
            )
        return ids

    def prompt_set(self) -> dict[str, list[tuple[list[int], Messages]]]:
        """Each split's prompts as (token ids, the conversation they render)."""
        return {
            split: [(self.encode_prompt(messages), messages) for messages in self.prompt_conversations(split)]
            for split in SPLITS
        }

    def prompt_ids(self) -> dict[str, list[list[int]]]:
        return {split: [ids for ids, _ in pool] for split, pool in self.prompt_set().items()}

    # The generation stage.

    def attach_teacher(self, teacher: nn.Module | EndpointClient) -> dict[str, float]:
        """Make (or reuse) the teacher's responses to every split's prompts; returns generation statistics."""
        log.info("Generation stage: the teacher answers the prompt pool")
        pool = self.prompt_set()
        prompts = {split: [ids for ids, _ in pool[split]] for split in SPLITS}
        ordered = [prompt for split in SPLITS for prompt in prompts[split]]
        conversations = {tuple(ids): messages for split in SPLITS for ids, messages in pool[split]}
        identity, generator = served_generator(teacher, self.settings, conversations)
        if generator is None:
            identity = {"teacher_weights": weights_fingerprint(teacher)}
            end_ids = end_token_ids(teacher, self.tokenizer)
            generator = Generator(teacher, self.settings, self.pad_id, end_ids, self.generation_batch_size)
        key = identity | {
            "tokenizer": self.corpus.tokenizer_key,
            "prompts": digest(ordered),
            "settings": settings_key(self.settings),
        }
        self.store = GenerationStore(self.cache_dir, "responses", key, self.shard_size)
        rows = self.store.build(generator, ordered)
        per_prompt, start = self.settings.num_return_sequences, 0
        for split in SPLITS:
            count = len(prompts[split]) * per_prompt
            self.responses[split] = rows.select(range(start, start + count))
            start += count
        return self.store.statistics()

    # Rows.

    def prepare_data(self) -> None:
        self.corpus.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if not self.responses:
            raise RuntimeError("no teacher responses yet: the run's generation stage (attach_teacher) comes first")
        self.corpus.setup(stage)
        train = self.corpus.splits["train"] if self.train_on == "corpus" else self._rows(self.responses["train"])
        train = self._limit_tokens(
            train.with_format(None).remove_columns([name for name in train.column_names if name == EXAMPLE_INDEX])
        )
        splits = {"train": train.add_column(EXAMPLE_INDEX, list(range(len(train))))}
        splits |= {split: self._rows(self.responses[split]) for split in HELD_OUT}
        self.splits = {split: rows.with_format("torch") for split, rows in splits.items()}

    def _rows(self, responses: datasets.Dataset) -> datasets.Dataset:
        """``prompt + response`` rows of ``max_length`` tokens, labels only on the response."""
        packed = pack_responses(responses["prompt_ids"], responses["response_ids"], self.max_length, self.pad_id)
        return datasets.Dataset.from_dict(packed, features=BLOCK_FEATURES)

    def _limit_tokens(self, rows: datasets.Dataset) -> datasets.Dataset:
        if self.train_tokens is None:
            return rows
        order = np.random.default_rng(self.pool_seed).permutation(len(rows))
        labels = rows.select_columns(["labels"]).with_format("numpy")[:]["labels"]
        counted = np.cumsum((labels[order, 1:] != IGNORE_INDEX).sum(axis=1))
        if counted[-1] < self.train_tokens:
            log.warning("data.train_tokens=%d: the training rows hold only %d", self.train_tokens, counted[-1])
        keep = int(np.searchsorted(counted, self.train_tokens)) + 1
        return rows.select(order[:keep])

    def calibration_dataloader(self):
        """The corpus's training blocks, whatever ``train_on`` is: every recipe starts from one pruned student
        (after ``prepare_data``, which prepares the corpus)."""
        return self.corpus.calibration_dataloader()

    def train_fingerprint(self) -> str:
        """Identity of the training rows: the responses (or corpus blocks), the row layout and the token cap."""
        self.setup("fit")
        source = self.corpus.train_fingerprint() if self.train_on == "corpus" else self.store.folder.name
        return digest(
            [source, self.train_on, self.max_length, self.train_tokens, self.pool_seed, len(self.splits["train"])]
        )

    def teacher_key_fields(self) -> dict[str, Any]:
        raise ValueError(
            "teacher.finetune=true fine-tunes the teacher on the training rows, and prompt/response data makes"
            " those from the teacher's own responses: fine-tune it on the corpus (data=shakespeare) and point"
            " teacher.name_or_path at the fine-tuned teacher's folder"
        )

    def check_context(self, max_positions: int) -> None:
        """Prompt plus response (and the corpus's blocks) must fit the model's context."""
        if self.max_length > max_positions:
            raise ValueError(
                f"data.max_prompt_tokens + data.generation.max_new_tokens = {self.max_length} exceeds the "
                f"model's context of {max_positions} positions"
            )
        self.corpus.check_context(max_positions)

    # Evaluation helpers.

    def reference_prompts(self, split: str, count: int, *lengths: int) -> list[tuple[list[int], list[int]]]:
        """``count`` held-out (prompt ids, teacher response ids) pairs, evenly spaced over ``split``
        (whole prompts and responses: the ``lengths`` a text corpus cuts its prompts by do not apply)."""
        rows = self.responses[split]
        picked = rows.select([row * len(rows) // count for row in range(min(count, len(rows)))])
        return list(zip(picked["prompt_ids"], picked["response_ids"], strict=True))

    def extra_test_loaders(self) -> dict[str, DataLoader]:
        """Held-out corpus blocks: the student's perplexity on text as well as on the teacher's responses."""
        self.corpus.setup("test")
        return {"corpus": self.corpus.test_dataloader()}

    def generation_settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self.settings)
