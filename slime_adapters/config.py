"""Frozen configuration dataclasses shared by every module, saved and loaded as JSON.

Each module ``M`` has a frozen dataclass ``MConfig`` whose fields are exactly ``M``'s constructor
keywords (minus ``device``/``dtype``). ``M.from_config(cfg)`` builds the module, ``m.config`` gives
the config back. Saved configs record the library version; loading one written by a newer version
with keys this version does not know warns (:class:`UnknownConfigKeyWarning`) and ignores them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import tempfile
import typing
import warnings
from pathlib import Path
from typing import Any, ClassVar, TypeVar

__all__ = [
    "ConfigBase",
    "ConfigError",
    "ConfigurableMixin",
    "UnknownConfigKeyWarning",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "check_numbers",
    "config_field",
    "config_setting",
    "refuse_removed_keywords",
]

C = TypeVar("C", bound="ConfigBase")


class ConfigError(ValueError):
    """A configuration file or dict cannot be turned into a config."""


class UnknownConfigKeyWarning(UserWarning):
    """A saved config holds keys this version does not know (written by a newer version?)."""


# ---- field validation, shared by every config's __post_init__ ----------------------------------
# Each helper names the config and the field, says what is allowed and shows the value it got.


def _fail(error: type[Exception], owner: str, message: str) -> None:
    raise error(f"{owner}: {message}")


def check_choice(owner: str, name: str, value: Any, choices: tuple, *,
                 error: type[Exception] = ConfigError) -> None:
    """Refuse ``value`` unless it is one of ``choices`` (the message lists them)."""
    if not any(value == c and type(value) is type(c) for c in choices):
        _fail(error, owner, f"{name} must be one of {choices}, got {value!r}")


def check_bool(owner: str, name: str, value: Any, *, error: type[Exception] = ConfigError) -> None:
    """Refuse anything but ``True`` or ``False`` (``"no"`` or ``1`` is not a bool)."""
    if not isinstance(value, bool):
        _fail(error, owner, f"{name} must be True or False, got {value!r}")


def check_int(owner: str, name: str, value: Any, *, minimum: int | None = None,
              allow_none: bool = False, error: type[Exception] = ConfigError) -> None:
    """Refuse a non-int (bools and floats included) or an int under ``minimum``."""
    if value is None and allow_none:
        return
    what = "an int" + (f" >= {minimum}" if minimum is not None else "") + (
        " or None" if allow_none else "")
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or (minimum is not None and value < minimum)):
        _fail(error, owner, f"{name} must be {what}, got {value!r}")


def check_number(owner: str, name: str, value: Any, *, minimum: float | None = None,
                 maximum: float | None = None, above: float | None = None,
                 allow_none: bool = False, error: type[Exception] = ConfigError) -> None:
    """Refuse a non-number, NaN, ±inf, a bool, or a value out of range: ``>= minimum``,
    ``> above``, ``<= maximum``."""
    if value is None and allow_none:
        return
    bounds = [f">= {minimum}" if minimum is not None else "", f"> {above}" if above is not None
              else "", f"<= {maximum}" if maximum is not None else ""]
    what = " and ".join(b for b in bounds if b)
    what = "a finite number" + (f" {what}" if what else "") + (" or None" if allow_none else "")
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and math.isfinite(value)
          and (minimum is None or value >= minimum) and (above is None or value > above)
          and (maximum is None or value <= maximum))
    if not ok:
        _fail(error, owner, f"{name} must be {what}, got {value!r}")


def check_numbers(owner: str, name: str, value: Any, length: int, *, above: float | None = None,
                  error: type[Exception] = ConfigError) -> None:
    """Refuse anything but ``length`` finite numbers (each ``> above`` when given)."""
    ok = isinstance(value, tuple | list) and len(value) == length
    if ok:
        try:
            for v in value:
                check_number(owner, name, v, above=above, error=error)
        except error:
            ok = False
    if not ok:
        bound = f" > {above}" if above is not None else ""
        _fail(error, owner, f"{name} must be {length} finite numbers{bound}, got {value!r}")


def config_field(name: str, doc: str) -> property:
    """A read-only module attribute that reads ``self.config.<name>`` (a structural setting)."""
    return property(lambda self: getattr(self.config, name), doc=doc)


def config_setting(name: str, doc: str) -> property:
    """A module attribute that reads ``self.config.<name>``; assigning it replaces ``self.config``
    with a validated copy, so the saved config is always what runs."""

    def set_(self: Any, value: Any) -> None:
        self.config = self.config.replace(**{name: value})

    return property(lambda self: getattr(self.config, name), set_,
                    doc=f"{doc} Setting it updates ``config`` (validated).")


#: Keywords removed from public signatures -> what to pass instead (the message names it).
REMOVED_KEYWORDS = {
    "key_padding_mask": (
        "key_mask (True = a valid key, as transformers' attention_mask; the opposite of "
        "key_padding_mask): pass key_mask=~key_padding_mask"
    ),
}


def refuse_removed_keywords(owner: str, kwargs: dict[str, Any]) -> None:
    """Raise :class:`TypeError` for keywords a signature does not take: for a removed one the
    message names its replacement; for any other the usual "unexpected keyword argument"."""
    for name in kwargs:
        if name in REMOVED_KEYWORDS:
            raise TypeError(f"{owner}() no longer takes {name}=; pass {REMOVED_KEYWORDS[name]}")
        raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _restore(tp: Any, value: Any) -> Any:
    """Turn JSON lists back into the tuples, and dicts into the nested configs, a field declares."""
    if isinstance(tp, type) and issubclass(tp, ConfigBase) and isinstance(value, dict):
        return tp.from_dict(value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                try:
                    return _restore(arg, value)
                except (TypeError, ValueError):
                    continue
        return value
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_restore(args[0], v) for v in value)
        if args and len(args) == len(value):
            return tuple(_restore(a, v) for a, v in zip(args, value))
        return tuple(value)
    if tp is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _umask() -> int:
    """The process's umask (read by setting it and putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a file so that readers see either the old content or the new, never half of it:
    write a temporary file beside it, flush it to disk, then rename it over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the file the mode open() would (0666 minus the umask)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


@dataclasses.dataclass(frozen=True)
class ConfigBase:
    """Base of every module config: dict/JSON round trips with the library version recorded."""

    kind: ClassVar[str] = "config"

    def to_dict(self) -> dict[str, Any]:
        from slime_adapters import __version__

        out = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"kind": self.kind, "slime_adapters_version": __version__, **out}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a dict, got {type(data).__name__}")
        data = dict(data)
        kind = data.pop("kind", cls.kind)
        data.pop("slime_adapters_version", None)
        if kind != cls.kind:
            raise ConfigError(f"{cls.__name__}: config is of kind {kind!r}, expected {cls.kind!r}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring unknown config keys {unknown} "
                "(written by a newer slime-adapters?)",
                UnknownConfigKeyWarning,
                stacklevel=2,
            )
        kwargs = {k: _restore(hints.get(k, Any), v) for k, v in data.items() if k in names}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{cls.__name__}: invalid config: {exc}") from exc

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls: type[C], path_or_text: str | os.PathLike[str]) -> C:
        """Load from a JSON file path or from a JSON string."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            path = Path(path_or_text)
            if not path.is_file():
                raise ConfigError(f"{cls.__name__}: config file {str(path)!r} does not exist")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{cls.__name__}: {str(path)!r} is not UTF-8 text: {exc}") \
                    from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cls.__name__}: not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


class ConfigurableMixin:
    """Adds ``from_config`` to a module whose ``__init__`` takes the config's fields as keywords
    and stores the resulting config as ``self.config``."""

    config_class: ClassVar[type[ConfigBase]]

    @classmethod
    def from_config(cls, config: ConfigBase, *, device=None, dtype=None):
        if not isinstance(config, cls.config_class):
            raise ConfigError(
                f"{cls.__name__}.from_config expects a {cls.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
        return cls(**fields, device=device, dtype=dtype)
