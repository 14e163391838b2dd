"""Resolve ``"package.module:attr"`` references (model factories, losses, datasets)."""
from __future__ import annotations

import ast
import dis
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import site
import sys
import sysconfig
import types
from typing import Any, Callable, Iterable

from ._version import __version__
from .exceptions import GradscoreError

#: modules that moved, so that references stored in files written before (a checkpoint's
#: model factory "gradscore.models:mlp") still resolve
MOVED = {"gradscore.models": "gradscore.demos.models", "gradscore.demo_lm": "gradscore.demos.lm",
         "gradscore.demo": "gradscore.demos.digits"}


def import_ref(ref: str, what: str, error: type[GradscoreError] = GradscoreError,
               root: str = "") -> Callable[..., Any]:
    """Import ``"package.module:attr"``; raise ``error`` naming ``what`` on failure (``root``:
    the folder it was imported from when a file recorded it, named in the fix)."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise error(f"{what} '{ref}' is not of the form 'package.module:name'")
    module_name, attr = ref.split(":")
    module_name = MOVED.get(module_name, module_name)
    if module_name not in sys.modules:
        why = _runs_on_import(module_name)
        if why:
            raise error(f"{what} '{ref}': {why}; move '{attr}' into a module of its own (models.py), or put the "
                        f"script's work under if __name__ == \"__main__\":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        fix = (f"run from {root} or put it on PYTHONPATH (PYTHONPATH={root} gradscore ...), where it was imported "
               f"from" if root else "install it or put it on PYTHONPATH")
        raise error(f"{what} '{ref}': cannot import module '{module_name}' ({e}); {fix}") from e
    try:
        obj = getattr(module, attr)
    except AttributeError as e:
        raise error(f"{what} '{ref}': module '{module_name}' has no attribute '{attr}'") from e
    if not callable(obj):
        raise error(f"{what} '{ref}' is not callable")
    return obj


def source_sha256(objects: Iterable[Any]) -> str:
    """SHA-256 of the source code of ``objects`` (classes, functions) in order; one whose
    source cannot be read (compiled, defined in a notebook cell) counts by its name."""
    h = hashlib.sha256()
    for obj in objects:
        try:
            text = inspect.getsource(obj)
        except (OSError, TypeError):
            text = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
        h.update(text.encode())
    return h.hexdigest()


def code_fingerprint(model: Any, factory: Callable, loss_fn: Callable) -> dict[str, str]:
    """What made the numbers besides the options, checkpoints and data: gradscore's version;
    the model's factory, structure (its modules' repr: an ``nn.Sequential`` of torch layers
    has no class of its own) and the source of its own module classes (those not from
    torch: an edited forward counts); the loss function's source; and, where that code
    calls any, the user's code it reaches (:func:`user_code`: an edited helper counts),
    each by name, so that a refusal can say which. A resumed or reused output needs the same."""
    classes = {type(m) for m in model.modules() if not type(m).__module__.startswith("torch.")}
    ordered = sorted(classes, key=lambda c: (c.__module__, c.__qualname__))
    structure = hashlib.sha256(repr(model).encode()).hexdigest()
    code = {"gradscore": __version__, "model": source_sha256([factory, *ordered]) + structure[:16],
            "loss": source_sha256([loss_fn])}
    reached = user_code([factory, *ordered, loss_fn])
    if reached:   # absent where there is none: such a fingerprint is what it was before helpers counted
        code["helpers"] = {key: hashlib.sha256(reached[key].encode()).hexdigest()[:16] for key in sorted(reached)}
    return code


#: top-level packages whose code is versioned by their release, not read (gradscore's version is in the fingerprint)
_VERSIONED = frozenset({"torch", "gradscore", "numpy", "builtins"}) | frozenset(sys.stdlib_module_names)


@functools.lru_cache(maxsize=1)
def _installed_dirs() -> tuple[str, ...]:
    """The folders installed packages and the standard library live in, with a trailing separator."""
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs.update(site.getsitepackages() if hasattr(site, "getsitepackages") else ())
    dirs.add(site.getusersitepackages())
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs if d)


def _is_user_module(name: str | None) -> bool:
    """Whether the module ``name`` is the user's own code: a script or a file outside the
    installed packages and the standard library (an editable install counts as the user's)."""
    if not name or name.split(".")[0] in _VERSIONED:
        return False
    file = getattr(sys.modules.get(name), "__file__", None)
    return name == "__main__" if file is None else not _installed_file(file)


#: calls that train, where a file makes them outside any function: a training script's
TRAINS = frozenset({"backward", "CheckpointWriter", "InRun"})
#: ... and these, called on a trainer (``trainer.fit(model)``, ``Trainer(...).train()``), not on a
#: scaler or a model (``StandardScaler().fit(X)``, ``model.train()``)
TRAINER_CALLS = frozenset({"fit", "train"})


def _runs_on_import(module_name: str) -> str:
    """Why importing the user's file ``module_name`` would run a training ("" where it
    would not): it is the running script, with no ``__main__`` guard, or it calls one of
    :data:`TRAINS` (or a trainer's :data:`TRAINER_CALLS`) outside any function and guard.
    Read, not run; an installed module or a file that does not parse is the import's to
    judge."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return ""
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith(".py") or _installed_file(origin):
        return ""
    try:
        with open(origin, encoding="utf-8") as f:
            tree = ast.parse(f.read(), origin)
    except (OSError, SyntaxError, ValueError):
        return ""
    name = os.path.basename(origin)
    guarded = any(isinstance(node, ast.If) and _is_main_guard(node.test) for node in tree.body)
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    if not guarded and script and os.path.realpath(script) == os.path.realpath(origin):
        return f"importing {name} would run the script again (it is the running script, and has no __main__ guard)"
    call = _training_call(tree.body)
    return f"importing {name} would run it: line {call[0]} calls {call[1]}() outside any function" if call else ""


def _is_main_guard(test: ast.expr) -> bool:
    """Whether ``test`` is ``__name__ == "__main__"`` (either side)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = {ast.dump(test.left), ast.dump(test.comparators[0])}
    return sides == {ast.dump(ast.Name("__name__", ast.Load())), ast.dump(ast.Constant("__main__"))}


def _training_call(body: list[ast.stmt]) -> tuple[int, str] | None:
    """(line, name) of the first call of :data:`TRAINS` (or a trainer's :data:`TRAINER_CALLS`)
    that ``body`` makes when its module is imported: outside functions, classes and
    ``__main__`` guards."""
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(stmt, ast.If) and _is_main_guard(stmt.test):
            found = _training_call(stmt.orelse)
        else:
            found = next(((node.lineno, called) for node in _run_at_import(stmt) if isinstance(node, ast.Call)
                          and (called := _called(node.func)) in TRAINS | TRAINER_CALLS
                          and (called in TRAINS or isinstance(node.func, ast.Attribute)
                               and "trainer" in ast.unparse(node.func.value).lower())), None)
        if found:
            return found
    return None


def _run_at_import(node: ast.AST) -> Iterable[ast.AST]:
    """``node`` and the nodes in it, but not the bodies of the functions, lambdas and classes
    it defines (their calls run when called)."""
    yield node
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            yield from _run_at_import(child)


def _called(func: ast.expr) -> str:
    """The name a call's function goes by: ``f`` of ``f(...)`` and of ``a.b.f(...)``."""
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def import_root(ref: str) -> str:
    """The folder that puts the imported module of ``"package.module:attr"`` on the import
    path (the parent of its top package), for a module of the user's own files; "" for an
    installed one, or one not imported."""
    top = ref.split(":")[0].split(".")[0]
    file = getattr(sys.modules.get(top), "__file__", None)
    if file is None or not _is_user_module(top):
        return ""
    file = os.path.realpath(file)
    return os.path.dirname(os.path.dirname(file) if os.path.basename(file) == "__init__.py" else file)


@functools.lru_cache(maxsize=4096)
def _installed_file(file: str) -> bool:
    return os.path.realpath(file).startswith(_installed_dirs())


def _constant(value: Any, depth: int = 0) -> str | None:
    """A text of an immutable constant (a number, string, None, or a tuple or frozenset of
    them) that is the same in every process (a frozenset's items sorted), else None: a list,
    dict or set a module holds is as often a cache the code fills as a setting."""
    if isinstance(value, (bool, int, float, complex, str, bytes, type(None))):
        return repr(value)
    if depth > 3 or not isinstance(value, (tuple, frozenset)) or len(value) > 10_000:
        return None
    texts = [_constant(v, depth + 1) for v in value]
    if any(t is None for t in texts):
        return None
    return f"{type(value).__name__}({', '.join(texts if isinstance(value, tuple) else sorted(texts))})"


def _named(value: Any) -> str | None:
    """'module.qualname' of an installed package's function or class (``act = F.gelu``), else None."""
    try:
        module, name = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    except Exception:  # noqa: BLE001 - a proxy object's __getattr__ may raise anything
        return None
    return f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else None


def _code_objects(code: types.CodeType) -> Iterable[types.CodeType]:
    """``code`` and the code of the functions, lambdas and comprehensions defined in it."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _functions_of(obj: Any) -> list[Callable]:
    """The plain functions behind ``obj``: itself, a class's methods (and its user-code bases'),
    a property's accessors, a partial's function, a decorated function's original."""
    if isinstance(obj, type):
        found = []
        for cls in obj.__mro__:
            if cls is obj or _is_user_module(cls.__module__):
                for member in vars(cls).values():
                    found += _functions_of(member) if not isinstance(member, type) else []
        return found
    if isinstance(obj, (staticmethod, classmethod)):
        return _functions_of(obj.__func__)
    if isinstance(obj, property):
        return [f for f in (obj.fget, obj.fset, obj.fdel) if isinstance(f, types.FunctionType)]
    if isinstance(obj, functools.partial):
        return _functions_of(obj.func)
    if isinstance(obj, types.MethodType):
        return _functions_of(obj.__func__)
    if isinstance(obj, types.FunctionType):
        return [obj] + (_functions_of(obj.__wrapped__) if hasattr(obj, "__wrapped__") else [])
    return []


def _referenced(fn: types.FunctionType) -> Iterable[tuple[str, Any]]:
    """(name, value) of what ``fn``'s code reads from its module (save the names it rebinds),
    its closure and the user modules it reads attributes of (``helpers.act``): names are all
    a code object keeps of them."""
    codes = list(_code_objects(fn.__code__))
    names = {n for code in codes for n in code.co_names}
    rebound = {i.argval for code in codes for i in dis.get_instructions(code)
               if i.opname in ("STORE_GLOBAL", "DELETE_GLOBAL")}   # state (``global calls; calls += 1``)
    scope = fn.__globals__
    for name in sorted(names - rebound):
        if name in scope:
            value = scope[name]
            yield f"{fn.__module__}.{name}", value
            if isinstance(value, types.ModuleType) and _is_user_module(value.__name__):
                for attr in sorted(names):
                    if attr in vars(value):
                        yield f"{value.__name__}.{attr}", vars(value)[attr]
    for i, cell in enumerate(fn.__closure__ or ()):
        try:
            yield f"{fn.__module__}.{fn.__qualname__}.<cell {i}>", cell.cell_contents
        except ValueError:   # an empty cell
            continue


def user_code(roots: Iterable[Any]) -> dict[str, str]:
    """{name: source or value}: the user's code that ``roots`` (a factory, model classes, a
    loss) reach and that is not one of them: the functions and classes of the user's own
    modules their code reads (transitively) and the user-code classes they inherit from, by
    source; and what such code reads from its module besides: immutable constants (numbers,
    strings, tuples …) by value, an installed package's function or class by name. The code
    of installed packages counts by its release, and attributes of ``self`` by their class."""
    roots = [r for r in roots if r is not None]
    seen, found, todo = {id(r) for r in roots}, {}, []

    def reach(obj: Any) -> None:
        """Walk ``obj``'s functions later; record the user-code classes it inherits from now."""
        todo.extend(_functions_of(obj))   # a class's: its user-code bases' methods too
        for base in (obj.__mro__[1:] if isinstance(obj, type) else ()):
            if _is_user_module(base.__module__) and id(base) not in seen:
                seen.add(id(base))
                found[f"{base.__module__}.{base.__qualname__}"] = source_sha256([base])

    for root in roots:
        reach(root)
    while todo:
        fn = todo.pop()
        for key, value in _referenced(fn):
            if isinstance(value, (types.FunctionType, type)) and _is_user_module(value.__module__):
                if id(value) not in seen:
                    seen.add(id(value))
                    found[f"{value.__module__}.{value.__qualname__}"] = source_sha256([value])
                    reach(value)
            elif not isinstance(value, types.ModuleType) and _is_user_module(fn.__module__):
                text = _named(value) if callable(value) else _constant(value)   # which library function; a constant
                if text is not None:
                    found[key] = text
    return found
