"""README's API section documents every public function with its real signature."""
import inspect
import re
from pathlib import Path

import pytest

import megatron_grpo.algorithms as alg

README = Path(__file__).resolve().parents[1] / "README.md"
SIG_LINE = re.compile(r"^([A-Za-z_]\w*)\((.*)\)$")


def _section():
    text = README.read_text()
    begin, end = "<!-- api:begin -->", "<!-- api:end -->"
    assert begin in text and end in text, "README lost its api markers"
    return text[text.index(begin) + len(begin):text.index(end)]


def _code_signatures(section):
    """{name: (signature text, prose until the next signature)} from ```python blocks."""
    blocks = list(re.finditer(r"```python\n(.*?)```", section, flags=re.S))
    out = {}
    for i, blk in enumerate(blocks):
        for line in blk.group(1).strip().splitlines():
            mt = SIG_LINE.match(line.strip())
            if mt:
                end = blocks[i + 1].start() if i + 1 < len(blocks) else len(section)
                assert mt.group(1) not in out, f"{mt.group(1)} documented twice"
                out[mt.group(1)] = (line.strip(), section[blk.end():end])
    return out


def _public_functions():
    return {n: getattr(alg, n) for n in alg.__all__ if inspect.isfunction(getattr(alg, n))}


def _plain_signature(fn):
    sig = inspect.signature(fn)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return sig.replace(parameters=params, return_annotation=inspect.Signature.empty)


def test_every_public_function_is_documented_with_its_signature():
    documented = _code_signatures(_section())
    for name, fn in _public_functions().items():
        assert name in documented, f"README api section lacks {name}"
        assert documented[name][0] == f"{name}{_plain_signature(fn)}", f"stale signature for {name}"


def test_every_argument_and_the_return_value_are_described():
    documented = _code_signatures(_section())
    for name, fn in _public_functions().items():
        prose = documented[name][1]
        for pname in _plain_signature(fn).parameters:
            assert f"`{pname}`" in prose, f"README does not describe argument {pname!r} of {name}"
        assert "Returns" in prose, f"README does not describe what {name} returns"


def test_no_stale_entries():
    documented = _code_signatures(_section())
    public = _public_functions()
    extra = set(documented) - set(public)
    assert not extra, f"README documents functions that are not exported: {sorted(extra)}"


def test_constants_are_mentioned():
    section = _section()
    for name in alg.__all__:
        if not callable(getattr(alg, name)):
            assert f"`{name}`" in section, name


@pytest.mark.parametrize("name", sorted(_public_functions()))
def test_public_functions_have_docstrings(name):
    assert (inspect.getdoc(getattr(alg, name)) or "").strip(), name
