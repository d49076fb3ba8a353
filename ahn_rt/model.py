"""The AHN-augmented Qwen decoder: prefill over a chunk of tokens and the single-token decode step.

Semantics: docs/semantics.md §2–§6 (the consistent rule; §9 says where the official decode path differs).
For a query at absolute position t the attention sees the sinks {0..S-1} and the window {t-W+1..t}; once
t >= S + W, the token t - W has left the window and was written into the layer's AHN memory (with the
gates computed when it was first processed), and the memory is read with q_t, gated by x_t, and added to
the attention output before o_proj. The memory is whichever variant the config names (GatedDeltaNet,
DeltaNet, Mamba2: ``ahn_rt.memory``, §11); this file never names one. Every hot op goes through
``ahn_rt.ops``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import memory, ops, settings
from .cache import DecodeBatch, State, StatePool, begin_writes
from .config import Config, rope_inv_freq
from .weights import Weights


_MLP_ROWS = 2048   # prefill rows per MLP block (Decoder._mlp_)


class _SideStream:
    """A fork of the current CUDA stream: work entered under ``with`` runs on a high-priority side stream
    after everything enqueued so far; ``join(t)`` makes the current stream wait for it and hands t (made on
    the side stream) over to the current stream's use. Inputs of the forked work must stay referenced until
    the join (the decoder's locals do), so that the current stream cannot reuse their memory early."""

    _streams: dict = {}

    def __init__(self, device: torch.device):
        key = device.index if device.index is not None else torch.cuda.current_device()
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device, priority=-1)
        self.side = self._streams[key]
        self.main = torch.cuda.current_stream(device)
        self._ctx = None

    @classmethod
    def for_decode(cls, device: torch.device) -> "_SideStream | None":
        """The fork for the decode step's memory work where AHN_RT_DECODE_FORK asks for it, only while a CUDA
        graph is being captured (the fork becomes a parallel branch of the graph; captures run one at a
        time, so eager steps of concurrent sessions never share the side stream); else None (serial)."""
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing() and settings.decode_fork():
            return cls(device)
        return None

    def __enter__(self):
        self.side.wait_stream(self.main)
        self._ctx = torch.cuda.stream(self.side)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        ctx, self._ctx = self._ctx, None
        return ctx.__exit__(*exc)

    def join(self, t: torch.Tensor) -> torch.Tensor:
        self.main.wait_stream(self.side)
        t.record_stream(self.main)
        return t


class Decoder:
    def __init__(self, config: Config, weights: Weights, device):
        # The switches read later (at a CUDA graph capture, at a prefill), checked now on every device: a
        # bad value is one line (SettingsError) at load, before any work, not at the first capture.
        settings.check("AHN_RT_PREFILL_CUDNN", "AHN_RT_PREFILL_BAND", "AHN_RT_DECODE_FORK", *settings.KERNEL_SWITCHES)
        self.config = config
        self.w = weights
        self.device = torch.device(device)
        self.inv_freq = rope_inv_freq(config, self.device)
        self.scale = config.head_dim ** -0.5
        c = config
        self._q_end = c.q_size
        self._k_end = c.q_size + c.kv_size
        self.v_end = c.q_size + 2 * c.kv_size     # the memory's projection rows follow
        # The AHN memory module (mode 'ahn' only).
        self.memory = memory.get(c.ahn_implementation) if c.mode == "ahn" else None

    @property
    def graph_safe(self) -> bool:
        """Whether decode_step can be captured into a CUDA graph (no host sync anywhere in it): with the
        compiled ops, which read positions and slots on the device; the references read them on the host."""
        return ops.backend() == "ext"

    def new_state(self, capacity: int | None = None, pool: StatePool | None = None) -> State:
        """A zeroed state at position 0: a free slot of ``pool`` (made by ``new_pool``), or private."""
        if pool is None:
            return State(self.config, self.device, capacity)
        if pool.config is not self.config:
            raise ValueError("the state pool belongs to another model; make it with this model's new_pool")
        return pool.acquire()

    # ------------------------------------------------------------------------------------------
    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = ops.rms_norm(h, self.w.norm, self.config.rms_norm_eps)
        return ops.linear(h, self.w.lm_head).float()

    def _mlp_(self, h: torch.Tensor, lw) -> torch.Tensor:
        """h += MLP(h) in place, _MLP_ROWS rows at a time: the [rows, 2 * intermediate] gate|up output of a
        whole chunk (180 MB at the 3B shape for the default 4096 tokens, 360 MB for 8192) would be the
        largest transient of a prefill; in blocks it is 90 MB, and each block's GEMMs are still large."""
        for b in h.split(_MLP_ROWS):
            x = ops.rms_norm(b, lw.ln_post, self.config.rms_norm_eps)
            ops.linear_add_(b, ops.silu_mul(ops.linear(x, lw.w_gu)), lw.w_down)
        return h

    # ------------------------------------------------------------------------------------------
    def prefill(self, st: State, ids: torch.Tensor, last_only: bool = False, scorer=None) -> torch.Tensor:
        """Run T >= 1 tokens at positions st.position.. through every layer; advance the state.

        The State plans the chunk (which keys it attends, which of its tokens it writes where, which
        tokens it hands to the memory); this function only computes. Returns float32 logits [T, vocab]
        (or [1, vocab] with ``last_only``). ``scorer`` (a ``sampling.PromptScorer``) takes the prompt
        log-probabilities of the chunk's rows from its final hidden states, in blocks of rows; the returned
        logits are computed as without it.
        """
        c = self.config
        T = ids.numel()
        plan = st.plan(T)
        begin_writes([st])
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        cos, sin = ops.rope_cos_sin(plan.positions, self.inv_freq, c.dtype)
        r = plan.read_rows

        h = F.embedding(ids, self.w.embed)
        for i, lw in enumerate(self.w.layers):
            x = ops.rms_norm(h, lw.ln_in, c.rms_norm_eps)
            proj = ops.linear(x, lw.w_in, lw.b_in)
            q = proj[:, : self._q_end].view(T, H, D)
            k = proj[:, self._q_end: self._k_end].view(T, Hkv, D)
            v = proj[:, self._k_end: self.v_end].view(T, Hkv, D)
            if c.qk_norm:
                q = ops.rms_norm(q, lw.q_norm, c.rms_norm_eps)
                k = ops.rms_norm(k, lw.k_norm, c.rms_norm_eps)
            q = ops.rope(q, cos, sin)
            k = ops.rope(k, cos, sin)
            gates = z = None
            if st.ahn:
                gates, z = self.memory.gates(proj[:, self.v_end:], lw.mem)
            if plan.in_order:   # a chunk that fills the cache in order is written first, and attends from it
                st.write(i, plan, k, v, gates)
            attn = ops.prefill_attention(q, k, v, st.k[i], st.v[i], plan.p0, st.sinks, st.window, self.scale,
                                         cached=plan.in_order)
            if st.ahn and plan.n_evict:
                k_ev, v_ev, g_ev = st.evicted(i, plan, k, v, gates)
                attn[r] += self.memory.prefill(q[r], k_ev, v_ev, g_ev, z[r], st.memory[i], lw.mem)
            if not plan.in_order:
                st.write(i, plan, k, v, gates)
            ops.linear_add_(h, attn.reshape(T, H * D), lw.w_o, lw.b_o)
            self._mlp_(h, lw)
        st.advance(T)
        if scorer is not None:
            scorer.take(lambda a, b: self._logits(h[a:b]), T)
        return self._logits(h[-1:] if last_only else h)

    @torch.inference_mode()
    def warm_up(self, tokens: int):
        """On CUDA: a prefill of ``tokens`` tokens (a chunk) from an empty state, then a small one past the
        fill point (ring attention over wrapped ranges, the memory's chunked path), on throwaway states, so
        that the first real prompt after ``load`` pays no one-time setup (library handles, kernel module
        loads, shared-memory limits), and cuDNN's prefill attention plans where enabled (``warm_attention``).
        A no-op elsewhere."""
        if self.device.type != "cuda":
            return
        self.warm_attention(tokens)
        # A chunk, then shorter prompts: a GEMM's first call at a row count of a new size class loads the
        # cuBLAS kernel for it (5 ms of host time in biased projections for a 2k prompt after a warm-up of
        # 8192 and 70 tokens, H100).
        for n in sorted({max(2, tokens), *(m for m in (2048, 512, 128) if m < tokens)}, reverse=True):
            st = self.new_state()
            self.prefill(st, torch.zeros(n, dtype=torch.int64, device=self.device), last_only=True)
        st = self.new_state()
        if not st.full:
            st.fill_random(st.sinks + st.window + st.window // 2 + 3)
        ids = torch.zeros(min(70, st.window + 2), dtype=torch.int64, device=self.device)
        self.prefill(st, ids, last_only=True)
        del st

    def warm_attention(self, tokens: int) -> bool:
        """cuDNN's plans for the prefill attention of ``tokens``-token chunks, built in the calling thread
        (``ops.warm_prefill_attention``: torch keeps them per thread, and a thread that has not built them
        prefills with FlashAttention-2 alone). Returns whether cuDNN will run; not in mode 'full', whose
        cache grows (no fixed layout to build for)."""
        c = self.config
        if c.mode == "full":
            return False
        return ops.warm_prefill_attention(c.num_heads, c.num_kv_heads, c.head_dim, c.dtype, self.device, tokens,
                                          c.sinks, c.window)

    # ------------------------------------------------------------------------------------------
    def _decode_attention(self, batch: DecodeBatch, i: int, lw, proj: torch.Tensor, fork: "_SideStream | None"):
        """Layer i of one decode token per row after the fused projection ``proj`` [B, P]: the decode front
        (q/k norm, RoPE, ring write with eviction, the memory's gates), window attention and the memory step,
        each one kernel over the B rows of ``batch``. Returns (attention output [B, H, D], memory term or None):
        serially the memory step adds its term into the attention output (None); with ``fork`` it runs on the
        side stream into a buffer of its own, filled with -0.0 first so that a row without a memory step adds
        exactly nothing (x + -0.0 == x, also for x = +0.0), and o_proj adds the two on its load (``x_add``):
        the same bits either way."""
        mem = self.memory if batch.ahn else None
        S, W, slots = batch.sinks, batch.window, batch.slots
        if mem is not None:
            q = mem.decode_front(self, batch, i, lw, proj)
        else:
            q = ops.decode_prep(proj, self.inv_freq, batch.pos, lw.q_norm, lw.k_norm, self.config.rms_norm_eps,
                                None, None, batch.k[i], batch.v[i], None, None, S, W, batch.k_evict,
                                batch.v_evict, None, None, slots=slots)
        m = None
        if mem is not None and fork is not None:
            with fork:
                m = torch.full((q.shape[0], self.config.num_heads, self.config.head_dim), -0.0, dtype=q.dtype,
                               device=q.device)
                mem.decode_step(self, batch, i, lw, q, proj, m)
        attn = ops.swa_decode(q, batch.k[i], batch.v[i], batch.pos, S, W, self.scale, slots=slots)
        if mem is not None and fork is None:
            mem.decode_step(self, batch, i, lw, q, proj, attn)
        return attn, (None if m is None else fork.join(m))

    def decode_step(self, st: State, ids: torch.Tensor) -> torch.Tensor:
        """One token (ids: int64 [1] on the device) at position st.pos (device): ``decode_steps`` of a batch
        of one. Does not advance the position: the caller does (eagerly, or after a replayed CUDA graph).
        Returns logits [1, vocab]."""
        return self.decode_steps(DecodeBatch([st]), ids)

    def decode_steps(self, batch: DecodeBatch, ids: torch.Tensor) -> torch.Tensor:
        """One token for each of the B rows of ``batch`` (ids: int64 [B] on the device; each state at its
        own position). Advances nobody (the caller does: ``batch.advance()``). Returns float32 logits
        [B, vocab]; row b is the same bits whatever the batch and its neighbours.

        Per layer: one fused GEMV over the B rows (RMSNorm + q|k|v|memory rows + bias; each weight read
        once for all rows), the decode front (q/k norm, RoPE, ring write with eviction, the memory's gates:
        ``decode_prep``), window attention, the memory step (GatedDeltaNet / DeltaNet: one fused
        ``gdn_decode``; Mamba2: ``mamba2_decode``), then three fused GEMVs (o_proj + residual,
        RMSNorm + gate|up + SiLU*mul, down + residual). With AHN_RT_DECODE_FORK=1, while a CUDA graph is
        captured, the memory step runs on a side stream beside the window attention (a parallel branch of
        the graph) and o_proj's GEMV adds its term (``_decode_attention``)."""
        eps = self.config.rms_norm_eps
        B = ids.numel()
        fork = _SideStream.for_decode(self.device) if batch.ahn else None
        h = F.embedding(ids.view(B), self.w.embed)
        for i, lw in enumerate(self.w.layers):
            proj = ops.gemv(h, lw.w_in, lw.b_in, lw.ln_in, eps, None, False, False, True)
            attn, m = self._decode_attention(batch, i, lw, proj, fork)
            h = ops.gemv(attn.view(B, -1), lw.w_o, lw.b_o, None, 0.0, h, False, False, True,
                         x_add=None if m is None else m.view(B, -1))
            act = ops.gemv(h, lw.w_gu, None, lw.ln_post, eps, None, True, False, True)
            h = ops.gemv(act, lw.w_down, None, None, 0.0, h, False, False, True)
        return ops.gemv(h, self.w.lm_head, None, self.w.norm, eps, None, False, True, True)

    def forward(self, st: State, ids: torch.Tensor, last_only: bool = False, scorer=None) -> torch.Tensor:
        """Tokens through the model. A single token takes the decode kernels, longer feeds the
        prefill path; both follow the same rule (tests check they agree). ``scorer``: see ``prefill``."""
        if ids.numel() == 1:
            st.ensure_capacity(st.position + 1)   # full mode: the decode kernels write slot `position`
            begin_writes([st])
            logits = self.decode_step(st, ids)
            st.advance(1)
            if scorer is not None:
                scorer.take(lambda a, b: logits[a:b], 1)
            return logits
        return self.prefill(st, ids, last_only, scorer)
