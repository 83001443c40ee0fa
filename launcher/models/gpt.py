"""The built-in GPT: a small pre-norm decoder with learned positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.attn_norm = nn.LayerNorm(d_model)
        # no bias: a key bias has an identically zero gradient (softmax ignores a per-query constant),
        # and Adam would turn the rounding noise in that zero into updates of size lr
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.attn_out = nn.Linear(d_model, d_model)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp_in = nn.Linear(d_model, 4 * d_model)
        self.mlp_out = nn.Linear(4 * d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(width, dim=2)
        q, k, v = (t.view(batch, seq, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:  # one sequence per row: the fused causal kernel
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        x = x + self.resid_dropout(self.attn_out(attn.transpose(1, 2).reshape(batch, seq, width)))
        return x + self.resid_dropout(self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x)))))


class GPT(nn.Module):
    """A small pre-norm decoder with learned positions. It has no buffers, so DDP broadcasts nothing per forward."""

    def __init__(
        self, vocab_size: int, seq_len: int, n_layer: int, n_head: int, d_model: int, dropout: float = 0.0, gradient_checkpointing: bool = False
    ):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        self.tok_embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(seq_len, d_model)
        self.embed_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.final_norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        for block in self.blocks:  # scaled residual projections (GPT-2)
            for proj in (block.attn_out, block.mlp_out):
                nn.init.normal_(proj.weight, std=0.02 / (2 * n_layer) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`position_ids` [batch, seq] (rows packed with several samples): positions restart at each sample, and a
        token attends only to earlier tokens of its own sample (a block-diagonal causal mask)."""
        attn_mask = None
        if position_ids is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        else:
            positions, attn_mask = position_ids, sample_causal_mask(position_ids)
        x = self.embed_dropout(self.tok_embed(input_ids) + self.pos_embed(positions))
        for block in self.blocks:
            # non-reentrant checkpointing restores the RNG state, so dropout masks match the first forward
            x = checkpoint(block, x, attn_mask, use_reentrant=False) if self.gradient_checkpointing and self.training else block(x, attn_mask)
        return self.lm_head(self.final_norm(x))


def sample_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, 1, seq, seq] booleans: causal, and within one sample (a sample starts where the position does not
    grow by one)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    sample = starts.cumsum(dim=1)
    seq = position_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    return (causal & (sample[:, :, None] == sample[:, None, :]))[:, None]
