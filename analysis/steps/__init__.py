"""The suite's analyses, one module each; every module registers itself with :mod:`tunelens.analysis.engine.registry`
when imported (the registry imports every module of this package)."""
