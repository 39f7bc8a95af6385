"""The ``@journaled`` class wrapper: a subclass of the user's deployment class.

Its ``__init__`` starts a :class:`~serve_journal._private.runtime.JournalRuntime` (model
resolution, buffer, flusher thread, transport) before the user's own ``__init__``; each journaled
method is wrapped so that, after the user's method returns or raises, one captured call is offered
to the buffer (:class:`~serve_journal._private.capture.JournaledCall`, the same steps for sync and
async methods). ``__init__`` and ``reconfigure`` run the user's code in a scope where
:func:`serve_journal.load_model` pins the replica's model; ``reconfigure`` then checks whether the
alias moved away from what serves (it never changes what entries record); ``__del__`` closes the
runtime. Once ``__init__`` finished, the start-up heap is frozen (:func:`freeze_startup_heap`,
``gc_freeze``).
The wrapper never changes the method's result or exception.

``JournalRuntime``, ``annotate``, ``build_privacy`` and ``build_transport`` are re-exported here
for code that imported them from this module.
"""

from __future__ import annotations

import functools
import gc
import inspect
from collections.abc import Callable
from typing import Any

from serve_journal.config import ConfigError, JournalConfig

from .capture import JournaledCall, annotate
from .models import loading_for
from .runtime import JournalRuntime
from .wiring import build_privacy, build_transport

__all__ = ["JournalRuntime", "annotate", "build_privacy", "build_transport", "freeze_startup_heap",
           "journal_runtime", "wrap_class"]

# The functions defined inside the functions below are pickled by value (Ray ships the wrapper
# class to replicas); they reach module state only through importable module-level names
# (JournaledCall, JournalRuntime, _close_runtime, ...), which pickle by reference. Never let them
# reference something unpicklable directly (the annotations ContextVar lives in capture.py).


def _wrap_method(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` journaled: the same :class:`JournaledCall` steps for sync and async methods."""
    if inspect.isasyncgenfunction(method) or inspect.isgeneratorfunction(method):
        raise ConfigError(
            f"method {name!r} is a generator (streaming response); journaling streams is not "
            "supported: journal a non-streaming method instead"
        )
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def journaled_async(self, *args, **kwargs):
            runtime = self.__dict__.get("_serve_journal_runtime")
            if runtime is None:
                return await method(self, *args, **kwargs)
            call = JournaledCall(runtime.capturer, args, kwargs)
            rejection = call.check_caller()
            if rejection is not None:
                return rejection
            with call:
                result = await method(self, *args, **kwargs)
            return await call.finish(result)

        return journaled_async

    @functools.wraps(method)
    def journaled_sync(self, *args, **kwargs):
        runtime = self.__dict__.get("_serve_journal_runtime")
        if runtime is None:
            return method(self, *args, **kwargs)
        call = JournaledCall(runtime.capturer, args, kwargs)
        rejection = call.check_caller()
        if rejection is not None:
            return rejection
        with call:
            result = method(self, *args, **kwargs)
        return call.finish_blocking(result)

    return journaled_sync


def wrap_class(user_cls: type, config: JournalConfig) -> type:
    """A subclass of ``user_cls`` (same name) whose methods are journaled."""
    if not inspect.isclass(user_cls):
        raise ConfigError(
            f"@journaled wraps a class-based deployment, got {type(user_cls).__name__}; "
            "turn the function into a class with __call__"
        )
    attrs: dict[str, Any] = {"__module__": user_cls.__module__, "__qualname__": user_cls.__qualname__,
                             "__doc__": user_cls.__doc__, "_serve_journal_config": config}
    for name in config.methods:
        method = getattr(user_cls, name, None)
        if method is None or not callable(method):
            raise ConfigError(f"{user_cls.__name__} has no method {name!r} to journal "
                              f"(methods={config.methods!r})")
        attrs[name] = _wrap_method(name, method)

    user_init = user_cls.__init__

    def __init__(self, *args, **kwargs):
        runtime = self._serve_journal_runtime = JournalRuntime(config)
        with loading_for(runtime):  # load_model in __init__ pins this replica's model
            user_init(self, *args, **kwargs)
        if config.gc_freeze:
            freeze_startup_heap()

    user_reconfigure = getattr(user_cls, "reconfigure", None)

    if user_reconfigure is not None and inspect.iscoroutinefunction(user_reconfigure):
        async def reconfigure(self, user_config):
            runtime = self._serve_journal_runtime
            with loading_for(runtime):  # a reload here moves the pin, exactly then
                await user_reconfigure(self, user_config)
            runtime.refresh_model()
    else:
        def reconfigure(self, user_config):
            runtime = self._serve_journal_runtime
            if user_reconfigure is not None:
                with loading_for(runtime):
                    user_reconfigure(self, user_config)
            runtime.refresh_model()

    user_del = getattr(user_cls, "__del__", None)

    if user_del is not None and inspect.iscoroutinefunction(user_del):
        async def __del__(self):
            _close_runtime(self)
            await user_del(self)
    else:
        def __del__(self):
            _close_runtime(self)
            if user_del is not None:
                user_del(self)

    attrs.update(__init__=__init__, reconfigure=reconfigure, __del__=__del__)
    functools.update_wrapper(__init__, user_init, assigned=("__doc__",))
    return type(user_cls.__name__, (user_cls,), attrs)


def freeze_startup_heap() -> None:
    """Collect once, then move every object alive now out of the collector's generations.

    A replica's start-up heap (the model, MLflow, Ray, pandas ...) is hundreds of thousands of
    objects that live as long as the process; each full collection walked them all while holding
    the GIL (~173 ms measured, docs/benchmarks.md), stalling the event loop. Frozen, they are
    never walked again (~8 ms). ``JournalConfig.gc_freeze=False`` turns this off.
    """
    gc.collect()
    gc.freeze()


def _close_runtime(instance: Any) -> None:
    runtime = instance.__dict__.get("_serve_journal_runtime")
    if runtime is not None:
        runtime.close()


def journal_runtime(instance: Any) -> JournalRuntime | None:
    """The runtime of a journaled instance (for tests and admin methods)."""
    return instance.__dict__.get("_serve_journal_runtime")
