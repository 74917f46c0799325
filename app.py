"""Gradio wiring: the customer chat at ``/``. No logic lives here beyond calling the services."""

from __future__ import annotations

import logging

from assistant import paths

paths.configure_environment()

import gradio as gr  # noqa: E402  (imported after the environment keeps it offline and quiet)

from assistant.chat import ChatError, ChatService  # noqa: E402
from feedback import turns  # noqa: E402
from feedback.db import ThreadLocalDB  # noqa: E402

log = logging.getLogger(__name__)

TITLE = "tuneloop assistant"


def build_app(service: ChatService, db: ThreadLocalDB, base_model: str, title: str = TITLE) -> gr.Blocks:
    """The customer chat; every answer streams and is logged with the adapter that produced it."""

    def start_session():
        return turns.new_session(db.get(), "customer")

    def respond(message: str, history: list, session_id: str | None):
        history = list(history or [])
        if not session_id:
            session_id = start_session()
        try:
            stream = service.answer(message, _pairs(history))
        except ChatError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        question = message.strip()
        turn_id = turns.start_turn(db.get(), session_id, question, _pairs(history), base_model)
        history = history + [
            {"role": "user", "content": question},
            {"role": "assistant", "content": ""},
        ]
        status, error = "interrupted", None
        try:
            for _piece in stream:
                history[-1] = {"role": "assistant", "content": stream.text}
                yield history, "", session_id, turn_id
            status = "complete"
        except Exception as exc:
            status, error = "error", f"{exc.__class__.__name__}: {exc}"
            log.exception("generation failed for turn %s", turn_id)
            raise gr.Error("Sorry, the assistant failed to answer. Please try again.") from exc
        finally:
            # Runs also when the customer disconnects mid-answer (GeneratorExit): what was
            # streamed so far is kept, marked "interrupted".
            turns.finish_turn(db.get(), turn_id, stream.text, stream.stats, status, error)
        yield history, "", session_id, turn_id

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}")
        session = gr.State(None)
        chatbot = gr.Chatbot(label="Chat", height=480, render_markdown=False, sanitize_html=True)
        last_turn = gr.Number(label="turn", visible=False, precision=0)
        with gr.Row():
            box = gr.Textbox(placeholder="Ask a question…", show_label=False, scale=8, max_lines=6)
            send = gr.Button("Send", variant="primary", scale=1)
        demo.load(start_session, outputs=session, api_visibility="private")
        for trigger in (box.submit, send.click):
            trigger(
                respond,
                inputs=[box, chatbot, session],
                outputs=[chatbot, box, session, last_turn],
                api_name="chat" if trigger == box.submit else False,
                concurrency_id="chat",
                concurrency_limit=service.cfg.concurrency,
            )
    return demo


def _pairs(history: list) -> list[tuple[str, str]]:
    """(question, answer) pairs from Gradio's message list."""
    pairs, question = [], None
    for message in history:
        role, content = message["role"], message["content"]
        text = content if isinstance(content, str) else " ".join(
            part.get("text", "") for part in content if isinstance(part, dict)
        )
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
