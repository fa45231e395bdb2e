#!/usr/bin/env python3
"""Acceptance benchmark: completions for holes cut from real source files, LSP versus a plain FIM call.

Holes come from code we did not write (installed Python packages, npm's own JavaScript, or --source-dir).
Half are "block" holes (a line's code removed, the cursor after its indentation: the server answers with
a block), half "line" holes (the cursor after some of the line's code, the rest removed: one line). Each
hole is completed twice, one after the other, the order alternating:

* through the language server (`python -m lsp_server serve`): didOpen, textDocument/inlineCompletion
  (timed from sending the request to reading its reply), didClose;
* through a plain llama-cpp-python call in this process: the same model, context length and threads,
  the same FIM prompt tokens (built with the project's own context and prompt code and this model's
  tokenizer), the same max_tokens, temperature 0; only `create_completion` is timed.

It prints p50/p95 latency of both paths and their ratio (target: LSP p50 <= 1.10 x plain p50: the server
and the process hop cost at most 10 %), and the share of holes with a non-empty suggestion per language
(target: >= 95 % for Python and JavaScript). It is a measurement: the exit code is 0 even when a target
is missed, unless something crashed.

Usage:
    .venv/bin/python scripts/bench_holes.py [--holes 20] [--seed 0] [--model PATH]
        [--source-dir DIR ...] [--no-default-sources] [--json-out FILE] [--timeout 120]
        [--plain-stops server|naive]

The ratio measures overhead, so by default (`--plain-stops server`) the plain call stops where the
server's line rules stop (the project's TextAccumulator as a stopping criterion: first line end for a
line hole, the end of the block or max_lines for a block hole) and both paths do the same work.
`--plain-stops naive` lets the plain call run to the end-of-generation token, a stop string or
max_tokens, as a plain FIM integration would; then the server's shorter, block-bounded answers make it
look faster than it is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lsp_server.hardware import plan_for_file  # noqa: E402

from holes import (  # noqa: E402  (scripts/holes.py: sources, holes, the LSP client, report helpers)
    REPO,
    Hole,
    LlamaModel,
    LspPath,
    PathResult,
    default_js_files,
    default_python_files,
    fmt_ms as _fmt_ms,
    language_for,
    log,
    percentile,
    pick_holes,
    short_name,
    source_dir_files,
    hole_record,
    side_by_side,
    table_lines,
    workspace_folders,
)
from lsp_server import languages, prompts  # noqa: E402
from lsp_server.config import Settings  # noqa: E402
from lsp_server.completion import CompletionService  # noqa: E402
from lsp_server.context import Snapshot  # noqa: E402

TARGET_LANGUAGES = ("python", "javascript")
RATIO_TARGET = 1.10
NONEMPTY_TARGET = 0.95


# ---- the plain path -------------------------------------------------------------------------------------


class _TemplateOnly:
    """An engine stand-in for building requests: ready, with no vocabulary (the family is set)."""

    state, detail, info = "ready", "", {}


class PlainPath(LlamaModel):
    """A plain llama-cpp-python call with the server's prompt tokens, limit and (by default) stops."""

    def __init__(self, model: Path, settings: Settings, stops: str = "naive", workspace: list[Path] = ()) -> None:
        super().__init__(model, settings)
        self.stops = stops
        # The server's own request builder (context, syntax decisions, prompt assembly), so both paths
        # get the same prompt tokens; only the generation differs.
        settings.model.family = self.template.family
        self.service = CompletionService(_TemplateOnly(), settings)
        self.service.crossfile.roots = [w.resolve() for w in workspace]

    def prepare(self, hole: Hole) -> dict:
        """The same prompt tokens, limit and stops as the server would use for this hole."""
        snap = Snapshot(hole.uri, 1, hole.text, hole.offset, hole.language_id)
        prepared = asyncio.run(self.service.prepare(snap))
        if isinstance(prepared, str):
            return {"tokens": [], "ctx": None, "single_line": True, "skip_reason": prepared, "max_tokens": 0, "stop": []}
        request, ctx = prepared.request, prepared.ctx
        tokens = prompts.build_prompt_tokens(
            request.segments, tokenize_text=self._tok_text, tokenize_special=self._tok_special, bos=self.bos(),
            max_prompt_tokens=request.max_prompt_tokens,
        ).tokens
        return {
            "tokens": tokens,
            "ctx": ctx,
            "single_line": ctx.single_line,
            "skip_reason": "",
            "max_tokens": request.max_tokens,
            "stop": (["\n"] if ctx.single_line else []) + list(request.stop),
        }

    def complete(self, hole: Hole) -> PathResult:
        res = PathResult()
        try:
            t0 = time.perf_counter()
            p = self.prepare(hole)
            prompt_ms = (time.perf_counter() - t0) * 1000.0
            res.extra = {
                "prompt_tokens": len(p["tokens"]),
                "single_line": p["single_line"],
                "max_tokens": p["max_tokens"],
                "prompt_build_ms": prompt_ms,
            }
            if p["skip_reason"]:  # the server answers this hole without the model; so does this path
                res.extra["skip_reason"] = p["skip_reason"]
                res.ms = prompt_ms
                return res
            criterion = self._server_stops(p) if self.stops == "server" else None
            self._perf_reset()
            t0 = time.perf_counter()
            out = self.llm.create_completion(
                prompt=p["tokens"],
                max_tokens=p["max_tokens"],
                temperature=0.0,
                stop=p["stop"],
                stopping_criteria=criterion,
            )
            res.ms = (time.perf_counter() - t0) * 1000.0
            res.extra.update(self._perf_read())
            choice = out["choices"][0]
            res.text = choice.get("text") or ""
            if criterion is not None and criterion.acc.finish:  # what the server's rules keep of it
                res.text = criterion.acc.text
            res.nonempty = bool(res.text.strip())
            res.extra["generated_tokens"] = out.get("usage", {}).get("completion_tokens")
            res.extra["finish"] = choice.get("finish_reason")
        except Exception as exc:  # one bad hole must not end the run
            res.error = f"{type(exc).__name__}: {exc}"
        return res

    def _server_stops(self, p: dict) -> "_ServerStops":
        import dataclasses

        from lsp_server.engine.generation import TextAccumulator
        from lsp_server.engine.protocol import GenerationRequest

        cs = self.settings.completion
        kwargs = {
            "segments": [],
            "max_tokens": p["max_tokens"],
            "stop": list(self.template.stop),
            "single_line": p["single_line"],
            "max_lines": cs.max_lines,
            "min_indent": getattr(p["ctx"], "indent", 0),
        }
        known = {f.name for f in dataclasses.fields(GenerationRequest)}
        request = GenerationRequest(**{k: v for k, v in kwargs.items() if k in known})
        return _ServerStops(self.llm, len(p["tokens"]), TextAccumulator(request))


class _ServerStops:
    """A llama-cpp-python stopping criterion that applies the server's line rules to the text so far.

    llama-cpp-python calls it with the tokens evaluated so far, i.e. one token behind the one just
    sampled, so it stops one decode step later than the server does (a small bias against plain).
    """

    def __init__(self, llm, prompt_len: int, acc) -> None:
        import codecs

        self.llm = llm
        self.prompt_len = prompt_len
        self.acc = acc
        self.seen = 0
        self.stopped = False
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, input_ids, logits) -> bool:
        if self.stopped:
            return True
        new = [int(t) for t in input_ids[self.prompt_len + self.seen :]]
        self.seen += len(new)
        for tok in new:
            if self.acc.feed(self.decoder.decode(self.llm.detokenize([tok]))):
                self.stopped = True
                return True
        return False


# ---- report ------------------------------------------------------------------------------------------


def _first_line_match(text: str, expected: str) -> bool:
    first = text.strip().split("\n", 1)[0].strip() if text.strip() else ""
    return bool(first) and first == expected.strip()


def summarize(records: list[dict]) -> dict:
    # A timed-out request counts at the time waited (a lower bound); other failed requests have no latency.
    lsp_ms = [
        r["lsp"]["ms"] for r in records if r["lsp"]["ms"] is not None and (not r["lsp"]["error"] or r["lsp"]["timeout"])
    ]
    plain_ms = [r["plain"]["ms"] for r in records if r["plain"]["ms"] is not None and not r["plain"]["error"]]
    n = len(records)
    s = {
        "holes": n,
        "lsp_p50": percentile(lsp_ms, 0.5),
        "lsp_p95": percentile(lsp_ms, 0.95),
        "plain_p50": percentile(plain_ms, 0.5),
        "plain_p95": percentile(plain_ms, 0.95),
        "lsp_nonempty": sum(r["lsp"]["nonempty"] for r in records),
        "plain_nonempty": sum(r["plain"]["nonempty"] for r in records),
        "lsp_exact": sum(_first_line_match(r["lsp"]["text"], r["expected"]) for r in records),
        "plain_exact": sum(_first_line_match(r["plain"]["text"], r["expected"]) for r in records),
        "lsp_errors": sum(bool(r["lsp"]["error"]) for r in records),
        "lsp_timeouts": sum(bool(r["lsp"]["timeout"]) for r in records),
        "plain_errors": sum(bool(r["plain"]["error"]) for r in records),
    }
    s["ratio"] = s["lsp_p50"] / s["plain_p50"] if s["lsp_p50"] is not None and s["plain_p50"] else None
    return s


def print_report(records: list[dict], langs: list[str], notes: list[str]) -> None:
    columns = [
        [("language", 11, "<"), ("holes", 5, ">")],
        [("LSP p50", 8, ">"), ("p95", 7, ">")],
        [("plain p50", 9, ">"), ("p95", 7, ">")],
        [("ratio", 5, ">")],
        [("non-empty LSP", 13, ">"), ("plain", 6, ">")],
        [("1st line exact LSP", 18, ">"), ("plain", 6, ">")],
        [("err/t.o.", 8, ">")],
    ]
    rows = []
    for name, recs in [(lang, [r for r in records if r["language"] == lang]) for lang in langs] + [("overall", records)]:
        if not recs:
            continue
        s = summarize(recs)
        n = s["holes"]
        rows.append([
            name, str(n),
            _fmt_ms(s["lsp_p50"]), _fmt_ms(s["lsp_p95"]), _fmt_ms(s["plain_p50"]), _fmt_ms(s["plain_p95"]),
            "-" if s["ratio"] is None else f"{s['ratio']:.3f}",
            f"{100 * s['lsp_nonempty'] / n:.0f}%", f"{100 * s['plain_nonempty'] / n:.0f}%",
            f"{100 * s['lsp_exact'] / n:.0f}%", f"{100 * s['plain_exact'] / n:.0f}%",
            f"{s['lsp_errors'] + s['plain_errors']}/{s['lsp_timeouts']}",
        ])
    print()
    for line in table_lines(columns, rows):
        print(line)
    print("(latencies in ms, LSP timeouts counted at the time waited; ratio = LSP p50 / plain p50; err/t.o. = failed requests of both paths / LSP timeouts)")

    # Where the time goes, from the server's own log line and the plain call's usage.
    gen_lsp = [r["lsp"]["extra"].get("generated_tokens") for r in records if r["lsp"]["extra"].get("generated_tokens") is not None]
    gen_plain = [r["plain"]["extra"].get("generated_tokens") for r in records if r["plain"]["extra"].get("generated_tokens") is not None]
    build_ms = [r["plain"]["extra"]["prompt_build_ms"] for r in records if "prompt_build_ms" in r["plain"]["extra"]]
    overhead = [
        r["lsp"]["ms"] - r["lsp"]["extra"]["server_total_ms"]
        for r in records
        if r["lsp"]["ms"] is not None and "server_total_ms" in r["lsp"]["extra"]
    ]
    if gen_lsp or gen_plain:
        print(
            f"generated tokens (mean): LSP {sum(gen_lsp) / max(1, len(gen_lsp)):.1f} over {len(gen_lsp)} holes, "
            f"plain {sum(gen_plain) / max(1, len(gen_plain)):.1f} over {len(gen_plain)} holes"
        )
    if build_ms:
        print(f"plain prompt building (not timed) p50 {percentile(build_ms, 0.5):.1f} ms")
    lsp_prefill = [r["lsp"]["extra"]["prefill_ms"] for r in records if r["lsp"]["extra"].get("prefill_ms")]
    plain_prefill = [r["plain"]["extra"]["prompt_eval_ms"] for r in records if r["plain"]["extra"].get("prompt_eval_ms")]
    lsp_tok = [
        r["lsp"]["extra"]["decode_ms"] / (r["lsp"]["extra"]["generated_tokens"] - 1)
        for r in records
        if r["lsp"]["extra"].get("generated_tokens", 0) > 1
    ]
    plain_tok = [
        r["plain"]["extra"]["decode_eval_ms"] / r["plain"]["extra"]["decode_eval_tokens"]
        for r in records
        if r["plain"]["extra"].get("decode_eval_tokens")
    ]
    if lsp_prefill and plain_prefill:
        print(
            f"prefill p50: LSP {percentile(lsp_prefill, 0.5):.0f} ms (server log: tokenize + chunked eval + 1st token), "
            f"plain {percentile(plain_prefill, 0.5):.0f} ms (llama.cpp prompt eval only)"
        )
    if lsp_tok and plain_tok:
        print(f"decode per token p50: LSP {percentile(lsp_tok, 0.5):.1f} ms, plain {percentile(plain_tok, 0.5):.1f} ms")
    if overhead:
        print(f"LSP round trip minus the server's own total: p50 {percentile(overhead, 0.5):.1f} ms")
    finishes: dict[str, int] = {}
    for r in records:
        f = r["lsp"]["extra"].get("finish")
        if f:
            finishes[f] = finishes.get(f, 0) + 1
    plain_finishes: dict[str, int] = {}
    for r in records:
        f = r["plain"]["extra"].get("finish")
        if f:
            plain_finishes[f] = plain_finishes.get(f, 0) + 1
    if finishes or plain_finishes:
        print(
            "finish reasons: LSP " + ", ".join(f"{k} {v}" for k, v in sorted(finishes.items()))
            + " | plain " + ", ".join(f"{k} {v}" for k, v in sorted(plain_finishes.items()))
        )
    if finishes.get("timeout"):
        print(
            f"NOTE: {finishes['timeout']} LSP generation(s) hit the server's completion.generation_timeout_s and were "
            "cut short; the plain call has no such cap, so those holes favour the LSP"
        )

    print()
    overall = summarize(records)
    if overall["ratio"] is None:
        print("VERDICT latency: no timing (no successful requests on one of the paths)")
    else:
        ok = overall["ratio"] <= RATIO_TARGET
        print(
            f"VERDICT latency: LSP p50 {overall['lsp_p50']:.0f} ms / plain p50 {overall['plain_p50']:.0f} ms = "
            f"{overall['ratio']:.3f} (target <= {RATIO_TARGET:.2f}): {'PASS' if ok else 'MISS'}"
        )
    for lang in TARGET_LANGUAGES:
        recs = [r for r in records if r["language"] == lang]
        if not recs:
            note = next((n for n in notes if lang in n.lower()), "no holes")
            print(f"VERDICT non-empty {lang}: SKIPPED ({note})")
            continue
        s = summarize(recs)
        share = s["lsp_nonempty"] / s["holes"]
        print(
            f"VERDICT non-empty {lang}: {s['lsp_nonempty']}/{s['holes']} = {100 * share:.1f}% "
            f"(target >= {100 * NONEMPTY_TARGET:.0f}%): {'PASS' if share >= NONEMPTY_TARGET else 'MISS'}"
        )


# ---- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF file or installed model name (default: the installed default model)")
    ap.add_argument("--holes", type=int, default=20, help="holes per language (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="random seed for choosing files and lines (default 0)")
    ap.add_argument("--source-dir", action="append", default=[], metavar="DIR",
                    help="add your own code (language by file extension); repeatable")
    ap.add_argument("--no-default-sources", action="store_true",
                    help="don't use site-packages and npm sources, only --source-dir")
    ap.add_argument("--json-out", metavar="FILE", help="write every per-hole record here")
    ap.add_argument("--plain-stops", choices=("naive", "server"), default="server",
                    help="server (default): the plain call also applies the server's line rules (equal work); "
                    "naive: it stops only at EOG, stop strings or max_tokens")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per LSP request (default 120)")
    ap.add_argument("--load-timeout", type=float, default=600.0, help="seconds to wait for the model to load")
    ap.add_argument("--server-log", default=str(REPO / "build" / "bench_holes_server.log"),
                    help="the server's stderr (default build/bench_holes_server.log)")
    args = ap.parse_args(argv)

    from lsp_server.models import resolve_model

    model = resolve_model(args.model)
    settings = Settings()
    cs = settings.completion

    # Sources per language.
    notes: list[str] = []
    by_lang: dict[str, list[Path]] = {}
    if not args.no_default_sources:
        py_files, note = default_python_files()
        notes.append(note)
        by_lang.setdefault("python", []).extend(py_files)
        js_files, note = default_js_files()
        notes.append(note)
        by_lang.setdefault("javascript", []).extend(js_files)
    for d in args.source_dir:
        if not Path(d).is_dir():
            log(f"--source-dir {d}: not a directory, ignored")
            continue
        for p in source_dir_files(d):
            info = language_for(p)
            if info is not None:
                by_lang.setdefault(info.name, []).append(p)
        notes.append(f"source dir: {d}")
    order = [name for name in (i.name for i in languages.LANGUAGES) if by_lang.get(name)]

    holes: list[Hole] = []
    for lang in order:
        rng = random.Random(f"{args.seed}-{lang}")
        picked = pick_holes(by_lang[lang], lang, args.holes, rng, len(holes))
        if len(picked) < args.holes:
            notes.append(f"{lang}: only {len(picked)} holes found")
        holes.extend(picked)
    if not holes:
        log("no source files with usable lines; nothing to measure")
        for n in notes:
            log("  " + n)
        return 2
    warm_lang = order[0]
    warm = pick_holes(by_lang[warm_lang], warm_lang, 1, random.Random(f"{args.seed}-warmup"), 10_000)
    warmup = warm[0] if warm else holes[0]
    warmup.index = 10_000

    print(f"model: {model}")
    print(
        f"settings: plan {plan_for_file(model, n_ctx=settings.model.n_ctx)[0].summary()}; "
        f"prefix<={cs.max_prefix_tokens} suffix<={cs.max_suffix_tokens} tokens, "
        f"max_tokens line/block={cs.max_tokens_single_line}/{cs.max_tokens_multi_line}, seed={args.seed}, "
        f"plain stops: {args.plain_stops}"
    )
    for n in notes:
        print(f"source: {n}")
    print("holes: " + ", ".join(f"{lang} {sum(h.language == lang for h in holes)}" for lang in order))

    lsp: LspPath | None = None
    records: list[dict] = []
    try:
        log(f"starting the server (log: {args.server_log}) ...")
        workspace = workspace_folders(by_lang)
        lsp = LspPath(model, Path(args.server_log), args.timeout, workspace=workspace)
        lsp.start()
        log("loading the model for the plain path ...")
        t0 = time.perf_counter()
        plain = PlainPath(model, settings, args.plain_stops, workspace)
        log(f"plain model loaded in {time.perf_counter() - t0:.1f} s (template {plain.template.family})")
        status = lsp.wait_ready(args.load_timeout)
        log(f"server ready (family {status.get('family')}, worker pid {status.get('workerPid')})")
        if status.get("family") and status.get("family") != plain.template.family:
            log(f"WARNING: the server uses template {status.get('family')}, the plain path {plain.template.family}")

        log("warming up both paths ...")
        w1 = lsp.complete(warmup)
        w2 = plain.complete(warmup)
        log(f"warm-up: LSP {_fmt_ms(w1.ms)} ms {w1.error or ''}, plain {_fmt_ms(w2.ms)} ms {w2.error or ''}")

        for k, hole in enumerate(holes):
            r_lsp, r_plain, lsp_first = side_by_side(k, hole, lsp, plain)
            rec = {
                **hole_record(hole),
                "order": "lsp-first" if lsp_first else "plain-first",
                "single_line": r_plain.extra.get("single_line"),
                "max_tokens": r_plain.extra.get("max_tokens"),
                "lsp": asdict(r_lsp),
                "plain": asdict(r_plain),
            }
            records.append(rec)
            short = short_name(hole.path)
            def state(r: PathResult) -> str:
                return "timeout" if r.timeout else ("error: " + r.error) if r.error else ("ok" if r.nonempty else "empty")
            log(
                f"[{k + 1}/{len(holes)}] {hole.language} {short}:{hole.line + 1}  "
                f"LSP {_fmt_ms(r_lsp.ms)} ms ({state(r_lsp)})  plain {_fmt_ms(r_plain.ms)} ms ({state(r_plain)})"
            )
    except KeyboardInterrupt:
        log("interrupted; reporting what was measured")
    finally:
        if lsp is not None:
            lsp.close()

    if records:
        print_report(records, order, notes)
    if args.json_out:
        out = {
            "model": str(model),
            "seed": args.seed,
            "holes_per_language": args.holes,
            "plain_stops": args.plain_stops,
            "settings": asdict(settings),
            "notes": notes,
            "summary": {lang: summarize([r for r in records if r["language"] == lang]) for lang in order
                        if any(r["language"] == lang for r in records)} | {"overall": summarize(records) if records else {}},
            "records": records,
        }
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2, ensure_ascii=False), encoding="utf-8")
        print(f"per-hole records: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
