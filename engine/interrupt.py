"""Stopping a model call partway when its caller asks (a cancel during a long prompt chunk).

Torch-free, so that every model kind can raise it: the V4 model between layers, the llama.cpp
backend between batches. The generating `Session` undoes the call's partial writes.
"""

from __future__ import annotations


class Interrupted(Exception):
    """A prompt call stopped between two steps because its caller asked (`set_interrupt`); the
    state may hold part of the call's writes: the caller rewinds it (`SequenceState.rewind`)."""
