"""The small byte-level language model the examples train, in plain PyTorch.

Text: `pydoc_data.topics`, the documentation that ships with CPython (about 465k
characters), so every example runs offline. Tokens are UTF-8 bytes, so there is no
vocabulary to build or ship. The Lightning and Composer examples wrap these pieces in
their framework's module type; the model itself is the same.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

VOCAB = 256
"""Byte-level tokens."""


def topics_bytes() -> Tensor:
    """The help text as a 1-D long tensor of bytes, topics in sorted order."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def next_byte_windows(data: Tensor, context: int) -> TensorDataset:
    """Non-overlapping windows of `context` bytes and, at each position, the byte after it."""
    count = (len(data) - 1) // context
    inputs = data[: count * context].view(count, context)
    targets = data[1 : count * context + 1].view(count, context)
    return TensorDataset(inputs, targets)


def train_val_split(context: int, val_fraction: float) -> tuple[TensorDataset, TensorDataset]:
    """Training and validation windows; the last `val_fraction` of the text validates."""
    data = topics_bytes()
    split = int(len(data) * (1 - val_fraction))
    return next_byte_windows(data[:split], context), next_byte_windows(data[split:], context)


class CharTransformer(nn.Module):
    """A small causal (pre-norm) transformer over bytes.

    Args:
        vocab: Number of token values.
        context: Longest sequence the positional embedding covers.
        d_model: Width of the residual stream.
        n_heads: Attention heads per block.
        n_layers: Transformer blocks.
    """

    def __init__(
        self,
        vocab: int = VOCAB,
        context: int = 64,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(context, d_model)
        block = nn.TransformerEncoderLayer(
            d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-token logits of shape (batch, length, vocab)."""
        length = tokens.shape[1]
        hidden = self.tokens(tokens) + self.positions(torch.arange(length, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(
            length, device=tokens.device, dtype=hidden.dtype
        )
        return self.head(self.norm(self.blocks(hidden, mask=mask, is_causal=True)))


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy in nats per byte, computed in fp32 even for a bf16 model."""
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
