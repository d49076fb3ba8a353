"""Losses over the vocabulary without ever holding [L, V] logits: self-distillation KL (docs/semantics.md
§10) with an optional student cross-entropy, and the plain next-token loss for teacher pretraining.

Both run the LM head chunk by chunk inside one autograd Function that computes the loss AND its gradient
in the same pass (the "fused linear cross-entropy" pattern): for each chunk of rows it forms the float32
logits of the student (and of the teacher), reduces them to the loss, turns them into the gradient with
respect to the student's logits (p_S - p_T for the KL, p_S - onehot for the CE), multiplies that by the LM
head weight and keeps only the [rows, d] result. Backward just scales what was kept. At most one chunk of
[chunk, V] float32 logits per model exists at a time, and nothing is recomputed.

Labels follow the Hugging Face convention: ``labels`` [B, L] is unshifted (labels[b, t] is token t, or
-100 to ignore it) and the cross-entropy at position t predicts labels[b, t + 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


class _HeadLoss(torch.autograd.Function):
    """loss = kl_scale * sum_rows KL(softmax(h_t E^T) || softmax(h_s E^T))
            + ce_scale * sum_rows CE(h_s E^T, target)   (rows with target < 0 add nothing).
    Each scale is a float, or a float32 tensor [rows] (a scale per row: weighted losses). Returns (loss, its
    KL part), the second without a gradient (the training log reports it on its own)."""

    @staticmethod
    def forward(ctx, h_s, weight, h_t, targets, kl_scale: float, ce_scale: float, chunk: int, want_grad: bool):
        need_h = want_grad and ctx.needs_input_grad[0]
        need_w = want_grad and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h_s) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        kl_total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        ce = targets is not None and (torch.is_tensor(ce_scale) or ce_scale != 0.0)
        for s in range(0, h_s.shape[0], chunk):
            e = min(h_s.shape[0], s + chunk)
            kls = kl_scale[s:e, None] if torch.is_tensor(kl_scale) else kl_scale   # float or [rows, 1]
            ces = ce_scale[s:e, None] if torch.is_tensor(ce_scale) else ce_scale
            lps = F.linear(h_s[s:e], weight).float().log_softmax(-1)          # log p_S  [rows, V]
            coef = 0.0
            if ce:
                t = targets[s:e]
                ok = (t >= 0).to(lps.dtype)[:, None]
                tt = t.clamp(min=0)[:, None]
                total += -(lps.gather(1, tt) * ok * ces).sum()
                coef = ces * ok
            if h_t is not None:
                lpt = F.linear(h_t[s:e], weight).float().log_softmax(-1)      # log p_T
                pt = lpt.exp()
                kl = (lpt.sub_(lps).mul_(pt).sum(-1, keepdim=True) * kls).sum()
                total += kl
                kl_total += kl
                del lpt
                coef = coef + kls
            if not (need_h or need_w):
                continue
            # d loss / d logits_S = p_S (kl_scale + ce_scale ok) - kl_scale p_T - ce_scale ok onehot(target)
            g = lps.exp_().mul_(coef)
            if h_t is not None:   # a float scale: one fused pass over [rows, V]
                g.sub_(pt.mul_(kls)) if torch.is_tensor(kls) else g.add_(pt, alpha=-kls)
            if ce:
                g.scatter_add_(1, tt, -ces * ok)
            g = g.to(weight.dtype)
            if need_h:
                grad_h[s:e] = (g @ weight).to(h_s.dtype)
            if need_w:
                grad_w += (g.t() @ h_s[s:e]).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(kl_total)
        return total, kl_total

    @staticmethod
    def backward(ctx, grad_out, _grad_kl):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * grad_out if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None


def _next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Unshifted labels [B, L] -> the target of each position [B, L] (labels[t + 1]; -100 at the end)."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)


def distill_loss(model, h_teacher: torch.Tensor, h_student: torch.Tensor, valid: torch.Tensor, *,
                 ce_weight: float = 0.0, labels: torch.Tensor | None = None, chunk: int = 1024,
                 weight: torch.Tensor | None = None, return_kl: bool = False):
    """KL(teacher || student) summed over the vocabulary at the ``valid`` positions ([B, L] bool) and
    averaged over them, plus ``ce_weight`` x the student's mean next-token cross-entropy at the valid
    positions that have a target (``labels`` unshifted, see the module docstring). With ``weight`` (float
    [B, L], position t's loss weight) both means are weighted: sum w_t loss_t / sum w_t. h_teacher /
    h_student: [B, L, d] after the final norm (the teacher gets no gradient). Returns (loss scalar float32,
    mass): mass is the number of valid positions, or the sum of their weights; with ``return_kl`` also the
    loss's KL part alone (no gradient; equal to the loss when ce_weight is 0)."""
    d = h_student.shape[-1]
    rows = valid.reshape(-1).nonzero().squeeze(1)
    n_valid = int(rows.numel())
    w = None if weight is None else weight.reshape(-1).index_select(0, rows).float()
    mass = n_valid if w is None else float(w.sum(dtype=torch.float64))
    if n_valid == 0 or mass <= 0:
        zero = h_student.sum() * 0.0
        return (zero, 0, zero.detach()) if return_kl else (zero, 0)
    hs = h_student.reshape(-1, d).index_select(0, rows)
    ht = h_teacher.detach().reshape(-1, d).index_select(0, rows)
    kl_scale = 1.0 / n_valid if w is None else w / mass
    targets, ce_scale = None, 0.0
    if ce_weight:
        if labels is None:
            raise ValueError("distill_loss: ce_weight > 0 needs labels")
        targets = _next_token_targets(labels).reshape(-1).index_select(0, rows)
        has = targets >= 0
        if w is None:
            ce_scale = float(ce_weight) / max(int(has.sum()), 1)
        else:
            ce_scale = float(ce_weight) * w / max(float((w * has).sum(dtype=torch.float64)), 1e-30)
    loss, kl = _HeadLoss.apply(hs, model.lm_head_weight, ht, targets, kl_scale, ce_scale, int(chunk),
                               torch.is_grad_enabled())
    return (loss, mass, kl) if return_kl else (loss, mass)


def lm_loss(model, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Mean next-token cross-entropy (teacher pretraining): position t predicts labels[:, t + 1]
    (labels unshifted, -100 ignored). hidden: [B, L, d] after the final norm. Gradient also reaches the
    LM head / tied embedding when it requires grad."""
    d = hidden.shape[-1]
    targets = _next_token_targets(labels).reshape(-1)
    rows = (targets >= 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return hidden.sum() * 0.0
    hs = hidden.reshape(-1, d).index_select(0, rows)
    return _HeadLoss.apply(hs, model.lm_head_weight, None, targets.index_select(0, rows), 0.0,
                           1.0 / rows.numel(), int(chunk), torch.is_grad_enabled())[0]
