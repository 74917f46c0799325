"""Issue 32, the OpenAI-compatible API driven by the official ``openai`` Python client, as the bank's
channels would: answers streamed and not (the answer id is the logged turn), bad and revoked keys,
feedback by answer id, the model list, and the same answer as the customer chat on a real model.
Real server on 127.0.0.1, real SQLite."""

from __future__ import annotations

import openai
import pytest
from gradio_client import Client

import app
from assistant import adapters
from assistant.chat import ChatService, make_backend
from assistant.config import ServeConfig
from feedback import apikeys
from feedback.db import ThreadLocalDB, connect
from test_api import serve
from test_app import Served, fake_adapter, free_port

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


def client_for(served, key: str) -> openai.OpenAI:
    # No retries: a refusal must reach the test as the client raises it, not be tried again.
    return openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0, timeout=30)


def turn_of(answer_id: str) -> int:
    assert answer_id.startswith("chatcmpl-"), answer_id
    return int(answer_id.removeprefix("chatcmpl-"))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_an_answer_and_a_streamed_answer_carry_their_turn_id(tuneloop_home):
    key = apikeys.create_key(connect(), "web")
    with serve(delay_s=0.01) as (served, _service):
        client = client_for(served, key)
        response = client.chat.completions.create(model="base", messages=user("How do I reset my PIN?"))
        assert response.choices[0].message.content == "You asked: How do I reset my PIN?"
        assert response.choices[0].finish_reason == "stop" and response.model == "base"
        (row,) = served.rows("SELECT t.question, t.answer, t.status, s.kind, s.api_key FROM turns t "
                             "JOIN sessions s ON s.id = t.session_id WHERE t.id = ?", [turn_of(response.id)])
        assert row == ("How do I reset my PIN?", "You asked: How do I reset my PIN?", "complete", "api", "web")

        chunks = list(client.chat.completions.create(model="base", messages=user("Where is my nearest branch?"),
                                                     stream=True))
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert sum(1 for p in pieces if p) > 3, "the answer should arrive in pieces"
        assert "".join(pieces) == "You asked: Where is my nearest branch?"
        assert chunks[-1].choices[0].finish_reason == "stop"
        (answer_id,) = {c.id for c in chunks}
        assert turn_of(answer_id) != turn_of(response.id)
        assert served.rows("SELECT answer, status FROM turns WHERE id = ?", [turn_of(answer_id)]) == [
            ("".join(pieces), "complete")]


def test_a_bad_or_revoked_key_raises_authentication_error_and_costs_no_answer(tuneloop_home):
    key = apikeys.create_key(connect(), "web")
    with serve() as (served, _service):
        with pytest.raises(openai.AuthenticationError) as bad:
            client_for(served, "tl-not-a-real-key").chat.completions.create(model="base", messages=user("hi"))
        assert bad.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client_for(served, "tl-not-a-real-key").models.list()
        client = client_for(served, key)
        assert client.chat.completions.create(model="base", messages=user("hi")).choices[0].message.content
        assert apikeys.revoke_key(connect(), "web")
        with pytest.raises(openai.AuthenticationError) as revoked:
            client.chat.completions.create(model="base", messages=user("hi again"))
        assert revoked.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            list(client.chat.completions.create(model="base", messages=user("streamed"), stream=True))
        assert len(served.backend.calls) == 1
        assert served.rows("SELECT question FROM turns") == [("hi",)]


def test_feedback_by_answer_id_is_stored_with_that_turn(tuneloop_home):
    key = apikeys.create_key(connect(), "web")
    with serve() as (served, _service):
        client = client_for(served, key)
        first = client.chat.completions.create(model="base", messages=user("How do I close my account?"))
        second = client.chat.completions.create(model="base", messages=user("What is the overdraft fee?"))
        # The client has no feedback method: its own request helper POSTs to /v1/feedback with the key.
        stored = client.post("/feedback", body={"turn_id": second.id, "value": "down", "reason": "fee is wrong"},
                             cast_to=object)
        assert stored["turn_id"] == turn_of(second.id) and stored["value"] == "down"
        assert client.post("/feedback", body={"turn_id": first.id, "value": "up"}, cast_to=object)["value"] == "up"
        assert served.rows("SELECT turn_id, value, reason FROM votes ORDER BY turn_id") == [
            (turn_of(first.id), 1, None), (turn_of(second.id), -1, "fee is wrong")]
        with pytest.raises(openai.BadRequestError):
            client.post("/feedback", body={"turn_id": "chatcmpl-999999", "value": "up"}, cast_to=object)


def test_models_list_names_the_adapter_serving_now(tuneloop_home):
    key = apikeys.create_key(connect(), "web")
    with serve() as (served, _service):
        client = client_for(served, key)
        assert [m.id for m in client.models.list()] == ["base"]
        fake_adapter("v-openai-1")
        adapters.set_current("v-openai-1", reason="test")
        assert [m.id for m in client.models.list()] == ["v-openai-1"]
        response = client.chat.completions.create(model="v-openai-1", messages=user("Which adapter answers?"))
        assert response.model == "v-openai-1"
        assert served.rows("SELECT adapter FROM turns WHERE id = ?", [turn_of(response.id)]) == [("v-openai-1",)]


def chat_and_api_answers(cfg: ServeConfig, question: str) -> tuple[str, str]:
    """The same question asked once in the customer chat (gradio_client) and once through the API
    (openai), in separate conversations, on one server; checks both turns were logged as answered."""
    key = apikeys.create_key(connect(), "web")
    backend = make_backend(cfg)
    demo = app.build_app(ChatService(cfg, backend), ThreadLocalDB(), backend.base.model_id)
    _, url, _ = app.launch(demo, "127.0.0.1", free_port(), 4, block=False)
    served = Served(url.rstrip("/"), backend, demo)
    try:
        history, _box, chat_turn = Client(served.url, verbose=False, download_files=False).predict(question,
                                                                                                   api_name="/chat")
        response = client_for(served, key).chat.completions.create(model="base", messages=user(question))
    finally:
        demo.close()
    chat_answer, api_answer = history[-1]["content"][0]["text"], response.choices[0].message.content
    rows = served.rows("SELECT id, answer, base_model, status FROM turns ORDER BY id")
    # Answered ("complete", or "cut" at max_new_tokens as the tiny random model's are), and alike.
    ended = "cut" if response.choices[0].finish_reason == "length" else "complete"
    assert rows == [(int(chat_turn), chat_answer, backend.base.model_id, ended),
                    (turn_of(response.id), api_answer, backend.base.model_id, ended)]
    return chat_answer, api_answer


def test_the_api_and_the_customer_chat_give_the_same_greedy_answer(tiny_model_dir, tuneloop_home):
    # A real model, the tiny random Llama on transformers, with greedy decoding (temperature 0, the
    # default). The strongest repetition penalty, on the prompt too: random weights otherwise repeat
    # one token (a newline) whatever the prompt, and two answers of blank lines would match without
    # proving anything.
    cfg = ServeConfig(base_model=str(tiny_model_dir), backend="transformers", quantization="none", device="cpu",
                      max_new_tokens=12, repetition_penalty=2.0, penalize_prompt=True)
    assert cfg.temperature == 0.0
    chat_answer, api_answer = chat_and_api_answers(cfg, "How do I order a new debit card?")
    assert len(set(api_answer.split())) > 1 or len(set(api_answer)) > 3, repr(api_answer)
    assert api_answer == chat_answer


@pytest.mark.slow
def test_the_api_and_the_customer_chat_give_the_same_answer_on_the_shipped_model(tuneloop_home):
    # What a CPU deployment serves by default: the shipped SmolLM2 on llama.cpp, greedy.
    cfg = ServeConfig(backend="llama_cpp", quantization="none", device="cpu", max_new_tokens=32)
    chat_answer, api_answer = chat_and_api_answers(cfg, "How do I order a new debit card?")
    assert "card" in api_answer.lower(), api_answer
    assert api_answer == chat_answer
