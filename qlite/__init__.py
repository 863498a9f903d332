"""qlite: quantized Qwen2 / Qwen2-MoE inference for one GPU."""
import os as _os

# In a source checkout kernels/, quant/ and tui.py sit beside this folder (the repository's
# layout); they import as qlite.kernels, qlite.quant and qlite.tui all the same.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "tui.py")) and _os.path.isfile(
        _os.path.join(_checkout, "kernels", "__init__.py")):
    __path__.append(_checkout)

from qlite.errors import QliteError, QliteWarning  # noqa: E402
from qlite.loader import load  # noqa: E402
from qlite.generate import GenerationStats, SamplingParams  # noqa: E402

__all__ = ["load", "QliteError", "QliteWarning", "SamplingParams", "GenerationStats"]
