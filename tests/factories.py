"""Model factories for tests, loaded through `model.factory: factories:NAME` (tests/ is on sys.path)."""

import torch
from torch import nn

from launcher.models import GPT


class Amplified(nn.Module):
    """The built-in GPT with its logits multiplied by a large learnable gain: fp16 gradients overflow
    until the loss scaler has backed off far enough."""

    def __init__(self, gpt: nn.Module, gain: float):
        super().__init__()
        self.gpt = gpt
        self.gain = nn.Parameter(torch.tensor(gain))

    def forward(self, input_ids):
        return self.gpt(input_ids) * self.gain


def overflowing_gpt(vocab_size: int, seq_len: int, gain: float = 3e4) -> nn.Module:
    return Amplified(GPT(vocab_size, seq_len, n_layer=1, n_head=2, d_model=32), gain)
