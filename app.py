"""Gradio wiring: the customer chat at ``/`` and the staff review view at ``/staff``.

No logic lives here beyond calling the services: answers come from :mod:`assistant.chat`, votes,
corrections and the review queue from :mod:`feedback.store`, sign-in from :mod:`feedback.auth`.
Every action is also an API endpoint for ``gradio_client`` (see ``API_NAMES``); the session id and
the staff sign-in token live in ``gr.State``, so one client is one session.
"""

from __future__ import annotations

import functools
import html
import logging

from assistant import paths

paths.configure_environment()

import gradio as gr  # noqa: E402  (imported after the environment keeps it offline and quiet)

from assistant import adapters  # noqa: E402
from assistant.chat import ChatError, ChatService  # noqa: E402
from feedback import auth, review, store, turns  # noqa: E402
from feedback.db import ThreadLocalDB  # noqa: E402

log = logging.getLogger(__name__)

TITLE = "tuneloop assistant"
STAFF_PATH = "/staff"
# api_name -> parameters, in order (session and sign-in token come from the page state, not the caller).
API_NAMES = {
    "chat": "message, history",
    "vote": "turn_id, value ('up' or 'down'), reason (optional, thumbs-down only)",
    "staff_signin": "name, password",
    "staff_signout": "",
    "review_queue": "",
    "review_item": "turn_id",
    "correct": "turn_id, corrected answer, label (optional)",
    "approve": "turn_id, label (optional)",
    "add_example": "question, answer, label (optional)",
    "review_next_pair": "",
    "review_mark": "pair_id, A accurate and helpful (bool), B accurate and helpful (bool)",
}
QUEUE_HEADERS = ["answer #", "vote", "reason", "question", "answer", "adapter", "asked at (UTC)"]


def _shown(fn):
    """Refusals from the services become a gr.Error the person sees (and an API caller receives)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (store.FeedbackError, auth.AuthError, ChatError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    return wrapper


def build_app(
    service: ChatService,
    db: ThreadLocalDB,
    base_model: str,
    title: str = TITLE,
    tokens: auth.StaffTokens | None = None,
) -> gr.Blocks:
    """The customer chat at ``/`` (answers stream and are logged with their adapter; customers vote)
    and the staff view at ``/staff`` (sign in, review queue, corrections, approvals, examples)."""
    tokens = tokens or auth.StaffTokens()
    with gr.Blocks(title=title) as demo:
        _customer_page(demo, service, db, base_model, title)
    with demo.route("Staff", STAFF_PATH.strip("/"), show_in_navbar=False):
        _staff_page(db, tokens, title)
    return demo


def _customer_page(demo: gr.Blocks, service: ChatService, db: ThreadLocalDB, base_model: str, title: str) -> None:
    def start_session():
        return turns.new_session(db.get(), "customer")

    def respond(message: str, history: list, session_id: str | None, answer_turns: list | None):
        history = list(history or [])
        answer_turns = list(answer_turns or [])
        if not session_id:
            session_id = start_session()
        try:
            stream = service.answer(message, _pairs(history))
        except ChatError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        question = message.strip()
        turn_id = turns.start_turn(db.get(), session_id, question, _pairs(history), base_model)
        history = history + [
            {"role": "user", "content": _as_text(question)},
            {"role": "assistant", "content": ""},
        ]
        # The turn id of every chat message (None for questions), so a like on any answer finds its turn.
        answer_turns = answer_turns[: len(history) - 2]
        answer_turns += [None] * (len(history) - 2 - len(answer_turns)) + [None, turn_id]
        status, error = "interrupted", None
        try:
            for _piece in stream:
                history[-1] = {"role": "assistant", "content": _as_text(stream.text)}
                yield history, "", session_id, turn_id, answer_turns
            status = "complete"
        except Exception as exc:
            status, error = "error", f"{exc.__class__.__name__}: {exc}"
            log.exception("generation failed for turn %s", turn_id)
            raise gr.Error("Sorry, the assistant failed to answer. Please try again.") from exc
        finally:
            # Runs also when the customer disconnects mid-answer (GeneratorExit): what was
            # streamed so far is kept, marked "interrupted".
            turns.finish_turn(db.get(), turn_id, stream.text, stream.stats, status, error)
        yield history, "", session_id, turn_id, answer_turns

    @_shown
    def vote(turn_id: int, value: str, reason: str, session_id: str | None) -> str:
        result = store.log_vote(db.get(), session_id, turn_id, value, reason)
        return _vote_note(result)

    @_shown
    def vote_from_like(answer_turns: list | None, session_id: str | None, liked: gr.LikeData):
        index = liked.index[0] if isinstance(liked.index, (list, tuple)) else liked.index
        turn_id = (answer_turns or [])[index] if 0 <= index < len(answer_turns or []) else None
        if turn_id is None or liked.liked not in (True, False):
            return gr.update(), gr.update(visible=False), None
        result = store.log_vote(db.get(), session_id, turn_id, "up" if liked.liked else "down")
        # A thumbs-down opens the optional "what was wrong?" box for that answer.
        return _vote_note(result), gr.update(visible=not liked.liked, value=""), turn_id

    @_shown
    def send_reason(reason: str, turn_id: int | None, session_id: str | None):
        result = store.log_vote(db.get(), session_id, turn_id, "down", reason)
        return _vote_note(result), gr.update(visible=False, value="")

    gr.Markdown(f"## {title}")
    session = gr.State(None)
    answer_turns = gr.State([])
    reason_turn = gr.State(None)
    chatbot = gr.Chatbot(label="Chat", height=480, render_markdown=False, sanitize_html=True)
    last_turn = gr.Number(label="turn", visible=False, precision=0)
    with gr.Row():
        box = gr.Textbox(placeholder="Ask a question…", show_label=False, scale=8, max_lines=6)
        send = gr.Button("Send", variant="primary", scale=1)
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

    demo.load(start_session, outputs=session, api_visibility="private")
    for trigger in (box.submit, send.click):
        trigger(
            respond,
            inputs=[box, chatbot, session, answer_turns],
            outputs=[chatbot, box, session, last_turn, answer_turns],
            api_name="chat" if trigger == box.submit else False,
            concurrency_id="chat",
            # Gradio's queue does not hold chats back: ChatService admits `concurrency` answers
            # plus `max_queue` waiting and tells the rest, at once, to try again.
            concurrency_limit=service.in_flight_limit,
        )
    vote_button.click(vote, [vote_turn, vote_value, vote_reason, session], vote_note, api_name="vote")
    chatbot.like(vote_from_like, [answer_turns, session], [vote_note, reason_row, reason_turn], api_visibility="private")
    for trigger in (reason.submit, reason_send.click):
        trigger(send_reason, [reason, reason_turn, session], [vote_note, reason_row], api_visibility="private")


def _vote_note(result: dict) -> str:
    if result["flagged"]:
        return "You are rating very quickly; this rating was saved but set aside for a person to check."
    return "Thanks for the rating." if result["value"] == store.UP else "Thanks; staff will review this answer."


def _staff_page(db: ThreadLocalDB, tokens: auth.StaffTokens, title: str) -> None:
    def staff_name(token: str | None) -> str:
        """The signed-in staff member; refused for a missing, expired or disabled sign-in."""
        name = tokens.require(token)
        if not auth.is_staff(db.get(), name):
            tokens.revoke(token)
            raise auth.AuthError("This staff user is disabled; ask an administrator.")
        return name

    @_shown
    def signin(name: str, password: str):
        signed_in = auth.sign_in(db.get(), name, password)
        return tokens.issue(signed_in), signed_in

    def show_panel():
        return gr.update(visible=False), gr.update(visible=True), ""

    @_shown
    def signout(token: str | None):
        tokens.revoke(token)
        return None, "", gr.update(visible=True), gr.update(visible=False)

    @_shown
    def queue(token: str | None):
        staff_name(token)
        return [
            [item["turn_id"], item["vote"] or "", item["reason"] or "", item["question"],
             item["answer"] or "", item["adapter"] or "base model", item["created_at"][:19].replace("T", " ")]
            for item in store.review_queue(db.get())
        ]

    @_shown
    def open_item(token: str | None, turn_id: int | None):
        staff_name(token)
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
        return conversation, item["adapter"] or "none (base model)", vote, item["answer"] or "", latest_label

    @_shown
    def correct(token: str | None, turn_id: int | None, answer: str, label: str):
        row = store.record_correction(db.get(), staff_name(token), turn_id, answer, label)
        return f"Correction {row} saved for answer {int(turn_id)}."

    @_shown
    def approve(token: str | None, turn_id: int | None, label: str):
        row = store.approve(db.get(), staff_name(token), turn_id, label)
        return f"Answer {int(turn_id)} approved (row {row})."

    @_shown
    def add_example(token: str | None, question: str, answer: str, label: str):
        row = store.add_example(db.get(), staff_name(token), question, answer, label)
        return f"Example {row} added."

    def pick_row(selected: gr.SelectData):
        return (selected.row_value or [None])[0]

    gr.Markdown(f"## {title}: staff review")
    token = gr.State(None)
    with gr.Column(visible=True) as signin_box:
        name = gr.Textbox(label="Staff name", max_length=64)
        password = gr.Textbox(label="Password", type="password", max_length=auth.MAX_PASSWORD_CHARS)
        signin_button = gr.Button("Sign in", variant="primary")
    with gr.Column(visible=False) as panel:
        with gr.Row():
            whoami = gr.Textbox(label="Signed in as", interactive=False, scale=3)
            signout_button = gr.Button("Sign out", scale=1)
        refresh_model, model_outputs = _model_section(db)
        gr.Markdown("### Review queue: thumbs-down first, then recent unrated answers")
        refresh = gr.Button("Refresh queue")
        queue_table = gr.Dataframe(headers=QUEUE_HEADERS, interactive=False, wrap=True, max_height=360)
        with gr.Row():
            turn_box = gr.Number(None, label="turn_id", precision=0, scale=1)
            open_button = gr.Button("Open answer", scale=1)
        conversation = gr.Chatbot(label="Conversation", height=300, render_markdown=False, sanitize_html=True)
        with gr.Row():
            adapter_used = gr.Textbox(label="Adapter that answered", interactive=False)
            vote_info = gr.Textbox(label="Customer rating", interactive=False)
        corrected = gr.Textbox(label="Corrected answer", lines=4, max_length=store.MAX_ANSWER_CHARS)
        label = gr.Textbox(label="Product / intent label (optional)", max_length=store.MAX_LABEL_CHARS)
        with gr.Row():
            correct_button = gr.Button("Save correction", variant="primary")
            approve_button = gr.Button("Approve answer as good")
        with gr.Accordion("Add a question and answer by hand", open=False):
            example_question = gr.Textbox(label="Question", lines=2, max_length=store.MAX_QUESTION_CHARS)
            example_answer = gr.Textbox(label="Answer", lines=4, max_length=store.MAX_ANSWER_CHARS)
            example_label = gr.Textbox(label="Label (optional)", max_length=store.MAX_LABEL_CHARS)
            add_button = gr.Button("Add example")
        result = gr.Textbox(label="Result", interactive=False)

    private = dict(api_visibility="private")
    signin_event = signin_button.click(signin, [name, password], [token, whoami], api_name="staff_signin")
    password.submit(signin, [name, password], [token, whoami], **private).success(
        show_panel, None, [signin_box, panel, password], **private
    ).success(refresh_model, None, model_outputs, **private).success(queue, token, queue_table, **private)
    signin_event.success(show_panel, None, [signin_box, panel, password], **private).success(
        refresh_model, None, model_outputs, **private
    ).success(queue, token, queue_table, **private)
    signout_button.click(signout, token, [token, whoami, signin_box, panel], api_name="staff_signout")
    refresh.click(queue, token, queue_table, api_name="review_queue").then(
        refresh_model, None, model_outputs, **private
    )
    queue_table.select(pick_row, None, turn_box, **private).success(
        open_item, [token, turn_box], [conversation, adapter_used, vote_info, corrected, label], **private
    )
    open_button.click(
        open_item, [token, turn_box], [conversation, adapter_used, vote_info, corrected, label], api_name="review_item"
    )
    correct_button.click(correct, [token, turn_box, corrected, label], result, api_name="correct").success(
        queue, token, queue_table, **private
    )
    approve_button.click(approve, [token, turn_box, label], result, api_name="approve").success(
        queue, token, queue_table, **private
    )
    add_button.click(add_example, [token, example_question, example_answer, example_label], result, api_name="add_example")
    _blind_review_section(db, panel, token, staff_name)


def _model_section(db: ThreadLocalDB):
    """The staff view's model section: the adapter serving now, the last gate decision and the F1
    history plot the last report wrote (data from :mod:`feedback.review`).

    Returns ``(refresh, outputs)``.
    """
    with gr.Row():
        current = gr.Textbox(label="Adapter serving now", interactive=False)
        run = gr.Textbox(label="Nightly retrain", interactive=False)
    decision = gr.Textbox(label="Last promotion decision", interactive=False, lines=4)
    history = gr.Image(label="F1 across adapter versions", type="filepath", interactive=False, height=320)

    def refresh():
        png = review.f1_history_png()
        return (adapters.current_version() or "none (base model)", review.retrain_text(db.get()),
                review.decision_text(review.last_decision(db.get())), str(png) if png else None)

    return refresh, [current, run, decision, history]


def _blind_review_section(db: ThreadLocalDB, panel: gr.Column, token: gr.State, staff_name) -> None:
    """Blind side-by-side review of current and candidate answers (which side is which is hidden)."""

    def shares_text() -> str:
        shares = review.helpful_shares(db.get())
        return "Marked accurate and helpful: " + (", ".join(
            f"{s['adapter']} {s['helpful_share']:.0%} of {s['marks']}" for s in shares) or "no marks yet")

    def next_pair(token: str | None):
        try:
            pair = review.next_pair(db.get(), staff_name(token))
        except auth.AuthError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        if pair is None:
            return None, "Nothing left to review.", "", "", False, False, shares_text()
        return pair["pair_id"], pair["question"], pair["left"], pair["right"], False, False, shares_text()

    def save(token: str | None, pair_id: int | None, left_ok: bool, right_ok: bool):
        try:
            review.mark_pair(db.get(), staff_name(token), pair_id, left_ok, right_ok)
        except (auth.AuthError, review.ReviewError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return next_pair(token)

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
    next_button.click(next_pair, token, outputs, api_name="review_next_pair")
    save_button.click(save, [token, pair_id, left_ok, right_ok], outputs, api_name="review_mark")


def _as_text(text: str) -> str:
    """Chat text for display: gr.Chatbot renders (sanitized) HTML even with render_markdown=False,
    so markup a customer or the model wrote is escaped to show as the characters typed."""
    return html.escape(text, quote=False)


def _pairs(history: list) -> list[tuple[str, str]]:
    """(question, answer) pairs from Gradio's message list, unescaped back to what was typed."""
    pairs, question = [], None
    for message in history:
        role, content = message["role"], message["content"]
        text = content if isinstance(content, str) else " ".join(
            part.get("text", "") for part in content if isinstance(part, dict)
        )
        text = html.unescape(text)
        if role == "user":
            question = text
        elif role == "assistant" and question is not None:
            pairs.append((question, text))
            question = None
    return pairs


def launch(demo: gr.Blocks, host: str, port: int, concurrency: int, block: bool = True):
    demo.queue(default_concurrency_limit=concurrency)
    return demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        show_error=True,
        quiet=True,
    )
