"""BUILD lists every module and test file, and every file it lists exists (Bazel is not installed here)."""

import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIRS = ("models", "o1jax", "configs", "launch", "bench")


def build_targets(text: str) -> dict[str, dict]:
  """Every rule call in a BUILD file: {name: {"rule": ..., "srcs": [...], "deps": [...]}}.

  Starlark is a subset of Python syntax, so `ast` parses it; list values may be a literal, a module-level
  constant, or a `+` of those.
  """
  tree = ast.parse(text)
  constants = {}

  def value(node):
    if isinstance(node, ast.List):
      return [value(e) for e in node.elts]
    if isinstance(node, ast.Constant):
      return node.value
    if isinstance(node, ast.Name):
      return constants[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
      return value(node.left) + value(node.right)
    raise ValueError(f"BUILD line {node.lineno}: unsupported expression {ast.dump(node)[:80]}")

  targets = {}
  for statement in tree.body:
    if isinstance(statement, ast.Assign):
      constants[statement.targets[0].id] = value(statement.value)
    elif isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call):
      call = statement.value
      rule = call.func.id
      kwargs = {k.arg: value(k.value) for k in call.keywords}
      if "name" in kwargs:
        if kwargs["name"] in targets:
          raise ValueError(f"BUILD defines target {kwargs['name']!r} twice.")
        targets[kwargs["name"]] = {"rule": rule, **kwargs}
  return targets


@pytest.fixture(scope="module")
def targets():
  with open(os.path.join(ROOT, "BUILD")) as f:
    return build_targets(f.read())


def listed(targets, rules) -> set[str]:
  return {src for t in targets.values() if t["rule"] in rules for src in t.get("srcs", [])}


def test_every_module_is_in_a_library_or_binary(targets):
  modules = {os.path.relpath(p, ROOT) for d in PACKAGE_DIRS
             for p in glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True)}
  missing = sorted(modules - listed(targets, {"py_library", "py_binary"}))
  assert not missing, f"modules missing from BUILD: {missing}"


def test_every_test_file_has_a_py_test(targets):
  tests = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "**", "test_*.py"), recursive=True)}
  missing = sorted(tests - listed(targets, {"py_test"}))
  assert not missing, f"test files without a py_test in BUILD: {missing}"


def test_every_listed_file_exists(targets):
  absent = sorted(src for src in listed(targets, {"py_library", "py_binary", "py_test"})
                  if not os.path.isfile(os.path.join(ROOT, src)))
  assert not absent, f"BUILD lists files that do not exist: {absent}"


def test_local_deps_resolve(targets):
  for name, target in targets.items():
    for dep in target.get("deps", []):
      if dep.startswith(":"):
        assert dep[1:] in targets, f"target {name!r} depends on unknown target {dep!r}"


def test_parser_catches_a_missing_file():
  text = 'py_library(name = "x", srcs = ["models/nope.py"])\npy_test(name = "t", srcs = ["tests/test_build.py"])'
  parsed = build_targets(text)
  assert not os.path.isfile(os.path.join(ROOT, parsed["x"]["srcs"][0]))
  with pytest.raises(ValueError, match="twice"):
    build_targets('py_test(name = "a")\npy_test(name = "a")')
