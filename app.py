"""Gradio wiring: the customer chat at ``/`` and the staff review view at ``/staff``.

No logic lives here beyond calling the services: answers come from :mod:`assistant.chat`, votes,
corrections and the review queue from :mod:`feedback.store`, sign-in from :mod:`feedback.auth`.
Every action is also an API endpoint for ``gradio_client`` (see ``API_NAMES``); the customer's
session id lives in ``gr.State`` (server-side), so one client is one conversation.

Staff sign in through a plain HTML form posted to ``/staff/login`` (a FastAPI route, never a Gradio
event, so the password is never an event input Gradio keeps or a browser's run history records). A
success sets an HttpOnly, SameSite=Strict cookie (Secure over TLS) naming a server-side session in
SQLite; every staff function reads that cookie from the request itself, whichever way it is called
(page, API name or function index). Gradio routes this app does not use are refused before Gradio
sees them (``REFUSED_ROUTES``). With ``[serve] staff_port`` the staff view, its sign-in and its events
live on an address of their own and the chat's address answers 404 for all of them.

The server opens before the model has loaded (``ChatService.loading``): ``/readyz`` answers 503
"starting", a customer's question gets a "starting up" message and ``/v1`` answers 503 meanwhile.
"""

from __future__ import annotations

import errno
import functools
import hmac
import html
import json
import logging
import re
import secrets
import socket
import time
import urllib.parse

from assistant import paths

paths.configure_environment()

import gradio as gr  # noqa: E402  (imported after the environment keeps it offline and quiet)

from assistant import adapters  # noqa: E402
from assistant.chat import CUT, STARTING_MESSAGE, BusyError, ChatError, ChatService, StartingError  # noqa: E402
from assistant.metrics import CONTENT_TYPE, ServingMetrics  # noqa: E402
from feedback import auth, privacy, review, store, turns  # noqa: E402
from feedback import api as channel_api  # noqa: E402  (the OpenAI-compatible /v1 routes)
from feedback.db import ThreadLocalDB  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

log = logging.getLogger(__name__)

TITLE = "tuneloop assistant"
# Shown as the answer from the moment a question is sent until its first token arrives: a title
# with Gradio's spinner and no text, so an API caller timing the first text is not misled.
TYPING = "Writing an answer…"
ANSWERING_NOTE = "Writing an answer: your next question stays in the box until it is done (or press Stop)."
STAFF_PATH = "/staff"
STAFF_LOGIN_PATH = "/staff/login"
STAFF_LOGOUT_PATH = "/staff/logout"
STAFF_COOKIE = "tuneloop_staff"
STAFF_ONLY = "Staff only: sign in at /staff first."
HEALTH_PATH, READY_PATH, METRICS_PATH = "/healthz", "/readyz", "/metrics"
CHANNEL_API_PATH = "/v1/"
# Where Gradio runs an event: by API name, or (queue/join) by the function index in the JSON body.
EVENT_BY_NAME = re.compile(r"/gradio_api/(?:call/v2|call|run|api)/([^/]+)/?")
EVENT_BY_INDEX = "/gradio_api/queue/join"
MAX_LOGIN_BODY_BYTES = 4096
# Gradio routes this app does not use, answered 404 before Gradio sees them: deep links (they wrote
# every component's value, a password or a customer's card number included, to disk and reopened
# it for anyone with the link), uploads (no component takes files), run history, media streaming,
# screen recording, the editing assistant, the proxy and dev reload.
REFUSED_ROUTES = (
    "/gradio_api/deep_link", "/gradio_api/upload", "/gradio_api/upload_progress", "/gradio_api/runs",
    "/gradio_api/run-history", "/gradio_api/stream", "/gradio_api/process_recording", "/gradio_api/vibe",
    "/gradio_api/undo-vibe", "/gradio_api/proxy=", "/gradio_api/dev", "/gradio_api/profiling", "/monitoring",
)
# api_name -> parameters, in order (the session comes from the page state, the staff member from the
# sign-in cookie; never from the caller's arguments).
API_NAMES = {
    "chat": "message",
    "vote": "turn_id, value ('up' or 'down'), reason (optional, thumbs-down only)",
    "staff_signout": "",
    "review_queue": "page (1 = newest complaints first), then the filters (thumbs-down only, has a correction, "
                    "not yet reviewed, adapter, label, from day, to day, show CLI/test turns), all optional",
    "review_item": "turn_id",
    "correct": "turn_id, corrected answer, label (optional), new label (when the label is 'new label…')",
    "approve": "turn_id, label (optional), new label (when the label is 'new label…')",
    "reject": "turn_id (out of the queue, never trained on)",
    "undo": "turn_id (reverts your latest correction, approval or rejection of it)",
    "add_example": "question, answer, label (optional)",
    "review_next_pair": "",
    "review_mark": "pair_id, A accurate and helpful (bool), B accurate and helpful (bool)",
}
QUEUE_HEADERS = ["answer #", "vote", "reason", "question", "answer", "adapter", "asked at (UTC)"]
# The label list's deliberate step to a label the data does not have yet (a textbox appears for it).
NEW_LABEL = "new label…"
# Keyboard shortcuts of the staff review panel: key (with Alt) -> the elem_id of the button it presses.
REVIEW_KEYS = {"Enter": "review-save-next", "ArrowRight": "review-skip", "ArrowLeft": "review-previous"}


def _shown(fn):
    """Refusals from the services become a gr.Error the person sees (and an API caller receives);
    anything else is logged with an id and shown only as a generic message with that id."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (store.FeedbackError, auth.AuthError, ChatError, turns.TooManySessions) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as exc:
            raise _internal_error(f"{fn.__name__} failed") from exc

    return wrapper


def _internal_error(what: str) -> gr.Error:
    """A generic message with an id for the person; the detail goes to the log under the same id."""
    error_id = secrets.token_hex(4)
    log.exception("%s (error %s)", what, error_id)
    return gr.Error(f"Sorry, something went wrong (error {error_id}). Please try again.", print_exception=False)


def build_app(
    service: ChatService,
    db: ThreadLocalDB,
    base_model: str,
    title: str = TITLE,
) -> gr.Blocks:
    """The customer chat at ``/`` (answers stream and are logged with their adapter; customers vote)
    and the staff view at ``/staff`` (review queue, corrections, approvals, examples), with the
    staff sign-in form at ``/staff/login``. :func:`launch` serves it with :data:`REFUSED_ROUTES` off.

    With ``[serve] staff_port`` the staff view and sign-in are a second Blocks (``demo.tuneloop_staff``)
    that :func:`launch` serves on ``staff_host:staff_port``; the chat's address then has no staff page,
    route or event at all. The service may still be loading its model (``service.loading``)."""
    cfg = service.cfg
    metrics = ServingMetrics(lambda: service.in_flight, lambda: None if service.loading else service.backend.active,
                             lambda: store.stats(db.get()))
    with gr.Blocks(title=title) as demo:
        _customer_page(demo, service, db, base_model, title, metrics)
    # Turns being answered now: a server stopping before they end marks them interrupted.
    demo.tuneloop_turns_in_flight = set()
    customer_routes = _operations_routes(service, db, metrics) + channel_api.routes(
        service, db, base_model, metrics, demo.tuneloop_turns_in_flight, busy_error=BusyError, chat_error=ChatError)
    if not cfg.staff_port:
        with demo.route("Staff", STAFF_PATH.strip("/"), show_in_navbar=False):
            _staff_page(demo, db, title)
        demo.tuneloop_server = _server_settings(cfg, _staff_routes(db, cfg, title) + customer_routes,
                                                blocks=demo, db=db, service=service, staff=True, customers=True)
        return demo
    # A Blocks of its own, not one Blocks behind two servers: Gradio runs an event by API name or by
    # function index through several routes (queue/join, call, run, api ...), and a guard choosing
    # by port would have to know each of them; a Blocks without the staff functions has none to run.
    with gr.Blocks(title=f"{title}: staff") as staff:
        pass  # its "/" leads to /staff (_SurfaceGuard)
    with staff.route("Staff", STAFF_PATH.strip("/"), show_in_navbar=False):
        _staff_page(staff, db, title)
    staff.tuneloop_server = _server_settings(cfg, _staff_routes(db, cfg, title), blocks=staff,
                                             db=db, service=service, staff=True, customers=False)
    staff.tuneloop_address = (cfg.staff_host, cfg.staff_port)
    demo.tuneloop_server = _server_settings(cfg, customer_routes, blocks=demo, db=db,
                                            service=service, staff=False, customers=True)
    demo.tuneloop_staff = staff
    return demo


def _server_settings(cfg, routes: list[Route], **guard: object) -> dict:
    """What launch() passes to Gradio for one app: our routes first, the guard (:class:`_SurfaceGuard`,
    with ``guard`` its settings) around everything, and the Gradio surface this app does not use turned off."""
    return {
        "app_kwargs": {"routes": routes, "middleware": [Middleware(_SurfaceGuard, **guard)]},
        "run_history": False,
        "footer_links": [],
        "max_file_size": "1kb",
        "state_session_capacity": cfg.max_browser_sessions,
    }


def _customer_page(demo: gr.Blocks, service: ChatService, db: ThreadLocalDB, base_model: str, title: str,
                   metrics: ServingMetrics) -> None:
    cfg = service.cfg
    limits = store.VoteLimits(per_address=cfg.votes_per_address_per_minute, overall=cfg.votes_per_minute)

    def respond(message: str, session_id: str | None, request: gr.Request):
        # The model sees what is stored: card numbers, IBANs, e-mails ... as placeholders.
        question = privacy.redact((message or "").strip())
        # The conversation is the server's record of this session, never what the client sends.
        earlier = (turns.conversation(db.get(), session_id, cfg.max_conversation_turns, cfg.max_history_bytes)
                   if session_id else [])
        pairs = [(t["question"], t["answer"]) for t in earlier]
        history, answer_turns = [], []
        for t in earlier:
            history += [{"role": "user", "content": _as_text(t["question"])},
                        {"role": "assistant", "content": _as_text(t["answer"])}]
            # The turn id of every chat message (None for questions), so a like on any answer finds its turn.
            answer_turns += [None, t["turn_id"]]
        asked = [{"role": "user", "content": _as_text(question)}] if question else []
        if question:
            # The question shows at once, with a typing mark, before the search and the first token.
            yield history + asked + [_chat_note(TYPING)], "", session_id, None, answer_turns + [None, None]
        try:
            if not session_id:
                session_id = turns.new_session(db.get(), "customer", _address(request), cfg.sessions_per_address_per_minute)
            stream = service.answer(question, pairs)
        except (turns.TooManySessions, BusyError, ChatError) as exc:
            if isinstance(exc, BusyError) and not isinstance(exc, StartingError):
                metrics.busy_refusals.inc()
            # In the page the refusal is the assistant's reply and the draft comes back to the box;
            # an API caller still gets the error (visible=False only keeps the red toast away).
            yield (history + asked + [_chat_note(str(exc))], message, session_id, None,
                   answer_turns + [None] * (len(asked) + 1))
            raise gr.Error(str(exc), visible=False, print_exception=False) from None
        turn_id = turns.start_turn(db.get(), session_id, question, pairs, base_model)
        demo.tuneloop_turns_in_flight.add(turn_id)
        history += asked + [_chat_note(TYPING)]
        answer_turns += [None, turn_id]
        status, error, failure = "interrupted", None, None
        try:
            for _piece in stream:
                history[-1] = {"role": "assistant", "content": _as_text(stream.text)}
                # The box is left alone (it was cleared when the question was taken): a draft the
                # customer types meanwhile survives every piece of the answer.
                yield history, gr.update(), session_id, turn_id, answer_turns
            # An answer cut at max_new_tokens was trimmed to its last sentence end (Stream).
            status = "cut" if stream.stats.finish_reason == CUT else "complete"
        except Exception as exc:
            failure = _internal_error(f"generation failed for turn {turn_id}")
            status, error = "error", f"{failure.message}: {exc.__class__.__name__}: {exc}"
        finally:
            # Runs also when the customer disconnects or presses Stop mid-answer (GeneratorExit):
            # what was streamed so far is kept, marked "interrupted".
            turns.finish_turn(db.get(), turn_id, stream.text, stream.stats, status, error)
            demo.tuneloop_turns_in_flight.discard(turn_id)
            metrics.observe(status, stream.stats)
        history[-1] = {"role": "assistant", "content": _as_text(stream.text)}
        if failure is not None:
            # What streamed before the failure stays (it is logged); the apology follows it.
            if not stream.text:
                history.pop()
                answer_turns.pop()
            yield history + [_chat_note(failure.message)], gr.update(), session_id, turn_id, answer_turns + [None]
            raise gr.Error(failure.message, visible=False, print_exception=False)
        yield history, gr.update(), session_id, turn_id, answer_turns

    @_shown
    def vote(turn_id: int, value: str, reason: str, session_id: str | None) -> str:
        result = store.log_vote(db.get(), session_id, turn_id, value, reason, limits)
        return _vote_note(result)

    @_shown
    def vote_from_like(answer_turns: list | None, session_id: str | None, liked: gr.LikeData):
        index = liked.index[0] if isinstance(liked.index, (list, tuple)) else liked.index
        turn_id = (answer_turns or [])[index] if 0 <= index < len(answer_turns or []) else None
        if turn_id is None or liked.liked not in (True, False):
            return gr.update(), gr.update(visible=False), None
        result = store.log_vote(db.get(), session_id, turn_id, "up" if liked.liked else "down", None, limits)
        # A thumbs-down opens the optional "what was wrong?" box for that answer.
        return _vote_note(result), gr.update(visible=not liked.liked, value=""), turn_id

    @_shown
    def send_reason(reason: str, turn_id: int | None, session_id: str | None):
        result = store.log_vote(db.get(), session_id, turn_id, "down", reason, limits)
        return _vote_note(result), gr.update(visible=False, value="")

    gr.Markdown(f"## {title}")
    session = gr.State(None)
    answer_turns = gr.State([])
    reason_turn = gr.State(None)
    # The welcome and the example questions show while the chat is empty (Gradio hides both after
    # the first message), so they are never part of the conversation or its turn ids.
    chatbot = gr.Chatbot(label="Chat", height=480, render_markdown=False, sanitize_html=True,
                         placeholder=html.escape(cfg.welcome) or None,
                         examples=[{"text": question} for question in cfg.example_questions()] or None)
    last_turn = gr.Number(label="turn", visible=False, precision=0)
    with gr.Row():
        box = gr.Textbox(placeholder="Ask a question…", show_label=False, scale=8, max_lines=6)
        send = gr.Button("Send", variant="primary", scale=1)
        stop = gr.Button("Stop", variant="stop", scale=1, visible=False)
    # Shown while an answer streams: the page takes one question at a time (a second Enter is not
    # sent) and the draft stays in the box until this answer ends or is stopped.
    waiting = gr.Markdown(ANSWERING_NOTE, visible=False, elem_id="answering-note")
    if cfg.disclaimer.strip():
        gr.Markdown(html.escape(cfg.disclaimer.strip()), elem_id="disclaimer")
    with gr.Row(visible=False) as reason_row:
        reason = gr.Textbox(
            label="What was wrong with this answer? (optional)", max_length=store.MAX_REASON_CHARS, scale=8
        )
        reason_send = gr.Button("Send reason", scale=1)
    vote_note = gr.Markdown()
    # API-only inputs of `vote`; in the page customers vote with the thumbs under each answer.
    with gr.Row(visible=False):
        vote_turn = gr.Number(label="turn_id", precision=0)
        vote_value = gr.Textbox(label="value")
        vote_reason = gr.Textbox(label="reason")
        vote_button = gr.Button("vote")

    # Stop takes Send's place while an answer streams (as gr.ChatInterface does); registered before
    # the answer's event because the page runs a trigger's events in the order they were added.
    # Queued like every event here: _SurfaceGuard refuses /run/predict, the route of queue=False events.
    controls = [send, stop, waiting]
    gr.on([box.submit, send.click], _answering, None, controls, api_visibility="private")
    # No session on page load: a conversation (a row in SQLite) starts with its first message.
    # Enter and Send are one event: its default trigger_mode "once" makes the page send nothing
    # more while an answer streams, so a second question stays in the box (two events would let
    # Enter start a second answer beside one Send started).
    ask = gr.on(
        [box.submit, send.click],
        respond,
        inputs=[box, session],
        outputs=[chatbot, box, session, last_turn, answer_turns],
        api_name="chat",
        concurrency_id="chat",
        # Gradio's queue does not hold chats back: ChatService admits `concurrency` answers
        # plus `max_queue` waiting and tells the rest, at once, to try again.
        concurrency_limit=service.in_flight_limit,
    )
    # A click on an example question asks it, as if typed and sent.
    example = chatbot.example_select(_example_text, None, box, api_visibility="private")
    example.then(_answering, None, controls, api_visibility="private")
    ask_example = example.then(
        respond, inputs=[box, session], outputs=[chatbot, box, session, last_turn, answer_turns],
        api_visibility="private", concurrency_id="chat", concurrency_limit=service.in_flight_limit,
    )
    # Stop cancels the answer's event; Gradio closes `respond` once the piece being generated is done:
    # its finally logs what streamed so far as "interrupted", and the answer's stream, closed with it,
    # gives its ChatService place back then.
    for event in (ask, ask_example):
        event.then(_answered, None, controls, api_visibility="private")
    stop.click(_stopped, chatbot, [*controls, chatbot], cancels=[ask, ask_example], api_visibility="private")
    vote_button.click(vote, [vote_turn, vote_value, vote_reason, session], vote_note, api_name="vote")
    chatbot.like(vote_from_like, [answer_turns, session], [vote_note, reason_row, reason_turn], api_visibility="private")
    for trigger in (reason.submit, reason_send.click):
        trigger(send_reason, [reason, reason_turn, session], [vote_note, reason_row], api_visibility="private")


def _answering():
    """Send, Stop and the one-at-a-time note while an answer streams: Send hidden, the others shown."""
    return gr.update(visible=False), gr.update(visible=True), gr.update(visible=True)


def _answered():
    """Send, Stop and the note once the answer has ended, failed or been stopped."""
    return gr.update(visible=True), gr.update(visible=False), gr.update(visible=False)


def _stopped(history: list | None):
    """After Stop: the controls as :func:`_answered` leaves them, and the chat without a typing mark
    left at its end (stopped before the first word: the question stays, with no answer)."""
    history = list(history or [])
    if history and (history[-1].get("metadata") or {}).get("title") == TYPING:
        history.pop()
    return (*_answered(), history)


def _chat_note(text: str) -> dict:
    """An assistant message the server did not log: a refusal or an apology (or the typing mark)."""
    if text == TYPING:
        return {"role": "assistant", "content": "", "metadata": {"title": TYPING, "status": "pending"}}
    return {"role": "assistant", "content": _as_text(text)}


def _example_text(selected: gr.SelectData) -> str:
    value = selected.value
    return value.get("text", "") if isinstance(value, dict) else ""


def _vote_note(result: dict) -> str:
    if result["flagged"]:
        return "You are rating very quickly; this rating was saved but set aside for a person to check."
    return "Thanks for the rating." if result["value"] == store.UP else "Thanks; staff will review this answer."


def _staff_page(demo: gr.Blocks, db: ThreadLocalDB, title: str) -> None:
    def signed_in(request: gr.Request) -> str:
        """The staff member of the request's sign-in cookie; refused generically otherwise."""
        return _staff_of(db, request)

    @_shown
    def load_panel(request: gr.Request):
        name = signed_in(request)
        return name, gr.update(visible=True), gr.update(visible=False)

    @_shown
    def signout(request: gr.Request):
        # The page's button goes to /staff/logout, which also clears the cookie; API callers use this.
        signed_in(request)
        auth.end_session(db.get(), _cookie(request))
        return "", gr.update(visible=False), gr.update(visible=True)

    @_shown
    def queue(page: float | None, thumbs_down, has_correction, not_reviewed, adapter, label_filter,
              since, until, show_hidden, request: gr.Request):
        filters = (thumbs_down, has_correction, not_reviewed, adapter, label_filter, since, until, show_hidden)
        signed_in(request)
        return [
            [item["turn_id"], item["vote"] or "", item["reason"] or "", item["question"],
             item["answer"] or "", item["adapter"] or "base model", item["created_at"][:19].replace("T", " ")]
            for item in store.review_queue(db.get(), _page(page), filters=_queue_filter(*filters))
        ]

    @_shown
    def queue_note(page: float | None, thumbs_down, has_correction, not_reviewed, adapter, label_filter,
                   since, until, show_hidden, request: gr.Request) -> str:
        filters = (thumbs_down, has_correction, not_reviewed, adapter, label_filter, since, until, show_hidden)
        signed_in(request)
        chosen = _queue_filter(*filters)
        listed = store.review_queue_size(db.get(), chosen)
        pages = max(1, -(-listed // store.REVIEW_PAGE_SIZE))
        counts = store.review_counts(db.get(), chosen.show_hidden)
        return (f"Page {_page(page)} of {pages}: {listed} answers match the filters. "
                + " · ".join(f"{name}: {counts[key]}" for key, name in (
                    ("thumbs_down", "thumbs-down"), ("has_correction", "has a correction"),
                    ("not_reviewed", "not reviewed"), ("rejected", "rejected"), ("all", "all"))))

    @_shown
    def label_choices(request: gr.Request):
        signed_in(request)
        return gr.update(choices=[""] + store.labels(db.get()))

    @_shown
    def newer_page(page: float | None, request: gr.Request) -> int:
        signed_in(request)
        return max(1, _page(page) - 1)

    @_shown
    def older_page(page: float | None, request: gr.Request) -> int:
        signed_in(request)
        return _page(page) + 1

    def panel_for(turn_id: int | None, note: str = ""):
        """The item panel for ``turn_id``; an empty panel (and ``note``) when there is none."""
        if turn_id is None:
            return (None, [], "", "Nothing left in this queue.", "", "", gr.update(value=None), "",
                    gr.update(value="", visible=False), "", note or "Nothing left in this queue.")
        return show_item(turn_id) + (note,)

    def show_item(turn_id: int):
        item = store.review_item(db.get(), turn_id)
        conversation = []
        for asked, answered in item["history"] + [[item["question"], item["answer"] or ""]]:
            conversation += [{"role": "user", "content": _as_text(asked)}, {"role": "assistant", "content": _as_text(answered)}]
        vote = {"up": "thumbs-up", "down": "thumbs-down"}.get(item["vote"], "not rated")
        if item["reason"]:
            vote += f": {item['reason']}"
        done = [f"{c['kind']} by {c['staff_user']} at {c['created_at'][:19]}" for c in item["corrections"]]
        if done:
            vote += "; already reviewed: " + ", ".join(done)
        latest_label = next((c["label"] for c in reversed(item["corrections"]) if c["label"]), "")
        # The correction box starts empty: the answer it corrects is shown beside it, not inside it.
        return (item["turn_id"], conversation, item["adapter"] or "none (base model)", vote, item["answer"] or "", "",
                gr.update(choices=[""] + store.labels(db.get()) + [NEW_LABEL], value=latest_label),
                "", gr.update(value="", visible=False), _references_text(item["references"]))

    @_shown
    def open_item(turn_id: int | None, request: gr.Request):
        signed_in(request)
        return show_item(turn_id)

    def chosen_label(label: str | None, new_label: str | None) -> str | None:
        # "new label…" is a deliberate step: the label is the textbox's, refused if it only re-spells one.
        return store.check_new_label(db.get(), new_label) if label == NEW_LABEL else label

    @_shown
    def correct(turn_id: int | None, answer: str, label: str, new_label: str | None = None, request: gr.Request = None):
        staff = signed_in(request)
        row = store.record_correction(db.get(), staff, turn_id, answer, chosen_label(label, new_label))
        return f"Correction {row} saved for answer {int(turn_id)}."

    @_shown
    def approve(turn_id: int | None, label: str, new_label: str | None = None, request: gr.Request = None):
        staff = signed_in(request)
        row = store.approve(db.get(), staff, turn_id, chosen_label(label, new_label))
        return f"Answer {int(turn_id)} approved (row {row})."

    @_shown
    def reject(turn_id: int | None, request: gr.Request):
        store.reject(db.get(), signed_in(request), turn_id)
        return f"Answer {int(turn_id)} rejected: out of the queue, never trained on (Undo brings it back)."

    @_shown
    def undo(turn_id: int | None, request: gr.Request):
        undone = store.undo(db.get(), signed_in(request), turn_id)
        return f"Your {undone['action']} of answer {int(turn_id)} is undone."

    @_shown
    def save_and_next(turn_id, answer, label, new_label, thumbs_down, has_correction, not_reviewed, adapter,
                      label_filter, since, until, show_hidden, request: gr.Request):
        filters = (thumbs_down, has_correction, not_reviewed, adapter, label_filter, since, until, show_hidden)
        staff = signed_in(request)
        # The next item is found before saving: a saved item may leave the filtered queue.
        following = store.queue_neighbour(db.get(), turn_id, _queue_filter(*filters), 1)
        row = store.record_correction(db.get(), staff, turn_id, answer, chosen_label(label, new_label))
        return panel_for(following, f"Correction {row} saved for answer {int(turn_id)}.")

    def move(step: int):
        @_shown
        def to_neighbour(turn_id, thumbs_down, has_correction, not_reviewed, adapter, label_filter, since, until,
                         show_hidden, request: gr.Request):
            filters = (thumbs_down, has_correction, not_reviewed, adapter, label_filter, since, until, show_hidden)
            signed_in(request)
            return panel_for(store.queue_neighbour(db.get(), turn_id, _queue_filter(*filters), step))
        return to_neighbour

    @_shown
    def show_diff(answer: str | None, correction: str | None, request: gr.Request) -> str:
        signed_in(request)
        return review.word_diff_html(answer, correction)

    @_shown
    def new_label_box(label: str | None, request: gr.Request):
        signed_in(request)
        return gr.update(visible=label == NEW_LABEL, value="")

    @_shown
    def add_example(question: str, answer: str, label: str, request: gr.Request):
        row = store.add_example(db.get(), signed_in(request), question, answer, label)
        return f"Example {row} added."

    @_shown
    def pick_row(selected: gr.SelectData, request: gr.Request):
        signed_in(request)
        return (selected.row_value or [None])[0]

    gr.Markdown(f"## {title}: staff review")
    # Shown until the page's load event finds a live sign-in (an expired one stays here).
    signed_out = gr.Markdown(f"Staff only: [sign in]({STAFF_LOGIN_PATH}) first.")
    with gr.Column(visible=False) as panel:
        with gr.Row():
            whoami = gr.Textbox(label="Signed in as", interactive=False, scale=3)
            signout_button = gr.Button("Sign out", scale=1, link=STAFF_LOGOUT_PATH, link_target="_self")
        refresh_model, model_outputs = _model_section(db, signed_in)
        gr.Markdown("### Review queue: thumbs-down first (newest first), then thumbs-up awaiting approval, then unrated answers")
        with gr.Row():
            thumbs_down = gr.Checkbox(False, label="thumbs-down only")
            has_correction = gr.Checkbox(False, label="has a correction")
            not_reviewed = gr.Checkbox(True, label="not yet reviewed")
            show_hidden = gr.Checkbox(False, label="show CLI/test turns")
        with gr.Row():
            adapter_filter = gr.Textbox("", label="Adapter version ('base' for the base model)", max_length=200)
            label_filter = gr.Dropdown([""], value="", label="With label", filterable=True, allow_custom_value=True)
            since = gr.Textbox("", label="From day (YYYY-MM-DD)", max_length=10)
            until = gr.Textbox("", label="To day (YYYY-MM-DD)", max_length=10)
        with gr.Row():
            page = gr.Number(1, label="Page", precision=0, minimum=1, scale=1)
            newer = gr.Button("Newer", scale=1)
            older = gr.Button("Older", scale=1)
            refresh = gr.Button("Refresh queue", scale=1)
        page_info = gr.Markdown(elem_id="review-queue-note")
        first_page = gr.Number(1, visible=False)
        queue_table = gr.Dataframe(headers=QUEUE_HEADERS, interactive=False, wrap=True, max_height=360)
        with gr.Row():
            turn_box = gr.Number(None, label="turn_id", precision=0, scale=1)
            open_button = gr.Button("Open answer", scale=1)
        gr.Markdown("Keys: **Alt+Enter** save and next · **Alt+→** skip · **Alt+←** previous")
        conversation = gr.Chatbot(label="Conversation", height=300, render_markdown=False, sanitize_html=True)
        with gr.Row():
            adapter_used = gr.Textbox(label="Adapter that answered", interactive=False)
            vote_info = gr.Textbox(label="Customer rating", interactive=False)
        # Why it answered so: the approved pairs its prompt held (feedback.knowledge).
        references_info = gr.Textbox(label="References it was given", lines=3, interactive=False)
        with gr.Row():
            answer_shown = gr.Textbox(label="The answer given", lines=4, interactive=False)
            corrected = gr.Textbox(label="Corrected answer", lines=4, max_length=store.MAX_ANSWER_CHARS)
        # The one HTML view of a customer's or the model's words: review.word_diff_html escapes them.
        diff = gr.HTML(label="Changes", elem_id="review-diff")
        with gr.Row():
            label = gr.Dropdown([""], value="", label="Product / intent label (optional)", filterable=True,
                                allow_custom_value=True)
            new_label = gr.Textbox("", label="New label", max_length=store.MAX_LABEL_CHARS, visible=False)
        with gr.Row():
            previous_button = gr.Button("Previous", elem_id="review-previous")
            skip_button = gr.Button("Skip", elem_id="review-skip")
            save_next_button = gr.Button("Save and next", variant="primary", elem_id="review-save-next")
        with gr.Row():
            correct_button = gr.Button("Save correction")
            approve_button = gr.Button("Approve answer as good")
            reject_button = gr.Button("Reject (never train on it)")
            undo_button = gr.Button("Undo my last action on it")
        with gr.Accordion("Add a question and answer by hand", open=False):
            example_question = gr.Textbox(label="Question", lines=2, max_length=store.MAX_QUESTION_CHARS)
            example_answer = gr.Textbox(label="Answer", lines=4, max_length=store.MAX_ANSWER_CHARS)
            example_label = gr.Textbox(label="Label (optional)", max_length=store.MAX_LABEL_CHARS)
            add_button = gr.Button("Add example")
        result = gr.Textbox(label="Result", interactive=False)

    # The keyboard shortcuts press the panel's buttons (REVIEW_KEYS); bound once per page.
    gr.HTML("", elem_id="review-keys", js_on_load="if (!window.tuneloopReviewKeys) { window.tuneloopReviewKeys = true; "
            f"const keys = {json.dumps(REVIEW_KEYS)}; "
            "document.addEventListener('keydown', (e) => { if (!e.altKey || !keys[e.key]) return; "
            "const button = document.getElementById(keys[e.key]); if (button) { e.preventDefault(); button.click(); } }); }")

    private = dict(api_visibility="private")
    filters = [thumbs_down, has_correction, not_reviewed, adapter_filter, label_filter, since, until, show_hidden]
    item_outputs = [turn_box, conversation, adapter_used, vote_info, answer_shown, corrected, label, diff, new_label,
                    references_info]
    queue_inputs = [page] + filters
    demo.load(load_panel, None, [whoami, panel, signed_out], **private).success(
        refresh_model, None, model_outputs, **private
    ).success(queue, queue_inputs, queue_table, **private).success(queue_note, queue_inputs, page_info, **private
    ).success(label_choices, None, label_filter, **private)
    signout_button.click(signout, None, [whoami, panel, signed_out], api_name="staff_signout")
    refresh.click(queue, queue_inputs, queue_table, api_name="review_queue").success(
        queue_note, queue_inputs, page_info, **private
    ).success(refresh_model, None, model_outputs, **private)
    for button, to_page in ((newer, newer_page), (older, older_page)):
        button.click(to_page, page, page, **private).success(
            queue, queue_inputs, queue_table, **private
        ).success(queue_note, queue_inputs, page_info, **private)
    # A changed filter starts at page 1 (reusing newer_page from page 1 keeps it a signed-in event).
    for component in filters:
        component.change(newer_page, first_page, page, **private).success(
            queue, queue_inputs, queue_table, **private
        ).success(queue_note, queue_inputs, page_info, **private)
    queue_table.select(pick_row, None, turn_box, **private).success(open_item, turn_box, item_outputs, **private)
    open_button.click(open_item, turn_box, item_outputs, api_name="review_item")
    label.change(new_label_box, label, new_label, **private)
    corrected.change(show_diff, [answer_shown, corrected], diff, **private)
    save_next_button.click(save_and_next, [turn_box, corrected, label, new_label] + filters, item_outputs + [result],
                           **private).success(queue, queue_inputs, queue_table, **private).success(
        queue_note, queue_inputs, page_info, **private)
    for button, step in ((skip_button, 1), (previous_button, -1)):
        button.click(move(step), [turn_box] + filters, item_outputs + [result], **private)
    correct_button.click(correct, [turn_box, corrected, label, new_label], result, api_name="correct").success(
        queue, queue_inputs, queue_table, **private
    )
    approve_button.click(approve, [turn_box, label, new_label], result, api_name="approve").success(
        queue, queue_inputs, queue_table, **private
    )
    for button, action in ((reject_button, reject), (undo_button, undo)):
        button.click(action, turn_box, result, api_name=action.__name__).success(
            queue, queue_inputs, queue_table, **private
        ).success(queue_note, queue_inputs, page_info, **private)
    add_button.click(add_example, [example_question, example_answer, example_label], result, api_name="add_example")
    _blind_review_section(db, panel, signed_in)


def _queue_filter(thumbs_down, has_correction, not_reviewed, adapter, label, since, until,
                  show_hidden) -> store.QueueFilter:
    """The staff view's filter controls as a :class:`feedback.store.QueueFilter`."""
    return store.QueueFilter(thumbs_down=bool(thumbs_down), has_correction=bool(has_correction),
                             not_reviewed=bool(not_reviewed), adapter=(adapter or "").strip() or None,
                             label=label or None, since=(since or "").strip() or None,
                             until=(until or "").strip() or None, show_hidden=bool(show_hidden))


def _page(page: float | None) -> int:
    try:
        return max(1, int(page or 1))
    except (TypeError, ValueError, OverflowError):
        return 1


NO_ADAPTER_YET = "none promoted yet: the base model answers until a retrain passes the gate"
"""What staff read in "Adapter serving now" on a fresh install (``tuneloop status`` says the same)."""


def _model_section(db: ThreadLocalDB, signed_in):
    """The staff view's model section: the adapter serving now, the last gate decision and the F1
    history plot the last report wrote (data from :mod:`feedback.review`).

    Returns ``(refresh, outputs)``.
    """
    with gr.Row():
        current = gr.Textbox(label="Adapter serving now", interactive=False)
        run = gr.Textbox(label="Nightly retrain", interactive=False)
    decision = gr.Textbox(label="Last promotion decision", interactive=False, lines=4)
    # Hidden until a retrain has written the plot: a fresh install shows no empty frame.
    history = gr.Image(label="F1 across adapter versions", type="filepath", interactive=False, height=320,
                       visible=False)

    @_shown
    def refresh(request: gr.Request):
        # Staff only, like every staff event: reachable by its function index even without an API name.
        signed_in(request)
        png = review.f1_history_png()
        # Before the first retrain there is no plot to show: the plot stays hidden and the decision
        # and run boxes say "No retrain has run yet." instead of an empty frame.
        return (adapters.current_version() or NO_ADAPTER_YET, review.retrain_text(db.get()),
                review.decision_text(review.last_decision(db.get())),
                gr.update(value=str(png) if png else None, visible=png is not None))

    return refresh, [current, run, decision, history]


def _blind_review_section(db: ThreadLocalDB, panel: gr.Column, signed_in) -> None:
    """Blind side-by-side review of current and candidate answers (which side is which is hidden)."""

    def shares_text() -> str:
        shares = review.helpful_shares(db.get())
        return "Marked accurate and helpful: " + (", ".join(
            f"{s['adapter']} {s['helpful_share']:.0%} of {s['marks']}" for s in shares) or "no marks yet")

    def pair_outputs(staff: str):
        pair = review.next_pair(db.get(), staff)
        if pair is None:
            return None, "Nothing left to review.", "", "", False, False, shares_text()
        return pair["pair_id"], pair["question"], pair["left"], pair["right"], False, False, shares_text()

    @_shown
    def next_pair(request: gr.Request):
        return pair_outputs(signed_in(request))

    @_shown
    def save(pair_id: int | None, left_ok: bool, right_ok: bool, request: gr.Request):
        staff = signed_in(request)
        try:
            review.mark_pair(db.get(), staff, pair_id, left_ok, right_ok)
        except review.ReviewError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return pair_outputs(staff)

    with panel, gr.Accordion("Blind review: which answers are accurate and helpful?", open=False):
        pair_id = gr.Number(None, label="pair", precision=0, visible=False)
        question = gr.Textbox(label="Question", interactive=False)
        with gr.Row():
            left = gr.Textbox(label="Answer A", interactive=False, lines=4)
            right = gr.Textbox(label="Answer B", interactive=False, lines=4)
        with gr.Row():
            left_ok = gr.Checkbox(label="A is accurate and helpful")
            right_ok = gr.Checkbox(label="B is accurate and helpful")
        with gr.Row():
            next_button = gr.Button("Next pair")
            save_button = gr.Button("Save and next", variant="primary")
        shares = gr.Markdown()
    outputs = [pair_id, question, left, right, left_ok, right_ok, shares]
    next_button.click(next_pair, None, outputs, api_name="review_next_pair")
    save_button.click(save, [pair_id, left_ok, right_ok], outputs, api_name="review_mark")


def _references_text(references: list[dict]) -> str:
    """The references of an answer as staff read them: score, question, answer, one block each."""
    if not references:
        return "none: the answer was made without references"
    blocks = []
    for ref in references:
        removed = " (removed since)" if ref["removed"] else ""
        removed += " (given as the answer, word for word)" if ref.get("verbatim") else ""
        score = "-" if ref["score"] is None else f"{ref['score']:.2f}"
        blocks.append(f"[{ref['id']}] similarity {score}{removed}\nQ: {ref['question'] or '?'}\nA: {ref['answer'] or '?'}")
    return "\n\n".join(blocks)


def _as_text(text: str) -> str:
    """Chat text for display: gr.Chatbot renders (sanitized) HTML even with render_markdown=False,
    so markup a customer or the model wrote is escaped to show as the characters typed."""
    return html.escape(text, quote=False)


# --- staff sign-in and the guard in front of Gradio ----------------------------------------------


def _cookie(request) -> str | None:
    """The staff session token of a gr.Request or a Starlette request (None without one)."""
    return (getattr(request, "cookies", None) or {}).get(STAFF_COOKIE)


def _address(request) -> str:
    """The client address of a request (the proxy's X-Forwarded-For where uvicorn trusts it)."""
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or "unknown"


def _staff_of(db: ThreadLocalDB, request) -> str:
    """The enabled staff member whose live session the request's cookie names; :class:`auth.AuthError`
    with one generic message for everything else (no cookie, expired, signed out, disabled)."""
    name = auth.session_staff(db.get(), _cookie(request)) if request is not None else None
    if name is None:
        raise auth.AuthError(STAFF_ONLY)
    return name


def _staff_routes(db: ThreadLocalDB, cfg, title: str) -> list[Route]:
    """``/staff/login`` (GET: the form; POST: check, set the cookie, go to /staff) and ``/staff/logout``."""
    limits = auth.SigninLimits(hashes_per_minute=cfg.signin_hashes_per_minute,
                               hashes_per_address_per_minute=cfg.signin_hashes_per_address_per_minute)
    ttl_s = cfg.staff_session_hours * 3600

    async def login_form(request: Request):
        return _login_page(title, "")

    async def login(request: Request):
        origin = request.headers.get("origin")
        if origin and urllib.parse.urlsplit(origin).netloc != request.headers.get("host"):
            return _login_page(title, "Sign in from this site's own page.", 403)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BODY_BYTES:
                return _login_page(title, "That sign-in form was too large.", 413)
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
        name, password = (form.get("name") or [""])[0], (form.get("password") or [""])[0]
        address = _address(request)
        try:
            # Hashing takes tens of milliseconds: off the event loop.
            # (db.get() inside the lambda: a connection belongs to the thread that uses it.)
            staff = await run_in_threadpool(lambda: auth.sign_in(db.get(), name, password, address, limits))
            token = await run_in_threadpool(lambda: auth.create_session(db.get(), staff, ttl_s, address))
        except auth.AuthError as exc:
            return _login_page(title, str(exc), 429 if "try again" in str(exc) else 401)
        response = RedirectResponse(request.scope.get("root_path", "") + STAFF_PATH, status_code=303)
        response.set_cookie(STAFF_COOKIE, token, max_age=int(ttl_s), path="/", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        return response

    async def logout(request: Request):
        await run_in_threadpool(lambda: auth.end_session(db.get(), _cookie(request)))
        response = RedirectResponse(request.scope.get("root_path", "") + STAFF_LOGIN_PATH, status_code=303)
        response.delete_cookie(STAFF_COOKIE, path="/", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response

    return [
        Route(STAFF_LOGIN_PATH, login_form, methods=["GET"]),
        Route(STAFF_LOGIN_PATH, login, methods=["POST"]),
        Route(STAFF_LOGOUT_PATH, logout, methods=["GET", "POST"]),
    ]


def _operations_routes(service: ChatService, db: ThreadLocalDB, metrics: ServingMetrics) -> list[Route]:
    """``/healthz`` (the process answers), ``/readyz`` (ready for customers: the model loaded, not
    draining, the database writable, the adapter pointer valid; 503 otherwise, with status "starting"
    while the model loads) and ``/metrics`` (Prometheus text; only for a loopback client not behind
    the proxy, or with ``[serve] metrics_token``)."""

    async def health(request: Request):
        return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})

    def ready_checks() -> dict:
        backend = service.backend  # read once: loading ends on another thread
        checks = {"loading": backend is None, "draining": service.draining, "database": _database_writable(db)}
        try:
            wanted = adapters.current_version()
            # The pointer names an adapter that exists, and the backend did not refuse the last one
            # it tried (a refusal keeps the previous adapter serving, which staff must hear about).
            present = wanted is None or (adapters.adapter_path(wanted) / adapters.WEIGHTS_FILE).exists()
        except adapters.AdapterError:
            wanted, present = None, False
        checks.update(adapter=wanted, adapter_valid=present and (backend is None or backend.last_error is None),
                      serving=None if backend is None else backend.active)
        return checks

    async def ready(request: Request):
        checks = await run_in_threadpool(ready_checks)
        ok = not checks["loading"] and not checks["draining"] and checks["database"] and checks["adapter_valid"]
        status = "ready" if ok else "starting" if checks["loading"] and not checks["draining"] else "not ready"
        return JSONResponse({"status": status, **checks}, status_code=200 if ok else 503,
                            headers={"Cache-Control": "no-store"})

    async def scrape(request: Request):
        if not _may_scrape(request, service.cfg.metrics_token):
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        body = await run_in_threadpool(metrics.text)
        return Response(body, media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})

    return [Route(HEALTH_PATH, health, methods=["GET"]), Route(READY_PATH, ready, methods=["GET"]),
            Route(METRICS_PATH, scrape, methods=["GET"])]


def _database_writable(db: ThreadLocalDB) -> bool:
    """Whether the write lock can be taken within the busy timeout (nothing is written)."""
    conn = db.get().conn
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except Exception:
        log.exception("readiness: the feedback database is not writable")
        return False


def _may_scrape(request: Request, token: str) -> bool:
    """With a token, only a request bearing it; without, only a client on this machine that did not
    come through the proxy (which adds X-Forwarded-For), so publishing the chat never publishes this."""
    if token:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), token.encode())
    host = getattr(request.client, "host", "") or ""
    proxied = "x-forwarded-for" in request.headers or "forwarded" in request.headers
    return not proxied and (host == "::1" or host.startswith("127."))


def _login_page(title: str, message: str, status: int = 200) -> HTMLResponse:
    note = f'<p role="alert" style="color:#b00">{html.escape(message)}</p>' if message else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}: staff sign-in</title>
<style>body{{font-family:system-ui,sans-serif;max-width:24rem;margin:4rem auto;padding:0 1rem}}
label,input,button{{display:block;width:100%;margin:.3rem 0;font-size:1rem}}input,button{{padding:.5rem}}</style>
</head><body><h2>{html.escape(title)}: staff sign-in</h2>{note}
<form method="post" action="{STAFF_LOGIN_PATH}" autocomplete="on">
<label for="name">Staff name</label><input id="name" name="name" maxlength="64" autocomplete="username" required>
<label for="password">Password</label><input id="password" name="password" type="password" maxlength="{auth.MAX_PASSWORD_CHARS}" autocomplete="current-password" required>
<button type="submit">Sign in</button></form></body></html>"""
    return HTMLResponse(page, status_code=status, headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY"})


class _SurfaceGuard:
    """ASGI middleware in front of Gradio: :data:`REFUSED_ROUTES` answer 404, and the staff page
    itself is sent to the sign-in form unless the request carries a live staff session.

    ``blocks``: the Blocks this server runs; an event it does not have (an API name or a function
    index of the other Blocks, say) is 404, where Gradio would fail with a 500 and a logged traceback.
    ``staff``: this server has the staff view (else anything under ``/staff`` is 404);
    ``customers``: it has the chat and the ``/v1`` API (503 while the model loads; else its ``/``
    leads to the staff view)."""

    def __init__(self, app, blocks: gr.Blocks, db: ThreadLocalDB, service: ChatService, staff: bool, customers: bool):
        self.app = app
        self.fns = blocks.fns
        self.db = db
        self.service = service
        self.staff = staff
        self.customers = customers

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"]
            staff_path = path.rstrip("/") == STAFF_PATH or path.startswith(STAFF_PATH + "/")
            named = EVENT_BY_NAME.fullmatch(path) if scope["method"] == "POST" else None
            if path.startswith(REFUSED_ROUTES) or (staff_path and not self.staff) or (
                    named and not any(fn.api_name == named[1] for fn in self.fns.values())):
                await JSONResponse({"detail": "Not Found"}, status_code=404)(scope, receive, send)
                return
            if path == EVENT_BY_INDEX and scope["method"] == "POST":
                body, receive = await _read_body(receive)
                try:
                    fn_index = json.loads(body).get("fn_index")
                except (ValueError, AttributeError):
                    pass  # not a JSON object: Gradio refuses a malformed body itself
                else:
                    if type(fn_index) is not int or fn_index not in self.fns:
                        await JSONResponse({"detail": "Not Found"}, status_code=404)(scope, receive, send)
                        return
            if self.customers and self.service.loading and path.startswith(CHANNEL_API_PATH):
                # OpenAI's error shape, as the /v1 routes answer (feedback.api).
                error = {"message": STARTING_MESSAGE, "type": "server_starting", "code": "server_starting"}
                await JSONResponse({"error": error}, status_code=503,
                                   headers={"Retry-After": "10", "Cache-Control": "no-store"})(scope, receive, send)
                return
            if not self.customers and path == "/":
                await RedirectResponse(scope.get("root_path", "") + STAFF_PATH, status_code=303)(scope, receive, send)
                return
            if path.rstrip("/") == STAFF_PATH:
                request = Request(scope)
                signed_in = await run_in_threadpool(lambda: auth.session_staff(self.db.get(), _cookie(request)))
                if signed_in is None:
                    target = scope.get("root_path", "") + STAFF_LOGIN_PATH
                    await RedirectResponse(target, status_code=303)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class AddressInUse(OSError):
    """An address :func:`launch` was to listen on is taken (or cannot be bound); the message says which."""


def check_address(host: str, port: int) -> None:
    """Raise :class:`AddressInUse` unless ``host:port`` can be bound now (bound and released at once,
    with the SO_REUSEADDR uvicorn uses, so a port in TIME_WAIT counts as free as it does for uvicorn)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(f"port {port} on {host} is already in use (another tuneloop serve?); stop it or "
                               "choose another port") from None
        raise AddressInUse(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


async def _read_body(receive):
    """The whole request body, and a ``receive`` that hands it on to the app as if unread."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client left; the app sees an empty body and its own disconnect
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body, replayed = b"".join(chunks), False

    async def replay():
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return body, replay


def launch(demo: gr.Blocks, host: str, port: int, concurrency: int, block: bool = True):
    """Serve ``demo`` at ``host:port`` and, when :func:`build_app` gave it a staff view of its own,
    that at ``[serve] staff_host:staff_port``. Every address is checked first: :class:`AddressInUse`
    before anything listens."""
    staff = getattr(demo, "tuneloop_staff", None)
    for address in [(host, port)] + ([staff.tuneloop_address] if staff is not None else []):
        check_address(*address)
    if staff is not None:
        _launch(staff, *staff.tuneloop_address, concurrency, block=False)
    try:
        return _launch(demo, host, port, concurrency, block)
    except BaseException:
        if staff is not None:
            staff.close()
        raise


def wait_delivered(demo: gr.Blocks, timeout_s: float, flush_s: float = 2.0) -> bool:
    """Wait until no event of the app runs and the messages Gradio still holds for its clients have
    left (at most ``flush_s`` of the wait): closing stops Gradio's queue, and a client whose final
    message is still queued then gets "unexpected_error" instead of its answer. False on timeout."""
    blocks = [demo] + [b for b in [getattr(demo, "tuneloop_staff", None)] if b is not None]
    deadline = time.monotonic() + timeout_s
    while any(b._queue.get_active_worker_count() for b in blocks) or demo.tuneloop_turns_in_flight:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    # A client gone mid-answer never collects its messages: they hold the close back flush_s at most.
    flush_deadline = min(deadline, time.monotonic() + flush_s)
    while any(not queue.empty() for b in blocks for queue in list(b._queue.pending_messages_per_session.values())):
        if time.monotonic() >= flush_deadline:
            return False
        time.sleep(0.05)
    return True


def close(demo: gr.Blocks) -> None:
    """Stop what :func:`launch` started: the chat's server and the staff view's, if it has its own."""
    staff = getattr(demo, "tuneloop_staff", None)
    if staff is not None:
        staff.close()
    demo.close()


def _launch(blocks: gr.Blocks, host: str, port: int, concurrency: int, block: bool):
    blocks.queue(default_concurrency_limit=concurrency)
    try:
        return blocks.launch(
            server_name=host,
            server_port=port,
            share=False,
            prevent_thread_lock=not block,
            # Customers see gr.Error messages only; anything else is logged with an id (see _shown).
            show_error=False,
            quiet=True,
            # build_app's own routes, the guard, and the Gradio surface this app does not use turned off.
            **getattr(blocks, "tuneloop_server", {}),
        )
    except OSError as exc:
        # Taken between check_address and now: Gradio's message names a "range" and an env variable.
        if "Cannot find empty port" not in str(exc):
            raise
        raise AddressInUse(f"port {port} on {host} is already in use (another tuneloop serve?); stop it or "
                           "choose another port") from None
