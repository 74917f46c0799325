"""The customer chat as a customer sees it, on the real Gradio app on 127.0.0.1: the question shows at
once, refusals and failures are chat messages (an API caller still gets the error), the
welcome, example questions and disclaimer come from the pack through [serve], a closed answer gives
its place back at once, and an answer cut at max_new_tokens (sized from the pack) ends at a sentence."""

from __future__ import annotations

import math
import threading

import httpx
import pytest
from gradio_client import Client

import app
from assistant.chat import BusyError, ChatService, ScriptedBackend, trim_to_sentence
from assistant.config import ConfigError, ServeConfig, load
from feedback import packs
from tuneloop import cli

from test_app import serve_scripted

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


def texts(history: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"][0]["text"]) for m in history]


def outputs_until_done(client: Client, message: str) -> tuple[list, Exception | None]:
    """Every update the /chat API streamed, and the error it ended with (None when it answered)."""
    job = client.submit(message, api_name="/chat")
    try:
        job.result()
        error = None
    except Exception as exc:  # the API caller's view of a refusal
        error = exc
    return job.outputs(), error


def test_the_question_shows_at_once_with_a_typing_mark_before_the_first_token(tuneloop_home):
    release = threading.Event()

    def slow_reply(question: str) -> str:
        release.wait(30)  # no token exists until the test has seen the question shown
        return "Open it with $25."

    with serve_scripted(backend=ScriptedBackend(reply=slow_reply)) as served:
        job = served.client().submit("How do I open checking?", api_name="/chat")
        for _ in range(300):
            if job.outputs():
                break
            threading.Event().wait(0.05)
        first_history, first_box, _turn = job.outputs()[0]
        assert texts(first_history[:1]) == [("user", "How do I open checking?")]
        typing = first_history[1]
        assert (typing["role"], typing["metadata"]["title"], typing["metadata"]["status"]) == ("assistant", app.TYPING, "pending")
        # No text yet: a caller timing the first text (benchmarks/serving.py) is not misled by the mark.
        assert not any(part.get("text") for part in typing["content"])
        assert first_box == ""
        release.set()
        history, _box, turn_id = job.result()
        assert texts(history) == [("user", "How do I open checking?"), ("assistant", "Open it with $25.")]
        assert served.rows("SELECT answer, status FROM turns WHERE id = ?", [turn_id]) == [("Open it with $25.", "complete")]


def test_a_refusal_is_a_chat_message_the_draft_comes_back_and_the_api_still_errors(tuneloop_home):
    with serve_scripted(max_input_chars=20) as served:
        outputs, error = outputs_until_done(served.client(), "x" * 21)
        assert error is not None and "the limit is 20" in str(error)
        history, box, _turn = outputs[-1]
        assert texts(history)[0] == ("user", "x" * 21)
        assert texts(history)[1][0] == "assistant" and "the limit is 20" in texts(history)[1][1]
        assert box == "x" * 21  # the customer's draft is not lost
        outputs, error = outputs_until_done(served.client(), "   ")
        assert "Please type a question" in str(error)
        assert texts(outputs[-1][0]) == [("assistant", "Please type a question.")]  # no empty question bubble
        assert served.rows("SELECT count(*) FROM turns") == [(0,)]


def test_a_generation_failure_is_an_apology_in_the_chat_and_the_turn_is_logged_as_an_error(tuneloop_home):
    def broken(question: str) -> str:
        raise RuntimeError("model fell over")

    with serve_scripted(backend=ScriptedBackend(reply=broken)) as served:
        outputs, error = outputs_until_done(served.client(), "Is the branch open?")
        assert "something went wrong (error" in str(error) and "model fell over" not in str(error)
        history, _box, _turn = outputs[-1]
        (question, apology) = texts(history)
        assert question == ("user", "Is the branch open?")
        assert apology[0] == "assistant" and "something went wrong (error" in apology[1]
        assert served.rows("SELECT status FROM turns") == [("error",)]


def test_welcome_examples_and_disclaimer_are_on_the_page(tuneloop_home):
    settings = dict(welcome="Hi <b>there</b>, ask away.", examples="Fees? | Hours?",
                    disclaimer="Answers may be wrong; staff review them.")
    with serve_scripted(**settings) as served:
        config = httpx.get(f"{served.url}/config", timeout=30).json()
        props = [c["props"] for c in config["components"]]
        (chatbot,) = [p for p in props if p.get("label") == "Chat"]
        assert chatbot["placeholder"] == "Hi &lt;b&gt;there&lt;/b&gt;, ask away."
        assert [e["text"] for e in chatbot["examples"]] == ["Fees?", "Hours?"]
        assert any(p.get("value") == "Answers may be wrong; staff review them." for p in props)
        # Still only the documented API: the example click is not a way in.
        assert set(served.client().view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
            f"/{name}" for name in app.API_NAMES}


def test_examples_are_parsed_and_limited():
    assert ServeConfig(examples=" A? |  | B? ").example_questions() == ["A?", "B?"]
    assert ServeConfig().example_questions() == []
    with pytest.raises(ConfigError, match="at most 4"):
        ServeConfig(examples="a|b|c|d|e")


def test_the_pack_sets_welcome_examples_and_disclaimer_through_serve(tuneloop_home):
    tuneloop_home.mkdir(parents=True, exist_ok=True)
    pack = packs.load_pack()
    assert packs.install_persona(pack) is True
    cfg = load(ServeConfig, "serve")
    assert cfg.welcome == pack.chat["welcome"] and "Peach State Bank" in cfg.welcome
    assert cfg.example_questions() == pack.chat["examples"] and 3 <= len(cfg.example_questions()) <= 4
    assert cfg.disclaimer == pack.chat["disclaimer"]
    assert packs.install_persona(pack) is False


def test_status_says_plainly_that_no_adapter_is_promoted_yet(tuneloop_home, capsys):
    assert cli.main(["status"]) == 0
    assert "current_adapter: none promoted yet: the base model answers" in capsys.readouterr().out


def test_closing_an_answer_mid_stream_gives_its_place_back_at_once():
    """What Stop does to the service: Gradio closes `respond`, which drops the answer's stream."""
    service = ChatService(ServeConfig(concurrency=1, max_queue=0), ScriptedBackend(reply=lambda q: "one two three four"))
    pieces = iter(service.answer("First?"))
    assert next(pieces) == "one" and service.in_flight == 1
    with pytest.raises(BusyError):
        service.answer("Second?")  # the one place is taken
    pieces.close()
    assert service.in_flight == 0
    assert "".join(service.answer("Second?")) == "one two three four"


CUT_REPLY = "The fee is $2.50 at other ATMs and we refund it twice a month. Ask a teller for the form and"


def test_an_answer_cut_at_max_new_tokens_ends_at_its_last_sentence():
    service = ChatService(ServeConfig(max_new_tokens=18), ScriptedBackend(reply=lambda q: CUT_REPLY, max_new_tokens=18))
    stream = service.answer("Fees?")
    streamed = "".join(stream)
    assert streamed == " ".join(CUT_REPLY.split(" ")[:18])  # the customer saw it being written ...
    assert stream.stats.finish_reason == "length"
    assert stream.text == "The fee is $2.50 at other ATMs and we refund it twice a month."  # ... and it ends clean
    ended = ChatService(ServeConfig(max_new_tokens=40), ScriptedBackend(reply=lambda q: CUT_REPLY, max_new_tokens=40))
    stream = ended.answer("Fees?")
    assert "".join(stream) == CUT_REPLY == stream.text and stream.stats.finish_reason == "stop"  # not cut: as written


def test_trimming_keeps_at_least_half_and_knows_prices_are_not_sentence_ends():
    assert trim_to_sentence("Yes. The Peach card costs $2.50 a month unless your balance is over") == \
        "Yes. The Peach card costs $2.50 a month unless your balance is over"  # "Yes." would drop most
    assert trim_to_sentence("It is free at every Peach ATM, any day\nThen si") == "It is free at every Peach ATM, any day"
    assert trim_to_sentence("Can you open it online from home today? Yes, and it ta") == \
        "Can you open it online from home today?"
    assert trim_to_sentence("It is free at every Peach ATM! Any da") == "It is free at every Peach ATM!"
    assert trim_to_sentence("Rates start at 7.75% APR for the loan and run to 9") == \
        "Rates start at 7.75% APR for the loan and run to 9"  # no sentence end at all: kept


def test_a_cut_answer_is_logged_as_cut_with_the_trimmed_text(tuneloop_home):
    backend = ScriptedBackend(reply=lambda q: CUT_REPLY, max_new_tokens=18)
    with serve_scripted(backend=backend, max_new_tokens=18) as served:
        history, _box, turn_id = served.client().predict("Fees?", api_name="/chat")
        assert texts(history)[-1] == ("assistant", "The fee is $2.50 at other ATMs and we refund it twice a month.")
        assert served.rows("SELECT answer, status FROM turns WHERE id = ?", [turn_id]) == [
            ("The fee is $2.50 at other ATMs and we refund it twice a month.", "cut")]


def test_init_sizes_max_new_tokens_from_the_packs_answers(tuneloop_home):
    tuneloop_home.mkdir(parents=True, exist_ok=True)
    pack = packs.load_pack()
    words = lambda text: len(text.split())  # noqa: E731  (any counter: the sizing is what is tested)
    lengths = sorted(words(row["answer"]) for row in packs._qa_rows(pack))
    p99 = lengths[math.ceil(0.99 * len(lengths)) - 1]  # nearest rank
    budget = packs.answer_token_budget(pack, words)
    assert budget % 8 == 0 and p99 * packs.ANSWER_TOKENS_MARGIN <= budget < p99 * packs.ANSWER_TOKENS_MARGIN + 8
    assert sum(n > budget for n in lengths) == 0  # no pack answer would be cut
    assert packs.install_max_new_tokens(pack, words) == budget
    assert load(ServeConfig, "serve").max_new_tokens == budget
    assert packs.install_max_new_tokens(pack, words) is None  # set already: the user's value stays


@pytest.mark.parametrize("kind", ["transformers", "llama_cpp"])
def test_the_real_backends_say_whether_an_answer_was_cut(kind, tiny_model_dir):
    """The tiny random model never ends by itself within 5 tokens: cut; made to end on any token: not cut."""
    cfg = ServeConfig(base_model=str(tiny_model_dir), quantization="none", device="cpu", max_new_tokens=5, backend=kind)
    if kind == "llama_cpp":
        pytest.importorskip("llama_cpp")
        from assistant.llama_backend import LlamaCppBackend

        backend = LlamaCppBackend(cfg)
    else:
        from assistant.chat import TransformersBackend

        backend = TransformersBackend(cfg)
    stream = ChatService(cfg, backend).answer("How do I reset my password?")
    list(stream)
    assert (stream.stats.tokens_out, stream.stats.finish_reason) == (5, "length")
    if kind == "llama_cpp":
        backend.eos_ids = set(range(backend.n_vocab()))
    else:
        backend.model.generation_config.eos_token_id = list(range(len(backend.tokenizer)))
    stream = ChatService(cfg, backend).answer("How do I reset my password?")
    list(stream)
    assert (stream.stats.tokens_out, stream.stats.finish_reason) == (1, "stop")
