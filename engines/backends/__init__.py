"""Runners: one small protocol (:mod:`~engines.backends.base`), one module per backend, one registry.

Heavy or optional runtimes are imported only when their backend is used; a missing
one becomes :class:`~engines.backends.base.BackendUnavailableError` with the install
hint, which the test plugins turn into a skip.  Runners never time themselves.
"""
