"""Convolutional front end: 4x subsampling in time (WeNet's Conv2dSubsampling4).

Two 3x3 convolutions of stride 2 without padding, so encoder frame t reads
feature frames 4t .. 4t+6 and nothing else: the front end is causal with a
right context of 6 feature frames, and a window of feature frames can be
subsampled on its own with exactly the result of the whole utterance.

Speed (``streamkd bench``): the first convolution has one input channel, a
shape oneDNN handles badly, so it runs as a matrix product over the 3x3
patches (``Tensor.unfold``) with the same weights; its output then lies in
channels-last order, which the second convolution runs about 1.7x faster in
than in NCHW, and the output projection reads that order directly (its
weight columns permuted on the fly), so no layout copy is made. ONNX export
takes the plain ``nn.Conv2d`` path: the parameters are the same.

This class is the one home of the frame geometry: ``output_length`` (and
``output_lengths``), ``window_frames``, ``next_window``, ``right_context``
and ``frame_ms``
(one encoder frame's duration); everything else (the data loader's
too-short check, streaming windows, latency figures, emission delays, the
export's metadata) is derived from them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv2dSubsampling4"]


def _two_convs(n):
    """Outputs of two 3-wide, stride-2 convolutions without padding over n
    inputs (an int or a tensor of them; negative when n < 7)."""
    return ((n - 1) // 2 - 1) // 2


class Conv2dSubsampling4(nn.Module):
    """(B, F, C) features -> (B, T, D) with T = ((F - 1) // 2 - 1) // 2."""

    subsampling = 4  # feature frames per encoder frame
    right_context = 6  # feature frames beyond 4t that encoder frame t reads

    def __init__(self, input_dim: int, d_model: int, channels: Optional[int] = None) -> None:
        """``channels``: width of the two convolutions (default ``d_model``,
        as in WeNet); fewer, as icefall's front ends use, make the
        front end, the costliest part of a small model's step, cheaper."""
        super().__init__()
        channels = channels or d_model
        freq = _two_convs(input_dim)
        if freq < 1:
            raise ValueError(f"input_dim must be >= 7 feature bins, got {input_dim}")
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, stride=2),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, stride=2),
            nn.ReLU(),
        )
        self.out = nn.Linear(channels * freq, d_model)

    @staticmethod
    def output_lengths(feat_lens: torch.Tensor) -> torch.Tensor:
        """(B,) feature-frame counts -> (B,) encoder-frame counts (>= 0)."""
        return torch.clamp(_two_convs(feat_lens), min=0)

    @staticmethod
    def output_length(feat_frames: int) -> int:
        """Encoder frames the front end gives for ``feat_frames`` frames."""
        return max(0, _two_convs(feat_frames))

    @classmethod
    def window_frames(cls, chunk_frames: int) -> int:
        """Feature frames one chunk of ``chunk_frames`` encoder frames reads."""
        return (chunk_frames - 1) * cls.subsampling + cls.right_context + 1

    @classmethod
    def next_window(
        cls, frames: torch.Tensor, chunk_frames: int, final: bool = False
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """Which feature frames feed the next streaming chunk: the one rule
        every streaming runtime (PyTorch, onnxruntime, the batched engine)
        follows.

        frames: (B, F_buf, C) frames received and not consumed yet. A chunk
        reads ``window_frames(chunk_frames)`` frames and the next one starts
        ``chunk_frames * subsampling`` frames later (the windows overlap by
        the right context). Returns (window, frames kept): a whole window
        when there is one; else, with ``final``, the rest as the last,
        shorter window when it gives an encoder frame (as many as the full
        forward has left), nothing kept; else (None, frames).
        """
        window = cls.window_frames(chunk_frames)
        if frames.size(1) >= window:
            return frames[:, :window], frames[:, chunk_frames * cls.subsampling:]
        if not final:
            return None, frames
        rest = frames if cls.output_length(frames.size(1)) > 0 else None
        return rest, frames[:, :0]

    @classmethod
    def frame_ms(cls, frame_shift_ms: float) -> float:
        """Duration of one encoder frame: ``subsampling`` feature frames."""
        return cls.subsampling * frame_shift_ms

    @classmethod
    def min_frames(cls) -> int:
        """Fewest feature frames that give one encoder frame (7)."""
        return cls.right_context + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, F, C) with F >= 7 -> (B, T, D)."""
        if x.dim() != 3:
            raise ValueError(f"expected features of shape (B, F, C), got {tuple(x.shape)}")
        if x.size(1) < self.min_frames():
            raise ValueError(
                f"the subsampling needs at least {self.min_frames()} feature frames, got {x.size(1)}"
            )
        if torch.onnx.is_in_onnx_export():
            h = self.conv(x.unsqueeze(1))  # (B, D, T, C')
            B, D, T, Cf = h.shape
            return self.out(h.transpose(1, 2).reshape(B, T, D * Cf))
        conv1, _, conv2, _ = self.conv
        d = conv1.out_channels
        patches = x.unfold(1, 3, 2).unfold(2, 3, 2)  # (B, T1, C1, 3, 3)
        B, T1, C1 = patches.shape[:3]
        # These are the model's largest activations: without autograd (the
        # teacher under KD, inference) the ReLUs run in place.
        relu = torch.relu if torch.is_grad_enabled() else torch.relu_
        h = relu(F.linear(patches.reshape(B, T1, C1, 9), conv1.weight.reshape(d, 9), conv1.bias))
        h = relu(conv2(h.permute(0, 3, 1, 2)))  # (B, D, T, C') in channels-last memory
        B, D, T, Cf = h.shape
        # out expects features ordered (channel, frequency); h is laid out
        # (frequency, channel): permute the weight, not the activations.
        weight = self.out.weight.view(-1, D, Cf).transpose(1, 2).reshape(-1, Cf * D)
        return F.linear(h.permute(0, 2, 3, 1).reshape(B, T, Cf * D), weight, self.out.bias)
