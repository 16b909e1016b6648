"""The HEAR 2021 API (https://hearbenchmark.com) for every encoder `bat.load_encoder` reads: BAT, EAT,
SSLAM, pretrain.py's and finetune.py's outputs, probe files.

    import bat.hear as hear
    model = hear.load_model("runs/bat/encoder.safetensors")       # or a probe.safetensors: its gate
    emb, ts = hear.get_timestamp_embeddings(audio, model)          # audio [n, samples] at 16 kHz
    scene = hear.get_scene_embeddings(audio, model)                # [n, D]

What the embeddings are (BAT's paper finds the information spread over the blocks, not in the last one):
- layers: a Convex Gated Probing layer mix, sum_l a_l h_l / ||h_l|| over the blocks' patch tokens
  (each token L2-normalised per block). a_l = 1/L, the CGP gate at its start, or, for a probe file
  from probe_cgp.py, the gate that probe learnt;
- timestamp embedding [D]: the mix averaged over the 8 frequency patches of one time patch: one per
  160 ms (16 spectrogram frames of 10 ms; the front-end's own hop where a task sets another), timestamps in ms at the centres of those 16 frames (75 ms + 160 ms k
  for the BAT front-end, whose frame k is centred at 10 k ms; 87.5 ms + 160 ms k for EAT/SSLAM's Kaldi
  front-end, whose 25 ms frame k starts at 10 k ms); only whole time patches, so the last timestamp
  is inside the audio;
- scene embedding [D]: the mean of the timestamp embeddings.

Long audio is cut into consecutive windows of the encoder's own chunk (64 time patches = 10.24 s for
REF's models; its positional grid), each a clip of its own for the front-end (BAT normalises a clip's
spectrogram by its own range, EAT subtracts its mean), as the encoder chunks long inputs itself.
`batch_windows` windows are encoded at a time and reduced to [T, D] at once, so memory is the input,
the output and one batch of windows, whatever the length (20 minutes: see the README for the peak).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bat.audio import bad_rows
from bat.frontend import Frontend
from bat.heads import mix_normalised
from bat.model import FREQ_PATCHES, PATCH, eval_mode



class LayerMixEncoder(nn.Module):
    """An encoder with its front-end and a layer gate: waveforms -> (embeddings [n, T, D], timestamps
    [n, T] in ms). The HEAR model (bat.hear.load_model) and the base of the X-ARES encoder."""

    def __init__(self, encoder, frontend_config: dict, gate: torch.Tensor | None = None, batch_windows: int = 8):
        super().__init__()
        self.encoder = encoder  # its mode is the caller's: _encode scores in eval mode and gives it back
        cfg = {k: v for k, v in frontend_config.items() if k != "target_frames"}  # windows set the length
        self.frontend = Frontend.from_config(cfg)
        # the rate and frame geometry are the front-end's: 16 kHz and 10 ms hops unless a task says otherwise
        self.sample_rate, self.hop_samples = int(self.frontend.sample_rate), int(self.frontend.hop)
        layers = encoder.num_layers
        gate = torch.full((layers,), 1.0 / layers) if gate is None else gate.detach().float().reshape(-1)
        if gate.numel() != layers:
            raise ValueError(f"gate has {gate.numel()} weights for {layers} layers")
        self.register_buffer("gate", gate)
        self.batch_windows = batch_windows
        self.scene_embedding_size = self.timestamp_embedding_size = int(encoder.dim)
        self.window_patches = int(encoder.cfg.chunk_patches)
        frame_ms = 1000.0 * self.hop_samples / self.sample_rate
        self.hop_size_in_ms = PATCH * frame_ms
        # Kaldi frames are 25 ms long and start at the hop (snip_edges); BAT's STFT frames are centred
        self.kaldi_window = self.sample_rate * 25 // 1000 if self.frontend.kind != "bat" else 0
        self.extra = max(self.kaldi_window - self.hop_samples, 0)  # samples a window reads beyond its hop
        self.first_centre_ms = 1000.0 * self.kaldi_window / 2 / self.sample_rate + (PATCH - 1) / 2 * frame_ms

    @property
    def device(self) -> torch.device:
        return self.gate.device

    def _frames(self, samples: int) -> int:
        if self.kaldi_window:
            return 0 if samples < self.kaldi_window else 1 + (samples - self.kaldi_window) // self.hop_samples
        return 1 + samples // self.hop_samples

    @torch.no_grad()
    def _encode(self, windows: torch.Tensor) -> torch.Tensor:
        """windows (b, samples) -> (b, T', D): the layer mix of every time patch."""
        spec = self.frontend(windows)
        tp = spec.shape[2] // PATCH
        spec = spec[:, :, :tp * PATCH]
        use_bf16 = windows.device.type == "cuda"
        with eval_mode(self.encoder), torch.autocast(windows.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            tokens = self.encoder.forward_layers(spec)[:, :, 1:]  # (L, b, N, D), CLS dropped
        mixed = mix_normalised(tokens.float(), self.gate)  # (b, N, D)
        return mixed.reshape(mixed.shape[0], tp, FREQ_PATCHES, -1).mean(2)

    def _encode_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """(w, samples) -> (w, T', D) on the CPU, batch_windows windows at a time."""
        return torch.cat([self._encode(x.to(self.device, torch.float32)).cpu() for x in windows.split(self.batch_windows)])

    def timestamp_embeddings(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        audio = torch.as_tensor(audio)
        if audio.dim() != 2 or not audio.is_floating_point():
            raise ValueError(f"expected float audio [n, samples] at {self.sample_rate} Hz, got {tuple(audio.shape)} "
                             f"{audio.dtype}")
        bad = bad_rows(audio.detach().float().cpu().numpy())
        if bad is not None:  # a NaN, or a spectrum overflowing to NaN, would spread over its window's embeddings
            raise ValueError(f"audio: {bad[1]} in clip(s) {', '.join(map(str, bad[0][:5]))}")
        n, samples = audio.shape
        if n == 0:  # no clips: the shapes one clip of this length gives, with n = 0
            emb, ts = self.timestamp_embeddings(torch.zeros(1, samples))
            return emb[:0], ts[:0]
        hop = self.window_patches * PATCH * self.hop_samples
        one_patch = self.extra + PATCH * self.hop_samples
        if samples < one_patch:  # shorter than one time patch: zero-extend to one
            audio = torch.nn.functional.pad(audio, (0, one_patch - samples))
            samples = audio.shape[1]
        full = (samples - self.extra) // hop
        rest = samples - full * hop
        # (n, full, window) is a view: only one batch of windows is ever copied (overlapping Kaldi
        # windows would make a flattened copy larger than the input)
        emb = torch.zeros(n, 0, self.timestamp_embedding_size)
        if full:
            windows = audio.unfold(1, hop + self.extra, hop)[:, :full]
            emb = torch.stack([self._encode_windows(windows[i]) for i in range(n)]).flatten(1, 2)
        if self._frames(rest) >= PATCH:  # the ragged end: one more, shorter window per clip
            emb = torch.cat([emb, self._encode_windows(audio[:, full * hop:])], dim=1)
        emb = emb.to(self.device)
        ts = self.first_centre_ms + self.hop_size_in_ms * torch.arange(emb.shape[1], dtype=torch.float64)
        return emb, ts.float().to(self.device).expand(n, -1).contiguous()


def load_layer_mix(path, batch_windows: int = 8, cls=LayerMixEncoder, num_heads: int | None = None,
                   allow_pickle: bool = False):
    """`cls` around any file `bat.load_encoder` reads (or `random:tiny|small|base`); a probe file
    (probe_cgp.py's probe.safetensors) brings the layer gate its CGP head learnt. num_heads: as in
    bat.load_encoder (default width / 64); allow_pickle=True for EAT/SSLAM fairseq checkpoints, which
    hold pickled configuration objects (as bat.load_encoder)."""
    from bat.checkpoint import CheckpointError, load_encoder
    from bat.probes import load_probe

    path = str(path)
    if path.endswith(".safetensors"):
        try:
            probe = load_probe(path)
        except CheckpointError:
            probe = None  # not a probe file: a plain encoder
        if probe is not None:
            return cls(probe.encoder, probe.encoder.frontend_config, probe.head.gate_weights(), batch_windows).eval()
    encoder = load_encoder(path, num_heads, allow_pickle)
    return cls(encoder, encoder.frontend_config, None, batch_windows).eval()


def load_model(model_file_path: str, batch_windows: int = 8, num_heads: int | None = None,
               allow_pickle: bool = False) -> LayerMixEncoder:
    """HEAR's load_model: see load_layer_mix."""
    return load_layer_mix(model_file_path, batch_windows, num_heads=num_heads, allow_pickle=allow_pickle)


def get_timestamp_embeddings(audio: torch.Tensor, model: LayerMixEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """audio [n, samples] at model.sample_rate (16 kHz) -> (embeddings [n, T, D] float32, timestamps [n, T] float32 in ms)."""
    return model.timestamp_embeddings(audio)


def get_scene_embeddings(audio: torch.Tensor, model: LayerMixEncoder) -> torch.Tensor:
    """audio [n, samples] at model.sample_rate (16 kHz) -> [n, D] float32: the mean of the timestamp embeddings."""
    emb, _ = model.timestamp_embeddings(audio)
    return emb.mean(dim=1)
