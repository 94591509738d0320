"""The application layer's operations code: the local server stack (:mod:`ops.stack`) and the
command-line extension (:mod:`ops.cli`) that adds ``cleanse stack ...`` and the Prefect flow behind
``cleanse run --prefect`` to the library's command line.

Application code (this package, ``flows/``, ``tasks/``) imports the library :mod:`cleanse`; the
library never imports it back (an import-linter contract in ``pyproject.toml`` checks this).
"""
