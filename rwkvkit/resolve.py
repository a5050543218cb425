"""Turning what users write (plugin names, options, plain functions) into plugin objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

from rwkvkit.errors import InputError, TokenizerError
from rwkvkit.interfaces import Callback, Sampler, Tokenizer
from rwkvkit.paths import resolve_file
from rwkvkit.registry import registry

CallbackLike = Callback | Callable[[str], Any] | str


class _FunctionCallback(Callback):
    """ChatRWKV's ``callback=print``-style functions receive each text piece."""

    def __init__(self, fn: Callable[[str], Any]) -> None:
        self.fn = fn

    def on_text(self, piece: str) -> None:
        self.fn(piece)


def as_callbacks(items: CallbackLike | Iterable[CallbackLike] | None) -> list[Callback]:
    """Accept callback objects, plain functions, registered names, or a list of these."""
    if items is None:
        return []
    if isinstance(items, (Callback, str)) or callable(items):
        items = [items]
    elif not isinstance(items, Iterable):
        raise InputError(f"callback={items!r:.80}: expected a Callback, a function taking text, a registered name, or a list of these")
    out = []
    for item in items:
        if isinstance(item, Callback):
            out.append(item)
        elif isinstance(item, str):
            out.append(registry.get("callbacks", item)())
        elif callable(item):
            out.append(_FunctionCallback(item))
        else:
            raise InputError(f"callback {item!r}: expected a Callback, a function taking text, or a registered name")
    return out


def resolve_sampler(sampler: Sampler | str, options: dict[str, Any] | None = None) -> Sampler:
    """A sampler instance from an instance or a registered name plus its options."""
    if isinstance(sampler, Sampler):
        return sampler
    factory = registry.get("samplers", sampler)
    try:
        return factory(**(options or {}))
    except TypeError as exc:
        raise InputError(f"sampler {sampler!r} does not accept options {sorted(options or {})}: {exc}") from None
    except InputError:
        raise
    except ValueError as exc:  # a plugin's own check of its options, without rwkvkit's error types
        raise InputError(f"sampler {sampler!r} refused its options: {exc}") from None


def resolve_tokenizer(name: str | Path | Tokenizer) -> Tokenizer:
    """A registered tokenizer name (``rwkv_vocab_v20230424``), a path (``pkg://`` allowed) to an
    HF ``tokenizer.json`` (as ChatRWKV's ``PIPELINE(model, "20B_tokenizer.json")``), or a Hugging
    Face model folder holding a ``tokenizer.json`` or the World vocabulary file (``vocab.txt`` too)."""
    if isinstance(name, Tokenizer):
        return name
    key = str(name)
    if key not in registry.names("tokenizers") and resolve_file(key).is_dir():
        return _folder_tokenizer(resolve_file(key))
    if key not in registry.names("tokenizers") and (key.endswith(".json") or resolve_file(key).exists()):
        return registry.get("tokenizers", "hf")(path=resolve_file(key))
    return registry.get("tokenizers", key)()


def _folder_tokenizer(folder: Path) -> Tokenizer:
    from rwkvkit.formats.hf import folder_tokenizer, world_vocab_file

    path = folder_tokenizer(folder)
    if path is None:
        raise TokenizerError(f"{folder}: a folder without tokenizer.json, rwkv_vocab_v20230424.txt or vocab.txt; name a tokenizer instead (e.g. rwkv_vocab_v20230424)")
    if path.suffix == ".json":
        return registry.get("tokenizers", "hf")(path=path)
    return registry.get("tokenizers", "rwkv_world")(vocab_file=world_vocab_file(path))
