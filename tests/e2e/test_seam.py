"""The api/engine seam is engine.served.ServedModel: the real LLM implements it, and the server's modules
(api/*.py) use no other name of a model and never ask for one with getattr/hasattr. Checked on the
source, as test_layering.py checks imports."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from kawai import engine
from kawai.engine.errors import ContextLengthError, KawaiError
from kawai.engine.llm import LLM
from kawai.engine.served import ServedModel
from tiny_models import write_tiny_model

ROOT = Path(__file__).resolve().parents[2]
SERVER_MODULES = sorted((ROOT / "api").glob("*.py"))  # the CLI (api/commands/) holds an engine.LLM
# Names a module may still read outside the Protocol while a change is under way; each entry must still be
# needed (the test says when it is not). None today.
PENDING: dict[str, set[str]] = {}


def declared() -> set[str]:
    """The names ServedModel declares: its annotated attributes, properties and methods."""
    return set(ServedModel.__annotations__) | {
        name for name, value in vars(ServedModel).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    }


def _is_model(node: ast.expr) -> bool:
    """`llm`, or `<anything>.llm` (self.llm, model.llm, m.llm)."""
    return (isinstance(node, ast.Name) and node.id == "llm") or (isinstance(node, ast.Attribute) and node.attr == "llm")


def model_uses(path: Path) -> tuple[set[str], list[str]]:
    """(names read on a model, getattr/hasattr calls on a model) in one module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names, probes = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_model(node.value):
            names.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and node.args and _is_model(node.args[0])):
            probes.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    return names, probes


def test_the_server_uses_only_what_the_protocol_declares():
    undeclared, probes = {}, []
    for path in SERVER_MODULES:
        names, found = model_uses(path)
        rel = str(path.relative_to(ROOT))
        pending = PENDING.get(rel, set())
        assert pending <= names, f"{rel} no longer reads {pending - names} on a model: drop it from PENDING"
        if names - declared() - pending:
            undeclared[rel] = sorted(names - declared() - pending)
        probes += [p for p in found if not any(f"{rel}:" in p and name in p for name in pending)]
    assert undeclared == {}, "declare these in engine/served.py (or ask the model a method that says it)"
    assert probes == [], "ask the model (ServedModel), do not probe it"
    used = set().union(*(model_uses(p)[0] for p in SERVER_MODULES))
    assert declared() - used <= {"display_name"}, "a ServedModel name api/ no longer uses: remove it"


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return engine.load(write_tiny_model(tmp_path_factory.mktemp("seam"), "qwen2", n_ctx=64), threads=1)


def test_the_real_llm_is_a_served_model_with_the_declared_signatures(tiny_llm):
    assert isinstance(tiny_llm, ServedModel)
    for name in declared():
        protocol, real = inspect.getattr_static(ServedModel, name, None), inspect.getattr_static(LLM, name, None)
        if callable(protocol) and not isinstance(protocol, type):
            want, got = inspect.signature(protocol).parameters, inspect.signature(real).parameters
            assert list(want) == list(got)[: len(want)], name
            assert all(got[p].kind == want[p].kind for p in want), name
        else:
            assert hasattr(tiny_llm, name), name


def test_what_the_seam_answers_for_a_text_model(tiny_llm):
    assert not tiny_llm.has_vision and tiny_llm.max_image_pixels is None
    with pytest.raises(KawaiError, match="does not take images"):
        tiny_llm.image_tokens(64, 64)
    tiny_llm.check_context(64)
    with pytest.raises(ContextLengthError, match=r"^prompt is too long: 65 tokens > 64 maximum \(the context window"):
        tiny_llm.check_context(65)
    assert tiny_llm.kv_bytes() == 64 * tiny_llm.kv_bytes(1) == tiny_llm.new_cache().nbytes
    assert tiny_llm.display_name  # general.name, or the id
