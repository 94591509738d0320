"""The classification family (the default): samples ``(x, y)`` with class labels. The family
itself is :class:`cleanse.families.classification.family.ClassificationFamily`; its params
sections are in :mod:`cleanse.families.classification.config`."""
