"""Loading a user's reward function from a Python file (``custom_reward_function.{path,name}``).

As in verl (``get_custom_reward_fn``): the file is imported as a module and ``name`` is looked up in
it; the function is called as ``fn(data_source=..., solution_str=..., ground_truth=...,
extra_info=..., **reward_kwargs)`` and returns a float or a dict with "score". Where we differ: every
problem (missing file, import error, missing name, not callable, a signature that cannot take those
keyword arguments) is a ValueError at start-up naming the file, the function and the callables the
file does define; the module is not added to ``sys.modules``.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.machinery
import importlib.util
import inspect
from pathlib import Path
from typing import Any, Callable

__all__ = ["CALL_KEYWORDS", "load_custom_reward_fn"]

CALL_KEYWORDS = ("data_source", "solution_str", "ground_truth", "extra_info")


def _import_file(path: Path):
    # A unique module name per file so two custom files never collide.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    loader = importlib.machinery.SourceFileLoader(f"mtprl_custom_reward_{digest}", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    try:
        loader.exec_module(module)
    except Exception as e:  # SyntaxError, ImportError, anything the file raises at import
        raise ValueError(
            f"importing the custom reward file {str(path)!r} failed with {type(e).__name__}: {e}"
        ) from e
    return module


def load_custom_reward_fn(path: str | Path, name: str = "compute_score", **reward_kwargs: Any) -> Callable:
    """Import ``path`` and return its function ``name``, checked to accept the reward call.

    ``reward_kwargs``: the extra keyword arguments the manager will pass (checked against the
    signature here, so a mismatch fails at start-up rather than on every sample).
    """
    if not path:
        raise ValueError("custom reward function path is empty; set custom_reward_function.path to a .py file")
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ValueError(
            f"custom reward function file {str(path)!r} does not exist (resolved to {str(file)!r}); "
            "check custom_reward_function.path"
        )
    module = _import_file(file)
    fn = getattr(module, name, None)
    if fn is None:
        available = sorted(
            n for n, v in vars(module).items() if callable(v) and not n.startswith("_") and not inspect.isclass(v)
        )
        close = difflib.get_close_matches(name, available, n=1, cutoff=0.0)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"custom reward file {str(file)!r} has no function {name!r}.{hint} Functions it defines: "
            f"{', '.join(available) or '(none)'}; set custom_reward_function.name accordingly"
        )
    if not callable(fn):
        raise ValueError(f"{name!r} in custom reward file {str(file)!r} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind(**{k: None for k in CALL_KEYWORDS}, **reward_kwargs)
    except TypeError as e:
        raise ValueError(
            f"custom reward function {name!r} in {str(file)!r} cannot be called as "
            f"{name}({', '.join(f'{k}=...' for k in (*CALL_KEYWORDS, *reward_kwargs))}): {e}. "
            "Give it the parameters data_source, solution_str, ground_truth, extra_info (or **kwargs)."
        ) from None
    except ValueError:  # builtins without a signature: accept and let the call decide
        pass
    return fn
