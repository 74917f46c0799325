"""The OpenAI-compatible API for the bank's own channels, served beside the chat by the same process:
``POST /v1/chat/completions`` (streamed as server-sent events or not), ``GET /v1/models`` and
``POST /v1/feedback`` (a thumbs up or down by answer id).

Every request needs ``Authorization: Bearer <key>`` (:mod:`feedback.apikeys`); a missing, unknown
or revoked key gets 401 before anything is parsed or generated, and each key has its own requests
per minute (429 past it). Answers go through the web chat's path: the same chat service (adapter,
references, admission: 429 when busy, 503 while draining), the same redaction of the question
before the model or the log sees it (:mod:`feedback.privacy`) and the same turn log with the
adapter that answered (:mod:`feedback.turns`). A response's ``id`` is ``chatcmpl-<turn id>``.

Conversation history: the last message must be the customer's (``user``) question. Earlier
``system``/``developer`` messages are ignored, so a client never writes the system turn (the
persona and references stay the server's). Earlier ``user``/``assistant`` pairs are kept only when
they are this key's own logged turns, word for word (:func:`feedback.turns.verified_history`): an
assistant message the client made up ("as agreed, your fee is refunded") never reaches the model.

The chat service and error classes are handed in by ``app.py`` (``feedback`` imports no chat code).
"""

from __future__ import annotations

import collections
import json
import logging
import secrets
import threading
import time

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from feedback import apikeys, privacy, store, turns

log = logging.getLogger(__name__)

COMPLETIONS_PATH, MODELS_PATH, FEEDBACK_PATH = "/v1/chat/completions", "/v1/models", "/v1/feedback"
MAX_BODY_BYTES = 256 * 1024
MAX_MESSAGES = 200
IGNORED_ROLES = ("system", "developer")
NO_STORE = {"Cache-Control": "no-store"}


class RateLimiter:
    """Requests per key in the last minute, in memory (one serving process per home)."""

    def __init__(self) -> None:
        self._seen: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def allow(self, name: str, per_minute: int) -> bool:
        now = time.monotonic()
        with self._lock:
            seen = self._seen[name]
            while seen and seen[0] <= now - 60:
                seen.popleft()
            if len(seen) >= per_minute:
                return False
            seen.append(now)
            return True


def routes(service, db, base_model: str, metrics, turns_in_flight: set, busy_error: type, chat_error: type) -> list[Route]:
    """The ``/v1`` routes: ``service`` is the web chat's ``ChatService``, ``db`` its
    ``ThreadLocalDB``, ``turns_in_flight`` the set a draining server marks interrupted, and
    ``busy_error``/``chat_error`` the service's refusal classes (429/503 and 400)."""
    cfg = service.cfg
    limiter = RateLimiter()

    async def caller(request: Request) -> dict | JSONResponse:
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header[:7].lower() == "bearer " else None
        found = await run_in_threadpool(lambda: apikeys.authenticate(db.get(), key))
        if found is None:
            return _error(401, "Invalid or revoked API key.", "invalid_api_key",
                          headers={"WWW-Authenticate": "Bearer"})
        if not limiter.allow(found["name"], found["per_minute"]):
            return _error(429, "This key's requests per minute are used up; try again in a minute.",
                          "rate_limit_exceeded", headers={"Retry-After": "60"})
        return found

    async def caller_and_body(request: Request) -> tuple[dict, dict] | JSONResponse:
        """The key's record and the JSON body, or the refusal to send: the key is checked first,
        so a bad key costs no body reading."""
        found = await caller(request)
        if isinstance(found, JSONResponse):
            return found
        body = await _json_body(request)
        return body if isinstance(body, JSONResponse) else (found, body)

    async def completions(request: Request):
        checked = await caller_and_body(request)
        if isinstance(checked, JSONResponse):
            return checked
        found, body = checked
        parsed = _conversation(body)
        if isinstance(parsed, JSONResponse):
            return parsed
        question, sent_pairs = parsed
        name = found["name"]

        def start():
            local = db.get()
            pairs = turns.verified_history(local, name, sent_pairs, cfg.max_conversation_turns, cfg.max_history_bytes)
            # The model sees what is stored: card numbers, IBANs, e-mails ... as placeholders.
            redacted = privacy.redact(question)
            stream = service.answer(redacted, pairs)
            session_id = turns.new_session(local, "test" if found["test"] else "api", _address(request), api_key=name)
            turn_id = turns.start_turn(local, session_id, redacted, pairs, base_model)
            turns_in_flight.add(turn_id)
            return stream, turn_id

        try:
            stream, turn_id = await run_in_threadpool(start)
        except busy_error as exc:
            metrics.busy_refusals.inc()
            return _error(503 if service.draining or service.loading else 429, str(exc), "server_busy", headers={"Retry-After": "30"})
        except chat_error as exc:
            return _error(400, str(exc), "invalid_request_error")
        created, model = int(time.time()), _model_name(service)

        def finish(status: str, error: str | None) -> None:
            try:
                turns.finish_turn(db.get(), turn_id, stream.text, stream.stats, status, error)
            finally:
                turns_in_flight.discard(turn_id)
                metrics.observe(status, stream.stats)

        if body.get("stream"):
            return StreamingResponse(_events(stream, turn_id, created, model, finish), media_type="text/event-stream",
                                     headers={**NO_STORE, "X-Accel-Buffering": "no"})

        def run() -> None:
            status, error = "interrupted", None
            try:
                for _piece in stream:
                    pass
                status = _ended(stream)
            except Exception as exc:
                status, error = "error", f"{exc.__class__.__name__}: {exc}"
                raise
            finally:
                finish(status, error)

        try:
            await run_in_threadpool(run)
        except Exception:
            return _internal_error(f"generation failed for turn {turn_id}")
        stats = stream.stats
        return JSONResponse({
            "id": f"chatcmpl-{turn_id}", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": stream.text}, "finish_reason": stats.finish_reason or "stop"}],
            "usage": {"prompt_tokens": stats.tokens_in, "completion_tokens": stats.tokens_out,
                      "total_tokens": stats.tokens_in + stats.tokens_out},
        }, headers=NO_STORE)

    async def models(request: Request):
        found = await caller(request)
        if isinstance(found, JSONResponse):
            return found
        return JSONResponse({"object": "list", "data": [
            {"id": _model_name(service), "object": "model", "created": 0, "owned_by": "tuneloop"}]}, headers=NO_STORE)

    async def feedback(request: Request):
        checked = await caller_and_body(request)
        if isinstance(checked, JSONResponse):
            return checked
        found, body = checked
        turn_id = body.get("turn_id", body.get("id"))
        if isinstance(turn_id, str) and turn_id.startswith("chatcmpl-"):
            turn_id = turn_id.removeprefix("chatcmpl-")
        try:
            turn_id = int(turn_id)
        except (TypeError, ValueError):
            return _error(400, "turn_id must be the answer's id (chatcmpl-N or N).", "invalid_request_error")

        def vote() -> dict:
            local = db.get()
            # Only this key's answers: another channel's turn reads as "no such answer".
            session_id = turns.api_session_of(local, turn_id, found["name"])
            return store.log_vote(local, session_id, turn_id, body.get("value"), body.get("reason"))

        try:
            result = await run_in_threadpool(vote)
        except store.FeedbackError as exc:
            return _error(400, str(exc), "invalid_request_error")
        return JSONResponse({"id": result["id"], "turn_id": result["turn_id"],
                             "value": "up" if result["value"] == store.UP else "down"}, headers=NO_STORE)

    return [Route(COMPLETIONS_PATH, completions, methods=["POST"]), Route(MODELS_PATH, models, methods=["GET"]),
            Route(FEEDBACK_PATH, feedback, methods=["POST"])]


async def _events(stream, turn_id: int, created: int, model: str, finish):
    """The answer as OpenAI ``chat.completion.chunk`` server-sent events, ending ``data: [DONE]``;
    the turn is finished whatever happens (a client that hangs up leaves it ``interrupted``)."""
    base = {"id": f"chatcmpl-{turn_id}", "object": "chat.completion.chunk", "created": created, "model": model}

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        return "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}) + "\n\n"

    status, error, finished = "interrupted", None, False
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in iterate_in_threadpool(iter(stream)):
            yield chunk({"content": piece})
        # Stored before the client hears the end: a client that reads the turn on [DONE] finds it.
        await run_in_threadpool(finish, _ended(stream), None)
        finished = True
        yield chunk({}, stream.stats.finish_reason or "stop")
        yield "data: [DONE]\n\n"
    except Exception as exc:
        status, error = "error", f"{exc.__class__.__name__}: {exc}"
        error_id = secrets.token_hex(4)
        log.exception("generation failed for turn %s (error %s)", turn_id, error_id)
        yield "data: " + json.dumps({"error": {"message": f"Sorry, something went wrong (error {error_id}).",
                                               "type": "server_error"}}) + "\n\n"
    finally:
        if not finished:
            await run_in_threadpool(finish, status, error)


def _ended(stream) -> str:
    """The status of a turn whose answer ended: "cut" when it stopped at max_new_tokens (as in the web chat)."""
    return "cut" if stream.stats.finish_reason == "length" else "complete"


def _conversation(body: dict) -> tuple[str, list[tuple[str, str]]] | JSONResponse:
    """``(question, earlier (question, answer) pairs)`` of a request's ``messages``, or a 400."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        return _error(400, f"messages must be a list of 1 to {MAX_MESSAGES} messages.", "invalid_request_error")
    texts = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        content = _text(message.get("content")) if isinstance(message, dict) else None
        if role not in ("user", "assistant", *IGNORED_ROLES) or content is None:
            return _error(400, "each message needs a role (user, assistant or system) and text content.",
                          "invalid_request_error")
        if role not in IGNORED_ROLES:  # the system turn is the server's: a client's is ignored
            texts.append((role, content))
    if not texts or texts[-1][0] != "user":
        return _error(400, "the last message must be the customer's (role user).", "invalid_request_error")
    pairs, earlier = [], texts[:-1]
    for (role, text), (next_role, next_text) in zip(earlier, earlier[1:]):
        if role == "user" and next_role == "assistant":
            pairs.append((text, next_text))
    return texts[-1][1], pairs


def _text(content) -> str | None:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


async def _json_body(request: Request) -> dict | JSONResponse:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            return _error(413, f"The request is larger than {MAX_BODY_BYTES} bytes.", "invalid_request_error")
    try:
        parsed = json.loads(body)
    except ValueError:
        return _error(400, "The body must be JSON.", "invalid_request_error")
    return parsed if isinstance(parsed, dict) else _error(400, "The body must be a JSON object.", "invalid_request_error")


def _model_name(service) -> str:
    """The adapter serving now (``base`` for the base model): what ``model`` reports. The turn log
    records the adapter that actually answered each turn."""
    return service.backend.active or "base"


def _address(request: Request) -> str:
    client = request.client
    return getattr(client, "host", None) or "unknown"


def _error(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": code, "code": code}}, status_code=status,
                        headers={**NO_STORE, **(headers or {})})


def _internal_error(what: str) -> JSONResponse:
    error_id = secrets.token_hex(4)
    log.exception("%s (error %s)", what, error_id)
    return _error(500, f"Sorry, something went wrong (error {error_id}). Please try again.", "server_error")
