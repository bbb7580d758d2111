"""tunelens.analysis.io: reading what the analyses read.

Checkpoints (``safe_load``: safetensors and weights-only pickles; ``state_dicts``: keys and nesting;
``architectures``: which architecture a checkpoint is; ``adapters``: PEFT adapter folders;
``loading``: one model from a file) and image data (``datafolder``: class folders,
``masks``: object masks, ``splits``: stratified train/test splits).

May import: ``tunelens.core`` and other ``io`` modules only (no measures, engine, findings or steps).
"""
