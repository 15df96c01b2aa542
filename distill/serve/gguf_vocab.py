"""The tokenizer part of a GGUF export: a byte-level BPE vocabulary (llama.cpp's ``gpt2`` tokenizer model).

Everything comes from the Hugging Face fast tokenizer itself (its ``tokenizer.json`` and added tokens), so the
file carries the tokenizer the student was trained with. llama.cpp does not run the tokenizer's pre-tokenizer:
it picks a built-in one by the name in ``tokenizer.ggml.pre``, so that name is read off the pre-tokenizer's
structure here (``PRE_TOKENIZERS``), and an unknown structure is an error rather than a silent default, which
llama.cpp would tokenize differently. SentencePiece-style vocabularies (Llama 2, Mistral v0.1) are refused.
"""

from __future__ import annotations

import json
from typing import Any

from gguf import GGUFWriter, TokenType
from transformers import PreTrainedTokenizerBase

# tokenizers' regexes as they appear in tokenizer.json (Llama 3 and Qwen2 split with their own regex, then map
# bytes without the GPT-2 regex).
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = _CONTRACTIONS + r"\p{N}{1,3}" + _REST  # digits in runs of up to three
QWEN2_REGEX = _CONTRACTIONS + r"\p{N}" + _REST  # digits one by one
# A pre-tokenizer's steps (see _steps) -> llama.cpp's name for the same splitting (src/llama-vocab.cpp).
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("byte-level+gpt2-regex",): "gpt-2",
    ("digits", "byte-level+gpt2-regex"): "smollm",
    (f"split {LLAMA3_REGEX}", "byte-level"): "llama-bpe",
    (f"split {QWEN2_REGEX}", "byte-level"): "qwen2",
}


def _steps(pre: dict[str, Any] | None) -> tuple[str, ...]:
    """A pre-tokenizer of tokenizer.json as a flat list of comparable steps."""
    if pre is None:
        return ()
    kind = pre["type"]
    if kind == "Sequence":
        return tuple(step for inner in pre["pretokenizers"] for step in _steps(inner))
    if kind == "ByteLevel":
        regex = "+gpt2-regex" if pre.get("use_regex", True) else ""
        prefix = "+prefix-space" if pre.get("add_prefix_space") else ""
        return (f"byte-level{regex}{prefix}",)
    if kind == "Digits":
        return ("digits" if pre.get("individual_digits") else "digit-runs",)
    if kind == "Split":
        pattern = pre["pattern"].get("Regex", pre["pattern"].get("String"))
        plain = pre.get("behavior") == "Isolated" and not pre.get("invert")
        return (
            f"split {pattern}" if plain else f"split {pattern} ({pre.get('behavior')}, invert={pre.get('invert')})",
        )
    return (kind.lower(),)


def _serialized(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: GGUF export reads its tokenizer.json")
    return json.loads(backend.to_str())


def pre_tokenizer_name(tokenizer: PreTrainedTokenizerBase, override: str | None = None) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the tokenizer's byte-level pre-tokenizer, or ``override``."""
    serialized = _serialized(tokenizer)
    steps = _steps(serialized["pre_tokenizer"])
    kind = serialized["model"]["type"]
    if kind != "BPE" or not any(step.startswith("byte-level") for step in steps):
        raise ValueError(
            f"GGUF export writes byte-level BPE vocabularies only; this tokenizer is {kind} with pre-tokenizer "
            f"{' + '.join(steps) or 'none'} (SentencePiece-style vocabularies are not supported)"
        )
    if override:
        return override
    if tuple(steps) not in PRE_TOKENIZERS:
        raise ValueError(
            f"unknown byte-level pre-tokenizer {' + '.join(steps)}: pass pre_tokenizer= with llama.cpp's name for it "
            f"(tokenizer.ggml.pre; known here: {', '.join(PRE_TOKENIZERS.values())})"
        )
    return PRE_TOKENIZERS[tuple(steps)]


def _tokens(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token texts by id and their types, padded to the model's ``vocab_size`` with unused slots."""
    by_id = {index: text for text, index in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has token id {max(by_id)}, past the model's vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder
    texts, types = [], []
    for index in range(vocab_size):
        text = by_id.get(index)
        texts.append(f"[PAD{index}]" if text is None else text)
        types.append(_token_type(text, added.get(index)))
    return texts, types


def _token_type(text: str | None, added: Any) -> int:
    if text is None:
        return TokenType.UNUSED
    if added is None:
        return TokenType.NORMAL
    # As llama.cpp's converter does: "<|...|>" added tokens act as control tokens even when not marked special.
    control = added.special or (text.startswith("<|") and text.endswith("|>"))
    return TokenType.CONTROL if control else TokenType.USER_DEFINED


def _merges(serialized: dict[str, Any]) -> list[str]:
    # tokenizers >= 0.20 writes merges as pairs, older versions as "left right" strings; GGUF wants the latter.
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in serialized["model"]["merges"]]


def _adds_specials(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, bool]:
    """Whether encoding prepends BOS / appends EOS, read off what the tokenizer does rather than its flags."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos = len(full) > len(plain) and tokenizer.bos_token_id is not None and full[0] == tokenizer.bos_token_id
    eos = len(full) > len(plain) and tokenizer.eos_token_id is not None and full[-1] == tokenizer.eos_token_id
    return bos, eos


def add_vocab(
    writer: GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int, pre_tokenizer: str | None = None
) -> str:
    """Write the tokenizer into ``writer``; returns the ``tokenizer.ggml.pre`` name written."""
    pre = pre_tokenizer_name(tokenizer, pre_tokenizer)
    texts, types = _tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(texts)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(_serialized(tokenizer)))
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):  # fmt: skip
        if (index := getattr(tokenizer, f"{role}_token_id", None)) is not None:
            add(index)
    add_bos, add_eos = _adds_specials(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)
    return pre
