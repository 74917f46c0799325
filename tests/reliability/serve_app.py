"""Run the real app in its own process on 127.0.0.1, so a test can ``kill -9`` it.

    python tests/reliability/serve_app.py --port 7871 [--delay 0.01] [--tiny-model DIR]

The scripted backend answers "You asked: <question>" word by word (``--delay`` seconds a word);
``--tiny-model`` serves a local model folder with the real :class:`TransformersBackend` instead.
The runtime home is ``$TUNELOOP_HOME``. Once the server listens, one JSON line goes to stdout:
``{"url", "share_url", "host", "pid"}``; then the process waits until it is killed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a plain script from anywhere


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--delay", type=float, default=0.0, help="scripted backend: seconds per word")
    parser.add_argument("--concurrency", type=int, default=8, help="chats generated at once")
    parser.add_argument("--tiny-model", default="", help="serve this model folder with TransformersBackend")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="TransformersBackend: longest answer")
    args = parser.parse_args(argv)

    import app
    from assistant.chat import ChatService, ScriptedBackend, TransformersBackend
    from assistant.config import ServeConfig
    from feedback.db import ThreadLocalDB

    if args.tiny_model:
        cfg = ServeConfig(base_model=args.tiny_model, device="cpu", max_new_tokens=args.max_new_tokens,
                          concurrency=args.concurrency, port=args.port)
        backend = TransformersBackend(cfg)
        base_model = backend.base.model_id
    else:
        cfg = ServeConfig(concurrency=args.concurrency, port=args.port)
        backend = ScriptedBackend(delay_s=args.delay)
        base_model = "scripted-base"
    demo = app.build_app(ChatService(cfg, backend), ThreadLocalDB(), base_model)
    # cfg.host is the ServeConfig default: the server binds wherever the product binds by default.
    _, url, share_url = app.launch(demo, cfg.host, cfg.port, cfg.concurrency, block=False)
    print(json.dumps({"url": url.rstrip("/"), "share_url": share_url or demo.share_url, "host": cfg.host,
                      "pid": os.getpid()}), flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
