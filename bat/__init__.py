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
    "Tagger": "bat.tagger",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        try:
            module = importlib.import_module(_EXPORTS[name])
        except ModuleNotFoundError as e:
            if e.name != "torch":
                raise
            # `pip install bat-audio` is the torch-free runtime: say what adds the rest
            raise ModuleNotFoundError(f"bat.{name} needs PyTorch, which this installation lacks: "
                                      "pip install 'bat-audio[train]' (or requirements.txt in a checkout)",
                                      name="torch") from None
        return getattr(module, name)
    raise AttributeError(f"module 'bat' has no attribute {name!r}")
