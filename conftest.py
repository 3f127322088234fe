"""Root conftest: loads the suite's pytest plugin (fidelity/plugin.py) when it is not installed.

Installed (pip install -e .), the plugin comes through its pytest11 entry point;
from a bare checkout it comes from here. In a bare checkout, give options whose
value is an existing path as --option=PATH.
"""

from importlib.metadata import entry_points

_installed = any(ep.value == "fidelity.plugin" for ep in entry_points(group="pytest11"))
pytest_plugins = () if _installed else ("fidelity.plugin",)
