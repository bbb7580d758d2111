"""Model construction for fine-tuning: the architecture catalogue of :mod:`tunelens.core.architectures`."""

from tunelens.core.architectures import TinyResNet, build_model, list_archs, replace_head
from tunelens.core.naming import head_name, stage_of, stage_order

__all__ = ["TinyResNet", "build_model", "head_name", "list_archs", "replace_head", "stage_of", "stage_order"]
