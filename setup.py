"""Only here to place tui.py inside the installed package as qlite/tui.py (see pyproject.toml)."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithTui(build_py):
    def run(self):
        super().run()
        if (Path(self.build_lib) / "qlite").is_dir():  # absent in an editable build
            shutil.copy(Path(__file__).parent / "tui.py", Path(self.build_lib) / "qlite" / "tui.py")


setup(cmdclass={"build_py": BuildPyWithTui})
