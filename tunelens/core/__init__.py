"""tunelens.core: what every layer may use (device and distributed runtime, evaluation, layer and stage
naming, forward hooks, atomic files, the results container). It imports nothing else of tunelens."""

from .evaluation import evaluate, unpack_batch
from .files import atomic_replace, atomic_write_bytes, atomic_write_text, sha256_file, versions, write_folder_atomically
from .hooks import ActivationCapture
from .naming import head_name, stage_of, stage_order
from .results import Results
from .runtime import resolve_device

__all__ = [
    "ActivationCapture",
    "Results",
    "atomic_replace",
    "atomic_write_bytes",
    "atomic_write_text",
    "evaluate",
    "head_name",
    "resolve_device",
    "sha256_file",
    "stage_of",
    "stage_order",
    "unpack_batch",
    "versions",
    "write_folder_atomically",
]
