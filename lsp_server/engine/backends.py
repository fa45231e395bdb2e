"""What runs inside the model worker: the llama.cpp backend and a scripted fake for tests.

A backend's `generate` calls `should_stop()` between prefill chunks and after every token, so a
cancelled or superseded request stops within one token step.
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import json
import logging
import os
import re
import time
from typing import Callable

from ..cache import model_fingerprint
from ..hardware import plan_for_file
from ..prompts import build_prompt_tokens
from .generation import TextAccumulator
from .protocol import GenerationRequest, GenerationResult

log = logging.getLogger("offpilot.worker")

ShouldStop = Callable[..., str | None]
"""Returns a finish reason ("cancelled", ...) when generation must stop, else None."""


_HEALABLE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ \t")


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


class LlamaBackend:
    def __init__(self, config: dict, on_plan: Callable[[dict], None] | None = None) -> None:
        from llama_cpp import Llama, llama_cpp  # imported here: the server process never loads llama.cpp

        self._llama_cpp = llama_cpp
        self.chunk = max(8, int(config.get("prefill_chunk_tokens", 128)))
        self.action_chunk = max(4, int(config.get("action_prefill_chunk_tokens", 16)))
        # The server kills a worker that shows no progress for hang_timeout_s, and progress shows between
        # prompt chunks: a chunk must take well under that, also for a 7B model on two CPU cores (~10 tokens/s:
        # 128 tokens would take 13 s). So chunks are sized from the measured prompt speed.
        hang_s = float(config.get("hang_timeout_s") or 0)
        self.chunk_target_s = hang_s / 4 if hang_s > 0 else 0.0
        self.prefill_tokens_per_s: float | None = None
        self.reuse_kv_cache = bool(config.get("reuse_kv_cache", True))
        self.model_path = config["model_path"]
        self.plan, _, _ = plan_for_file(
            config["model_path"], n_ctx=int(config.get("n_ctx") or 0), n_gpu_layers=int(config.get("n_gpu_layers", -1)),
            vram_budget_mb=int(config.get("vram_budget_mb") or 0), n_threads=int(config.get("n_threads") or 0),
        )
        log.info("plan: %s (%s)", self.plan.summary(), "; ".join(self.plan.reasons))
        if on_plan is not None:
            on_plan(self.plan.to_dict())  # before loading: an out-of-memory abort leaves no other trace
        try:
            self.llm = Llama(
                model_path=config["model_path"],
                n_batch=max(self.chunk, 512),
                verbose=bool(config.get("verbose", False)),
                **self.plan.llama_kwargs(),
            )
        except ValueError as exc:
            # llama.cpp says only "Failed to load model from file"; the header reader said why.
            header = [r for r in self.plan.reasons if r.startswith("the GGUF header could not be read")]
            raise ValueError(f"{exc} ({header[0]})" if header else str(exc)) from None
        self.vocab = self.llm._model.vocab
        # Once per load (about 0.7 s for a 150k vocabulary): the tokens that end a text, and those that start
        # with a closing bracket (in a block, one closes something opened before the cursor: the block ends).
        is_eog = llama_cpp.llama_vocab_is_eog
        self.end_token_ids: set[int] = set()
        self.closer_token_ids: set[int] = set()
        self._pieces: list[bytes] = []
        """Each token's bytes, for healing the prompt's last token."""
        self._by_first_byte: dict[int, list[int]] = {}
        for t in range(self.llm.n_vocab()):
            piece = self.llm.detokenize([t])
            self._pieces.append(piece)
            if is_eog(self.vocab, t):
                self.end_token_ids.add(t)
                continue
            if piece.lstrip()[:1] in (b")", b"]", b"}"):
                self.closer_token_ids.add(t)
            if piece:
                self._by_first_byte.setdefault(piece[0], []).append(t)
        self.lane = "completion"
        self._parked: dict[str, tuple[bytes, list[int]]] = {}
        self._finished_lanes: set[str] = set()

    def _logits_processor(self, req: GenerationRequest, prompt_len: int, stop_ids: set[int], heal: bytes):
        """Forbid ending the text during the first `req.min_tokens` tokens after the healed text (in a block, a
        leading closing bracket ends it too: the bracket rule cuts the suggestion there); and while the healed
        text is not yet written out, allow only tokens that continue it."""
        processors = []
        if req.min_tokens > 0:
            banned = sorted(self.end_token_ids | stop_ids | (set() if req.single_line else self.closer_token_ids))

            def forbid_end(input_ids, scores):
                # The healed text is the user's, not the model's: the count starts after it.
                if len(input_ids) - prompt_len < req.min_tokens or (heal and len(self._written(input_ids, prompt_len)) <= len(heal)):
                    scores[banned] = -float("inf")
                return scores

            processors.append(forbid_end)
        if heal:

            def continue_healed(input_ids, scores):
                written = self._written(input_ids, prompt_len)
                if len(written) >= len(heal):
                    return scores
                rest = heal[len(written):]
                allowed = [t for t in self._by_first_byte.get(rest[0], ())
                           if self._pieces[t].startswith(rest) or rest.startswith(self._pieces[t])]
                kept = scores[allowed].copy()
                scores[:] = -float("inf")
                scores[allowed] = kept
                return scores

            processors.append(continue_healed)
        if not processors:
            return None
        from llama_cpp import LogitsProcessorList

        return LogitsProcessorList(processors)

    def _written(self, input_ids, prompt_len: int) -> bytes:
        return b"".join(self._pieces[t] for t in input_ids[prompt_len:])

    def _heal(self, req: GenerationRequest, prompt: list[int]) -> int:
        """How many tokens to take back from the end of a prompt that ends with plain text: the pieces of the
        last word with the whitespace before it (at most 3 tokens; punctuation is left alone, the bracket rules
        count what the model writes). "    retu" may be tokens "   ", " ret", "u": " ret" + "u" go back and
        the model writes " return" as it would have without the cursor there."""
        if not req.heal_last_token or not req.segments or req.segments[-1].special:
            return 0
        count = 0
        for t in reversed(prompt[-3:]):
            piece = self._pieces[t] if 0 <= t < len(self._pieces) else b""
            if not piece or not all(c in _HEALABLE for c in piece):
                break
            count += 1
            if piece[:1] in (b" ", b"\t"):
                break
        return min(count, len(prompt) - 1)

    def _note_prefill_speed(self, tokens: int, seconds: float) -> None:
        if tokens >= 8 and seconds > 0:
            rate = tokens / seconds
            self.prefill_tokens_per_s = rate if self.prefill_tokens_per_s is None else 0.7 * self.prefill_tokens_per_s + 0.3 * rate

    def info(self, probe_tokens: list[str]) -> dict:
        meta = dict(self.llm.metadata)
        present = []
        for tok in probe_tokens:
            raw = tok.encode("utf-8")
            special = self.llm.tokenize(raw, add_bos=False, special=True)
            if len(special) == 1 and self.llm.tokenize(raw, add_bos=False, special=False) != special:
                present.append(tok)
        return {
            "architecture": meta.get("general.architecture", ""),
            "name": meta.get("general.name", ""),
            "special_tokens": present,
            "n_ctx": self.llm.n_ctx(),
            "plan": self.plan.to_dict(),
            "n_vocab": self.llm.n_vocab(),
            "fingerprint": model_fingerprint(self.model_path),
        }

    def _tokenize_text(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else []

    def _tokenize_special(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) if text else []

    # ---- lanes: one model, a saved KV state per kind of work ------------------------------------------
    def _use_lane(self, lane: str) -> None:
        """Make `lane`'s tokens the context's: park the current lane's KV cells (sequence 0) and its token
        list, and bring back the wanted lane's. An action that yields to a completion thus resumes
        without evaluating its prompt again, and the completion keeps its own prefix for reuse."""
        if lane == self.lane:
            return
        llm, lc = self.llm, self._llama_cpp
        if self.lane not in self._finished_lanes and llm.n_tokens > 0:
            size = lc.llama_state_seq_get_size(llm._ctx.ctx, 0)
            buffer = (ctypes.c_uint8 * size)()
            written = lc.llama_state_seq_get_data(llm._ctx.ctx, buffer, size, 0)
            self._parked[self.lane] = (ctypes.string_at(buffer, written), llm._input_ids[: llm.n_tokens].tolist())
        llm._ctx.kv_cache_seq_rm(0, 0, -1)
        llm.n_tokens = 0
        parked = self._parked.pop(lane, None)
        if parked is not None:
            data, tokens = parked
            buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
            if lc.llama_state_seq_set_data(llm._ctx.ctx, buffer, len(data), 0) == len(data):
                llm.input_ids[: len(tokens)] = tokens
                llm.n_tokens = len(tokens)
            else:
                llm._ctx.kv_cache_seq_rm(0, 0, -1)
        self.lane = lane

    def generate(self, req: GenerationRequest, should_stop: ShouldStop) -> GenerationResult:
        llm = self.llm
        started = time.perf_counter()
        self._use_lane(req.lane)
        self._finished_lanes.discard(req.lane)
        bos = [llm.token_bos()] if req.add_bos and llm.token_bos() >= 0 else []
        prompt = build_prompt_tokens(
            req.segments, tokenize_text=self._tokenize_text, tokenize_special=self._tokenize_special, bos=bos,
            max_prompt_tokens=req.max_prompt_tokens,
        ).tokens
        healed_tokens = self._heal(req, prompt)
        heal = b"".join(self._pieces[t] for t in prompt[len(prompt) - healed_tokens:]) if healed_tokens else b""
        prompt = prompt[: len(prompt) - healed_tokens]
        prompt_len = len(prompt)
        prompt = prompt + list(req.resume_tokens)
        room = llm.n_ctx() - (req.max_tokens - len(req.resume_tokens))
        if len(prompt) > room:
            return GenerationResult(finish="error", error=f"prompt of {prompt_len} tokens does not fit n_ctx")
        stop_ids = set()
        for s in req.stop:
            ids = self._tokenize_special(s)
            if len(ids) == 1:
                stop_ids.add(ids[0])

        def yielded(text: str, tokens: list[int]) -> GenerationResult:
            return GenerationResult(text=text, finish="yielded", tokens=tokens, prompt_tokens=prompt_len, reused_tokens=reused)

        # Reuse the longest common prefix with what is in the KV cache; evaluate the rest in chunks so a
        # newer request can stop a long prefill between chunks. The last prompt token is left for
        # generate(), which needs fresh logits to sample from.
        cached = llm._input_ids[: llm.n_tokens].tolist() if self.reuse_kv_cache or req.lane != "completion" else []
        reused = 0
        for a, b in zip(cached, prompt):
            if a != b:
                break
            reused += 1
        reused = max(0, min(reused, len(prompt) - 1))
        llm.n_tokens = reused
        llm._ctx.kv_cache_seq_rm(-1, reused, -1)
        pos = reused
        while pos < len(prompt) - 1:
            reason = should_stop() or ("timeout" if time.perf_counter() - started > req.timeout_s else None)
            if reason == "yield":
                return yielded(req.resume_text, list(req.resume_tokens))
            if reason:
                return GenerationResult(finish=reason, prompt_tokens=prompt_len, reused_tokens=reused, prefill_ms=_ms(started))
            limit = self.chunk if req.lane == "completion" else self.action_chunk
            end = min(pos + chunk_tokens(limit, self.prefill_tokens_per_s, self.chunk_target_s), len(prompt) - 1)
            t_eval = time.perf_counter()
            llm.eval(prompt[pos:end])
            self._note_prefill_speed(end - pos, time.perf_counter() - t_eval)
            pos = end
        acc = TextAccumulator(req)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        prefill_ms = 0.0
        decode_started = 0.0
        generated = len(req.resume_tokens)
        new_tokens: list[int] = []
        finish = "length"
        processor = self._logits_processor(req, prompt_len, stop_ids, heal)
        healed = heal.decode("ascii")
        for token in llm.generate(prompt, temp=req.temperature, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0,
                                  logits_processor=processor):
            if not decode_started:
                prefill_ms = _ms(started)
                decode_started = time.perf_counter()
            generated += 1
            if token in stop_ids or self._llama_cpp.llama_vocab_is_eog(self.vocab, token):
                finish = "eog"
                break
            new_tokens.append(token)
            over = req.decode_budget_s > 0 and time.perf_counter() - decode_started > req.decode_budget_s
            if acc.feed(decoder.decode(llm.detokenize([token])), over):
                finish = acc.finish or "stop"
                break
            if generated >= req.max_tokens:
                finish = "length"
                break
            reason = should_stop(acc.text[len(healed):] if acc.text.startswith(healed) else "")
            if reason == "yield" and not decoder.getstate()[0]:  # yield only between whole characters
                llm.n_tokens = len(prompt) + len(new_tokens) - 1  # the last token is evaluated again on resume
                return yielded(acc.text, list(req.resume_tokens) + new_tokens)
            if reason and reason != "yield":
                finish = reason
                break
            if time.perf_counter() - started > req.timeout_s:
                finish = "timeout"
                break
        text = acc.end(finish)
        text = text[len(healed):] if text.startswith(healed) else text
        if req.lane != "completion":
            self._finished_lanes.add(req.lane)  # nothing worth parking when the next lane comes
        return GenerationResult(
            text=text,
            finish=acc.finish or finish,
            prompt_tokens=prompt_len,
            reused_tokens=reused,
            generated_tokens=generated,
            prefill_ms=prefill_ms,
            decode_ms=_ms(decode_started) if decode_started else 0.0,
        )


def chunk_tokens(limit: int, tokens_per_s: float | None, target_s: float) -> int:
    """Prompt tokens to evaluate before the next cancellation check and progress tick: the configured `limit`,
    fewer when the measured speed says that many would take longer than `target_s` (16 before any measure),
    never under 8 (tiny batches waste the CPU's matrix kernels)."""
    if target_s <= 0:
        return limit
    if tokens_per_s is None:
        return min(limit, 16)
    return max(min(8, limit), min(limit, int(tokens_per_s * target_s)))


_FAKE_TOKEN = re.compile(r"\s+|\w+|[^\w\s]")


def fake_tokenize(text: str) -> list[int]:
    """Deterministic stand-in for a tokenizer: words, runs of spaces and symbols each count as one."""
    return [int.from_bytes(hashlib.blake2s(t.encode(), digest_size=3).digest(), "big") for t in _FAKE_TOKEN.findall(text)]


class FakeBackend:
    """A scripted model for tests. Config keys:

    outputs: list of strings answered in turn (default: a fixed line);
    action_outputs: the same for the "action" lane (default: outputs);
    token_delay_ms: time per generated piece (a piece is a word, a run of spaces or a symbol);
    prefill_delay_ms: time before the first piece, checked for cancellation every prefill_chunk_ms
        (default 5; a real prefill can only stop between chunks);
    crash_on_generate: exit the process with this code when a generation starts;
    crash_signal: die of a signal instead: "abort" (SIGABRT, as llama.cpp's GGML_ABORT) or "segv" (a real
        segmentation fault in native code);
    crash_after_tokens: crash after this many pieces instead of at the start;
    hang: stop making progress (no token, no cancellation check, as a hung GPU kernel) after
        hang_after_tokens pieces (default 0);
    garbage: answer with hostile text in turn (special tokens, bidi controls, NULs, a 100 KB line, 1,000 lines);
    fault_file: the crash, hang and load_error faults apply only while this path exists (a test repairs the model by
        deleting it: the worker is a new process after each crash, so it cannot count);
    load_delay_ms / load_error: slow or failed model load;
    gpu_layers / oom_above_layers / oom_mode: GPU out-of-memory at load. gpu_layers is what the plan offloads
        when n_gpu_layers is -1; a load with more than oom_above_layers layers fails as llama.cpp does:
        oom_mode "raise" (llama-cpp-python's ValueError, the default) or "abort" (GGML_ABORT: SIGABRT);
    record_path: append each request (JSON line) to this file, for tests that inspect prompts.
    """

    def __init__(self, config: dict, n_gpu_layers: int = -1, on_plan: Callable[[dict], None] | None = None) -> None:
        self.config = config
        layers = n_gpu_layers if n_gpu_layers >= 0 else int(config.get("gpu_layers", 0))
        self.plan = {"device": "fake-gpu" if layers else "cpu", "n_gpu_layers": layers}
        if on_plan is not None:
            on_plan(self.plan)
        delay = float(config.get("load_delay_ms", 0)) / 1000.0
        if delay:
            time.sleep(delay)
        if config.get("load_error") and self._faulty():
            raise RuntimeError(str(config["load_error"]))
        limit = config.get("oom_above_layers")
        if limit is not None and layers > int(limit):
            if config.get("oom_mode") == "abort":
                os.abort()
            raise ValueError("Failed to create llama_context")
        self.outputs = list(config.get("outputs") or (GARBAGE_OUTPUTS if config.get("garbage") else ["return 42"]))
        self.action_outputs = list(config.get("action_outputs") or self.outputs)
        self.calls = {"completion": 0, "action": 0}

    def info(self, probe_tokens: list[str]) -> dict:
        fim = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_sep|>", "<|repo_name|>", "<|endoftext|>"]
        scripted = hashlib.sha256(json.dumps(self.outputs).encode()).hexdigest()[:16]
        return {"architecture": "fake", "name": "fake", "special_tokens": [t for t in probe_tokens if t in fim], "n_ctx": 4096,
                "n_vocab": 0, "fingerprint": f"fake:{scripted}", "plan": self.plan}

    def _faulty(self) -> bool:
        path = self.config.get("fault_file")
        return not path or os.path.exists(path)

    def _crash_or_hang(self, pieces_done: int) -> None:
        """Die or hang here when the config says so (after `pieces_done` generated pieces)."""
        config = self.config
        if (config.get("crash_on_generate") or config.get("crash_signal")) and pieces_done == int(config.get("crash_after_tokens", 0)):
            if self._faulty():
                signal_name = config.get("crash_signal")
                if signal_name == "abort":
                    os.abort()
                if signal_name == "segv":
                    ctypes.string_at(0)  # reads address 0: SIGSEGV in native code, no Python exception
                os._exit(int(config.get("crash_on_generate") or 1))
        if config.get("hang") and pieces_done == int(config.get("hang_after_tokens", 0)) and self._faulty():
            while True:  # no token, no should_stop(): only a kill ends this
                time.sleep(3600)

    def generate(self, req: GenerationRequest, should_stop: ShouldStop) -> GenerationResult:
        started = time.perf_counter()
        if self.config.get("record_path"):
            with open(self.config["record_path"], "a", encoding="utf-8") as f:
                f.write(json.dumps(req.to_dict()) + "\n")
        prompt = build_prompt_tokens(
            req.segments, tokenize_text=fake_tokenize, tokenize_special=lambda s: [0], bos=[], max_prompt_tokens=req.max_prompt_tokens
        )
        outputs = self.action_outputs if req.lane == "action" else self.outputs
        if req.resume_tokens:  # a yielded action: [which output, one entry per piece already given]
            index, skip = req.resume_tokens[0], len(req.resume_tokens) - 1
        else:
            index, skip = self.calls.get(req.lane, 0) % len(outputs), 0
            self.calls[req.lane] = self.calls.get(req.lane, 0) + 1
        output = outputs[index]
        prefill_s = 0.0 if skip else float(self.config.get("prefill_delay_ms", 0)) / 1000.0
        chunk_s = float(self.config.get("prefill_chunk_ms", 5)) / 1000.0
        deadline = time.perf_counter() + prefill_s
        while time.perf_counter() < deadline:
            reason = should_stop()
            if reason == "yield":
                return GenerationResult(finish="yielded", tokens=[index], prompt_tokens=len(prompt.tokens))
            if reason:
                return GenerationResult(finish=reason, prompt_tokens=len(prompt.tokens), prefill_ms=_ms(started))
            time.sleep(min(chunk_s, max(0.0, deadline - time.perf_counter())))
        prefill_ms = _ms(started)
        decode_started = time.perf_counter()
        acc = TextAccumulator(req)
        finish = "eog"
        generated = skip
        delay_s = float(self.config.get("token_delay_ms", 0)) / 1000.0
        self._crash_or_hang(generated)
        for piece in _FAKE_TOKEN.findall(output)[skip:]:
            reason = should_stop(acc.text)
            if reason == "yield":
                return GenerationResult(text=acc.text, finish="yielded", tokens=[index] + [0] * generated,
                                        prompt_tokens=len(prompt.tokens))
            if reason:
                finish = reason
                break
            if delay_s:
                time.sleep(delay_s)
            generated += 1
            over = req.decode_budget_s > 0 and time.perf_counter() - decode_started > req.decode_budget_s
            if acc.feed(piece, over):
                finish = acc.finish or "stop"
                break
            if generated >= req.max_tokens:
                finish = "length"
                break
            self._crash_or_hang(generated)
        text = acc.end(finish)
        return GenerationResult(
            text=text,
            finish=acc.finish or finish,
            prompt_tokens=len(prompt.tokens),
            generated_tokens=generated,
            prefill_ms=prefill_ms,
            decode_ms=_ms(decode_started),
        )


GARBAGE_OUTPUTS = [
    # Special tokens a broken model or template leaks, bidi controls (Trojan Source), NULs, zero-width and Tags.
    "value\x00 + 1 \u202eevil\u202c \u2066x\u2069\u200b\U000E0041 <|fim_pad|><|im_end|> tail",
    "B" * 100_000,  # one 100 KB line (sent as a single piece: the fake's pieces are words)
    "line_0 = 0" + "".join(f"\n    line_{i} = {i}" for i in range(1, 1000)),  # 1,000 lines at the cursor's indent
    "<|fim_middle|><|endoftext|><|file_sep|>",
]
"""What `garbage: true` answers, in turn."""


def make_backend(config: dict, on_plan: Callable[[dict], None] | None = None):
    """The configured backend; `on_plan` hears the placement plan (GPU layers) before the model loads."""
    kind = config.get("backend", "llama")
    if kind == "fake":
        return FakeBackend(config.get("fake") or {}, int(config.get("n_gpu_layers", -1)), on_plan)
    if kind == "llama":
        return LlamaBackend(config, on_plan)
    raise ValueError(f"unknown backend {kind!r}")
