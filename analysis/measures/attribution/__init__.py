"""tunelens.analysis.measures.attribution: Captum attributions and what they say.

``methods``: every attribution method declared once (Captum class, options, cost, report name, modalities);
``prepare``: a model made ready for attribution, and its randomized floor; ``probe_head``: a linear-probe head
where the base's head answers another task; ``batching``: images per pass and seeded chunks; ``targets``: what
a map explains; ``gradcam``: Grad-CAM's layer; ``attribute``: maps for one batch; ``study`` and ``study_run``:
the calibrated base-vs-tuned study; ``stats``, ``examples``, ``map_metrics``, ``faithfulness``: how maps are
compared and summarised; ``text``: the study for text models (token attributions).

May import: ``tunelens.core`` and other ``measures`` modules.
"""
