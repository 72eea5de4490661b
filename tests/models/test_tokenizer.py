"""Tests for specc/models/tokenizer.py: a synthetic byte-level BPE GGUF, the chat template, the real one."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from gguf.constants import TokenType
from tokenizers import pre_tokenizers

from specc.models.fetch import fetch_default_gguf
from specc.models.gguf_loader import GGUFError
from specc.models.tokenizer import SMOLLM2_CHAT_TEMPLATE, Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "1 2"]


def write_tokenizer_gguf(
    path: Path, model: str = "gpt2", pre: str = "smollm", template: str | None = SMOLLM2_CHAT_TEMPLATE
) -> Path:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = ["".join(m.split(" ")) for m in MERGES]
    tokens = SPECIALS + alphabet + merged
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL] * len(SPECIALS) + [TokenType.NORMAL] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if template is not None:
        writer.add_chat_template(template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_tokenizer(tmp_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "tok.gguf"))


def test_merges_apply_and_special_tokens_stay_whole(tiny_tokenizer: Tokenizer) -> None:
    hello = tiny_tokenizer.token_to_id("hello")
    assert tiny_tokenizer.encode("hello") == [hello]
    assert tiny_tokenizer.encode("<|im_start|>hello<|im_end|>") == [1, hello, 2]
    assert tiny_tokenizer.encode(" w") == [tiny_tokenizer.token_to_id("Ġw")]
    assert tiny_tokenizer.eos_id == 2 and tiny_tokenizer.bos_id == 1


@pytest.mark.parametrize(
    "text", ["hello world", "  two  spaces\n\ttab", "digits 12345", "é日本🙂", "<|im_end|>x", ""]
)
def test_decode_inverts_encode(tiny_tokenizer: Tokenizer, text: str) -> None:
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_decode_can_skip_special_tokens(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode("<|im_start|>hello<|im_end|>")
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "hello"


def test_smollm_pre_tokenizer_splits_digits_and_gpt2_does_not(tmp_path: Path) -> None:
    smollm = Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "smollm.gguf", pre="smollm"))
    gpt2 = Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "gpt2.gguf", pre="gpt2"))
    assert smollm.encode("12") == [smollm.token_to_id("1"), smollm.token_to_id("2")]
    assert gpt2.encode("12") == [gpt2.token_to_id("12")]


@pytest.mark.parametrize(
    "model,pre,message", [("llama", "smollm", "'llama' tokenizer"), ("gpt2", "llama-bpe", "'llama-bpe'")]
)
def test_unsupported_tokenizers_are_refused(tmp_path: Path, model: str, pre: str, message: str) -> None:
    with pytest.raises(GGUFError, match=message):
        Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "t.gguf", model=model, pre=pre))


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!\nHow can I help?"},
        {"role": "user", "content": "2+2?"},
    ],
    [{"role": "user", "content": ""}, {"role": "system", "content": "late system"}],
    [],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_jinja_rendering(
    tiny_tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool
) -> None:
    sandbox = pytest.importorskip("jinja2.sandbox")
    # The environment transformers renders chat templates with.
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(SMOLLM2_CHAT_TEMPLATE)
    expected = template.render(messages=messages, add_generation_prompt=add_generation_prompt)
    assert tiny_tokenizer.apply_chat_template(messages, add_generation_prompt) == expected


def test_chat_prompt_starts_with_the_default_system_message(tiny_tokenizer: Tokenizer) -> None:
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_other_chat_templates_are_refused(tmp_path: Path) -> None:
    tok = Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "t.gguf", template="{{ messages }}"))
    with pytest.raises(ValueError, match="not SmolLM2's ChatML"):
        tok.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_malformed_messages_are_named(tiny_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="message 1"):
        tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "user"}])


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(fetch_default_gguf(progress=False))


REAL_TEXTS = [
    "The capital of France is Paris.",
    "def f(x):\n    return x ** 2  # square\n\n",
    "Ünïcödé, 日本語, emoji 🙂 and   odd\tspacing\r\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "Numbers: 3.14159, 2025-01-01, 1,000,000",
]


@pytest.mark.real_model
@pytest.mark.parametrize("text", REAL_TEXTS)
def test_smollm2_decode_inverts_encode(smollm2_tokenizer: Tokenizer, text: str) -> None:
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text)) == text


@pytest.mark.real_model
def test_smollm2_token_ids_match_hf(smollm2_tokenizer: Tokenizer) -> None:
    # Ids as HF's SmolLM2 tokenizer gives them; digits are single tokens after a lone "Ġ".
    assert smollm2_tokenizer.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert smollm2_tokenizer.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    assert smollm2_tokenizer.encode("  multiple   spaces") == [216, 2701, 256, 5600]


@pytest.mark.real_model
def test_smollm2_chat_prompt_tokenizes_with_whole_special_tokens(smollm2_tokenizer: Tokenizer) -> None:
    assert smollm2_tokenizer.chat_template == SMOLLM2_CHAT_TEMPLATE
    assert smollm2_tokenizer.eos_id == 2 == smollm2_tokenizer.token_to_id("<|im_end|>")
    im_start = smollm2_tokenizer.token_to_id("<|im_start|>")
    assert im_start == 1
    ids = smollm2_tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert ids[:3] == [im_start, smollm2_tokenizer.token_to_id("system"), smollm2_tokenizer.token_to_id("Ċ")]
    assert ids.count(im_start) == 3 and ids.count(smollm2_tokenizer.eos_id) == 2
    # "assistant" with no space before it is two BPE pieces ("ass", "istant"), as in HF.
    assert ids[-4] == im_start and smollm2_tokenizer.decode(ids[-3:]) == "assistant\n"
