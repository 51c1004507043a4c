"""The plugin stands alone: a Flower user imports it without Hydra or our two apps."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP_LEVEL = ("hydra", "omegaconf", "server_app", "client_app", "fedlsc_common", "fedlsc_tools")


def test_plugin_imports_neither_hydra_nor_the_apps():
    code = ("import sys, fedlsc_flwr, fedlsc_flwr.strategy, fedlsc_flwr.similarity, "
            "fedlsc_flwr.wire, fedlsc_flwr.metrics, fedlsc_flwr.model\n"
            "fedlsc_flwr.FedLSC, fedlsc_flwr.build_model\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({APP_LEVEL!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_similarity_math_needs_no_flower():
    code = ("import sys, fedlsc_flwr.similarity\n"
            "print(any(m.split('.')[0] in ('flwr', 'torch') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_flower_components_are_the_top_level_apps():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    components = pyproject["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "server_app.app:app", "clientapp": "client_app.app:app"}
    for package in ("fedlsc_flwr", "server_app", "client_app"):
        assert (ROOT / package / "__init__.py").is_file()
