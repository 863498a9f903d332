"""qlite: quantized Qwen2 / Qwen2-MoE inference for one GPU."""
import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys

# In a source checkout kernels/, quant/ and tui.py sit beside this folder (the repository's
# layout). They import as qlite.kernels, qlite.quant and qlite.tui, and nothing else of the
# checkout does (no qlite.setup, qlite.bench or qlite.tests). An installed wheel has them
# inside qlite/ (pyproject.toml's package-dir; setup.py copies tui.py) and needs none of this.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
_BESIDE = {"qlite.kernels": "kernels/__init__.py", "qlite.quant": "quant/__init__.py",
           "qlite.tui": "tui.py"}


class _CheckoutFinder(_abc.MetaPathFinder):
    """Finds exactly the modules of _BESIDE in the checkout (their submodules then follow the
    package's own path). First on sys.meta_path, so an editable install of another checkout
    cannot answer for them."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _BESIDE:
            return None
        file = _os.path.join(_checkout, _BESIDE[fullname])
        package = [_os.path.dirname(file)] if file.endswith("__init__.py") else None
        return _util.spec_from_file_location(fullname, file, submodule_search_locations=package)


if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and all(
        _os.path.isfile(_os.path.join(_checkout, f)) for f in _BESIDE.values()):
    _sys.meta_path.insert(0, _CheckoutFinder())

from qlite.errors import QliteError, QliteWarning  # noqa: E402
from qlite.loader import load  # noqa: E402
from qlite.generate import GenerationStats, SamplingParams  # noqa: E402

__all__ = ["load", "QliteError", "QliteWarning", "SamplingParams", "GenerationStats"]
