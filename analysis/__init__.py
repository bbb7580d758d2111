"""tunelens.analysis: what fine-tuning changed, as functions over (model A, model B, data).

Every function takes models (``nn.Module``) or state dicts and data (a DataLoader or
dataset yielding ``(inputs, labels[, masks])``) and returns a pandas DataFrame or a
small dataclass of DataFrames; nothing here knows about HTML.
"""
from .attribution import attribute, attribute_pair
from .attribution_study import AttributionStudy, attribution_study
from .compare import compare_maps
from .datafolder import image_folder, split_train_test
from .functional import interpolate, loss_barrier, rewind, rewound_model
from .loading import CheckpointLoadError, check_finite, load_model, load_state_dict
from .prepare import prepare_for_attribution
from .layers import ActivationCapture, iterate_features, iterate_pair, resolve_layers
from .probes import probe_gain, probe_layers
from .results import Results
from .similarity import CKAResult, StreamingCKA, cka_against_chance, cka_matrix, linear_cka, randomly_initialised
from .weights import ArchitectureMismatch, aggregate_deltas, first_conv_filters, weight_deltas

__all__ = [
    "weight_deltas", "aggregate_deltas", "first_conv_filters", "ArchitectureMismatch",
    "linear_cka", "StreamingCKA", "cka_matrix", "cka_against_chance", "CKAResult", "randomly_initialised",
    "attribute", "attribute_pair", "compare_maps", "attribution_study", "AttributionStudy", "prepare_for_attribution",
    "rewind", "rewound_model", "interpolate", "loss_barrier", "probe_layers", "probe_gain",
    "load_model", "load_state_dict", "check_finite", "CheckpointLoadError", "image_folder", "split_train_test",
    "resolve_layers", "ActivationCapture", "iterate_features", "iterate_pair", "Results",
]
