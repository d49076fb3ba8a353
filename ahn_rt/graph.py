"""The decode step as one unit: ``Stepper``, a callable token -> next token that runs the model for one
position, samples, and advances the session.

On CUDA the whole step — every layer, the final norm, the LM head and sampling — is captured once into a
CUDA graph and replayed for every later token (the habit of mamba's ``capture_graph`` and gpt-fast's
decode loop). The graph reads its position from the state's device tensor, so the same graph serves every
step; after each replay the stepper calls ``State.advance``, the same method the eager path uses. The
only host sync per token is the caller reading the sampled id. A session keeps its graphs (one per
sampling setup) in its declared ``graphs`` attribute for all its steps and all its ``generate`` calls;
``Session.reset`` keeps them too; a graph captured before a full-mode cache grew (``State.layout``) is
dropped and captured again. Elsewhere, and when the reference ops run (``AHN_RT_BACKEND=ref`` or no
compiled extension: they read positions on the host), the step runs eagerly.
"""
from __future__ import annotations

import contextlib
import gc
import threading

import torch

from . import settings
from .cache import DecodeBatch, begin_writes

# AHN_RT_GRAPH=0 turns graph capture off (debugging; the benchmark's eager rows).
GRAPHS_ENABLED = settings.graphs_enabled()
# torch.cuda.graph captures on one shared side stream: one capture at a time per process.
_CAPTURE_LOCK = threading.Lock()


@contextlib.contextmanager
def _capture(graph: torch.cuda.CUDAGraph):
    """Capture into ``graph``, one capture at a time. Python's cycle collector is run first and held off
    during the capture: a pool's graphs and states refer to each other, so a dropped pool is freed by the
    collector, and freeing its graphs' memory (cudaFree) inside a capture would invalidate it."""
    with _CAPTURE_LOCK:
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                yield
        finally:
            if was_enabled:
                gc.enable()


def sampling_key(sampler) -> tuple:
    p = sampler.p
    return (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty)


class _GraphStep:
    """One captured decode step over a session's static buffers."""

    def __init__(self, session, sampler):
        self.session = session
        self.sampler = sampler
        self.seen = sampler.seen          # the graph reads and writes this tensor
        st = session.state
        self.layout = st.layout   # the buffers the graph's kernels read and write (State.layout)
        self.tok = torch.zeros(1, dtype=torch.int64, device=st.device)
        self.noise = (None if sampler.p.greedy else
                      torch.empty(session.model.config.vocab_size, dtype=torch.float32, device=st.device))
        # Capturing runs nothing, so the state is not touched; the caller has already run a real
        # step eagerly, which warmed up the allocator and the cuBLAS handles.
        self.graph = torch.cuda.CUDAGraph()
        with _capture(self.graph):
            self.logits = session.model.decoder.decode_step(st, self.tok)[0]
            self.tok.copy_(sampler.sample(self.logits, noise=self.noise))

    def adopt(self, sampler):
        """Serve a new generate call with the same sampling setup: move its state into the buffers
        the graph was captured with."""
        self.seen.copy_(sampler.seen)
        sampler.seen = self.seen
        self.sampler = sampler

    def __call__(self, tok: torch.Tensor) -> torch.Tensor:
        if tok is not self.tok:
            self.tok.copy_(tok.view(1))
        if self.noise is not None:
            self.noise.exponential_(generator=self.sampler.gen)
        begin_writes([self.session.state])
        self.graph.replay()
        self.session.state.advance(1)
        return self.tok


class BatchStep:
    """``Model.step`` on CUDA: the decode of B rows captured once per storage and batch size and replayed
    for any B states of that storage — their pool slots go into the graph's ``slots`` buffer, their
    tokens into ``ids`` (a private state's graph serves that state alone). Positions come from the
    storage's device tensor, so the same graph serves every step. Only states whose buffers never move
    come here (``Model.step`` steps full mode's growing caches eagerly)."""

    def __init__(self, decoder, batch):
        self.decoder = decoder
        self.slot_list = [st.pool_slot for st in batch.states]   # what the slots buffer holds
        B = len(batch)
        self.ids = torch.zeros(B, dtype=torch.int64, device=batch.state0.device)
        self.batch = batch
        self.graph = torch.cuda.CUDAGraph()
        with _capture(self.graph):
            self.logits = decoder.decode_steps(batch, self.ids)

    def __call__(self, states, ids: torch.Tensor) -> torch.Tensor:
        b = self.batch
        if len(states) > 1 or b.state0.pool is not None:
            want = [st.pool_slot for st in states]
            if want != self.slot_list:   # a host-to-device copy only when the batch's slots changed
                b.slots.copy_(torch.tensor(want, dtype=torch.int64))
                self.slot_list = want
        b.states, b.state0 = states, states[0]
        self.ids.copy_(ids.view(-1))
        self.graph.replay()
        return self.logits.clone()


def batch_step(decoder, states, ids: torch.Tensor, graphs: dict) -> tuple[torch.Tensor, DecodeBatch]:
    """One decode step of ``states`` (one storage) in one batch: float32 logits [B, vocab] and the batch
    (its ``advance()`` is the caller's). On CUDA the step replays the graph that ``graphs`` (the pool's, or
    a private state's session's) keeps under ("step", B) (captured after a first eager step); elsewhere, and
    on the reference ops (``Decoder.graph_safe``), eager."""
    st0 = states[0]
    begin_writes(states)   # the caller's batch.advance() ends them
    if not (st0.device.type == "cuda" and GRAPHS_ENABLED and decoder.graph_safe):
        batch = DecodeBatch(states)
        return decoder.decode_steps(batch, ids), batch
    key = ("step", len(states))
    g = graphs.get(key)
    if g is None:
        batch = DecodeBatch(states)
        logits = decoder.decode_steps(batch, ids)   # a real step, and the warm-up before capture
        slots = None
        if st0.pool is not None:
            slots = torch.tensor([st.pool_slot for st in states], dtype=torch.int64, device=st0.device)
        graphs[key] = BatchStep(decoder, DecodeBatch(states, slots))
        return logits, batch
    logits = g(states, ids)
    return logits, g.batch


class Stepper:
    """``tok = stepper(tok)``: decode one token (int64 [1] on the device) and sample the next.
    ``logits`` holds the float32 [vocab] logits of the last step (on the graph path a static buffer that
    the next step overwrites). A step whose logits hold NaN/inf returns ``sampling.NON_FINITE`` (-1), which
    is no token: read the id before feeding it back (the runtime's loops do, and stop with one error line);
    fed to the model, -1 fails its embedding (on CUDA a device-side assert)."""

    def __init__(self, session, sampler):
        self.session = session
        self.sampler = sampler
        self.logits: torch.Tensor | None = None
        st = session.state
        # The reference ops sync with the host (``Decoder.graph_safe``): they decode eagerly.
        self.graphed = st.device.type == "cuda" and GRAPHS_ENABLED and session.model.decoder.graph_safe
        self.key = sampling_key(sampler)

    @torch.inference_mode()
    def eager(self, tok: torch.Tensor) -> torch.Tensor:
        logits = self.session.model.decoder.forward(self.session.state, tok.view(1))
        self.logits = logits[0]
        return self.sampler.sample(self.logits)

    @torch.inference_mode()
    def __call__(self, tok: torch.Tensor) -> torch.Tensor:
        if not self.graphed:
            return self.eager(tok)
        st, graphs = self.session.state, self.session.graphs
        st.ensure_capacity(st.position + 1)
        g = graphs.get(self.key)
        if g is not None and g.layout != st.layout:
            # full mode's cache moved since the capture: here, or in a prefill or a load (a longer prompt on a
            # reused session); replayed, the graph would write the freed buffers
            graphs.clear()
            g = None
        if g is None:
            out = self.eager(tok)                  # a real step, and the warm-up before capture
            graphs[self.key] = _GraphStep(self.session, self.sampler)
            return out
        if g.sampler is not self.sampler:
            g.adopt(self.sampler)
        out = g(tok)
        self.logits = g.logits
        return out
