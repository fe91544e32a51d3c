"""Dependencies of handlers (`Depends`, as in FastAPI and FastDepends): what a handler needs
besides its body, worked out once when the decorator runs and resolved on each attempt.

    def db() -> Iterator[Session]:
        session = Session()
        try:
            yield session            # the handler runs here
        finally:
            session.close()          # after the attempt, which raised or not

    @app.consumer("orders")
    async def on_order(order: Order, session: Annotated[Session, Depends(db)]) -> None: ...

A dependency is a callable: `def`, `async def`, or a generator (sync or async) whose code
after `yield` runs once the attempt ended and sees its exception (thrown in at the `yield`; it
cannot swallow it: the attempt fails all the same). Its own parameters are dependencies too, or
annotated `Message` or `App`, or have defaults. Within one attempt a dependency runs once however
many ask for it, unless declared `Depends(f, use_cache=False)`. Sync dependencies run on the
event loop: keep them quick (a sync handler's body runs in a thread, its dependencies do not).
"""

from __future__ import annotations

import contextlib
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rabbitflow.errors import ConfigError
from rabbitflow.message import Message

__all__ = ["APP", "MESSAGE", "Depends", "Plan", "Source", "is_app", "plan"]

# Where a parameter's value comes from: the Message, the App, or the value of plan step N.
MESSAGE = -1
APP = -2
Source = int

_PLAIN, _ASYNC, _GENERATOR, _ASYNC_GENERATOR = range(4)
_DEPTH = 32


class Depends:
    """Marks a parameter whose value `dependency()` makes, once per attempt (`use_cache=False`:
    once per parameter that asks for it)."""

    __slots__ = ("dependency", "use_cache")

    def __init__(self, dependency: Callable[..., Any], *, use_cache: bool = True) -> None:
        if not callable(dependency):
            raise ConfigError(f"Depends({dependency!r}): expected a function or a class")
        self.dependency = dependency
        self.use_cache = use_cache

    def __repr__(self) -> str:
        return f"Depends({_name(self.dependency)})"


def is_app(annotation: object) -> bool:
    """Does `annotation` name rabbitflow's App (without importing it: the app sits above us)?"""
    return isinstance(annotation, type) and getattr(annotation, "__rabbitflow_app__", False) is True


@dataclass(frozen=True, slots=True)
class _Step:
    call: Callable[..., Any]
    kind: int
    arguments: tuple[tuple[str, Source], ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """The dependencies of one handler in the order they run, and where each handler parameter
    comes from. Built once, when the decorator runs."""

    steps: tuple[_Step, ...]
    parameters: tuple[tuple[str, Source], ...]  # the handler's keyword arguments
    needs_message: bool
    needs_app: bool
    has_teardown: bool

    async def resolve(
        self, message: Message | None, app: Any, exits: contextlib.AsyncExitStack | None
    ) -> dict[str, Any]:
        """The handler's keyword arguments for one attempt; generators enter `exits`."""
        values: list[Any] = []
        for step in self.steps:
            kwargs = {name: _pick(source, values, message, app) for name, source in step.arguments}
            kind = step.kind
            if kind == _PLAIN:
                value = step.call(**kwargs)
            elif kind == _ASYNC:
                value = await step.call(**kwargs)
            elif kind == _GENERATOR:
                assert exits is not None
                value = exits.enter_context(contextlib.contextmanager(step.call)(**kwargs))
            else:
                assert exits is not None
                value = await exits.enter_async_context(contextlib.asynccontextmanager(step.call)(**kwargs))
            values.append(value)
        return {name: _pick(source, values, message, app) for name, source in self.parameters}


def _pick(source: Source, values: list[Any], message: Message | None, app: Any) -> Any:
    if source >= 0:
        return values[source]
    return message if source == MESSAGE else app


def marker(parameter: inspect.Parameter, annotation: object) -> Depends | None:
    """The `Depends` of a parameter: its default, or inside `Annotated[X, Depends(f)]`."""
    if isinstance(parameter.default, Depends):
        return parameter.default
    for extra in getattr(annotation, "__metadata__", ()):
        if isinstance(extra, Depends):
            return extra
    return None


def hints_of(call: Callable[..., Any], what: str) -> dict[str, Any]:
    target = call.__init__ if isinstance(call, type) else call  # type: ignore[misc]
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception as exc:
        raise ConfigError(f"{what}: cannot resolve its type hints: {exc}") from None


def plan(where: str, wanted: list[tuple[str, inspect.Parameter, Any]]) -> Plan | None:
    """The plan for a handler's parameters after its body: `(name, parameter, annotation)` of
    each one that is a dependency, a Message or an App; None when there are none."""
    builder = _Builder(where)
    parameters = tuple((name, builder.source(param, annotation, 0)) for name, param, annotation in wanted)
    if not parameters:
        return None
    sources = {source for _, source in parameters} | {s for step in builder.steps for _, s in step.arguments}
    return Plan(
        steps=tuple(builder.steps),
        parameters=parameters,
        needs_message=MESSAGE in sources,
        needs_app=APP in sources,
        has_teardown=any(step.kind >= _GENERATOR for step in builder.steps),
    )


class _Builder:
    def __init__(self, where: str) -> None:
        self.where = where
        self.steps: list[_Step] = []
        self.cached: dict[Any, int] = {}
        self.visiting: list[Callable[..., Any]] = []

    def source(self, param: inspect.Parameter, annotation: object, depth: int) -> Source:
        bare = typing.get_args(annotation)[0] if hasattr(annotation, "__metadata__") else annotation
        depends = marker(param, annotation)
        if depends is not None:
            return self.step(depends, depth)
        if bare is Message:
            return MESSAGE
        if is_app(bare):
            return APP
        raise AssertionError(param)  # the caller only asks about these three kinds

    def step(self, depends: Depends, depth: int) -> int:
        call = depends.dependency
        if depends.use_cache and call in self.cached:
            return self.cached[call]
        what = f"{self.where}: dependency {_name(call)}"
        if call in self.visiting or depth > _DEPTH:
            chain = " -> ".join(_name(c) for c in [*self.visiting, call])
            raise ConfigError(f"{what} depends on itself ({chain}); break the cycle")
        self.visiting.append(call)
        try:
            arguments = self.arguments(call, what, depth)
        finally:
            self.visiting.pop()
        self.steps.append(_Step(call, _kind(call), arguments))
        index = len(self.steps) - 1
        if depends.use_cache:
            self.cached[call] = index
        return index

    def arguments(self, call: Callable[..., Any], what: str, depth: int) -> tuple[tuple[str, Source], ...]:
        try:
            signature = inspect.signature(call)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{what}: cannot read its signature: {exc}") from None
        hints = hints_of(call, what)
        out = []
        for param in signature.parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if param.kind is param.POSITIONAL_ONLY:
                raise ConfigError(
                    f"{what}: parameter {param.name!r} is positional-only; dependencies get keywords"
                )
            annotation = hints.get(param.name)
            bare = typing.get_args(annotation)[0] if hasattr(annotation, "__metadata__") else annotation
            if marker(param, annotation) is not None or bare is Message or is_app(bare):
                out.append((param.name, self.source(param, annotation, depth + 1)))
            elif param.default is param.empty:
                raise ConfigError(
                    f"{what}: parameter {param.name!r} has no default and is neither `Depends(...)` "
                    "nor annotated `Message` or `App`; rabbitflow cannot supply it"
                )
        return tuple(out)


def _kind(call: Callable[..., Any]) -> int:
    if isinstance(call, type):
        return _PLAIN
    target = call if inspect.isfunction(call) or inspect.ismethod(call) else type(call).__call__
    if inspect.isasyncgenfunction(target):
        return _ASYNC_GENERATOR
    if inspect.isgeneratorfunction(target):
        return _GENERATOR
    if inspect.iscoroutinefunction(target):
        return _ASYNC
    return _PLAIN


def _name(call: object) -> str:
    return getattr(call, "__qualname__", None) or repr(call)
