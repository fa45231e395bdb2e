"""Build a tiny random-weight GGUF model that looks like Qwen2.5-Coder.

The model is meant for fast CI runs: its output is nonsense, but loading,
tokenizing (byte-level BPE with the Qwen2 pre-tokenizer), FIM special tokens
and the full qwen2 forward pass in llama.cpp are all exercised.

Only ``gguf`` and ``numpy`` are needed to write it; ``llama_cpp`` is not
imported here.

Typical use in ``conftest.py``::

    @pytest.fixture(scope="session")
    def tiny_gguf(tmp_path_factory):
        return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

__all__ = [
    "MODEL_NAME",
    "SPECIAL_TOKENS",
    "byte_to_unicode",
    "build_vocab",
    "tiny_gguf_path",
    "write_tiny_gguf",
]

MODEL_NAME = "tiny-qwen2-fim-test"

# Hyper-parameters (kept tiny so the file stays well under 2 MB).
N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
N_CTX_TRAIN = 2048
ROPE_FREQ_BASE = 1_000_000.0
RMS_EPS = 1e-6

# Special tokens, in the same relative order as the real Qwen2.5-Coder vocab.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Merge rules, highest priority first, written with the GPT-2 byte->unicode
# alphabet ("Ġ" is a space, "Ċ" a newline).  Each side must be a byte token
# or the result of an earlier merge; results are appended to the vocabulary.
_MERGES: tuple[tuple[str, str], ...] = (
    ("Ġ", "t"), ("Ġ", "a"), ("h", "e"), ("i", "n"), ("r", "e"),
    ("o", "n"), ("e", "r"), ("Ġ", "s"), ("a", "t"), ("Ġ", "w"),
    ("Ġ", "o"), ("e", "n"), ("Ġ", "c"), ("i", "t"), ("i", "s"),
    ("a", "n"), ("o", "r"), ("e", "s"), ("Ġ", "b"), ("e", "d"),
    ("Ġ", "f"), ("in", "g"), ("Ġ", "p"), ("o", "u"), ("a", "l"),
    ("a", "r"), ("Ġ", "m"), ("Ġ", "d"), ("Ġ", "h"), ("i", "c"),
    ("a", "s"), ("l", "e"), ("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"), ("Ġ", "i"),
    ("Ġ", "r"), ("Ġ", "n"), ("Ġ", "l"), ("Ġt", "he"), ("Ġa", "n"),
    ("Ġan", "d"), ("Ġt", "o"), ("Ġo", "f"), ("Ġ", "in"), ("i", "on"),
    ("e", "f"), ("Ġd", "ef"), ("u", "r"), ("ur", "n"), ("Ġ", "re"),
    ("t", "urn"), ("Ġre", "turn"), ("Ċ", "Ċ"), ("(", ")"), (")", ":"),
    ("Ġ", "="), ("s", "e"), ("l", "f"), ("se", "lf"), ("i", "f"),
    ("Ġ", "if"), ("p", "r"), ("in", "t"), ("pr", "int"), ("Ġ", "print"),
    ("ĠĠĠĠ", "ĠĠĠĠ"), ("Ġ", "x"), ("Ġ", "y"), ("=", "="), ("Ġ", "=="),
)

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible mapping from the 256 byte values to printable chars.

    Printable Latin-1 bytes map to themselves; every other byte is assigned,
    in increasing byte order, the next code point starting at U+0100.
    """
    keep = (
        set(range(ord("!"), ord("~") + 1))
        | set(range(ord("¡"), ord("¬") + 1))
        | set(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_vocab(vocab_extra: bool = True) -> tuple[list[str], list[int], list[str]]:
    """Return ``(tokens, token_types, merges)`` for the tiny tokenizer.

    Layout: the 256 byte tokens (ordered like GPT-2: printable ones first),
    then the merge results, then the special tokens.  ``vocab_extra=False``
    keeps only the first merge (``"Ġ Ġ"``).
    """
    b2u = byte_to_unicode()
    # GPT-2 / Qwen order: the self-mapped printable bytes first, then the rest.
    byte_tokens = sorted(b2u.values(), key=ord)
    tokens: list[str] = list(byte_tokens)
    types: list[int] = [int(gguf.TokenType.NORMAL)] * len(tokens)
    merges: list[str] = []

    # llama.cpp refuses a "gpt2" tokenizer without a tokenizer.ggml.merges
    # key, and GGUFWriter cannot write an empty array, so even the minimal
    # vocabulary keeps one merge.
    known = set(tokens)
    for left, right in (_MERGES if vocab_extra else _MERGES[:1]):
        if left not in known or right not in known:
            raise AssertionError(f"merge {left!r} {right!r} uses an unknown token")
        merged = left + right
        merges.append(f"{left} {right}")
        if merged not in known:
            known.add(merged)
            tokens.append(merged)
            types.append(int(gguf.TokenType.NORMAL))

    for special in SPECIAL_TOKENS:
        tokens.append(special)
        types.append(int(gguf.TokenType.CONTROL))

    if len(set(tokens)) != len(tokens):
        raise AssertionError("duplicate tokens in vocabulary")
    return tokens, types, merges


def _random(rng: np.random.Generator, *shape: int, std: float = 0.02) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16)


def _output_head(rng: np.random.Generator, tokens: list[str], types: list[int]) -> np.ndarray:
    """Random LM head whose rows are zero for tokens greedy decoding must avoid."""
    u2b = {u: b for b, u in byte_to_unicode().items()}
    visible = {0x0A} | set(range(0x20, 0x7F))  # newline + printable ASCII
    head = rng.standard_normal((len(tokens), N_EMBD), dtype=np.float32)
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ != gguf.TokenType.NORMAL or any(u2b[ch] not in visible for ch in tok):
            head[i] = 0.0
    return (head * 0.02).astype(np.float16)


def write_tiny_gguf(path: Path, *, seed: int = 0, vocab_extra: bool = True, chat_template: str | None = None) -> Path:
    """Write the tiny qwen2 model to ``path`` and return ``path``.

    The output is byte-for-byte deterministic for a given ``seed`` and
    ``vocab_extra``.  With ``vocab_extra=False`` the vocabulary holds only
    the 256 byte tokens, one merge (``"Ġ Ġ"``: llama.cpp needs the merges key and
    GGUFWriter cannot write an empty array) and the special tokens.

    Matrices are stored as F16 and 1-D tensors (norms, biases) as F32, like a
    real "f16" conversion.

    The output head is a separate ``output.weight`` (not tied to
    ``token_embd``): with tiny random weights a tied head just echoes the
    last input token, so a FIM prompt (ending in ``<|fim_middle|>``) would
    "complete" with an endless run of invisible control tokens.  Rows of the
    head for control tokens and for byte tokens other than printable ASCII,
    space and newline are zero, while the others are random, so greedy
    decoding always yields visible ASCII text and never an end-of-generation
    token (sampling with temperature can still pick any token).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    tokens, types, merges = build_vocab(vocab_extra)
    n_vocab = len(tokens)
    special_id = {tok: tokens.index(tok) for tok in SPECIAL_TOKENS}
    head_dim = N_EMBD // N_HEAD
    n_embd_kv = head_dim * N_HEAD_KV

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    try:
        # --- general ----------------------------------------------------
        writer.add_name(MODEL_NAME)
        writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        # --- hyper-parameters -------------------------------------------
        writer.add_context_length(N_CTX_TRAIN)
        writer.add_embedding_length(N_EMBD)
        writer.add_block_count(N_LAYER)
        writer.add_feed_forward_length(N_FF)
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv(N_HEAD_KV)
        writer.add_rope_freq_base(ROPE_FREQ_BASE)
        writer.add_layer_norm_rms_eps(RMS_EPS)

        # --- tokenizer ----------------------------------------------------
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        eot = special_id["<|endoftext|>"]
        writer.add_bos_token_id(eot)
        writer.add_eos_token_id(eot)
        writer.add_pad_token_id(eot)
        writer.add_add_bos_token(False)
        tk = gguf.Keys.Tokenizer
        writer.add_uint32(tk.FIM_PRE_ID, special_id["<|fim_prefix|>"])
        writer.add_uint32(tk.FIM_SUF_ID, special_id["<|fim_suffix|>"])
        writer.add_uint32(tk.FIM_MID_ID, special_id["<|fim_middle|>"])
        writer.add_uint32(tk.FIM_PAD_ID, special_id["<|fim_pad|>"])
        writer.add_uint32(tk.FIM_REP_ID, special_id["<|repo_name|>"])
        writer.add_uint32(tk.FIM_SEP_ID, special_id["<|file_sep|>"])
        writer.add_chat_template(_CHAT_TEMPLATE if chat_template is None else chat_template)

        # --- tensors (numpy shapes are the reverse of ggml's ne[]) --------
        writer.add_tensor("token_embd.weight", _random(rng, n_vocab, N_EMBD))
        writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor("output.weight", _output_head(rng, tokens, types))
        for i in range(N_LAYER):
            p = f"blk.{i}"
            writer.add_tensor(f"{p}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
            writer.add_tensor(f"{p}.attn_q.weight", _random(rng, N_EMBD, N_EMBD))
            writer.add_tensor(f"{p}.attn_q.bias", _random(rng, N_EMBD).astype(np.float32))
            writer.add_tensor(f"{p}.attn_k.weight", _random(rng, n_embd_kv, N_EMBD))
            writer.add_tensor(f"{p}.attn_k.bias", _random(rng, n_embd_kv).astype(np.float32))
            writer.add_tensor(f"{p}.attn_v.weight", _random(rng, n_embd_kv, N_EMBD))
            writer.add_tensor(f"{p}.attn_v.bias", _random(rng, n_embd_kv).astype(np.float32))
            writer.add_tensor(f"{p}.attn_output.weight", _random(rng, N_EMBD, N_EMBD))
            writer.add_tensor(f"{p}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
            writer.add_tensor(f"{p}.ffn_gate.weight", _random(rng, N_FF, N_EMBD))
            writer.add_tensor(f"{p}.ffn_up.weight", _random(rng, N_FF, N_EMBD))
            writer.add_tensor(f"{p}.ffn_down.weight", _random(rng, N_EMBD, N_FF))

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def tiny_gguf_path(tmp_path_factory) -> Path:
    """Helper for a session-scoped pytest fixture (pass ``tmp_path_factory``)."""
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
