"""Loopback fakes of the OpenAI Images and Replicate predictions APIs, for the tests.

Real HTTP servers on 127.0.0.1 (a ``ThreadingHTTPServer`` in a thread), told per test what
to answer through a Python API:

- :mod:`tests.fakes.common`: :class:`~tests.fakes.common.Fault`, the shared server;
- :mod:`tests.fakes.openai_server`: ``OpenAIFake``;
- :mod:`tests.fakes.replicate_server`: ``ReplicateFake``;
- :mod:`tests.fakes.plugin`: the pytest fixtures ``openai_fake`` and ``replicate_fake``.

Each server also runs as a process: ``python -m tests.fakes.openai_server --port 0`` prints
its URL and serves until SIGTERM or Ctrl-C.
"""
