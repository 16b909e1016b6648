"""Every encoder `bat.load_encoder` reads as an X-ARES audio encoder (https://github.com/jimbozhang/xares).

    import bat.xares
    encoder = bat.xares.load("runs/bat/encoder.safetensors")   # an nn.Module named BATEncoder
    frames = encoder(audio)                                     # [B, samples] at 16 kHz -> [B, T, D]

The frames are bat.hear's timestamp embeddings (the CGP layer mix of each 160 ms time patch, see
bat.hear), so both benchmarks score the same representation. Audio of any length (X-ARES feeds up to
10 minutes) is encoded window by window with bounded memory.
"""
from __future__ import annotations

import torch

from bat.hear import LayerMixEncoder, load_layer_mix


class BATEncoder(LayerMixEncoder):
    """X-ARES's encoder contract: class name ending in `Encoder`, `sampling_rate`, `output_dim`,
    `hop_size_in_ms`, forward(audio [B, samples]) -> [B, frames, output_dim]."""

    @property
    def sampling_rate(self) -> int:
        return self.sample_rate

    @property
    def output_dim(self) -> int:
        return self.timestamp_embedding_size

    def forward(self, audio: torch.Tensor, audio_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """audio [B, samples] (or [samples]) float at 16 kHz -> [B, frames, output_dim] float32.
        A padding mask is accepted for X-ARES's call signature; every row is encoded to its full length."""
        audio = torch.as_tensor(audio)
        if audio.dim() == 1:
            audio = audio[None]
        return self.timestamp_embeddings(audio.float())[0]


def load(path: str, batch_windows: int = 8, num_heads: int | None = None, allow_pickle: bool = False) -> BATEncoder:
    """An X-ARES encoder from any file `bat.load_encoder` reads, or a probe file (its learnt gate);
    allow_pickle=True for EAT/SSLAM fairseq checkpoints."""
    return load_layer_mix(path, batch_windows, BATEncoder, num_heads, allow_pickle)
