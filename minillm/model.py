"""A GPT in one readable file: RMSNorm, rotary position embeddings, causal self-attention, MLP, blocks.

Taught in chapter 03 (pretraining). Later chapters build on these names: chapter 04 swaps the MLP for a
mixture of experts, chapter 07 adds a KV cache to `generate`, chapter 08 tunes the model with loss
masking (targets of -100 are ignored by the loss).
"""
from __future__ import annotations

import math
import numbers
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.kernels.reference import _wide, wide_dtype
from minillm.moe import MoE, MoEConfig

ATTENTION_KINDS = ("sdpa", "manual")


@dataclass
class GPTConfig:
    vocab_size: int = 512
    block_size: int = 128        # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    rope_base: float = 10000.0
    attention: str = "sdpa"      # "sdpa" (fused F.scaled_dot_product_attention) or "manual" (mask + softmax)
    tie_weights: bool = True
    moe: MoEConfig | None = None   # chapter 04: a mixture of experts instead of the MLP ...
    n_dense_layers: int = 0        # ... in every block after the first n_dense_layers

    def __post_init__(self) -> None:
        # numpy scalars (np.int64, np.float64) are accepted but stored as Python numbers: a checkpoint holding
        # numpy objects cannot be read back by a safe (weights-only) torch.load.
        for field_ in dataclasses.fields(self):   # plain_number leaves strings, bools and the MoE config alone
            setattr(self, field_.name, plain_number(getattr(self, field_.name)))
        if isinstance(self.moe, dict):  # a config saved with dataclasses.asdict (checkpoints)
            known = {field_.name for field_ in dataclasses.fields(MoEConfig)}
            unknown = [key for key in self.moe if key not in known]
            if unknown:   # (MoEConfig(**moe) would say only "unexpected keyword argument")
                raise TypeError(f"GPTConfig: moe has unknown field(s) {', '.join(map(repr, unknown))}; MoEConfig's "
                                f"fields are {', '.join(sorted(known))}")
            self.moe = MoEConfig(**self.moe)
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise ValueError(f"GPTConfig: moe={self.moe!r} must be a MoEConfig (or None for dense MLPs)")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig: {name}={value!r} must be a positive integer")
        # After the n_layer check, so that a bad n_layer is reported as such, not as a failed comparison.
        if isinstance(self.n_dense_layers, bool) or not isinstance(self.n_dense_layers, int) \
                or not 0 <= self.n_dense_layers <= self.n_layer:
            raise ValueError(f"GPTConfig: n_dense_layers={self.n_dense_layers!r} must be an integer between 0 and "
                             f"n_layer={self.n_layer}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             "pick n_embd as a multiple of n_head")
        head_dim = self.n_embd // self.n_head
        if head_dim % 2 != 0:
            raise ValueError(f"GPTConfig: head dimension n_embd/n_head={self.n_embd}/{self.n_head}={head_dim} is "
                             "odd; RoPE rotates pairs of dimensions, so pick n_embd/n_head even")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout={self.dropout!r} must be a number with 0 <= dropout < 1")
        if isinstance(self.rope_base, bool) or not isinstance(self.rope_base, (int, float)) \
                or not math.isfinite(self.rope_base) or not self.rope_base > 1.0:
            raise ValueError(f"GPTConfig: rope_base={self.rope_base!r} must be a finite number > 1 (10000 is usual)")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"GPTConfig: attention={self.attention!r} is unknown; "
                             f"choose one of {', '.join(map(repr, ATTENTION_KINDS))}")
        if not isinstance(self.tie_weights, bool):
            raise ValueError(f"GPTConfig: tie_weights={self.tie_weights!r} must be True or False")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.n_dense_layers


def plain_number(value):
    """A numpy (or other non-built-in) bool, integer or real as Python's bool, int or float; anything else unchanged."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):   # numpy 2 and 1
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned per-channel weight (no bias, no mean)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares overflows/underflows easily in 16-bit, so normalise in float32 (float64 stays).
        wide = _wide(x)
        normed = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(wide.dtype)).type_as(x)


def rope_cos_sin(head_dim: int, length: int, base: float = 10000.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (length, head_dim/2): position p rotates pair i by p * base^(-2i/head_dim).

    Computed in float64 and returned as `dtype` (float32 by default; float64 for a float64 model)."""
    if head_dim % 2 != 0:
        raise ValueError(f"rope_cos_sin: head_dim={head_dim} must be even (RoPE rotates pairs of dimensions)")
    inverse_frequency = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inverse_frequency)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (..., T, D) by the angles of positions 0..T-1 (cos, sin: (T, D/2)).

    Dimension i is paired with i + D/2. A rotation by angle(p) at query position p and angle(s) at key
    position s leaves q.k depending only on p - s: attention sees relative positions.
    """
    half = x.shape[-1] // 2
    wide = _wide(x)   # rotate in float32 (float64 stays float64)
    x1, x2 = wide[..., :half], wide[..., half:]
    cos, sin = cos.to(wide.dtype), sin.to(wide.dtype)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t only sees positions <= t; RoPE on queries and keys."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim, self.n_embd = config.n_head, config.head_dim, config.n_embd
        self.kind = config.attention
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self._rope_base = config.rope_base
        cos, sin = rope_cos_sin(config.head_dim, config.block_size, config.rope_base)
        # Non-persistent: derived from the config, so they stay out of checkpoints.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) casts every floating buffer; RoPE's tables stay float32 (in bf16 the angles
        # of positions a few dozen apart blur), and apply_rope rotates in float32 anyway. A float64 model gets
        # float64 tables, computed again at that precision.
        # A model built on the meta device and then given memory with to_empty(device=...) gets uninitialised
        # tables, and load_state_dict does not fill them (they are not in the state dict): compute them again.
        was_meta = self.rope_cos.is_meta
        super()._apply(fn, recurse)
        wide = wide_dtype(self.qkv.weight.dtype)
        if self.rope_cos.dtype != wide or (was_meta and not self.rope_cos.is_meta):
            self._rebuild_rope(self.rope_cos.device, wide)
        return self

    def _rebuild_rope(self, device: torch.device, dtype: torch.dtype) -> None:
        length, half = self.rope_cos.shape
        cos, sin = rope_cos_sin(2 * half, length, getattr(self, "_rope_base", 10000.0), dtype=dtype)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        q, k, v = self.qkv(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(batch, time, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.rope_cos.is_meta and not x.is_meta:
            # Built on the meta device, then given weights with load_state_dict(..., assign=True): the tables
            # are no weights, so they are still meta; compute them where the input is.
            self._rebuild_rope(x.device, wide_dtype(self.qkv.weight.dtype))
        cos, sin = self.rope_cos[:time], self.rope_sin[:time]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kind == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            future = torch.ones(time, time, dtype=torch.bool, device=x.device).triu(diagonal=1)
            scores = scores.masked_fill(future, float("-inf"))
            weights = F.softmax(_wide(scores), dim=-1).type_as(q)
            y = self.attn_dropout(weights) @ v
        y = y.transpose(1, 2).contiguous().view(batch, time, channels)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.fc = nn.Linear(config.n_embd, hidden, bias=False)
        self.proj = nn.Linear(hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm residual block: each sublayer reads a normalised copy and adds its result to the stream."""

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.norm_attn = RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.norm_mlp = RMSNorm(config.n_embd)
        self.mlp = MoE(config.n_embd, config.moe) if config.is_moe_layer(layer) else MLP(config)
        # The dense MLP drops its own output; an MoE layer has no dropout of its own, so the block drops the MoE
        # output the same way: dense and MoE then compare like with like when dropout > 0 (0 changes nothing).
        self.mlp_dropout = nn.Dropout(config.dropout) if isinstance(self.mlp, MoE) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x))
        return x + self.mlp_dropout(self.mlp(self.norm_mlp(x)))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT: expected a GPTConfig, got {type(config).__name__}; build one with GPTConfig(...)")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.norm_final = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # One matrix maps tokens to vectors and vectors back to token scores: fewer parameters,
            # and rare tokens' output rows get trained through their input use too.
            self.lm_head.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        # Every block adds two outputs to the residual stream, so its variance grows with 2*n_layer
        # additions; shrinking those projections by 1/sqrt(2*n_layer) keeps the stream's scale near
        # constant with depth at initialisation (GPT-2's recipe).
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            if isinstance(block.mlp, MoE):
                block.mlp.reset_output_projections(residual_std)
            else:
                nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) for token ids idx (B, T); with targets (B, T), also the mean cross-entropy.

        Targets equal to -100 are left out of the mean (used to mask prompts during fine-tuning).
        """
        for name, value in (("idx", idx), ("targets", targets)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"GPT.forward: {name} must be a torch tensor of token ids, got "
                                f"{type(value).__name__}; convert it with torch.as_tensor({name})")
        if idx.dim() != 2:
            raise ValueError(f"GPT.forward: idx must have shape (batch, time), got {tuple(idx.shape)}; "
                             "for a single sequence pass idx.unsqueeze(0)")
        time = idx.shape[1]
        if idx.numel() == 0:
            # An empty batch would give a mean loss over no tokens, NaN, without any error.
            raise ValueError(f"GPT.forward: idx of shape {tuple(idx.shape)} holds no tokens; give at least one "
                             "sequence of at least one token")
        if time > self.config.block_size:
            raise ValueError(f"GPT.forward: sequence length {time} exceeds block_size={self.config.block_size}; "
                             f"crop the input to its last {self.config.block_size} tokens, e.g. "
                             f"idx[:, -{self.config.block_size}:]")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"GPT.forward: idx must hold integer token ids (int64), got dtype {idx.dtype}")
        # On a GPU this check would wait for the device at every step, so only CPU inputs are checked
        # (a bad id on a GPU stops with CUDA's own device-side assert instead). Under torch.compile the checks
        # on values are left out: a branch on a tensor's value splits the compiled graph in two.
        checked = idx.device.type == "cpu" and not torch.compiler.is_compiling()
        if checked and idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            bad = idx[(idx < 0) | (idx >= self.config.vocab_size)][0].item()
            raise ValueError(f"GPT.forward: token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1}); "
                             "was the text encoded with a tokenizer of a different vocab_size?")
        # Targets are checked before the blocks run: a refused call must not leave a train-mode forward's
        # tokens in the MoE layers' load counters (they would steer the next step's bias update).
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"GPT.forward: targets shape {tuple(targets.shape)} must equal idx shape "
                                 f"{tuple(idx.shape)}")
            if targets.dtype not in (torch.int64, torch.int32) or targets.device != idx.device:
                raise TypeError(f"GPT.forward: targets must hold integer token ids (int64 or int32) on idx's device "
                                f"({idx.device}), got {targets.dtype} on {targets.device}")
            if checked and bool((targets == -100).all()):   # as for idx: on a CPU, uncompiled
                raise ValueError("GPT.forward: every target is -100 (masked), so the mean loss would be over no "
                                 "tokens (NaN); leave at least one target unmasked, or call without targets")
            if checked:
                outside = (targets >= self.config.vocab_size) | ((targets < 0) & (targets != -100))
                if bool(outside.any()):
                    raise ValueError(f"GPT.forward: target {targets[outside][0].item()} is outside the vocabulary "
                                     f"(0..{self.config.vocab_size - 1}, or -100 to mask a position); were the "
                                     "targets encoded with a tokenizer of a different vocab_size?")
        x = self.dropout(self.token_embedding(idx))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm_final(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(_wide(logits).view(-1, logits.shape[-1]),
                                   targets.reshape(-1).long(),
                                   ignore_index=-100)
            for layer in self.moe_layers():  # the optional balance loss of each MoE layer (training only)
                if layer.aux_loss is not None:
                    loss = loss + layer.aux_loss
        return logits, loss

    def moe_layers(self) -> list[MoE]:
        return [block.mlp for block in self.blocks if isinstance(block.mlp, MoE)]

    def after_optimizer_step(self) -> None:
        """Called by minillm.train after every optimizer step: MoE layers record load and update biases."""
        for layer in self.moe_layers():
            layer.after_optimizer_step()

    def num_active_parameters(self, non_embedding: bool = False) -> int:
        """Parameters one token uses: like num_parameters, but only top_k of each MoE layer's routed experts."""
        unused = sum(sum(p.numel() for p in layer.parameters()) - layer.num_active_parameters()
                     for layer in self.moe_layers())
        return self.num_parameters(non_embedding) - unused

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Trainable parameters, tied weights counted once.

        non_embedding=True leaves out the token embedding table (the convention of scaling-law papers);
        an untied LM head is a matmul and stays counted.
        """
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding:
            total -= self.token_embedding.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Analytic matmul FLOPs per token (a multiply-add counts as 2).

        forward = 2 * (matmul parameters, including the LM head) + 4 * n_layer * seq_len * n_embd for the
        attention scores q.k and the weighted sum of values. Attention is counted in full, T x T per head,
        as if not causal: that is what torch.utils.flop_counter.FlopCounterMode reports for the explicit
        attention matmuls and for the CUDA SDPA kernels (it ignores is_causal). On CPU the counter
        records nothing for the fused SDPA kernel, so compare against attention="manual" there.
        Training = 3 * forward (the backward pass computes gradients for inputs and for weights).
        A mixture-of-experts layer counts only what a token uses: the router, the shared experts and
        top_k routed experts (the sparse compute that makes MoE cheap per token).
        seq_len defaults to block_size; embedding lookups, norms and softmax are not matmuls and are left out.
        """
        config = self.config
        seq_len = config.block_size if seq_len is None else plain_number(seq_len)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"flops_per_token: seq_len={seq_len!r} must be a positive integer")
        attention = 4 * config.n_embd ** 2                          # qkv + out proj
        dense_mlp = 2 * config.mlp_ratio * config.n_embd ** 2
        moe_mlp = 0
        if config.moe is not None:
            # Only the weights a token uses: router, shared experts and top_k routed SwiGLU experts.
            moe_mlp = config.n_embd * (config.moe.n_routed + 3 * config.moe.expert_hidden * config.moe.active_experts)
        n_moe = sum(config.is_moe_layer(layer) for layer in range(config.n_layer))
        matmul_parameters = (config.n_layer * attention + (config.n_layer - n_moe) * dense_mlp + n_moe * moe_mlp
                             + config.vocab_size * config.n_embd)
        forward = 2.0 * matmul_parameters + 4.0 * config.n_layer * seq_len * config.n_embd
        return 3.0 * forward if training else forward

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 top_p: float | None = None, stop_token: int | None = None) -> torch.Tensor:
        """Append up to max_new_tokens sampled tokens to idx ((T,) or (B, T)); returns the same rank.

        temperature=0 picks the most likely token (greedy); top_k keeps only the k most likely tokens;
        top_p keeps the fewest most likely tokens whose probabilities add up to at least top_p (nucleus).
        top_p comes after generator so that calls passing generator by position keep working. stop_token (say
        the id of "<|endoftext|>") ends a row when drawn, and the generation once every row has ended.
        The context is cropped to the last block_size tokens, so any prompt length works. The sampling
        itself is `minillm.sampling.generate` (chapter 01), shared by every model of the course.
        """
        from minillm.sampling import generate
        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        generator=generator, stop_token=stop_token)

    def configure_optimizer(self, lr: float, weight_decay: float, betas: tuple[float, float],
                            device_type: str) -> torch.optim.AdamW:
        """AdamW that decays 2-D weights (matmuls, embeddings) but not norm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # The fused CUDA kernel updates all parameters in a few launches instead of several per tensor.
        extra = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **extra)
