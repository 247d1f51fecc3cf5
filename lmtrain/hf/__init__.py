"""Hugging Face interop: `lmtrain export --format hf` (export.py), the native families it maps
onto (native.py) and the remote-code model for everything else (remote.py, which needs
transformers; writing an export does not)."""
