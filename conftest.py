"""Root conftest: the suite's pytest plugin lives in fidelity/plugin.py."""

pytest_plugins = ("fidelity.plugin",)
