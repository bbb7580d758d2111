"""tunelens.analysis.engine: how the analyses run.

``registry``: the registered analyses and what each receives (``Context``); ``passes``: one pass per model
over the data, shared by every reader; ``sharding``: splitting work across ``torchrun`` ranks; ``budget``
(costs) and ``budget_plan``: sizing the costly analyses to the time allowed.

May import: ``tunelens.core``, ``io``, ``measures`` and ``findings`` (the ``Finding`` model a step returns);
never ``steps`` (the steps import the engine and register themselves).
"""
