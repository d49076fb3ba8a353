"""ahn_rt.train: self-distillation training of the AHN memory on a frozen Qwen base (docs/semantics.md §10).

Modules: gdn (chunked gated delta rule with autograd), gla (chunked scalar-decay linear attention with
autograd), memories (one trainable module per AHN memory variant: GatedDeltaNet, DeltaNet, Mamba2),
attention (sinks + window / causal attention via SDPA), model (TrainModel, AHNLayer, init_ahn_), loss
(distill_loss, lm_loss); data, trainer, checkpoint and ``python -m ahn_rt.train`` on top. The interface is
in each module's docstrings.
"""
