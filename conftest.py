"""Root conftest: loads the suite's pytest plugins (engines/plugin.py, fidelity/plugin.py, perf/plugin.py) when it is not installed.

Installed (pip install -e .), the plugin comes through its pytest11 entry point;
from a bare checkout it comes from here. In a bare checkout, give options whose
value is an existing path as --option=PATH.
"""

from importlib.metadata import entry_points

_PLUGINS = ("engines.plugin", "fidelity.plugin", "perf.plugin")
_installed = {ep.value for ep in entry_points(group="pytest11")}
pytest_plugins = tuple(p for p in _PLUGINS if p not in _installed)
