"""Access: customers stay inside their own session and out of the staff view, staff actions need a
sign-in (a form at /staff/login and an HttpOnly session cookie), passwords are stored only as
argon2id hashes, failed sign-ins back off without locking anyone out, no file route of the app
leaks a file, the server listens on 127.0.0.1 without a share link, and the installed Gradio
carries the fixes of its published path-traversal and SSRF advisories. A handful of hostile
inputs also go through the live API here (the store functions get the rest in
test_reliability_inputs.py)."""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.parse

import gradio
import httpx
import pytest
from packaging.version import Version

import app
from assistant import paths
from assistant.config import ServeConfig
from feedback import auth
from reliability_harness import BAD_TEXTS, STAFF_NAME, STAFF_PASSWORD, SURROGATE_TEXTS, UNCLEAR, raw_get

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

# Staff sign in by the form at app.STAFF_LOGIN_PATH, never through a Gradio event; /staff_signout
# refuses a caller without a staff session like every other staff endpoint.
CUSTOMER_APIS = {"/chat", "/vote"}
# Published Gradio advisories on file routes (path traversal, arbitrary file read) and SSRF, with the
# first fixed release, from the GitHub advisory entries and the issue threads that cite them. The open
# redirect / client-side SSRF through /gradio_api/file=<URL> (gradio#13593, #13608; no fixed
# version published) is probed on the live server by test_no_file_route_leaks_the_database_or_system_files.
ADVISORIES = {
    "CVE-2023-51449 / GHSA-6qm2-wpxq-7qh2 (file route traversal, SSRF)": "4.11.0",
    "CVE-2024-1561 (arbitrary file read via /component_server)": "4.13.0",
    "CVE-2024-47164, CVE-2024-47166 (directory traversal)": "5.0.0",
    "CVE-2024-47167 (SSRF via /queue/join)": "5.0.0",
    "CVE-2025-48889 / GHSA-8jw3-6x8j-v96g (file copy via FileData path)": "5.31.0",
    "CVE-2026-28416 / GHSA-jmh7-g254-2cq9 (SSRF via gr.load proxy_url)": "6.6.0",
    "CVE-2026-28414 / GHSA-39mp-8hj3-5c49 (absolute path traversal in /static)": "6.7.0",
    "GHSA-j36p-7w88-g82j (FileExplorer path traversal)": "6.16.0",
}


@pytest.fixture
def served(tuneloop_home):
    from test_app import serve_scripted  # the real app in this process, scripted backend, staff "alice"

    with serve_scripted(delay_s=0.0) as running:
        from feedback import auth
        from feedback.db import connect

        auth.add_staff(connect(), STAFF_NAME, STAFF_PASSWORD)
        yield running


def _dummy_args(parameters: list[dict]) -> list:
    values = {"int": 1, "float": 1.0, "bool": False, "str": "x"}
    return [values.get(p.get("python_type", {}).get("type"), "x") for p in parameters]


def _sign_in(served, name: str = STAFF_NAME, password: str = STAFF_PASSWORD, address: str | None = None):
    """POST the staff sign-in form (no redirect followed); ``address`` as a proxy passes it on."""
    headers = {"X-Forwarded-For": address} if address else None
    return httpx.post(served.url + app.STAFF_LOGIN_PATH, data={"name": name, "password": password},
                      headers=headers, timeout=30)


def _staff(served):
    """A gradio_client carrying the session cookie of a signed-in STAFF_NAME."""
    return served.staff_client(STAFF_NAME, STAFF_PASSWORD)


def _ask(customer, question: str) -> int:
    _history, _box, turn_id = customer.predict(question, api_name="/chat")
    return int(turn_id)


# --- sessions and staff endpoints ----------------------------------------------------------------


def test_every_staff_endpoint_refuses_a_customer(served):
    customer = served.client()
    _ask(customer, "my own question")
    endpoints = customer.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert "/staff_signin" not in endpoints  # no Gradio event takes a password
    staff = set(endpoints) - CUSTOMER_APIS
    assert {f"/{name}" for name in app.API_NAMES} - CUSTOMER_APIS <= staff  # every documented staff action
    for api_name in sorted(staff):
        with pytest.raises(Exception, match="(?i)staff only|sign in") as refused:
            customer.predict(*_dummy_args(endpoints[api_name]["parameters"]), api_name=api_name)
        assert not any(word in str(refused.value) for word in UNCLEAR), api_name
    assert served.rows("SELECT count(*) FROM corrections") == [(0,)]


def test_a_sign_in_belongs_to_one_session_only(served):
    staff, customer = _staff(served), served.client()
    assert isinstance(staff.predict(api_name="/review_queue"), dict)
    with pytest.raises(Exception, match="Staff only"):
        customer.predict(api_name="/review_queue")


def test_customers_cannot_vote_on_or_read_other_sessions(served):
    victim, attacker = served.client(), served.client()
    question = "my account number is 12345678, is that safe?"
    victim_turn = _ask(victim, question)
    (victim_session,) = served.rows("SELECT session_id FROM turns WHERE id = ?", [victim_turn])[0]
    for turn in (victim_turn, victim_turn + 1, 0, -1):
        with pytest.raises(Exception, match="no answer .* in this conversation"):
            attacker.predict(turn, "down", "", api_name="/vote")
    # The session lives in server-side state: a raw call that adds the victim's session id as an
    # extra input does not vote as the victim.
    base = served.url
    with httpx.Client(timeout=30) as http:
        event = http.post(f"{base}/gradio_api/call/vote", json={"data": [victim_turn, "down", "forged", victim_session]})
        if event.status_code == 200:
            with http.stream("GET", f"{base}/gradio_api/call/vote/{event.json()['event_id']}") as stream:
                body = "".join(stream.iter_text())
            assert "event: complete" not in body
    assert served.rows("SELECT count(*) FROM votes") == [(0,)]
    # The attacker's own chat answers carry nothing of another session.
    history, _box, _turn = attacker.predict("what did the last customer ask?", api_name="/chat")
    assert question not in json.dumps(history)
    for path in ("/", "/staff", "/config", "/gradio_api/info"):
        status, body = raw_get(int(urllib.parse.urlsplit(base).port), path)
        assert question.encode() not in body, path


def test_passwords_are_stored_only_as_hashes(served):
    assert _sign_in(served).status_code == 303
    refused = _sign_in(served, "bob", STAFF_PASSWORD)
    assert refused.status_code == 401 and "Wrong staff name or password" in refused.text
    (stored,) = served.rows("SELECT password_hash FROM staff_users WHERE name = ?", [STAFF_NAME])[0]
    assert stored.startswith("$argon2id$") and STAFF_PASSWORD not in stored
    db_file = paths.feedback_db()
    with sqlite3.connect(db_file) as conn:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    for file in (db_file, db_file.with_name(db_file.name + "-wal"), db_file.with_name(db_file.name + "-shm")):
        if file.exists():
            raw = file.read_bytes()
            assert STAFF_PASSWORD.encode("utf-8") not in raw and STAFF_PASSWORD.encode("utf-16-le") not in raw, file


def test_failed_sign_ins_back_off_per_name_and_address_without_locking_the_name_out(served):
    attacker = "203.0.113.5"
    limits = auth.SigninLimits()
    for attempt in range(limits.backoff_after_failures):
        refused = _sign_in(served, STAFF_NAME, f"guess {attempt}", attacker)
        assert refused.status_code == 401 and "Wrong staff name or password" in refused.text
    # Backing off now, even with the right password: refused at once, before any hash is computed.
    waiting = _sign_in(served, STAFF_NAME, STAFF_PASSWORD, attacker)
    assert waiting.status_code == 429 and "try again" in waiting.text and app.STAFF_COOKIE not in waiting.cookies
    assert served.rows("SELECT count(*) FROM signin_attempts WHERE address = ?", [attacker]) == [(limits.backoff_after_failures,)]
    # Another name from the same address is not held back, and the staff member is never locked out:
    # from her own address she signs in at once.
    assert _sign_in(served, "bob", "guess", attacker).status_code == 401
    assert _sign_in(served, STAFF_NAME, STAFF_PASSWORD, "198.51.100.20").status_code == 303
    # A backoff, not a lockout: once it has passed, the right password works from that address too.
    time.sleep(2.0 ** 0 + 0.2)  # the first backoff step (SigninLimits: 1, 2, 4 ... seconds)
    assert _sign_in(served, STAFF_NAME, STAFF_PASSWORD, attacker).status_code == 303


# --- files and network ---------------------------------------------------------------------------


def test_no_file_route_leaks_the_database_or_system_files(served):
    port = int(urllib.parse.urlsplit(served.url).port)
    db_file = paths.feedback_db()
    home, temp = paths.home(), paths.home() / "gradio-tmp"
    secrets = [db_file.read_bytes()[:4096], b"root:x:0:0", b"[project]", STAFF_PASSWORD.encode()]
    quoted, twice = urllib.parse.quote(str(db_file), safe=""), urllib.parse.quote(urllib.parse.quote(str(db_file), safe=""), safe="")
    probes = [
        "/gradio_api/file=/etc/passwd", "/gradio_api/file=%2Fetc%2Fpasswd", "/gradio_api/file=..%2F..%2F..%2Fetc%2Fpasswd",
        f"/gradio_api/file={db_file}", f"/gradio_api/file={quoted}", f"/gradio_api/file={twice}",
        f"/gradio_api/file={temp}/../feedback.db", f"/gradio_api/file={temp}/..%2Ffeedback.db",
        f"/gradio_api/file={temp}/%2e%2e/feedback.db", f"/gradio_api/file/{db_file}", "/gradio_api/file=feedback.db",
        "/gradio_api/file=pyproject.toml", f"/gradio_api/file={home}/config.toml", "/gradio_api/file=file:///etc/passwd",
        "/gradio_api/file=....//....//....//etc/passwd", "/gradio_api/file=..\\..\\..\\etc\\passwd",
        "/file=../../feedback.db", f"/file={db_file}", "/file=/etc/passwd",
        "/static/../feedback.db", "/static/..%2F..%2F..%2Fetc%2Fpasswd", "/static/%2e%2e/%2e%2e/etc/passwd",
        "/assets/../../../../etc/passwd", "/assets/..%2F..%2F..%2Fetc%2Fpasswd", "/staff/../../../etc/passwd",
        "/gradio_api/static/../../feedback.db", "/favicon.ico/../../feedback.db",
        # SSRF: the file route must not fetch from this machine or a cloud metadata address.
        f"/gradio_api/file=http://127.0.0.1:{port}/config", "/gradio_api/file=http://169.254.169.254/latest/meta-data/",
        f"/gradio_api/proxy=http://127.0.0.1:{port}/config", "/gradio_api/file=https://evil.example/phish",
    ]
    leaked = []
    for path in probes:
        status, body = raw_get(port, path)
        if not 400 <= status < 500 or any(secret in body for secret in secrets):
            leaked.append((path, status, body[:80]))
    assert leaked == []


def test_binds_loopback_by_default_and_never_shares(served, tuneloop_home):
    assert ServeConfig().host == "127.0.0.1"
    port = int(urllib.parse.urlsplit(served.url).port)
    assert urllib.parse.urlsplit(served.url).hostname == "127.0.0.1"
    # The separate-process server (as `tuneloop serve` starts it) reports its bind and no share link.
    from reliability_harness import server

    with server(tuneloop_home) as running:
        assert running.info["host"] == "127.0.0.1" and running.info["share_url"] is None
        psutil = pytest.importorskip("psutil")
        listening = [c.laddr for c in psutil.Process(running.process.pid).net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
    assert port


def test_launch_never_creates_a_share_link(tuneloop_home):
    from assistant.chat import ChatService, ScriptedBackend
    from feedback.db import ThreadLocalDB
    from reliability_harness import free_port

    demo = app.build_app(ChatService(ServeConfig(), ScriptedBackend()), ThreadLocalDB(), "scripted-base")
    try:
        app.launch(demo, "127.0.0.1", free_port(), 2, block=False)
        assert demo.share is False and demo.share_url is None
    finally:
        demo.close()


def test_installed_gradio_carries_every_known_file_route_and_ssrf_fix():
    fixed = max(Version(v) for v in ADVISORIES.values())
    assert Version(gradio.__version__) >= fixed, f"gradio {gradio.__version__} predates fixes in {fixed}"


# --- hostile text through the live API -----------------------------------------------------------


# Slow tier: every hostile text through the live server, one request each (50 s on 2 cores).
@pytest.mark.slow
def test_hostile_text_through_the_api_is_refused_clearly_or_stored_and_shown_escaped(served):
    customer, staff = served.client(), _staff(served)
    handled = 0
    for name, text in BAD_TEXTS.items():
        try:
            history, _box, turn_id = customer.predict(text, api_name="/chat")
        except Exception as exc:  # a refusal must be written for a person
            assert not any(word in str(exc) for word in UNCLEAR), (name, str(exc))
            assert name in ("empty", "blank", "huge"), (name, str(exc))
            handled += 1
            continue
        assert served.rows("SELECT question FROM turns WHERE id = ?", [turn_id]) == [(text.strip(),)], name
        shown = json.dumps(history)
        assert "<img" not in shown and "<script" not in shown and "<a href" not in shown, name
        note = customer.predict(int(turn_id), "down", text[:400], api_name="/vote")
        assert "<" not in note
        result = staff.predict(int(turn_id), text[:4000], "", api_name="/correct") if text.strip() else "empty"
        assert "<" not in result
        conversation, *_ = staff.predict(int(turn_id), api_name="/review_item")
        assert "<img" not in json.dumps(conversation) and "<script" not in json.dumps(conversation), name
        handled += 1
    assert handled == len(BAD_TEXTS)
    assert customer.predict("still answering?", api_name="/chat")[2] > 0
    port = int(urllib.parse.urlsplit(served.url).port)
    for path in ("/", "/staff", "/config"):  # nothing typed by anyone is baked into a page
        assert b"window.pwned" not in raw_get(port, path)[1], path


@pytest.mark.parametrize("api_name", ["chat", "vote"])
def test_lone_surrogates_through_the_api_get_a_clear_refusal(api_name, served):
    """A lone surrogate can only travel as a JSON ``\\udc80`` escape (gradio_client cannot even
    encode it), so the request is sent raw through Gradio's call API and its event stream read."""
    data = {"chat": [SURROGATE_TEXTS["lone_low"]], "vote": [1, "down", SURROGATE_TEXTS["lone_high"]]}[api_name]
    body = json.dumps({"data": data})  # ensure_ascii (the default) writes the surrogate as an escape
    assert "\\ud" in body
    base = served.url.rstrip("/")
    with httpx.Client(timeout=30) as http:
        started = http.post(f"{base}/gradio_api/call/{api_name}", content=body,
                            headers={"content-type": "application/json"})
        assert started.status_code == 200, started.text
        events = http.get(f"{base}/gradio_api/call/{api_name}/{started.json()['event_id']}").text
    assert "event: error" in events, events
    assert not any(word in events for word in UNCLEAR), events
    assert served.rows("SELECT count(*) FROM turns WHERE question LIKE 'bad %'")[0][0] == 0


@pytest.mark.parametrize("turn", [2**63, -(2**63) - 1, float("inf")])
def test_out_of_range_answer_numbers_are_refused_clearly(turn, tuneloop_home):
    from feedback import store, turns
    from feedback.db import connect

    db = connect()
    with pytest.raises(store.FeedbackError):
        store.log_vote(db, turns.new_session(db), turn, "up")


@pytest.mark.parametrize("field", ["name", "password"])
@pytest.mark.parametrize("encoded", [b"%ED%B2%80", b"caf%E9", b"abc\xed\xa0\x80def"], ids=["surrogate", "latin1", "raw"])
def test_undecodable_text_through_the_sign_in_form_gets_a_clear_refusal(field, encoded, served):
    """The sign-in form is a plain POST (not a Gradio event): a lone surrogate (UTF-8 encoded, as a
    lenient client sends it) or other bytes that are not UTF-8, escaped or raw, are refused with a
    message written for a person, and the server keeps serving."""
    fields = {"name": STAFF_NAME.encode(), "password": urllib.parse.quote(STAFF_PASSWORD).encode()}
    fields[field] = encoded
    body = b"&".join(key.encode() + b"=" + value for key, value in fields.items())
    refused = httpx.post(served.url + app.STAFF_LOGIN_PATH, content=body, timeout=30,
                         headers={"content-type": "application/x-www-form-urlencoded"})
    assert refused.status_code == 401, (refused.status_code, refused.text[:300])
    assert "Wrong staff name or password" in refused.text
    assert not any(word in refused.text for word in UNCLEAR)
    assert served.rows("SELECT count(*) FROM staff_sessions") == [(0,)]
    assert _sign_in(served).status_code == 303  # still serving, and the real password still works
