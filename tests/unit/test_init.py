"""raypose's public surface: every exported name resolves, is typed and documented; one error family; a light import."""

from __future__ import annotations

import inspect
import subprocess
import sys

import raypose
from raypose import errors


def test_every_exported_name_resolves_with_a_docstring_and_typed_signature():
    for name in raypose.__all__:
        value = getattr(raypose, name)
        if name == "__version__":
            continue
        assert inspect.getdoc(value), f"raypose.{name} has no docstring"
        callables = [value] if inspect.isfunction(value) else public_methods(value) if inspect.isclass(value) else []
        for fn in callables:
            signature = inspect.signature(fn)
            untyped = [p for p in signature.parameters if p not in ("self", "cls")
                       and signature.parameters[p].annotation is inspect.Parameter.empty]
            assert not untyped, f"raypose.{name}: {fn.__name__} has untyped parameters {untyped}"
            assert signature.return_annotation is not inspect.Signature.empty, f"raypose.{name}: {fn.__name__}"
            assert inspect.getdoc(fn), f"raypose.{name}: {fn.__name__} has no docstring"
    assert set(dir(raypose)) >= set(raypose.__all__)


def public_methods(cls: type) -> list:
    members = [getattr(member, "__func__", member) for name, member in vars(cls).items() if not name.startswith("_")]
    return [member for member in members if inspect.isfunction(member)]


def test_one_error_family_with_the_clis_exit_codes():
    family = [value for value in vars(errors).values() if inspect.isclass(value) and issubclass(value, Exception)]
    assert {cls.__name__ for cls in family} <= set(raypose.__all__)
    assert all(issubclass(cls, raypose.RayposeError) for cls in family)
    assert {cls.__name__: cls.exit_code for cls in family if cls.exit_code == 2} == {
        "SpecError": 2, "LeaseHeld": 2, "ConvertError": 2, "OutputError": 2}
    # Where they were raised from before they joined the family, they still are.
    from raypose.models.convert import ConvertError
    from raypose.output.lease import LeaseHeld
    from raypose.review.reading import OutputError
    from raypose.pipeline.cluster import ClusterError

    assert (ConvertError, LeaseHeld, OutputError, ClusterError) == (
        raypose.ConvertError, raypose.LeaseHeld, raypose.OutputError, raypose.ClusterError)


def test_import_raypose_leaves_ray_torch_and_transformers_for_later():
    code = "import sys, raypose; print(sorted(m for m in ('ray', 'torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
