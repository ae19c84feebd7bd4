"""Build hook: a built wheel (`pip install .`, not -e) carries the workflow beside the code.

The Snakefile, rules/, config/, profiles/, envs/ and the job entry scripts of workflow_scripts/ live at
the top of the checkout, where Snakemake users expect them. A wheel copies them into
``distributed_downloader/_workflow/``, where ``config.WORKFLOW_ROOT`` finds them when the package does
not sit in a checkout. An editable install keeps using the checkout itself. Metadata: pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
WORKFLOW = ("Snakefile", "rules", "config", "profiles", "envs")  # with workflow_scripts/*.py (not the package)
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".snakemake")


class BuildPyWithWorkflow(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "distributed_downloader" / "_workflow"
        shutil.rmtree(target, ignore_errors=True)
        for name in WORKFLOW:
            source = HERE / name
            if source.is_dir():
                shutil.copytree(source, target / name, ignore=IGNORED)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)
        (target / "workflow_scripts").mkdir()
        for script in sorted((HERE / "workflow_scripts").glob("*.py")):
            shutil.copy2(script, target / "workflow_scripts" / script.name)


setup(cmdclass={"build_py": BuildPyWithWorkflow})
