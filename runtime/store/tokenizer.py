"""The tokenizer a compiled directory carries, loaded and used within bounds.

The directory may come from a stranger (ARCHITECTURE.md, threat model), and its tokenizer files
are data transformers and tokenizers act on: a ``tokenizer_config.json`` key can name a file to
read (``gguf_file``, ``vocab_file``: transformers resolves it against the folder it loads from,
and an absolute path escapes it) or a class to import (``tokenizer_class``); a ``tokenizer.json``
can chain normalizers that grow text exponentially or carry a regex that backtracks without end.
So each listed file is read once and checked against its checksum as read, those bytes are
checked here (``check_tokenizer_files``) and only then written to a private folder that
transformers loads from, with remote code off and no hub access. The chat template is rendered by
``chat.render_chat`` (bounded time, memory and output).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

try:  # re's own parser gives a pattern's shape: its opcodes and each part's shortest match
    from re import _constants as sre, _parser as sre_parse
except ImportError:  # Python 3.10
    import sre_constants as sre  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

from .manifest import TEXT_FILES, TOKENIZER_VOCAB, LoadError, parse_json, read_bytes, read_manifest

#: Bytes per tokenizer file, twice the largest a released model ships (Gemma 3's tokenizer.json:
#: 33 MiB); the JSON files transformers parses in Python (~25 bytes of memory per byte) at 16 MiB,
#: the chat template at 1 MiB (real ones: under 20 KiB).
TEXT_LIMITS = {"tokenizer.json": 64 * 2**20, "tokenizer.model": 64 * 2**20, "spiece.model": 64 * 2**20,
               "chat_template.jinja": 2**20, "chat_template.json": 2**20}
TEXT_LIMIT = 16 * 2**20
#: How much a tokenizer.json's Replace and Precompiled steps may multiply a text's length, all
#: chained: real Replace steps map a character to one (" " -> "▁") or shrink (" {2,}" -> " "), and
#: SentencePiece's precompiled NFKC map grows a character at most 18 times (U+FDFA).
MAX_EXPANSION = 64
MAX_COMPONENTS = 256  # normalizers, pre-tokenizers, decoders and processors, all nested
MAX_PATTERN = 4096  # characters of one regex (GPT-4o's split pattern has ~250)
#: Keys of tokenizer_config.json that name a file: only a file of the private copy, by bare name.
_FILE_KEY = re.compile(r".*_files?")
_UNICODE_CLASS = re.compile(r"\\[pP](\{[^}]*\}|[A-Za-z])")


def load_tokenizer(path: str | Path) -> Any:
    """The source model's tokenizer (and chat template), from the compiled directory alone.

    Only the tokenizer files listed in the manifest are read, each once, checked against its
    checksum as read and against ``check_tokenizer_files``; the checked bytes are written to a
    private temporary directory and loaded from it with remote code off and no hub access, so no
    other file (a planted symlink, a path in a config) is ever opened.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    present = [n for n in TEXT_FILES if n in manifest["files"]]
    if not any(n in present for n in TOKENIZER_VOCAB):
        raise LoadError(f"{path} has no tokenizer: its source model shipped none; tokenize with the source "
                        "model's tokenizer and pass input_ids")
    files = {name: read_bytes(path, name, TEXT_LIMITS.get(name, TEXT_LIMIT), manifest["files"][name])
             for name in present}
    check_tokenizer_files(path, files)
    with tempfile.TemporaryDirectory(prefix="expertflow-tokenizer-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError, RecursionError) as exc:
            raise LoadError(f"{path}: the tokenizer files do not load ({_first_line(exc)}); "
                            "recompile the model") from None
        except BaseException as exc:  # tokenizers' Rust panics are BaseExceptions
            raise panic_error(exc, f"{path}: the tokenizer files do not load") from None


def encode_text(tokenizer: Any, text: str | list[str], **kwargs: Any) -> Any:
    """``tokenizer(text, **kwargs)``, with a panic of tokenizers' Rust code (a regex that exceeds
    its backtracking limit) as a one-line LoadError instead of a traceback."""
    try:
        return tokenizer(text, **kwargs)
    except BaseException as exc:
        raise panic_error(exc, "the tokenizer failed on this text") from None


def panic_error(exc: BaseException, what: str) -> BaseException:
    """A LoadError for a ``pyo3_runtime.PanicException``; any other exception unchanged."""
    if type(exc).__name__ != "PanicException":
        return exc
    return LoadError(f"{what} (tokenizers panicked: {_first_line(exc)[:200]}); the tokenizer files are broken")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_tokenizer_files(path: Path, files: dict[str, bytearray]) -> None:
    """The tokenizer files' contents, before transformers sees them (LoadError naming the file);
    tokenizer_config.json's stale file keys are left out of what transformers sees."""
    if "tokenizer_config.json" in files:
        file = path / "tokenizer_config.json"
        config = _check_tokenizer_config(file, parse_json(files["tokenizer_config.json"], file), files)
        files["tokenizer_config.json"] = bytearray(json.dumps(config).encode())
    if "tokenizer.json" in files:
        _check_pipeline(path / "tokenizer.json", parse_json(files["tokenizer.json"], path / "tokenizer.json"))


def builtin_tokenizer_classes() -> frozenset[str]:
    """The tokenizer classes transformers ships (its auto mapping's and the backends'), by name."""
    import transformers
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    names = {n for n in TOKENIZER_MAPPING_NAMES.values() if isinstance(n, str)}
    names |= {n for n in ("TokenizersBackend", "PreTrainedTokenizerFast", "PythonBackend", "SentencePieceBackend",
                          "PreTrainedTokenizer") if hasattr(transformers, n)}
    return frozenset(names)


def _check_tokenizer_config(file: Path, config: Any, files: dict[str, bytearray]) -> dict[str, Any]:
    """The config transformers may see: ``gguf_file`` (transformers reads it, and an absolute path
    leaves the private copy) and ``auto_map`` refused; other keys naming a file that is not one of
    the listed files by its bare name (saved configs carry their author's paths, which transformers
    ignores today: ``vocab_file``, ``tokenizer_file``...) left out; a built-in class only."""
    if not isinstance(config, dict):
        raise LoadError(f"{file} is not a JSON object; recompile the model")
    if "auto_map" in config:
        raise LoadError(f"{file}: auto_map names remote code, which ExpertFlow never loads")
    if "gguf_file" in config:
        raise LoadError(f"{file}: gguf_file {str(config['gguf_file'])[:80]!r} names a file outside the tokenizer "
                        "files the manifest lists; a compiled directory's tokenizer reads only those")
    config = {k: v for k, v in config.items()
              if not _FILE_KEY.fullmatch(k) or v is None or (isinstance(v, str) and v in files)}
    name, known = config.get("tokenizer_class"), builtin_tokenizer_classes()
    if name is not None and not (isinstance(name, str) and (name in known or name.removesuffix("Fast") in known)):
        raise LoadError(f"{file}: tokenizer_class {str(name)[:80]!r} is not one of transformers' tokenizer classes")
    return config


def _check_pipeline(file: Path, spec: Any) -> None:
    """tokenizer.json's normalizers, pre-tokenizers, processors and decoders (the vocabulary aside):
    few enough, no regex that can backtrack without end, and Replace steps that together grow a
    text at most MAX_EXPANSION times."""
    if not isinstance(spec, dict):
        raise LoadError(f"{file} is not a JSON object; recompile the model")
    components, expansion = 0, 1.0
    stack = [spec.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        if not isinstance(node, dict):
            continue
        components += 1
        if components > MAX_COMPONENTS:
            raise LoadError(f"{file} chains more than {MAX_COMPONENTS} normalizers, pre-tokenizers and decoders; "
                            "no real tokenizer needs that many")
        pattern = node.get("pattern")
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if regex is not None:
            _check_regex(file, regex)
        if node.get("type") in ("Replace", "Precompiled"):
            expansion *= _growth(file, pattern, node.get("content")) if node["type"] == "Replace" else \
                _charsmap_growth(file, node.get("precompiled_charsmap"))
            if expansion > MAX_EXPANSION:
                raise LoadError(f"{file}: its Replace and Precompiled steps can grow a text more than "
                                f"{MAX_EXPANSION} times; no real tokenizer does")
        stack.extend(v for k, v in node.items() if isinstance(v, (dict, list)) and k != "pattern")


def _growth(file: Path, pattern: Any, content: Any) -> float:
    """How many times a Replace can lengthen a text: its content over the shortest match."""
    if not isinstance(pattern, dict) or not isinstance(content, str):
        raise LoadError(f"{file}: a Replace step has no pattern or content; recompile the model")
    if isinstance(pattern.get("String"), str):
        shortest = len(pattern["String"])
    else:
        shortest = _parse(file, pattern.get("Regex")).getwidth()[0]
    # an empty match inserts the content between every two characters
    return max(1.0, len(content) / shortest) if shortest else 1.0 + len(content)


def _charsmap_growth(file: Path, charsmap: Any) -> float:
    """The longest replacement in a SentencePiece precompiled map (a little-endian uint32 trie size,
    the trie, then the NUL-separated replacement strings), in characters."""
    import base64
    import binascii

    try:
        blob = base64.b64decode(charsmap or "", validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise LoadError(f"{file}: a Precompiled normalizer's charsmap is not base64; recompile the model") from None
    if not blob:
        return 1.0
    trie = int.from_bytes(blob[:4], "little")
    if len(blob) < 4 or trie > len(blob) - 4:
        raise LoadError(f"{file}: a Precompiled normalizer's charsmap is malformed; recompile the model")
    return max(1.0, *(len(s.decode("utf-8", "replace")) for s in blob[4 + trie:].split(b"\0")))


def _check_regex(file: Path, regex: Any) -> None:
    """A quantifier over something quantified (``(a+)+``) backtracks exponentially in Oniguruma."""
    def nested(tree: Any, inside: bool) -> bool:
        for op, arg in tree:
            if op in _REPEATS:
                repeats = arg[1] > 1
                if (repeats and inside) or nested(arg[2], inside or repeats):
                    return True
            elif op in (sre.SUBPATTERN, sre.ASSERT, sre.ASSERT_NOT) and nested(arg[-1], inside):
                return True
            elif op == _ATOMIC and nested(arg, inside):
                return True
            elif op == sre.BRANCH and any(nested(b, inside) for b in arg[1]):
                return True
        return False

    if nested(_parse(file, regex), False):
        raise LoadError(f"{file}: the regex {regex[:80]!r} nests quantifiers and can backtrack without end; "
                        "no real tokenizer's pattern does")


_REPEATS = tuple(getattr(sre, n) for n in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") if hasattr(sre, n))
_ATOMIC = getattr(sre, "ATOMIC_GROUP", None)


def _parse(file: Path, regex: Any) -> Any:
    if not isinstance(regex, str) or len(regex) > MAX_PATTERN:
        raise LoadError(f"{file}: a regex is not a string of at most {MAX_PATTERN} characters")
    try:  # Oniguruma's \p{L} classes read as one character for the shape of the pattern
        return sre_parse.parse(_UNICODE_CLASS.sub("a", regex))
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise LoadError(f"{file}: the regex {regex[:80]!r} is not one ExpertFlow can check ({exc})") from None
