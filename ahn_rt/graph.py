"""The decode step as one unit: a function token -> next token that runs the model for one position,
samples, and advances the session.

On CUDA the whole step — every layer, the final norm, the LM head, sampling and the device-side position
update — is captured once into a CUDA graph and replayed for every later token (the habit of mamba's
``capture_graph`` and gpt-fast's decode loop). The graph reads its position from the state's device
tensor, so the same graph serves every step; the only host sync per token is the caller reading the
sampled id. A session keeps its graphs (one per sampling setup) for all its steps and all its
``generate`` calls; ``Session.reset`` keeps them too. Elsewhere the step runs eagerly.
"""
from __future__ import annotations

import os

import torch

# AHN_RT_GRAPH=0 turns graph capture off (debugging; the benchmark's eager rows).
GRAPHS_ENABLED = os.environ.get("AHN_RT_GRAPH", "1") != "0"


class _GraphStep:
    """One captured decode step over a session's static buffers."""

    def __init__(self, session, sampler):
        self.session = session
        self.sampler = sampler
        self.seen = sampler.seen          # the graph reads and writes this tensor
        st = session.state
        self.capacity = st.capacity
        self.tok = torch.zeros(1, dtype=torch.int64, device=st.device)
        self.noise = (None if sampler.p.greedy else
                      torch.empty(session.model.config.vocab_size, dtype=torch.float32, device=st.device))
        # Capturing runs nothing, so the state is not touched; the caller has already run a real
        # step eagerly, which warmed up the allocator and the cuBLAS handles.
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            logits = session.model.decoder.decode_step(st, self.tok)
            self.tok.copy_(sampler.sample(logits[0], noise=self.noise))
            st.pos.add_(1)

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
        self.graph.replay()
        self.session.state.position += 1
        return self.tok


def make_stepper(session, sampler):
    dec = session.model.decoder
    st = session.state

    @torch.inference_mode()
    def eager(tok: torch.Tensor) -> torch.Tensor:
        logits = dec.forward(st, tok.view(1))
        return sampler.sample(logits[0])

    if st.device.type != "cuda" or not GRAPHS_ENABLED:
        return eager

    graphs = session.__dict__.setdefault("_graphs", {})
    key = (sampler.p.temperature, sampler.p.top_k, sampler.p.top_p, sampler.p.min_p,
           sampler.p.repetition_penalty)

    @torch.inference_mode()
    def step(tok: torch.Tensor) -> torch.Tensor:
        if st.ensure_capacity(st.position + 1):   # full mode grew: the buffers moved
            graphs.clear()
        g = graphs.get(key)
        if g is None:
            out = eager(tok)                       # a real step, and the warm-up before capture
            graphs[key] = _GraphStep(session, sampler)
            return out
        if g.sampler is not sampler:
            g.adopt(sampler)
        return g(tok)

    return step
