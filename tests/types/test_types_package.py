"""`tether.types` offers the SDK's user types like `tinker.types`, without making submodules heavy."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import tether.types
import tether.types.data


def test_user_types_resolve_to_the_data_module() -> None:
    for name in tether.types.data.__all__:
        assert getattr(tether.types, name) is getattr(tether.types.data, name)
    assert tether.types.Datum is tether.Datum
    assert set(tether.types.__all__) == set(tether.types.data.__all__)
    assert "Datum" in dir(tether.types)


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError):
        tether.types.NoSuchType  # noqa: B018
    with pytest.raises(AttributeError):
        tether.types.np  # data's own imports are not re-exported  # noqa: B018


def test_importing_submodules_stays_light() -> None:
    code = textwrap.dedent(
        """
        import sys
        import tether.types
        from tether.types import errors, paths
        import tether.types.errors
        heavy = [m for m in ("numpy", "torch", "pydantic", "tether.types.data") if m in sys.modules]
        assert not heavy, heavy
        from tether.types import Datum, ModelInput
        assert Datum.__module__ == "tether.types.data"
        assert "torch" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
