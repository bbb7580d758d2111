"""tunelens.analysis.measures.attribution: Captum attributions and what they say.

``methods``: every attribution method declared once; ``prepare``: a model made ready for attribution;
``attribute``: maps for one batch; ``study``: the attribution study over a dataset; ``stats``,
``examples``, ``map_metrics``, ``faithfulness``: what the maps are compared by; ``text``: the study for
text models (token attributions).

May import: ``tunelens.core`` and other ``measures`` modules.
"""
