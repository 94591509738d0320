"""The regression family (``family: regression``): samples ``(x, y)`` with a real-valued target,
ridge or MLP models under squared error, test RMSE as the outcome, and target outliers as the
corruption. The family is :class:`cleanse.families.regression.family.RegressionFamily`; its params
sections are in :mod:`cleanse.families.regression.config`, its staging in
:mod:`cleanse.families.regression.data`."""
