"""The model's tokenizer, rebuilt from a GGUF's `tokenizer.ggml.*` metadata, and its chat format.

SmolLM2 uses byte-level BPE (GPT-2 style: bytes mapped to printable characters, `Ġ` for a space)
after splitting every digit into its own piece. llama.cpp names that pre-tokenizer "smollm"
(shared with starcoder, refact and codeshell): the regex `\\p{N}` first, then the GPT-2 regex.
In `tokenizers` terms that is `Digits(individual_digits=True)` followed by
`ByteLevel(add_prefix_space=False)`, which is what HF's own tokenizer.json for SmolLM2 holds.
Tokens of type CONTROL or USER_DEFINED (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, ...) are
added tokens, matched whole in the text before BPE runs.

`apply_chat_template` renders SmolLM2's ChatML template in plain Python (no jinja); it refuses
any other template rather than guess at it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import tokenizers
from gguf.constants import TokenType
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from specc.models.gguf_loader import GGUFError, GGUFFile, open_gguf

# SmolLM2-135M-Instruct's tokenizer.chat_template, verbatim (its '\n' are real newlines inside
# the jinja string literals).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) whose split is "each digit alone, then GPT-2".
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}
_GPT2_PRE = {"gpt2", "default"}


def _pre_tokenizer(pre: str, source: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _GPT2_PRE:
        return byte_level
    raise GGUFError(
        f"{source} uses the pre-tokenizer {pre!r}; specc rebuilds only "
        f"{sorted(_DIGIT_SPLIT_PRE | _GPT2_PRE)}"
    )


class Tokenizer:
    """Byte-level BPE tokenizer plus SmolLM2's ChatML chat format.

    `encode` recognises special tokens written in the text (as HF does), so a rendered chat
    template tokenizes with `<|im_start|>` as one token. `decode` keeps special tokens unless
    asked to skip them, so `decode(encode(text)) == text`.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_id: int,
        bos_id: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.chat_template = chat_template

    @classmethod
    def from_gguf(cls, source: str | os.PathLike[str] | GGUFFile) -> Tokenizer:
        """Rebuild the tokenizer stored in a GGUF (`tokenizer.ggml.model == "gpt2"`, i.e. BPE)."""
        gf = open_gguf(source)
        kind = gf.metadata("tokenizer.ggml.model", required=True)
        if kind != "gpt2":
            raise GGUFError(f"{gf.path} has a {kind!r} tokenizer; specc rebuilds only byte-level BPE ('gpt2')")
        tokens: list[str] = gf.metadata("tokenizer.ggml.tokens", required=True)
        merge_lines: list[str] = gf.metadata("tokenizer.ggml.merges", required=True)
        token_types: list[int] = gf.metadata("tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens))
        if len(token_types) != len(tokens):
            raise GGUFError(
                f"{gf.path} has {len(tokens)} tokens but {len(token_types)} token types; the file is inconsistent"
            )

        vocab: dict[str, int] = {}
        for token_id, token in enumerate(tokens):
            # A string listed twice (padding entries in some conversions) keeps its first id.
            vocab.setdefault(token, token_id)
        merges = []
        for line in merge_lines:
            pair = line.split(" ")
            if len(pair) != 2:
                raise GGUFError(f"{gf.path}: merge {line!r} is not two tokens separated by one space")
            merges.append((pair[0], pair[1]))

        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = _pre_tokenizer(gf.metadata("tokenizer.ggml.pre", "default"), str(gf.path))
        backend.decoder = decoders.ByteLevel()
        added = [
            AddedToken(token, special=kind == TokenType.CONTROL, normalized=False)
            for token, kind in zip(tokens, token_types)
            if kind in (TokenType.CONTROL, TokenType.USER_DEFINED)
        ]
        backend.add_special_tokens([t for t in added if t.special])
        backend.add_tokens([t for t in added if not t.special])

        eos_id = gf.metadata("tokenizer.ggml.eos_token_id", required=True)
        return cls(
            backend,
            eos_id=eos_id,
            bos_id=gf.metadata("tokenizer.ggml.bos_token_id"),
            chat_template=gf.metadata("tokenizer.chat_template"),
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS is added (SmolLM2's GGUF sets add_bos_token = false)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) as SmolLM2's template does.

        Each message becomes `<|im_start|>{role}\\n{content}<|im_end|>\\n`; when the first message is
        not a system message, SmolLM2's default system message comes first; with
        `add_generation_prompt`, `<|im_start|>assistant\\n` ends the prompt.
        """
        if self.chat_template != SMOLLM2_CHAT_TEMPLATE:
            shown = "none" if self.chat_template is None else repr(self.chat_template[:120]) + "..."
            raise ValueError(
                f"this model's chat template is not SmolLM2's ChatML template, the only one specc "
                f"renders (found: {shown}); format the prompt yourself and call encode()"
            )
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise ValueError(
                    f"message {index} is {message!r}; each message must be a dict with string "
                    f"'role' and 'content'"
                )
        parts = []
        if messages and messages[0]["role"] != "system":
            parts.append(f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM}<|im_end|>\n")
        parts.extend(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    def encode_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat prompt."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))
