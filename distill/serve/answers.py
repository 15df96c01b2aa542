"""A served teacher's answer read as the teacher's token ids, whatever form the server gives its tokens in.

Servers name the tokens they generate in three ways:

* by id: llama.cpp's ``logprobs.content[i].id`` (and its ``top_logprobs[j].id``), or vLLM's
  ``"token_id:<id>"`` strings (``return_tokens_as_token_ids``);
* by text: OpenAI's chat completions (``logprobs.content[i].token`` with its UTF-8 ``bytes``) and the legacy
  text completions (``logprobs.tokens`` and ``top_logprobs`` dicts), which vLLM serves by default;
* not at all: a chat answer asked for no log-probabilities is only its ``message.content``.

A token given by text is looked up in :class:`TokenTable`, the teacher tokenizer's vocabulary by the bytes each
token decodes to; the chosen tokens must spell the answer's text, or the server's tokenizer is not the one
``teacher.name_or_path`` names and the answer is refused. Text without tokens (and, when no top-k is stored,
tokens that do not resolve) is tokenized afresh, with the end-of-sequence token appended when the server
stopped by itself: the in-process generator keeps it too, so the student learns to stop.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers.convert_slow_tokenizer import bytes_to_unicode

Response = tuple[list[int], bool, list[list[int]], list[list[float]]]
# The teacher's vocabulary, read only when an answer names a token by text (loading a tokenizer takes seconds).
Tables = Callable[[], "TokenTable | None"]
TOKEN_ID = re.compile(r"token_id:(\d+)")
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class UnknownToken(ValueError):
    """A token the server names by text that is not one token of the teacher's vocabulary."""


@dataclass(frozen=True)
class Token:
    """One generated or alternative token as the server names it."""

    id: int | None
    text: str | None
    utf8: bytes | None
    logprob: float


class TokenTable:
    """The teacher tokenizer's vocabulary by the bytes each token decodes to (the first id wins a tie)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        special = set(tokenizer.all_special_tokens)
        byte_level = "ByteLevel" in str(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", ""))
        decoded = {char: value for value, char in bytes_to_unicode().items()}
        self.ids: dict[bytes, int] = {}
        self.raw: dict[int, bytes] = {}
        for token_id, piece in enumerate(pieces):
            if piece is None:
                continue
            if piece in special:
                raw = piece.encode()
            elif byte_level and all(char in decoded for char in piece):
                raw = bytes(decoded[char] for char in piece)
            elif match := BYTE_PIECE.fullmatch(piece):  # SentencePiece's byte fallback
                raw = bytes([int(match.group(1), 16)])
            else:
                raw = piece.replace("\u2581", " ").encode()
            self.ids.setdefault(raw, token_id)
            self.raw[token_id] = raw

    def segment(self, raw: bytes) -> list[int]:
        """``raw`` as tokens, longest match first (a few bytes of one character: one token, or one per byte)."""
        ids = []
        while raw:
            end = next((end for end in range(len(raw), 0, -1) if raw[:end] in self.ids), 0)
            if not end:
                raise UnknownToken(f"the bytes {raw!r} are no token of {self.tokenizer.name_or_path!r}")
            ids.append(self.ids[raw[:end]])
            raw = raw[end:]
        return ids

    def id_of(self, token: Token) -> int:
        if token.id is not None:
            return token.id
        if token.text is not None and (match := TOKEN_ID.fullmatch(token.text)):
            return int(match.group(1))
        raw = token.utf8 if token.utf8 is not None else (token.text or "").encode()
        if raw not in self.ids:
            raise UnknownToken(
                f"the server's token {token.text!r} is not one token of {self.tokenizer.name_or_path!r}: teacher."
                "name_or_path must be the served model's tokenizer (or set teacher.top_logprobs=0)"
            )
        return self.ids[raw]

    def encode(self, text: str, stopped: bool) -> list[int]:
        """``text`` tokenized afresh, with the end-of-sequence token when the server stopped by itself."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return [*ids, eos] if stopped and eos is not None else ids


def content_tokens(entries: Sequence[dict[str, Any]]) -> tuple[list[Token], list[list[Token]]]:
    """The ``logprobs.content`` form (llama.cpp's completions, OpenAI's and everyone's chat completions)."""

    def token(entry: dict[str, Any]) -> Token:
        utf8 = bytes(entry["bytes"]) if entry.get("bytes") is not None else None
        return Token(entry.get("id"), entry.get("token"), utf8, float(entry["logprob"]))

    return [token(entry) for entry in entries], [
        [token(item) for item in entry.get("top_logprobs") or []] for entry in entries
    ]


def legacy_tokens(logprobs: dict[str, Any]) -> tuple[list[Token], list[list[Token]]]:
    """The legacy text-completions form: parallel ``tokens`` / ``token_logprobs`` lists and ``top_logprobs``
    dicts of text to log-probability (OpenAI's ``/v1/completions``, vLLM's default)."""
    chosen = [
        Token(None, text, None, float(value))
        for text, value in zip(logprobs["tokens"], logprobs["token_logprobs"], strict=True)
    ]
    alternatives = [
        [Token(None, text, None, float(value)) for text, value in (options or {}).items()]
        for options in logprobs.get("top_logprobs") or [{} for _ in chosen]
    ]
    return chosen, alternatives


def parse_answer(answer: dict[str, Any], top_logprobs: int, table: Tables) -> Response:
    """Token ids, finished, and the top-k ids and log-probabilities of each generated token of one answer
    (a completion or a chat completion)."""
    choice = answer["choices"][0]
    stopped = choice["finish_reason"] == "stop"
    text = choice["message"]["content"] if "message" in choice else choice.get("text")
    logprobs = choice.get("logprobs") or {}
    if "content" in logprobs:
        chosen, alternatives = content_tokens(logprobs["content"] or [])
    elif "tokens" in logprobs:
        chosen, alternatives = legacy_tokens(logprobs)
    elif top_logprobs:
        raise ValueError("no logprobs in the answer, which teacher.top_logprobs > 0 needs")
    else:
        return require(table).encode(text or "", stopped), stopped, [], []
    chosen, alternatives = split_merged(
        chosen, alternatives, (answer.get("usage") or {}).get("completion_tokens"), table
    )
    ids = chosen_ids(chosen, text, stopped, top_logprobs, table)
    top_ids, top_values = [], []
    for position, token_id in enumerate(ids if top_logprobs else []):
        # None: no distribution given (a merged character's leading tokens, an end token the answer left out)
        options = alternatives[position] if position < len(alternatives) else None
        if options is None:
            top_ids.append(one_hot_ids(token_id, top_logprobs))
            top_values.append([0.0] + [float("-inf")] * (top_logprobs - 1))
            continue
        if len(options) < top_logprobs:
            raise ValueError(f"{len(options)} top_logprobs where {top_logprobs} were asked for")
        best = sorted(options, key=lambda option: -option.logprob)[:top_logprobs]
        top_ids.append([resolve(option, table) for option in best])
        top_values.append([option.logprob for option in best])
    return ids, stopped, top_ids, top_values


def split_merged(
    chosen: list[Token], alternatives: list[list[Token]], reported: int | None, table: Tables
) -> tuple[list[Token], list[list[Token] | None]]:
    """llama.cpp names a character split over several tokens once: by its last token's id, with the whole
    character's bytes, and no entry (nor distribution) for the tokens before it. Where the answer reports more
    completion tokens than it names, those tokens are recovered from the bytes, which must account for every
    reported token; they carry no distribution (``None``)."""
    if reported is None or reported <= len(chosen):
        return chosen, alternatives
    vocab = require(table)
    tokens: list[Token] = []
    options: list[list[Token] | None] = []
    for token, given in zip(chosen, alternatives, strict=True):
        own = vocab.raw.get(resolve(token, table), b"") if token.utf8 else b""
        if token.utf8 and own and len(token.utf8) > len(own) and token.utf8.endswith(own):
            for prefix in vocab.segment(token.utf8[: -len(own)]):
                tokens.append(Token(prefix, None, vocab.raw[prefix], 0.0))
                options.append(None)
        tokens.append(Token(resolve(token, table), token.text, own or token.utf8, token.logprob))
        options.append(given)
    if len(tokens) != reported:
        raise ValueError(
            f"the answer reports {reported} completion tokens, names {len(chosen)} and its bytes give {len(tokens)}"
        )
    return tokens, options


def one_hot_ids(token_id: int, k: int) -> list[int]:
    """``token_id`` first, then ``k - 1`` other distinct ids (log-probability -inf): the top-k of a certainty."""
    return [token_id, *[other for other in range(k) if other != token_id][: k - 1]]


def chosen_ids(chosen: list[Token], text: str | None, stopped: bool, top_logprobs: int, table: Tables) -> list[int]:
    """The generated tokens' ids; named by text, they must spell the answer (the same tokenizer)."""
    if all(token.id is not None for token in chosen):
        return ended([token.id for token in chosen], stopped, table)
    try:
        ids = [require(table).id_of(token) for token in chosen]
    except UnknownToken:
        if top_logprobs:  # the top-k must sit on the server's own tokens: re-tokenizing would shift them
            raise
        return require(table).encode(text or "", stopped)
    tokenizer = require(table).tokenizer
    spelled = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if text is not None and spelled != text and not text.startswith(spelled):
        raise UnknownToken(
            f"the server's tokens spell {spelled[:60]!r} where its text reads {text[:60]!r}: teacher.name_or_path "
            f"{tokenizer.name_or_path!r} is not the served model's tokenizer"
        )
    return ended(ids, stopped, table)


def ended(ids: list[int], stopped: bool, table: Tables) -> list[int]:
    """``ids`` with the end-of-sequence token the server stopped on, which chat answers leave out and llama.cpp's
    completions keep (as the in-process generator does); unknown without the teacher's tokenizer."""
    vocab = table() if stopped else None
    if vocab is None or (ids and ids[-1] in vocab.tokenizer.all_special_ids):
        return ids
    eos = vocab.tokenizer.eos_token_id
    return ids if eos is None else [*ids, eos]


def resolve(token: Token, table: Tables) -> int:
    return token.id if token.id is not None else require(table).id_of(token)


def require(table: Tables) -> TokenTable:
    found = table()
    if found is None:
        raise ValueError("the server names its tokens by text, and the client was given no tokenizer to read them")
    return found
