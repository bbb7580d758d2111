"""tunelens.analysis.steps: the suite's analyses, one module each; every module registers itself with
:mod:`tunelens.analysis.engine.registry` when imported, and this package imports every module of its own
(found by listing the package, so a new step is one new file). ``tunelens.analysis`` imports this package,
so the registry is complete before anything asks it.

A step declares its name, settings, tables, run, findings and (where it has them) configuration rules and
cost. May import: ``tunelens.core``, ``io``, ``measures``, ``engine``, ``findings`` and other steps.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    importlib.import_module(f"{__name__}.{_info.name}")
