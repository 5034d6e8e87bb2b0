"""The public handler API is what docs/api.md lists and nothing else; the example plugin uses it alone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import billingd.api

ROOT = Path(__file__).resolve().parents[2]
#: What `billingd.api` imports for itself, not for plugins.
OWN = {"annotations", "TYPE_CHECKING", "Any"}


def documented() -> set[str]:
    return set(re.findall(r"^### `(\w+)`$", (ROOT / "docs" / "api.md").read_text(), re.MULTILINE))


def test_the_api_module_exports_exactly_what_the_docs_list():
    exported = set(billingd.api.__all__)
    assert len(billingd.api.__all__) == len(exported)
    assert exported == documented()
    for name in exported:  # every name resolves (the Stripe ones on first use)
        assert getattr(billingd.api, name) is not None, name
    public = {n for n in vars(billingd.api) if n[0] not in "_@"} - OWN  # @: pytest's assertion rewriting
    assert public <= exported, f"public but not exported: {sorted(public - exported)}"


def test_the_package_is_typed():
    assert (ROOT / "billingd" / "py.typed").is_file()


def test_the_example_plugin_imports_nothing_of_billingd_but_the_api():
    package = ROOT / "examples" / "ai-tokens" / "src" / "billingd_ai_tokens"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name == "billingd" or name.startswith("billingd."):
                    assert name == "billingd.api", f"{path.name} imports {name}"
