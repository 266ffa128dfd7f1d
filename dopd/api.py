"""The HTTP API (aiohttp): OpenAI completions and chat (streamed as SSE or not), models, health,
Prometheus metrics, the cluster snapshot and the admin route that moves workers between roles.

Every error is an OpenAI-style JSON body with a 4xx status: `{"error": {"message", "type",
"param", "code"}}`. An error after the stream has started arrives as one such `data:` event, then
`data: [DONE]`. A client that goes away aborts its requests everywhere.

Streams coalesce: a handler wakes when its request has news and sends everything that piled up
since, in one chunk — a slow client gets fewer, larger chunks instead of an ever longer queue.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dopd.controller import Controller, Overloaded, RequestState
from dopd.messages import Role
from dopd.protocol import MAX_STOP_LENGTH, MAX_STOP_STRINGS, ChatBody, CompletionBody, RolesBody, message_text
from dopd.request import Request
from dopd.sampling_params import SamplingParams
from dopd.snapshot import cluster_snapshot

log = logging.getLogger("dopd.api")

MAX_BODY_BYTES = 16 * 2**20
JSON = "application/json"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type=JSON)


class Api:
    def __init__(self, controller: Controller, model_name: str, api_key: str | None = None) -> None:
        self.controller = controller
        self.model_name = model_name
        self.api_key = api_key
        self.tokenizer = controller.tokenizer
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._auth])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/cluster", self.cluster)
        app.router.add_post("/v1/cluster/roles", self.roles)
        app.router.add_get("/openapi.json", self.openapi)
        return app

    # ---- middlewares ----------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except ApiError as e:
            return web.Response(body=msgspec.json.encode(error_body(e.message, e.kind, e.param, e.status)),
                                status=e.status, content_type=JSON, headers=e.headers)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            kind = "not_found_error" if e.status == 404 else "invalid_request_error"
            message = {404: f"no route {request.method} {request.path}",
                       405: f"method {request.method} not allowed on {request.path}",
                       413: f"request body too large (limit {MAX_BODY_BYTES} bytes)"}.get(e.status, e.reason)
            return web.Response(body=msgspec.json.encode(error_body(message, kind, code=e.status)), status=e.status,
                                content_type=JSON)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:  # a bug of ours: say so in JSON, keep serving
            log.exception("error handling %s %s", request.method, request.path)
            return web.Response(body=msgspec.json.encode(error_body(f"internal error: {type(e).__name__}: {e}",
                                                                    "server_error", code=500)),
                                status=500, content_type=JSON)

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self.api_key is not None and request.path != "/health":
            # As bytes: a header that is not UTF-8 arrives with surrogate escapes, and must compare
            # unequal, not raise. compare_digest on bytes of any lengths is constant in the content.
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                raise ApiError(401, "invalid or missing API key", kind="authentication_error",
                               headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    # ---- simple routes --------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "dopd",
            "max_model_len": self.controller.max_model_len}]})

    async def health(self, request: web.Request) -> web.Response:
        alive = sum(w.alive for w in self.controller.workers.values())
        if alive == 0 or self.controller.closing:
            return _json({"status": "unavailable", "workers_alive": alive}, status=503)
        return _json({"status": "ok", "workers_alive": alive})

    async def metrics(self, request: web.Request) -> web.Response:
        c = self.controller
        c.telemetry.observe_workers(c.workers.values(), len(c.unplaced) + len(c.handoffs))
        body = generate_latest(self.controller.telemetry.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def cluster(self, request: web.Request) -> web.Response:
        return _json(cluster_snapshot(self.controller))

    async def roles(self, request: web.Request) -> web.Response:
        body = await self._body(request, RolesBody)
        try:
            roles = {int(wid): Role.parse(role) for wid, role in body.roles.items()}
            moves = self.controller.set_roles(roles, reason=body.reason, migrate=body.migrate)
        except ValueError as e:
            raise ApiError(400, str(e), "roles") from None
        return _json({"moves": moves})

    async def openapi(self, request: web.Request) -> web.Response:
        from dopd.openapi import schema

        return _json(schema(self.model_name))

    # ---- generation -----------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, CompletionBody)
        self._check_common(body)
        if body.echo:
            raise ApiError(400, "echo is not supported", "echo")
        if body.suffix:
            raise ApiError(400, "suffix is not supported", "suffix")
        if body.best_of not in (None, 1):
            raise ApiError(400, "best_of > 1 is not supported", "best_of")
        prompts = self._completion_prompts(body.prompt)
        params = self._params(body, body.max_tokens, body.logprobs)
        for text, ids in prompts:  # all valid before any is submitted
            self._check_length(text, ids, params)
        wakeup = asyncio.Event()
        states = []
        try:
            for text, ids in prompts:
                states.append(self._submit("cmpl", text, ids, params, wakeup))
        except ApiError:  # over the limit part-way through a batch: none of it runs
            for st in states:
                self.controller.abort(st.request_id, "rejected with the rest of its batch")
            raise
        render = _CompletionRender(self, states, body.logprobs is not None)
        return await self._respond(request, body, states, wakeup, render)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, ChatBody)
        self._check_common(body)
        if not body.messages:
            raise ApiError(400, "messages must not be empty", "messages")
        try:
            conversation = [{"role": m.role, "content": message_text(m)} for m in body.messages]
            text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template error is the client's message shape, not our fault
            raise ApiError(400, f"could not apply the chat template: {e}", "messages") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        top = body.top_logprobs if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        params = self._params(body, max_tokens, (top or 0) if body.logprobs else None)
        wakeup = asyncio.Event()
        states = [self._submit("chatcmpl", None, ids, params, wakeup)]
        render = _ChatRender(self, states, body.logprobs)
        return await self._respond(request, body, states, wakeup, render)

    async def _body(self, request: web.Request, kind: type):
        raw = await request.read()
        try:  # strict JSON: no NaN or Infinity, valid UTF-8 without lone surrogates
            return msgspec.json.decode(raw, type=kind)
        except msgspec.ValidationError as e:
            raise ApiError(400, f"invalid request: {e}") from None
        except msgspec.DecodeError as e:
            raise ApiError(400, f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "request body is not valid JSON: nested too deeply") from None

    def _check_common(self, body) -> None:
        if body.model is not None and body.model != self.model_name:
            raise ApiError(400, f"the model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           "model", kind="invalid_request_error")
        if body.n != 1:
            raise ApiError(400, "n must be 1", "n")
        if body.presence_penalty or body.frequency_penalty:
            raise ApiError(400, "presence_penalty and frequency_penalty are not supported", "presence_penalty")
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_LENGTH} characters",
                           "stop")

    def _params(self, body, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed,
                stop=body.stop, stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos, logprobs=logprobs,
                skip_special_tokens=body.skip_special_tokens,
            )
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def _completion_prompts(self, prompt) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompt, str):
            items = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            items = [prompt]
        elif all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
            items = list(prompt)
        else:
            raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids, or a list of "
                                "lists of token ids", "prompt")
        if not items:
            raise ApiError(400, "prompt must not be empty", "prompt")
        vocab = len(self.tokenizer)
        out = []
        for item in items:
            if isinstance(item, str):
                ids = self.tokenizer.encode(item)
                out.append((item, ids))
            else:
                if any(not 0 <= t < vocab for t in item):
                    raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
                out.append((None, list(item)))
        return out

    def _check_length(self, text: str | None, ids: list[int], params: SamplingParams) -> None:
        limit = self.controller.max_model_len
        if not ids or (text is not None and not text):
            raise ApiError(400, "prompt must not be empty", "prompt")
        if len(ids) >= limit:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens; the prompt has "
                                f"{len(ids)}", "prompt")
        room = limit - len(ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens; you asked for "
                                f"{len(ids) + params.max_tokens} ({len(ids)} in the prompt, {params.max_tokens} "
                                "to generate)", "max_tokens")

    def _submit(self, prefix: str, text: str | None, ids: list[int], params: SamplingParams,
                wakeup: asyncio.Event) -> RequestState:
        self._check_length(text, ids, params)
        room = self.controller.max_model_len - len(ids)
        request = Request(self.controller.new_request_id(prefix), text, ids, params, params.max_tokens or room,
                          self.tokenizer)
        try:
            st = self.controller.submit(request)
        except Overloaded as e:
            if self.controller.closing:  # not this server's load: it is going away
                raise ApiError(503, str(e), kind="server_error", headers={"Retry-After": "1"}) from None
            raise ApiError(429, f"server busy: {e}", kind="rate_limit_error", headers={"Retry-After": "1"}) from None
        st.wakeup = wakeup
        return st

    async def _respond(self, request: web.Request, body, states: list[RequestState], wakeup: asyncio.Event,
                       render) -> web.StreamResponse:
        try:
            if not body.stream:
                while not all(st.request.finished for st in states):
                    await wakeup.wait()
                    wakeup.clear()
                failed = [st for st in states if st.request.error]
                if failed:  # ours, not the client's: a worker was lost, a handoff or the request timed out
                    raise ApiError(500, failed[0].request.error, kind="server_error")
                return _json(render.full())
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(request, states, wakeup, render, include_usage)
        finally:
            for st in states:  # the client went away, or we are done: nothing may linger
                if not st.request.finished:
                    self.controller.abort(st.request_id, "client disconnected")

    async def _stream(self, request: web.Request, states, wakeup, render, include_usage: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(render.opening())
        done = [False] * len(states)
        while not all(done):
            await wakeup.wait()
            wakeup.clear()
            parts = []
            for i, st in enumerate(states):
                if done[i]:
                    continue
                if st.request.error:
                    parts.append(_sse(error_body(st.request.error, "server_error")))
                    done = [True] * len(states)
                    break
                chunk = render.chunk(i)
                if chunk:
                    parts.append(chunk)
                done[i] = st.request.finished
            if parts:
                await resp.write(b"".join(parts))
        if include_usage and not any(st.request.error for st in states):
            await resp.write(_sse(render.usage_chunk()))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _sse(data) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


class _Render:
    """Shared by both routes: usage, and how many tokens of each request have been sent."""

    object_full = object_chunk = ""

    def __init__(self, api: Api, states: list[RequestState], logprobs) -> None:
        self.api, self.states, self.logprobs = api, states, logprobs
        self.sent = [0] * len(states)
        self.id = states[0].request_id
        self.created = int(time.time())

    def usage(self) -> dict:
        prompt = sum(st.request.num_prompt_tokens for st in self.states)
        completion = sum(st.request.num_output_tokens for st in self.states)
        cached = sum(st.request.num_cached_tokens or 0 for st in self.states)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": self.object_chunk, "created": self.created, "model": self.api.model_name,
                "choices": [], "usage": self.usage()}

    def envelope(self, choices: list, full: bool) -> dict:
        out = {"id": self.id, "object": self.object_full if full else self.object_chunk, "created": self.created,
               "model": self.api.model_name, "choices": choices}
        if full:
            out["usage"] = self.usage()
        return out

    def new_tokens(self, i: int) -> range:
        req = self.states[i].request
        start, self.sent[i] = self.sent[i], req.num_output_tokens
        return range(start, req.num_output_tokens)

    def token_str(self, token_id: int) -> str:
        return self.states[0].request.token_text(token_id)


class _CompletionRender(_Render):
    object_full = object_chunk = "text_completion"

    def opening(self) -> bytes:
        return b""

    def _logprobs(self, i: int, tokens: range) -> dict | None:
        if not self.logprobs:
            return None
        req = self.states[i].request
        ids = [req.output_token_ids[t] for t in tokens]
        return {
            "tokens": [self.token_str(t) for t in ids],
            "token_logprobs": [req.logprobs[t][tid].logprob for t, tid in zip(tokens, ids)],
            "top_logprobs": [{self.token_str(k): v.logprob for k, v in req.logprobs[t].items()} for t in tokens],
            "text_offset": [],
        }

    def chunk(self, i: int) -> bytes:
        req = self.states[i].request
        text, tokens = req.take_text(), self.new_tokens(i)
        if not text and not req.finished and not (self.logprobs and tokens):
            return b""
        choice = {"index": i, "text": text, "logprobs": self._logprobs(i, tokens),
                  "finish_reason": req.finish_reason if req.finished else None}
        return _sse(self.envelope([choice], full=False))

    def full(self) -> dict:
        choices = []
        for i, st in enumerate(self.states):
            req = st.request
            choices.append({"index": i, "text": req.detok.text,
                            "logprobs": self._logprobs(i, range(req.num_output_tokens)),
                            "finish_reason": req.finish_reason, "stop_reason": req.stop_reason})
        return self.envelope(choices, full=True)


class _ChatRender(_Render):
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"

    def opening(self) -> bytes:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return _sse(self.envelope([choice], full=False))

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.token_str(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def _logprobs(self, i: int, tokens: range) -> dict | None:
        if not self.logprobs:
            return None
        req = self.states[i].request
        content = []
        for t in tokens:
            tid = req.output_token_ids[t]
            entry = self._entry(tid, req.logprobs[t][tid].logprob)
            top = sorted(req.logprobs[t].items(), key=lambda kv: kv[1].rank)
            entry["top_logprobs"] = [self._entry(k, v.logprob) for k, v in top if v.rank <= req.params.logprobs]
            content.append(entry)
        return {"content": content}

    def chunk(self, i: int) -> bytes:
        req = self.states[i].request
        text, tokens = req.take_text(), self.new_tokens(i)
        if not text and not req.finished and not (self.logprobs and tokens):
            return b""
        delta = {"content": text} if text else {}
        choice = {"index": 0, "delta": delta, "logprobs": self._logprobs(i, tokens),
                  "finish_reason": req.finish_reason if req.finished else None}
        return _sse(self.envelope([choice], full=False))

    def full(self) -> dict:
        req = self.states[0].request
        choice = {"index": 0, "message": {"role": "assistant", "content": req.detok.text},
                  "logprobs": self._logprobs(0, range(req.num_output_tokens)), "finish_reason": req.finish_reason,
                  "stop_reason": req.stop_reason}
        return self.envelope([choice], full=True)
