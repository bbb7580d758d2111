"""Report sections, in page order. Each builder maps a Results to a Section, or None when it has nothing to show."""

from . import attribution, functional, methods, overview, similarity, weights

SECTION_BUILDERS = [
    ("overview", overview.build),
    ("weights", weights.build),
    ("similarity", similarity.build),
    ("attribution", attribution.build),
    ("functional", functional.build),
    ("methods", methods.build),
]
