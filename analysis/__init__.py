"""tunelens.analysis: what fine-tuning changed, as functions over (model A, model B, data).

Every function takes models (``nn.Module``) or state dicts and data (a DataLoader or
dataset yielding ``(inputs, labels[, masks])``) and returns a pandas DataFrame or a
small dataclass of DataFrames; nothing here knows about HTML.
"""

from tunelens.core.hooks import ActivationCapture
from tunelens.core.results import Results

from .attribution import attribute, attribute_pair
from .attribution_study import AttributionStudy, attribution_study
from .datafolder import image_folder, split_train_test
from .interventions import InterpolationResult, RewindResult, interpolate, loss_barrier, rewind, rewound_model
from .intruders import aggregate_intruders, intruder_control, intruder_dimensions
from .layers import iterate_features, iterate_pair, resolve_layers
from .loading import CheckpointLoadError, check_finite, load_model, load_state_dict
from .map_metrics import compare_maps
from .prepare import prepare_for_attribution
from .probes import probe_gain, probe_layers
from .similarity import CKAResult, StreamingCKA, cka_against_chance, cka_matrix, linear_cka, randomly_initialised
from .weights import ArchitectureMismatch, aggregate_deltas, first_conv_filters, weight_deltas

__all__ = [
    "ActivationCapture",
    "ArchitectureMismatch",
    "AttributionStudy",
    "CKAResult",
    "CheckpointLoadError",
    "InterpolationResult",
    "Results",
    "RewindResult",
    "StreamingCKA",
    "aggregate_deltas",
    "aggregate_intruders",
    "attribute",
    "attribute_pair",
    "attribution_study",
    "check_finite",
    "cka_against_chance",
    "cka_matrix",
    "compare_maps",
    "first_conv_filters",
    "image_folder",
    "interpolate",
    "intruder_control",
    "intruder_dimensions",
    "iterate_features",
    "iterate_pair",
    "linear_cka",
    "load_model",
    "load_state_dict",
    "loss_barrier",
    "prepare_for_attribution",
    "probe_gain",
    "probe_layers",
    "randomly_initialised",
    "resolve_layers",
    "rewind",
    "rewound_model",
    "split_train_test",
    "weight_deltas",
]
