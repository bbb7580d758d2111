"""Report sections, in page order. Each builder maps a Results to a Section, or None when it has nothing to show."""
from . import methods, overview, weights

SECTION_BUILDERS = [
    ("overview", overview.build),
    ("weights", weights.build),
    ("methods", methods.build),
]
