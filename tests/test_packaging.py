"""What the package promises about itself: one version, written once, and the warnings policy
that makes a deprecated call in pyroute's own code fail the suite (so the next stdlib
removal, as crypt's in 3.13, shows here before it breaks users). Building and installing
the sdist and wheel and running the demo from them is .ci/run's packaging step."""
import importlib.metadata
import ssl
import tomllib
import warnings

import pytest

import pyroute
from support.proxy import REPO

DEPRECATED_CALL = compile("ssl.SSLContext()", "<probe>", "exec")  # no protocol: deprecated since 3.10


def test_the_version_is_written_once_and_installed_as_written():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("pyroute") == pyroute.__version__


def test_a_deprecated_call_from_a_pyroute_module_is_an_error():
    with pytest.raises(DeprecationWarning, match="protocol"):
        exec(DEPRECATED_CALL, {"__name__": "pyroute.dataplane.probe", "ssl": ssl})


def test_a_deprecation_in_a_dependency_stays_a_warning():
    with warnings.catch_warnings(record=True) as seen:  # records without changing the filters
        exec(DEPRECATED_CALL, {"__name__": "somelibrary.module", "ssl": ssl})
    assert seen and all(w.category is DeprecationWarning for w in seen)
