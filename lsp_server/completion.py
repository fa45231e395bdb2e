"""The inline-completion use case: latest wins, one generation at a time, one answer per request.

A newer request supersedes every older one (there is one cursor and one user): the older requests are
answered at once with nothing, the running generation is told to stop (within one token), and only the
newest waiting request is started next. So at most one generation runs and at most one waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from . import languages, postprocess, prompts, redact
from .cache import CompletionCache, cache_key, default_directory
from .config import Settings
from .context import CompletionContext, Snapshot, build_context, has_code, inside_word, line_suffix_at
from .context.crossfile import CrossFileContext, RecentEdits
from .context.syntax import SyntaxFacts, SyntaxService
from .engine.client import READY, Job
from .engine.protocol import GenerationRequest, GenerationResult

log = logging.getLogger("offpilot.completion")

_MAX_MIDDLE_CHARS = 400
"""A longer cursor line stays in the prefix, where the prompt budget can cut it."""


class Engine(Protocol):
    state: str
    detail: str
    info: dict

    def submit(self, request: GenerationRequest) -> Job: ...

    def cancel(self, job: Job) -> None: ...


@dataclass
class Completion:
    text: str
    reason: str = "ok"
    """"ok", or why there is no suggestion (loading, superseded, cursor inside a word, ...)."""
    timings_ms: dict[str, float] = field(default_factory=dict)
    result: GenerationResult | None = None
    cache: str = "miss"
    """"miss", "memory", "disk" or "type-through" (the user typed the start of the shown suggestion)."""


@dataclass
class Shown:
    """The last suggestion answered for a document, for type-through."""

    uri: str
    text: str
    offset: int
    suggestion: str

    def typed_since(self, snapshot: Snapshot) -> str | None:
        """The characters typed at this suggestion's cursor to make `snapshot` (None: not just typing there)."""
        return typed_since(Snapshot(self.uri, 0, self.text, self.offset, ""), snapshot)

    def rest_after_typing(self, snapshot: Snapshot) -> str:
        """What is left of the suggestion when `snapshot` is this one plus typed characters that start it."""
        typed = self.typed_since(snapshot)
        if not typed or len(typed) >= len(self.suggestion) or not self.suggestion.startswith(typed):
            return ""
        return self.suggestion[len(typed):]


def state_after_first_line(snapshot: Snapshot, suggestion: str, ctx: CompletionContext) -> Snapshot | None:
    """The document after the suggestion's first line is typed (or accepted) and Enter pressed, with the
    indentation an editor would give the new line: the suggestion's own second line's, else the current
    line's (one step deeper after a block opener). None when text stands right of the cursor."""
    if ctx.line_suffix.strip():
        return None
    lines = suggestion.split("\n")
    first = lines[0]
    if not first.strip() and len(lines) == 1:
        return None
    if len(lines) > 1:
        second = lines[1]
        indent = second[: len(second) - len(second.lstrip(" \t"))]
    else:
        line = ctx.line_prefix + first
        indent = line[: len(line) - len(line.lstrip(" \t"))]
        info = languages.detect(snapshot.language_id, snapshot.uri)
        if line.rstrip().endswith(info.block_openers if info else (":", "{")):
            indent += ctx.indent_unit or "    "
    inserted = first + ctx.eol + indent
    text = snapshot.text[: snapshot.offset] + inserted + snapshot.text[snapshot.offset :]
    return Snapshot(snapshot.uri, snapshot.version, text, snapshot.offset + len(inserted), snapshot.language_id)


@dataclass
class Prepared:
    ctx: CompletionContext
    facts: SyntaxFacts | None
    request: GenerationRequest
    template: prompts.FimTemplate


_FIRST_LINE_GRACE_S = 0.1
"""After a multi-line generation's first line, how long to wait for the rest before answering with that line."""

_FOLLOW_GRACE_S = 0.3
"""How long a generation whose request the client cancelled waits for a newer request to follow it."""


_FAILED = ("crashed", "not_ready", "error", "cancelled", "diverged")
"""Finish reasons of a generation that gave no text to use."""


def _pass_on(source: asyncio.Future, target: asyncio.Future | None) -> None:
    if target is not None and not target.done() and not source.cancelled() and source.exception() is None:
        target.set_result(source.result())


@dataclass
class _Request:
    seq: int
    snapshot: Snapshot
    request: GenerationRequest
    future: asyncio.Future
    job: Job | None = None
    prepared: Prepared | None = None
    key: str = ""
    followers: int = 0
    """Newer requests waiting for this request's generation (see completion.follow_typing)."""
    stop_sent: bool = False
    partial: asyncio.Future | None = None
    """The first line of a multi-line generation, when the worker sends it first."""
    first_line: str = ""
    """The first line as answered (the rest is still generating)."""
    rest_task: asyncio.Task | None = None


def typed_since(old: Snapshot, new: Snapshot) -> str | None:
    """The characters typed at `old`'s cursor to make `new` (None: `new` is not `old` plus typing there)."""
    typed_len = new.offset - old.offset
    if new.uri != old.uri or typed_len <= 0 or len(new.text) != len(old.text) + typed_len:
        return None
    if new.text[: old.offset] != old.text[: old.offset] or new.text[new.offset :] != old.text[old.offset :]:
        return None
    return new.text[old.offset : new.offset]


class CompletionService:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        syntax: SyntaxService | None = None,
        open_texts: Callable[[], dict[str, str]] = dict,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.syntax = syntax or SyntaxService(settings.completion.parse_deadline_ms)
        self.crossfile = CrossFileContext()
        self.recent_edits = RecentEdits()
        self.open_texts = open_texts
        self._latest = 0
        self._waiting: _Request | None = None
        self._running: _Request | None = None
        self._template_cache: tuple[str, prompts.FimTemplate | None] | None = None
        self._cache: CompletionCache | None = None
        self._shown: dict[str, Shown] = {}
        self._type_through_hits = 0
        self._followed_hits = 0
        self.last_shown: dict | None = None
        """The last suggestion shown: its time from request to answer and where it came from (for status bars)."""
        self._model_requests = 0
        """Requests that went past the instant answers (type-through): a prefetch yields to any of them."""
        self._prefetch_task: asyncio.Task | None = None
        self.prefetches = {"started": 0, "stored": 0}
        self._keystroke_intervals_s: list[float] = []
        self._last_request_at = 0.0
        self._model_latency_s: float | None = None
        """Moving average of recent generations' prefill + decode time."""
        self._in_progress = 0
        self._requests = 0
        self._gate: asyncio.Future | None = None
        """Resolved when a newer request arrives (wakes the current one in its context or debounce step)."""
        self._max_pending = 0
        """High-water mark of jobs the scheduler held (running + waiting): 2 at most by design (A5)."""

    @property
    def cache(self) -> CompletionCache | None:
        """Made on first use, from the settings as the client configured them."""
        c = self.settings.cache
        if not c.enabled:
            return None
        if self._cache is None:
            directory = (Path(c.directory).expanduser() if c.directory else default_directory()) if c.disk else None
            self._cache = CompletionCache(memory_entries=c.memory_entries, directory=directory, disk_limit_mb=c.disk_limit_mb)
        return self._cache

    def cache_report(self) -> dict:
        c = self._cache
        if c is None:
            return {"enabled": self.settings.cache.enabled, "typeThrough": self._type_through_hits}
        return {"enabled": True, "memoryHits": c.stats.memory_hits, "diskHits": c.stats.disk_hits, "misses": c.stats.misses,
                "typeThrough": self._type_through_hits, "followed": self._followed_hits, "disk": str(c.directory) if c.directory and not c.disk_error else None,
                "prefetchStarted": self.prefetches["started"], "prefetchStored": self.prefetches["stored"]}

    def forget(self, uri: str) -> None:
        """The document was closed."""
        self._shown.pop(uri, None)

    # ---- template ------------------------------------------------------------------------------------
    def template(self) -> prompts.FimTemplate | None:
        """The FIM template for the loaded model: from settings, else detected from its vocabulary."""
        configured = self.settings.model.family
        key = f"{configured}|{self.engine.info.get('name')}|{','.join(self.engine.info.get('special_tokens', []))}"
        if self._template_cache and self._template_cache[0] == key:
            return self._template_cache[1]
        templates = prompts.load_templates()
        if configured != "auto":
            template = templates.get(configured)
            if template is None:
                log.warning("unknown model.family %r; detecting it from the model", configured)
        else:
            template = None
        if template is None:
            family = prompts.detect_family(self.engine.info.get("special_tokens", []), self.engine.info.get("architecture", ""))
            template = templates.get(family) if family else None
        self._template_cache = (key, template)
        return template

    # ---- requests ------------------------------------------------------------------------------------
    async def prepare(self, snapshot: Snapshot) -> Prepared | str:
        """Decide and build the generation request for a snapshot, or say why there is none."""
        settings = self.settings.completion
        if not settings.enabled:
            return "disabled"
        if redact.is_secret_uri(snapshot.uri):  # .env, *.pem, id_rsa, ...: no AI features (F10)
            return "secret file"
        if self.engine.state != READY:
            return f"model {self.engine.state}"
        template = self.template()
        if template is None:
            return "the model has no known FIM tokens (set model.family)"
        info = languages.detect(snapshot.language_id, snapshot.uri)
        after = line_suffix_at(snapshot.text, snapshot.offset)
        facts = None
        if info is not None and not inside_word(after):
            # The tree may overrule the text-only decision (a hole right of the cursor, a comment).
            facts = await self.syntax.analyze(snapshot.uri, info.name, snapshot.text, snapshot.offset, has_code(after))
        ctx = build_context(snapshot, settings, facts)
        if ctx.skip_reason:
            return ctx.skip_reason
        request = GenerationRequest(
            segments=redact.prompt_segments(prompts.assemble(template, self._prompt_parts(snapshot, ctx, facts)), snapshot.uri),
            add_bos=template.add_bos,
            max_prompt_tokens=settings.max_prompt_tokens,
            max_tokens=settings.max_tokens_single_line if ctx.single_line else settings.max_tokens_multi_line,
            stop=list(template.stop),
            single_line=ctx.single_line,
            max_lines=settings.max_lines,
            min_indent=ctx.indent,
            temperature=settings.temperature,
            timeout_s=settings.generation_timeout_s,
            decode_budget_s=0.0 if ctx.single_line else settings.multi_line_budget_ms / 1000.0,
            # On a blank line the user is about to write something: "nothing" is no answer there.
            min_tokens=1 if not ctx.line_prefix.strip() and not ctx.line_suffix.strip() else 0,
            heal_last_token=settings.cursor_line_in_middle,
            first_line_first=settings.first_line_first and not ctx.single_line,
        )
        return Prepared(ctx, facts, request, template)

    def scheduler_report(self) -> dict:
        """What the scheduler holds now (for load tests and status): a burst must not grow any of it."""
        return {"running": int(self._running is not None), "waiting": int(self._waiting is not None),
                "maxPending": self._max_pending, "inProgress": self._in_progress, "requests": self._requests}

    async def complete(self, snapshot: Snapshot) -> Completion:
        self._requests += 1
        self._in_progress += 1
        try:
            completion = await self._complete(snapshot)
        finally:
            self._in_progress -= 1
        if completion.text:
            self.last_shown = {"totalMs": round(completion.timings_ms.get("total", 0.0), 1), "cache": completion.cache}
        return completion

    async def _complete(self, snapshot: Snapshot) -> Completion:
        t0 = time.perf_counter()
        self._latest += 1
        mine = self._latest
        self._note_keystroke(t0)
        following = self._followable(snapshot)
        gate = self._answer_older(keep_job=following is not None)
        if not self.settings.completion.enabled:
            return Completion("", "disabled")
        shown = self._shown.get(snapshot.uri)
        if shown is not None and self.cache is not None:
            rest = shown.rest_after_typing(snapshot)
            if rest:
                self._shown[snapshot.uri] = Shown(snapshot.uri, snapshot.text, snapshot.offset, rest)
                self._type_through_hits += 1
                total_ms = (time.perf_counter() - t0) * 1000.0
                log.info("completion ok reason=ok cache=type-through total=%.1fms chars=%d", total_ms, len(rest))
                return Completion(rest, "ok", {"total": total_ms}, cache="type-through")
        if following is not None:
            followed = await self._follow(following, snapshot, t0, mine, gate)
            if followed is not None:
                return followed
            if mine != self._latest:
                return Completion("", "superseded by a newer request")
        self._model_requests += 1
        preparing = asyncio.ensure_future(self.prepare(snapshot))
        try:
            await asyncio.wait((preparing, gate), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            preparing.cancel()
            raise
        if not preparing.done():  # a newer request came meanwhile: answer now, not when the parse ends
            preparing.cancel()
            return Completion("", "superseded by a newer request")
        prepared = preparing.result()
        if isinstance(prepared, str):
            log.debug("no completion: %s", prepared)
            return Completion("", prepared)
        if mine != self._latest:
            return Completion("", "superseded by a newer request")
        context_ms = (time.perf_counter() - t0) * 1000.0
        key = self._cache_key(prepared.request, prepared.template)
        cached = self.cache.get(key) if self.cache is not None and key else None
        if cached is not None and self.cache is not None:
            result = GenerationResult(text=cached["text"], finish=str(cached.get("finish", "stop")))
            return await self._finish(snapshot, prepared, result, t0, context_ms, self.cache.last_layer)

        delay_s = self.debounce_s()
        if delay_s > 0:
            await asyncio.wait((gate,), timeout=delay_s)  # a newer request ends the wait at once
            if mine != self._latest:
                return Completion("", "superseded by a newer request", {"total": (time.perf_counter() - t0) * 1000.0})
        loop = asyncio.get_running_loop()
        req = _Request(mine, snapshot, prepared.request, loop.create_future(), prepared=prepared, key=key,
                       partial=loop.create_future() if prepared.request.first_line_first else None)
        self._supersede_all()
        self._waiting = req
        self._pump()
        try:
            if req.partial is not None:
                await asyncio.wait((req.future, req.partial), return_when=asyncio.FIRST_COMPLETED)
                if not req.future.done():  # the whole text may be only moments behind (a fast model): show it all
                    await asyncio.wait((req.future,), timeout=_FIRST_LINE_GRACE_S)
                if not req.future.done():
                    early = await self._answer_first_line(req, snapshot, prepared, t0, context_ms)
                    if early is not None:
                        return early
            result: GenerationResult | None = await req.future
        except asyncio.CancelledError:
            self._drop(req)
            raise
        total_ms = (time.perf_counter() - t0) * 1000.0
        if result is None:
            return Completion("", "superseded by a newer request", {"total": total_ms})
        if result.finish in ("crashed", "not_ready", "error", "cancelled"):
            timings = {"context": context_ms, "prefill": result.prefill_ms, "decode": result.decode_ms, "total": total_ms}
            return Completion("", f"generation {result.finish} {result.error}".strip(), timings, result)
        self._remember(key, result)
        spent_s = (result.prefill_ms + result.decode_ms) / 1000.0
        self._model_latency_s = spent_s if self._model_latency_s is None else 0.7 * self._model_latency_s + 0.3 * spent_s
        return await self._finish(snapshot, prepared, result, t0, context_ms, "miss")

    # ---- following a generation while the user types ---------------------------------------------------
    def _followable(self, snapshot: Snapshot) -> _Request | None:
        """The running single-line generation that `snapshot` only adds typed characters to, if any."""
        running = self._running
        if running is None or not self._followable_kind(running) or self._waiting is not None:
            return None
        typed = typed_since(running.snapshot, snapshot)
        if not typed:
            return None
        if running.request.single_line:
            return running if "\n" not in typed and "\r" not in typed else None
        return running if running.first_line else None  # typing (or accepting) the first line shown, and on

    def _followable_kind(self, req: _Request) -> bool:
        return (self.settings.completion.follow_typing and req.seq > 0 and req.job is not None and not req.job.future.done()
                and req.prepared is not None and (req.request.single_line or bool(req.first_line)))

    async def _follow(self, running: _Request, snapshot: Snapshot, t0: float, mine: int, gate: asyncio.Future) -> Completion | None:
        """Wait for the generation `running` started (its own request was answered already) and answer `snapshot`
        with what is left of it after the typed characters; None when it wrote something else."""
        assert running.job is not None and running.prepared is not None
        job = running.job.future
        typed = typed_since(running.snapshot, snapshot) or ""
        follow = getattr(self.engine, "follow", None)
        if follow is not None:
            follow(running.job, typed)  # the worker stops as soon as its text differs from what was typed
        done = running.rest_task if running.rest_task is not None else job
        running.followers += 1
        try:
            await asyncio.wait((done, gate), return_when=asyncio.FIRST_COMPLETED)
        finally:
            running.followers -= 1
        if mine != self._latest or not done.done():
            return Completion("", "superseded by a newer request", {"total": (time.perf_counter() - t0) * 1000.0})
        if running.rest_task is None:  # a single-line generation: its own request was answered empty
            result: GenerationResult = job.result()
            if result.finish in _FAILED:
                return None
            self._remember(running.key, result)
            await self._finish(running.snapshot, running.prepared, result, t0, 0.0, "miss")
        shown = self._shown.get(snapshot.uri)
        rest = shown.rest_after_typing(snapshot) if shown is not None and shown.offset == running.snapshot.offset else ""
        if not rest or mine != self._latest:
            return None
        self._shown[snapshot.uri] = Shown(snapshot.uri, snapshot.text, snapshot.offset, rest)
        self._followed_hits += 1
        total_ms = (time.perf_counter() - t0) * 1000.0
        log.info("completion ok reason=ok cache=followed total=%.1fms chars=%d", total_ms, len(rest))
        return Completion(rest, "ok", {"total": total_ms}, cache="followed")

    # ---- first line first ---------------------------------------------------------------------------
    async def _answer_first_line(self, req: _Request, snapshot: Snapshot, prepared: Prepared, t0: float,
                                 context_ms: float) -> Completion | None:
        """Answer with the first line of a multi-line generation that goes on; None when that line alone is
        no suggestion (e.g. a block header the syntax check refuses without its body): then wait for all."""
        assert req.partial is not None
        completion = await self._finish(snapshot, prepared, GenerationResult(text=req.partial.result(), finish="first-line"),
                                        t0, context_ms, "first-line")
        if not completion.text or req.job is None or req.job.future.done():
            return None
        req.first_line = completion.text
        req.rest_task = asyncio.ensure_future(self._complete_rest(req, snapshot, prepared, t0, context_ms))
        return completion

    async def _complete_rest(self, req: _Request, snapshot: Snapshot, prepared: Prepared, t0: float, context_ms: float) -> None:
        """The whole multi-line text, once generated: into the cache, and into type-through when the user is
        still on the way it goes (typed or accepted its start)."""
        assert req.job is not None
        result: GenerationResult = await asyncio.shield(req.job.future)
        if result.finish in _FAILED:
            return
        self._remember(req.key, result)
        shown = self._shown.get(snapshot.uri)
        # Still on the way: the suggestion shown is this one's, or what was left of it after typing its start.
        on_the_way = shown is not None and (shown.offset == snapshot.offset and shown.text == snapshot.text
                                            or typed_since(snapshot, Snapshot(shown.uri, 0, shown.text, shown.offset, "")) is not None)
        completion = await self._finish(snapshot, prepared, result, t0, context_ms, "miss", remember=on_the_way)
        if on_the_way and not completion.text.startswith(req.first_line):
            self._shown.pop(snapshot.uri, None)  # the whole text begins otherwise than the line shown

    def _remember(self, key: str, result: GenerationResult) -> None:
        """A finished generation's text into the response cache (a timed-out one is cut short: not kept)."""
        if self.cache is not None and key and result.finish != "timeout":
            self.cache.put(key, {"text": result.text, "finish": result.finish})

    def _note_keystroke(self, now: float) -> None:
        gap = now - self._last_request_at
        self._last_request_at = now
        if 0 < gap < 1.0:  # longer gaps are pauses, not the typing rhythm
            self._keystroke_intervals_s = (self._keystroke_intervals_s + [gap])[-9:]

    def debounce_s(self) -> float:
        """How long to wait before starting the model. Adaptive: when the model needs longer than the typist's
        usual gap between keys, a generation started at once would almost always be cancelled by the next
        key after it had already spent a prefill chunk (up to ~1 s of a 2-core CPU, which the request after
        the pause then waits for); so wait a little over one usual gap and start only when typing pauses."""
        fixed = self.settings.completion.debounce_ms
        if fixed >= 0:
            return fixed / 1000.0
        if len(self._keystroke_intervals_s) < 3 or self._model_latency_s is None:
            return 0.0
        gap = sorted(self._keystroke_intervals_s)[len(self._keystroke_intervals_s) // 2]
        if self._model_latency_s < gap:
            return 0.0  # answers arrive before the next key anyway
        return min(0.3, 1.3 * gap)

    def _cache_key(self, request: GenerationRequest, template: prompts.FimTemplate) -> str:
        fingerprint = self.engine.info.get("fingerprint")
        if not fingerprint or request.temperature > 0:  # sampled answers are not a function of the prompt
            return ""
        params = asdict(request)
        params.pop("timeout_s", None)
        return cache_key({"model": fingerprint, "template": template.source, "template_text": template.template,
                          "request": params})

    async def _finish(
        self, snapshot: Snapshot, prepared: Prepared, result: GenerationResult, t0: float, context_ms: float, cache: str,
        remember: bool = True,
    ) -> Completion:
        """Post-process the model's text against the document as it is now, log, remember for type-through."""
        ctx, facts, template = prepared.ctx, prepared.facts, prepared.template
        timings = {"context": context_ms, "prefill": result.prefill_ms, "decode": result.decode_ms}
        t1 = time.perf_counter()
        log.debug("model text (%s): %r", result.finish, result.text)  # content only at DEBUG
        surrounding = snapshot.text[max(0, snapshot.offset - 2000) : snapshot.offset + 2000]
        text = postprocess.clean(result.text, ctx, surrounding)
        cleaned = bool(text)
        if text and facts is not None:
            text = await self.syntax.trim(facts, text)
            if not ctx.single_line:  # a cut can leave a line that the document already has below
                text = postprocess.drop_repeated_suffix_lines(text, ctx.suffix)
        timings["postprocess"] = (time.perf_counter() - t1) * 1000.0
        timings["total"] = (time.perf_counter() - t0) * 1000.0
        reason = "ok" if text else ("syntax check" if cleaned else "post-processing")
        log.info(
            "completion %s reason=%s cache=%s lang=%s mode=%s tokens=%d/%d reused=%d finish=%s context=%.1fms prefill=%.0fms decode=%.0fms post=%.1fms total=%.0fms template=%s chars=%d",
            "ok" if text else "empty",
            reason.replace(" ", "-"),
            cache,
            ctx.language,
            "line" if ctx.single_line else "block",
            result.prompt_tokens,
            result.generated_tokens,
            result.reused_tokens,
            result.finish,
            context_ms,
            result.prefill_ms,
            result.decode_ms,
            timings["postprocess"],
            timings["total"],
            template.source,
            len(text),
        )
        if text and remember:
            self._shown[snapshot.uri] = Shown(snapshot.uri, snapshot.text, snapshot.offset, text)
            self._schedule_prefetch(snapshot, text, ctx)
        return Completion(text, reason if text else f"nothing usable after {reason}", timings, result, cache)

    # ---- speculative prefetch ------------------------------------------------------------------------
    def _schedule_prefetch(self, snapshot: Snapshot, suggestion: str, ctx: CompletionContext) -> None:
        if not self.settings.completion.prefetch or self.cache is None:
            return
        following = state_after_first_line(snapshot, suggestion, ctx)
        if following is None:
            return
        if self._prefetch_task is not None and not self._prefetch_task.done():
            self._prefetch_task.cancel()
        self._prefetch_task = asyncio.ensure_future(self._prefetch(following, self._model_requests))

    async def _prefetch(self, snapshot: Snapshot, seq: int) -> None:
        """Generate into the cache only while nothing else wants the model; any real request stops it."""
        await asyncio.sleep(0.05)  # a keystroke already on its way goes first
        if seq != self._model_requests or self._running is not None or self._waiting is not None:
            return
        t0 = time.perf_counter()
        prepared = await self.prepare(snapshot)
        if isinstance(prepared, str) or seq != self._model_requests or self.cache is None:
            return
        key = self._cache_key(prepared.request, prepared.template)
        if not key or key in self.cache or self._running is not None or self._waiting is not None:
            return
        req = _Request(-seq, snapshot, prepared.request, asyncio.get_running_loop().create_future())
        self._waiting = req
        self.prefetches["started"] += 1
        self._pump()
        result = await req.future
        if result is None or result.finish in ("crashed", "not_ready", "error", "cancelled", "timeout"):
            return
        self.cache.put(key, {"text": result.text, "finish": result.finish})
        self.prefetches["stored"] += 1
        log.info("prefetch stored tokens=%d/%d reused=%d prefill=%.0fms decode=%.0fms total=%.0fms",
                 result.prompt_tokens, result.generated_tokens, result.reused_tokens, result.prefill_ms,
                 result.decode_ms, (time.perf_counter() - t0) * 1000.0)

    def _prompt_parts(self, snapshot: Snapshot, ctx, facts) -> prompts.PromptParts:
        settings = self.settings.completion
        snippets: list[tuple[str, str]] = []
        if settings.max_snippet_tokens > 0:
            open_texts = self.open_texts()
            if facts is not None:
                found = self.crossfile.import_snippets(snapshot.uri, facts.language, facts.head_tree, facts.head_data, open_texts)
                snippets += [(s.path, s.text) for s in found]
            snippets += [(s.path, s.text) for s in self.recent_edits.snippets(open_texts, snapshot.uri, self.crossfile.relative)]
            snippets = snippets[: settings.max_snippets]
        prefix, middle = ctx.prefix, ""
        if settings.cursor_line_in_middle and 0 < len(ctx.line_prefix) <= _MAX_MIDDLE_CHARS and prefix.endswith(ctx.line_prefix):
            prefix, middle = prefix[: len(prefix) - len(ctx.line_prefix)], ctx.line_prefix
        return prompts.PromptParts(
            prefix=prompts.PromptValue(prefix, settings.max_prefix_tokens, "end", ctx.header, ctx.header_at,
                                       ctx.prefix_first_line, settings.prefix_anchor_lines),
            middle=middle,
            suffix=prompts.PromptValue(ctx.suffix, settings.max_suffix_tokens, "start"),
            path=self.crossfile.relative(snapshot.uri),
            repo_name=self.crossfile.roots[0].name if self.crossfile.roots else "",
            snippets=snippets,
            snippet_budget_tokens=settings.max_snippet_tokens,
            comment=ctx.comment,
        )

    def _answer_older(self, keep_job: bool = False) -> asyncio.Future:
        """A request arrived: every older one is answered now (A2: within ms of the newer one's arrival), not
        when this one has its context and has waited out the debounce. A prefetch is left to run (a
        type-through answer does not need the model), until this request needs the model itself.
        Returns the future that a newer request will resolve, to stop this one's waiting."""
        if self._gate is not None and not self._gate.done():
            self._gate.set_result(None)
        self._gate = asyncio.get_running_loop().create_future()
        waiting, running = self._waiting, self._running
        if waiting is not None and waiting.seq > 0:
            self._waiting = None
            if not waiting.future.done():
                waiting.future.set_result(None)
        if running is not None and running.seq > 0:
            if not running.future.done():
                running.future.set_result(None)
            if not keep_job:  # kept: the newer request follows it
                self._stop(running)
        return self._gate

    def _supersede_all(self) -> None:
        if self._waiting is not None and not self._waiting.future.done():
            self._waiting.future.set_result(None)
        self._waiting = None
        running = self._running
        if running is not None:
            if not running.future.done():
                running.future.set_result(None)
            self._stop(running)  # also a generation that a request was following

    def _drop(self, req: _Request) -> None:
        """The client cancelled this request: forget it, and stop its generation if it runs."""
        if self._waiting is req:
            self._waiting = None
        if self._running is req and req.job is not None:
            if self._followable_kind(req):
                # An editor cancels the shown request before it sends the next keystroke's: give that one a
                # moment to follow this generation before stopping it.
                asyncio.get_running_loop().call_later(_FOLLOW_GRACE_S, self._cancel_unfollowed, req)
            else:
                self._stop(req)

    def _cancel_unfollowed(self, req: _Request) -> None:
        if self._running is req and req.followers == 0:
            self._stop(req)

    def _stop(self, req: _Request) -> None:
        """Tell the engine to stop this request's generation (once)."""
        if req.job is not None and not req.stop_sent and not req.job.future.done():
            req.stop_sent = True
            self.engine.cancel(req.job)

    def _pump(self) -> None:
        self._max_pending = max(self._max_pending, int(self._running is not None) + int(self._waiting is not None))
        if self._running is not None or self._waiting is None:
            return
        req, self._waiting = self._waiting, None
        if req.future.done():
            return
        self._running = req
        req.job = self.engine.submit(req.request)
        req.job.future.add_done_callback(lambda fut, req=req: self._finished(req, fut))
        if req.partial is not None and req.job.partial is not None:
            req.job.partial.add_done_callback(lambda fut, req=req: _pass_on(fut, req.partial))

    def _finished(self, req: _Request, fut: asyncio.Future) -> None:
        if self._running is req:
            self._running = None
        if not req.future.done():
            req.future.set_result(fut.result())
        self._pump()
