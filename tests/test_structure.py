"""The package's shape, read from its source: the one head pipeline (README "Layout"). A change that
re-lists the head options through the layers, imports upward or forks the pipeline fails here."""
import ast
import pathlib

import pytest

import fusedpref
from fusedpref._spec import OP_ARGS, Divergence, HeadCall, Transform

PKG = pathlib.Path(fusedpref.__file__).parent
ROOT = PKG.parent

# the functions allowed more than 12 parameters: the public API (each documented in README) and the
# custom-op boundary, whose schema torch.library needs flat
PUBLIC_WIDE = {
    "api.preference_loss", "api.kto_loss", "api.FusedLinearPreferenceLoss.__init__",
    "functions.linear_kl", "functions.linear_logprobs_kl", "functions.linear_divergence",
    "functions.LinearKL.apply", "functions.LinearDivergence.apply", "functions.LinearLogProbsKL.apply",
    "reference.eager_preference_loss", "reference.eager_kto_loss", "reference.eager_divergence",
    "_library.head_bwd",
}


def _functions(path):
    """(qualified name, number of parameters) of every function in a module."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = child.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + (a.vararg is not None) + \
                    (a.kwarg is not None)
                out.append((prefix + child.name, n))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
    visit(tree, "")
    return out


def _module(path):
    return ".".join(path.relative_to(PKG).with_suffix("").parts)


def test_no_internal_function_takes_more_than_12_parameters():
    wide = {f"{_module(p)}.{name}" for p in PKG.rglob("*.py") if "kernels" not in p.parts
            for name, n in _functions(p) if n > 12}
    assert wide <= PUBLIC_WIDE, f"internal functions over 12 parameters (bundle them): {sorted(wide - PUBLIC_WIDE)}"


def _imports(path):
    """The fusedpref modules a module imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = _module(path).split(".")[: -node.level]
            mod = ".".join(base + ([node.module] if node.module else []))
            names.add(mod)
            if node.module is None:
                names.update(".".join(base + [a.name]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fusedpref"):
            names.add(node.module.removeprefix("fusedpref.").removeprefix("fusedpref"))
    return {n for n in names if n}


@pytest.mark.parametrize("module, forbidden", [
    ("ops", {"chunked", "functions", "api", "_library", "distributed"}),     # the Triton host: no torch backend
    ("chunked", {"ops", "functions", "api", "_library", "distributed"}),
    ("_partials", {"ops", "chunked", "functions", "api", "_library"}),       # shared maths: no backend
    ("distributed", {"ops", "chunked", "functions", "api", "_library"}),     # the shards: no second pipeline
    ("_library", {"functions", "api"}),                                      # nothing runs upward
    ("functions", {"api", "ops", "chunked"}),
    ("api", {"ops", "chunked", "_library", "distributed"}),
])
def test_layers_import_downward_only(module, forbidden):
    got = _imports(PKG / f"{module.replace('.', '/')}.py")
    assert not got & forbidden, f"fusedpref/{module}.py imports {sorted(got & forbidden)}"


def test_the_loss_layer_uses_no_private_helper_of_the_function_layer():
    tree = ast.parse((PKG / "api.py").read_text())
    private = [a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "functions"
               for a in node.names if a.name.startswith("_")]
    assert not private, private


def test_one_compaction_skeleton():
    """The valid rows are found in one place (fusedpref/_library.py Rows), not per call kind."""
    hits = [str(p.relative_to(ROOT)) for p in PKG.rglob("*.py")
            if "!= call.ignore_index).nonzero()" in p.read_text() or "!= ignore_index).nonzero()" in p.read_text()]
    assert hits == ["fusedpref/_library.py"], hits


def test_divergence_values_are_the_kernels_modes():
    from fusedpref.kernels import modes

    assert {d.name: int(d) for d in Divergence} == {n: getattr(modes, n).value for n in ("FORWARD_KL", "REVERSE_KL",
                                                                                      "JSD")}


def test_the_call_spec_round_trips_through_the_op_arguments():
    call = HeadCall(Transform(3.0, 0.5), Transform(None, 2.0), Divergence.JSD, 0.25, -1, "torch", False, True,
                    "standard", True, "7", False)
    args = call.op_args()
    assert len(args) == len(OP_ARGS)
    back = HeadCall.from_op_args(args)
    assert back == call.__class__(**{**call.__dict__, "frozen": "auto"})
    one = HeadCall(Transform(None, None))
    assert HeadCall.from_op_args(one.op_args()) == one


def test_the_op_schemas_list_the_call_in_op_args_order():
    import torch

    import fusedpref._library  # noqa: F401  (registers the ops)

    for op in (torch.ops.fusedpref.head_fwd.default, torch.ops.fusedpref.head_bwd.default):
        names = [a.name for a in op._schema.arguments]
        assert tuple(names[-len(OP_ARGS):]) == OP_ARGS, (op, names)
