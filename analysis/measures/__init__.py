"""tunelens.analysis.measures: what fine-tuning changed, as functions over models, weights and batches.

Weight deltas (``weights``), intruder dimensions (``intruders``), CKA (``similarity``), activations,
probes, rewinding (``interventions``), interpolation, layer selection (``layers``), rewinding from
recorded inputs (``resume``), and the attribution study (``attribution/``). A measure computes numbers;
it does not know about the suite, the budget, the registry or the findings.

May import: ``tunelens.core`` and other ``measures`` modules (never ``io``, ``engine``, ``findings``
or ``steps``).
"""
