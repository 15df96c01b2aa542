"""Servers that name their tokens by text, not id (distill.serve.answers): OpenAI's chat completions, the legacy
text completions vLLM serves by default, text-only chat answers; read as the teacher tokenizer's ids."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from distill.serve.answers import Token, TokenTable, UnknownToken, parse_answer
from distill.serve.endpoint import EndpointClient, EndpointError, EndpointGenerator, EndpointSettings
from distill.serve.generation import SamplingSettings
from distill.utils.references import load_tokenizer
from tests.test_endpoint_teacher import llama_server, serve  # noqa: F401  (the fake and the real server)

TEXT = "Hello, wörld! 日本語 and thee"
MESSAGES = [{"role": "user", "content": "Continue: Shall I compare thee"}]
BYTE_OF = {char: value for value, char in bytes_to_unicode().items()}


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf: Path):
    return load_tokenizer(str(smollm2_gguf))


def entry(tokenizer, token_id: int, logprob: float, alternatives: list[tuple[int, float]] | None = None) -> dict:
    """A token as OpenAI's chat completions name it: its text and UTF-8 bytes (a byte-level BPE's), no id."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    raw = piece.encode() if piece in tokenizer.all_special_tokens else bytes(BYTE_OF[char] for char in piece)
    named = {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw), "logprob": logprob}
    if alternatives is not None:
        named["top_logprobs"] = [entry(tokenizer, other, value) for other, value in alternatives]
    return named


def chat_answer(tokenizer, text: str, top_k: int, stop: bool = True) -> dict:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    content = [entry(tokenizer, i, -0.5, [(i, -0.5), *[(j, -2.0 - j / 100) for j in range(1, top_k)]]) for i in ids]
    logprobs = {"content": content} if top_k else None
    message = {"role": "assistant", "content": text}
    return {"choices": [{"message": message, "logprobs": logprobs, "finish_reason": "stop" if stop else "length"}]}


def chat_server(serve, answer: dict):  # noqa: F811
    def script(path: str, body: dict) -> tuple[int, str]:
        if path == "/v1/models":
            return 200, json.dumps({"data": [{"id": "frontier"}]})
        assert path == "/v1/chat/completions" and "prompt" not in body
        return 200, json.dumps(answer)

    return serve(script)


def chat_client(url: str, tokenizer: str, top_k: int) -> EndpointClient:
    settings = EndpointSettings(base_url=url, model="frontier", top_logprobs=top_k, api="chat", max_retries=0)
    return EndpointClient(settings, tokenizer=tokenizer)


def test_the_table_finds_every_token_by_its_bytes_including_split_characters(smollm2_tokenizer) -> None:
    table = TokenTable(smollm2_tokenizer)
    ids = smollm2_tokenizer(TEXT + "<|im_end|>", add_special_tokens=False)["input_ids"]
    named = [entry(smollm2_tokenizer, i, 0.0) for i in ids]
    assert any("\ufffd" in token["token"] for token in named)  # 日本語 splits inside characters: bytes decide
    assert [table.id_of(Token(None, token["token"], bytes(token["bytes"]), 0.0)) for token in named] == ids
    assert table.id_of(Token(None, "token_id:4242", None, 0.0)) == 4242  # vLLM's return_tokens_as_token_ids
    with pytest.raises(UnknownToken, match=r"'☃☃☃' is not one token of .*teacher.name_or_path"):
        table.id_of(Token(None, "☃☃☃", None, 0.0))


def test_a_sentencepiece_vocabulary_reads_word_starts_and_byte_fallback() -> None:
    vocab = {
        "<unk>": 0,
        "</s>": 1,
        "<0xE2>": 2,
        "<0x98>": 3,
        "<0x83>": 4,
        "▁the": 5,
        "e": 6,
        "▁": 7,
        "t": 8,
        "h": 9,
        "th": 10,
    }
    model = Tokenizer(models.BPE(vocab=vocab, merges=[("t", "h")], unk_token="<unk>", byte_fallback=True))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    table = TokenTable(PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>"))
    assert table.id_of(Token(None, " the", None, 0.0)) == 5
    assert table.id_of(Token(None, None, b"\xe2", 0.0)) == 2 and table.id_of(Token(None, "e", None, 0.0)) == 6


def test_a_chat_api_gets_the_messages_and_its_answer_reads_as_token_ids(serve, smollm2_gguf, smollm2_tokenizer) -> None:  # noqa: F811
    server = chat_server(serve, chat_answer(smollm2_tokenizer, TEXT, top_k=3))
    ids = smollm2_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    prompt = [1, 2, 3]
    generator = EndpointGenerator(chat_client(server.url, str(smollm2_gguf), 3), SamplingSettings(max_new_tokens=32))
    generator.messages = {tuple(prompt): MESSAGES}
    [(tokens, finished, top_ids, top_values)] = generator([prompt])
    assert tokens == [*ids, smollm2_tokenizer.eos_token_id] and finished  # the end token the server stopped on
    assert [row[0] for row in top_ids] == tokens and top_ids[0][1:] == [1, 2] and top_values[0] == [-0.5, -2.01, -2.02]
    assert top_values[-1] == [0.0, float("-inf"), float("-inf")]  # the end token the answer left out: itself
    body = server.requests[-1][1]
    assert body["messages"] == MESSAGES and body["logprobs"] is True and body["top_logprobs"] == 3
    assert generator.store_key()["api"] == "chat"


def test_a_text_only_chat_answer_is_tokenized_afresh(serve, smollm2_gguf, smollm2_tokenizer) -> None:  # noqa: F811
    server = chat_server(serve, chat_answer(smollm2_tokenizer, TEXT, top_k=0, stop=False))
    tokens, finished, top_ids, _ = chat_client(server.url, str(smollm2_gguf), 0).complete(
        [1], SamplingSettings(max_new_tokens=64), messages=MESSAGES
    )
    assert tokens == smollm2_tokenizer(TEXT, add_special_tokens=False)["input_ids"] and not finished
    assert top_ids == [] and "logprobs" not in server.requests[-1][1]  # no log-probabilities asked of the API


def test_the_legacy_completions_form_reads_by_text_or_token_id(serve, smollm2_gguf, smollm2_tokenizer) -> None:  # noqa: F811
    ids = smollm2_tokenizer(" and thee", add_special_tokens=False)["input_ids"]
    names = [smollm2_tokenizer.decode([i]) for i in ids]

    def legacy(as_ids: bool) -> dict:
        tokens = [f"token_id:{i}" for i in ids] if as_ids else names
        top = [{token: -0.1, "token_id:7" if as_ids else "\n": -3.0} for token in tokens]
        logprobs = {"tokens": tokens, "token_logprobs": [-0.1] * len(ids), "top_logprobs": top}
        return {"choices": [{"text": " and thee", "logprobs": logprobs, "finish_reason": "length"}]}

    for as_ids in (False, True):
        server = serve(lambda path, body, as_ids=as_ids: (200, json.dumps(legacy(as_ids))))
        settings = EndpointSettings(base_url=server.url, model="m", top_logprobs=2, max_retries=0)
        tokens, _, top_ids, top_values = EndpointClient(settings, tokenizer=str(smollm2_gguf)).complete(
            [1], SamplingSettings(max_new_tokens=8)
        )
        newline = 7 if as_ids else smollm2_tokenizer("\n", add_special_tokens=False)["input_ids"][0]
        assert tokens == ids and [row[0] for row in top_ids] == ids and {row[1] for row in top_ids} == {newline}
        assert all(values == [-0.1, -3.0] for values in top_values)


def test_a_server_with_another_tokenizer_is_refused_in_one_line(serve, smollm2_gguf, smollm2_tokenizer) -> None:  # noqa: F811
    answer = chat_answer(smollm2_tokenizer, TEXT, top_k=2)
    answer["choices"][0]["logprobs"]["content"][1]["token"] = "☃☃☃"
    del answer["choices"][0]["logprobs"]["content"][1]["bytes"]
    server = chat_server(serve, answer)
    with pytest.raises(EndpointError, match=r"malformed answer \(UnknownToken: the server's token '☃☃☃' is not one"):
        chat_client(server.url, str(smollm2_gguf), 2).complete([1], SamplingSettings(), messages=MESSAGES)


def test_a_chat_api_needs_the_prompts_messages() -> None:
    client = chat_client("http://127.0.0.1:9", "unused", 0)
    with pytest.raises(EndpointError, match=r"teacher\.api=chat sends each prompt's messages"):
        client.complete([1], SamplingSettings())
    with pytest.raises(ValueError, match=r"teacher.api='responses' must be one of \('completions', 'chat'\)"):
        EndpointSettings(base_url="u", model="m", api="responses")


def test_a_character_named_once_for_several_tokens_is_split_back(smollm2_tokenizer) -> None:
    """llama.cpp names a character split over tokens once, by its last token, with the whole character's bytes."""
    ids = smollm2_tokenizer("わら", add_special_tokens=False)["input_ids"]
    assert len(ids) == 4  # two tokens a character
    named = [entry(smollm2_tokenizer, i, -0.5, [(i, -0.5), (7, -2.0)]) for i in ids]
    for merged, character in ((named[1], "わ"), (named[3], "ら")):  # the last token's id, the character's bytes
        merged["bytes"], merged["id"] = list(character.encode()), ids[named.index(merged)]
    answer = {"choices": [{"text": "わら", "logprobs": {"content": [named[1], named[3]]}, "finish_reason": "length"}]}
    answer["usage"] = {"completion_tokens": 4}
    tokens, _, top_ids, top_values = parse_answer(answer, 2, lambda: TokenTable(smollm2_tokenizer))
    assert tokens == ids and [row[0] for row in top_ids] == ids
    assert top_values[0] == [0.0, float("-inf")] and top_values[1] == [-0.5, -2.0]  # no distribution: the token
    answer["usage"] = {"completion_tokens": 5}
    with pytest.raises(ValueError, match="reports 5 completion tokens, names 2 and its bytes give 4"):
        parse_answer(answer, 2, lambda: TokenTable(smollm2_tokenizer))


@pytest.mark.slow
def test_the_real_servers_answers_read_as_the_tokens_it_generated(llama_server, smollm2_gguf) -> None:  # noqa: F811
    """Against llama.cpp's server: split characters are recovered to the very tokens its native endpoint returns,
    and its chat answers read the same by text (OpenAI's form) as by id."""
    settings = EndpointSettings(base_url=llama_server, model=str(smollm2_gguf), top_logprobs=5)
    client = EndpointClient(settings, tokenizer=str(smollm2_gguf))
    tokenizer = client.tokens().tokenizer
    ask = [{"role": "user", "content": "Translate 'good morning' into Japanese and Greek."}]
    prompt = tokenizer.apply_chat_template(ask, add_generation_prompt=True, tokenize=True, return_dict=False)
    tokens, _, top_ids, _ = client.complete(prompt, SamplingSettings(max_new_tokens=24))
    native = client.request(
        "POST", "/completion", {"prompt": prompt, "n_predict": 24, "temperature": 0, "return_tokens": True}
    )
    assert tokens == native["tokens"] and len(top_ids) == 24
    assert len(tokenizer.decode(tokens).encode()) < 2 * len(tokens)  # multi-byte characters, split over tokens
    chat = EndpointClient(dataclasses.replace(settings, api="chat"), tokenizer=str(smollm2_gguf))
    for question in ("Write one line of verse about the sea.", "Name three rivers of England."):
        body = chat.request_body([], SamplingSettings(max_new_tokens=24), 0, [{"role": "user", "content": question}])
        answer = chat.request("POST", "/v1/chat/completions", body)
        by_id = parse_answer(answer, 5, chat.tokens)
        for entry in answer["choices"][0]["logprobs"]["content"]:
            for named in (entry, *entry["top_logprobs"]):
                del named["id"]
        assert parse_answer(answer, 5, chat.tokens) == by_id
