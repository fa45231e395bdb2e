"""Check that the tiny random-weight GGUF fixture loads and runs in llama.cpp."""

from __future__ import annotations

import itertools

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

try:  # tests/ on sys.path (rootdir-style, no tests/__init__.py)
    from tiny_gguf import MODEL_NAME, SPECIAL_TOKENS, build_vocab, write_tiny_gguf
except ImportError:  # tests is a package
    from tests.tiny_gguf import MODEL_NAME, SPECIAL_TOKENS, build_vocab, write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def llm(tiny_model_path):
    model = llama_cpp.Llama(
        model_path=str(tiny_model_path), n_ctx=512, verbose=False, n_threads=1
    )
    yield model
    model.close()


def test_file_is_small_and_deterministic(tiny_model_path, tmp_path):
    assert tiny_model_path.stat().st_size < 2 * 1024 * 1024
    again = write_tiny_gguf(tmp_path / "again.gguf")
    assert again.read_bytes() == tiny_model_path.read_bytes()
    other_seed = write_tiny_gguf(tmp_path / "seed1.gguf", seed=1)
    assert other_seed.read_bytes() != tiny_model_path.read_bytes()


def test_metadata(llm):
    assert llm.metadata["general.architecture"] == "qwen2"
    assert llm.metadata["general.name"] == MODEL_NAME
    assert llm.metadata["tokenizer.ggml.model"] == "gpt2"
    assert llm.metadata["tokenizer.ggml.pre"] == "qwen2"
    assert llm.n_vocab() == len(build_vocab()[0])
    assert llm.n_ctx() == 512


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_special_token_is_single_control_token(llm, special):
    text = special.encode()
    ids = llm.tokenize(text, add_bos=False, special=True)
    assert ids == [build_vocab()[0].index(special)]
    # Without special parsing the marker is ordinary text.
    plain = llm.tokenize(text, add_bos=False, special=False)
    assert len(plain) > 1
    assert llm.detokenize(plain) == text


def test_eos_is_endoftext(llm):
    eos = llm.token_eos()
    assert llm.detokenize([eos], special=True) == b"<|endoftext|>"
    # Control tokens render as nothing unless special rendering is asked for.
    assert llm.detokenize([eos]) == b""


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n    return 'é€😀'\n",
        "\tif x == y:\r\n\t\tprint(\"\\u00e9\", 0x1F600)\n\n",
        "".join(chr(c) for c in range(1, 128)),
        "中文 русский العربية 🧪🐍",
    ],
)
def test_unicode_round_trip(llm, text):
    data = text.encode("utf-8")
    ids = llm.tokenize(data, add_bos=False, special=False)
    assert ids
    assert llm.detokenize(ids) == data


def test_merges_are_applied(llm):
    # " the" and " return" are single tokens only if the BPE merges are used.
    assert len(llm.tokenize(b" the", add_bos=False)) == 1
    assert len(llm.tokenize(b" return", add_bos=False)) == 1
    assert len(llm.tokenize(b"def f(x):\n    return x\n", add_bos=False)) < len(
        b"def f(x):\n    return x\n"
    )


def test_fim_generate(llm):
    vocab = build_vocab()[0]
    pre, suf, mid = (vocab.index(t) for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))
    prompt = (
        [pre]
        + llm.tokenize(b"def add(a, b):\n    ", add_bos=False)
        + [suf]
        + llm.tokenize(b"\n\nprint(add(1, 2))\n", add_bos=False)
        + [mid]
    )

    def run() -> list[int]:
        llm.reset()
        return list(itertools.islice(llm.generate(prompt, temp=0.0), 8))

    out = run()
    assert len(out) == 8
    assert all(0 <= t < llm.n_vocab() for t in out)
    assert run() == out  # greedy decoding is deterministic
    # The fixture's LM head makes greedy output visible ASCII, never control.
    assert not set(out) & {vocab.index(t) for t in SPECIAL_TOKENS}
    text = llm.detokenize(out).decode("ascii")
    assert text
    assert all(c == "\n" or c.isprintable() for c in text)


def test_create_completion(llm):
    result = llm.create_completion("def add(a, b):", max_tokens=6, temperature=0.0)
    assert result["usage"]["completion_tokens"] == 6
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["choices"][0]["text"]
