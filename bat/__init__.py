"""bat: BAT (Better Audio Transformer) and Convex Gated Probing in plain PyTorch.

Attributes are imported lazily so that `python -m bat.tag` (the ONNX tagger for services) never
imports torch: only the submodule you touch gets loaded.
"""

import importlib

_EXPORTS = {
    "spectrogram": "bat.frontend",
    "kaldi_fbank": "bat.frontend",
    "Frontend": "bat.frontend",
    "load_audio": "bat.audio",
    "AudioError": "bat.audio",
    "Encoder": "bat.model",
    "EncoderConfig": "bat.model",
    "load_encoder": "bat.checkpoint",
    "save_encoder": "bat.checkpoint",
    "CheckpointError": "bat.checkpoint",
    "load_probe": "bat.probes",
    "task_inputs": "bat.tasks",
    "Tagger": "bat.tag",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bat' has no attribute {name!r}")
