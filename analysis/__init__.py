"""tunelens.analysis: what fine-tuning changed, as functions over (model A, model B, data).

Every function takes models (``nn.Module``) or state dicts and data (a DataLoader or
dataset yielding ``(inputs, labels[, masks])``) and returns a pandas DataFrame or a
small dataclass of DataFrames; nothing here knows about HTML.
"""

from tunelens.analysis import steps  # noqa: F401 - every step registers itself with the engine's registry
from tunelens.analysis.io.datafolder import image_folder, split_train_test
from tunelens.analysis.io.loading import CheckpointLoadError, check_finite, load_model, load_state_dict
from tunelens.analysis.measures.attribution.attribute import attribute, attribute_pair
from tunelens.analysis.measures.attribution.map_metrics import compare_maps
from tunelens.analysis.measures.attribution.prepare import prepare_for_attribution
from tunelens.analysis.measures.attribution.study import AttributionStudy, attribution_study
from tunelens.analysis.measures.cka import StreamingCKA, linear_cka
from tunelens.analysis.measures.cka_models import CKAResult, cka_against_chance, cka_matrix, randomly_initialised
from tunelens.analysis.measures.interpolation import InterpolationResult, interpolate, loss_barrier
from tunelens.analysis.measures.interventions import RewindResult, rewind
from tunelens.analysis.measures.intruders import aggregate_intruders, intruder_control, intruder_dimensions
from tunelens.analysis.measures.layers import iterate_features, iterate_pair, resolve_layers
from tunelens.analysis.measures.probes import probe_gain, probe_layers
from tunelens.analysis.measures.weight_space import rewound_model
from tunelens.analysis.measures.weights import aggregate_deltas, first_conv_filters, weight_deltas
from tunelens.core.hooks import ActivationCapture
from tunelens.core.naming import ArchitectureMismatch
from tunelens.core.results import Results

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
