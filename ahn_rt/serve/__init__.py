"""Serving: the OpenAI-compatible HTTP server (``python -m ahn_rt.serve``) and the pieces it is made of.

Only ``ahn_rt.serve.server`` (and ``__main__``) import FastAPI/uvicorn (the ``serve`` extra);
the other modules use the standard library and torch, and the core runtime uses them directly:

* ``prompt``       — ``Prompt`` (token ids + chat-message marks) and the Qwen ChatML builder;
* ``prefix_cache`` — ``PrefixCache``: an LRU of prefilled states keyed by token prefix, bounded by bytes;
* ``scheduler``    — ``Scheduler``: one worker that steps every active generation (``Model.agenerate``);
* ``sessions``     — ``SessionStore``: conversations kept server-side (``session_id``), on disk with
  ``--state-dir``;
* ``metrics``      — Prometheus text exposition, written by hand.

docs/serving.md describes all of it.
"""
