"""CLIP's text tokenizer, read from local files: OpenAI/open_clip's BPE merges or a Hugging Face
``tokenizer.json``.

The rules are OpenAI's (``clip/simple_tokenizer.py``, which open_clip keeps):

1. clean: ``ftfy.fix_text``, HTML entities unescaped (twice), runs of whitespace made one space,
   stripped, lower-cased;
2. split with the pattern :data:`PATTERN` (the special tokens, English contractions, runs of
   letters, single digits, runs of other non-space characters);
3. each piece as UTF-8 bytes, each byte as one printable character (:func:`bytes_to_unicode`),
   the last one marked ``</w>`` (end of word), merged by byte-level BPE: the adjacent pair with
   the lowest merge rank, every occurrence left to right, until no pair has a rank;
4. ``<|startoftext|>`` + ids + ``<|endoftext|>``, cut to the context length (77) with the
   end-of-text token kept last, padded with 0.

From a BPE file (``bpe_simple_vocab_16e6.txt.gz``, or the same text uncompressed) the first line
(``#version: 0.2``) is skipped and at most :data:`MAX_MERGES` merges are read, as OpenAI does; the
vocabulary is the 256 byte characters, the same with ``</w>``, one token per merge, then the two
special tokens (49,408 for CLIP). A ``tokenizer.json`` is run by the ``tokenizers`` library
(its model, normalizer and pre-tokenizer, as Hugging Face CLIP checkpoints ship them) after the
same cleaning; its special tokens are looked up by name.
"""

from __future__ import annotations

import gzip
import hashlib
import html
from functools import lru_cache
from pathlib import Path
from typing import Any

from distillc.errors import DistillcError

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
CONTEXT_LENGTH = 77
#: The merges OpenAI's tokenizer reads from its file: 49152 - 256 - 2.
MAX_MERGES = 48894
#: OpenAI's split pattern (compiled with ``regex``, case-insensitive).
PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
           r"""[^\s\p{L}\p{N}]+""")
#: The longest text a tokenizer reads; a class name or prompt is a few words.
MAX_TEXT_CHARS = 10_000


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def clean_text(text: str) -> str:
    """OpenAI's ``whitespace_clean(basic_clean(text)).lower()``."""
    import ftfy
    import regex

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    """Text -> CLIP token ids ``(N, context_length)``, from a BPE merges file or a ``tokenizer.json``.

    Build it with :meth:`from_file` (or :meth:`from_content`, from what :meth:`to_meta` kept).
    ``vocab_size`` must equal the rows of the text tower's ``token_embedding``; ``eot_id`` is
    where the text tower reads its embedding.
    """

    def __init__(self, *, kind: str, content: str, source: str):
        self.kind = kind
        self.content = content
        self.source = source
        if kind == "bpe":
            self._init_bpe(content)
        elif kind == "hf":
            self._init_hf(content)
        else:
            raise DistillcError(f"tokenizer {source!r}: unknown kind {kind!r}")

    # -- reading ---------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> "ClipTokenizer":
        """Read ``*.json`` (Hugging Face) or ``*.txt.gz`` / ``*.txt`` (BPE merges)."""
        path = Path(path)
        name = path.name.lower()
        try:
            if name.endswith(".json"):
                return cls(kind="hf", content=path.read_text(encoding="utf-8"), source=str(path))
            if name.endswith(".gz"):
                with gzip.open(path, "rb") as f:
                    raw = f.read()
            elif name.endswith(".txt"):
                raw = path.read_bytes()
            else:
                raise DistillcError(f"tokenizer {str(path)!r}: expected a Hugging Face tokenizer.json or a BPE "
                                    f"merges file (.txt.gz or .txt)")
            return cls(kind="bpe", content=_used_merges(raw.decode("utf-8"), str(path)), source=str(path))
        except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
            raise DistillcError(f"tokenizer {str(path)!r} cannot be read: {exc}") from None

    @classmethod
    def from_content(cls, info: dict[str, Any]) -> "ClipTokenizer":
        """The tokenizer :meth:`to_meta` described."""
        return cls(kind=info["kind"], content=info["content"], source=info.get("source", "tokenizer"))

    def to_meta(self) -> dict[str, Any]:
        """A JSON form that rebuilds this tokenizer (its merges or its tokenizer.json text)."""
        return {"kind": self.kind, "content": self.content, "source": Path(self.source).name,
                "sha256": hashlib.sha256(self.content.encode()).hexdigest(), "vocab_size": self.vocab_size}

    def _init_bpe(self, content: str) -> None:
        merges = [tuple(line.split()) for line in content.split("\n") if line.strip()]
        bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
        if bad is not None:
            raise DistillcError(f"tokenizer {self.source!r}: merge {bad + 1} is not two symbols: "
                                f"{' '.join(merges[bad])[:60]!r}")
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START_OF_TEXT, END_OF_TEXT]
        self._encoder = {token: i for i, token in enumerate(vocab)}  # a repeated merge keeps its last id, as OpenAI's
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._cache: dict[str, list[str]] = {START_OF_TEXT: [START_OF_TEXT], END_OF_TEXT: [END_OF_TEXT]}
        self.vocab_size = len(vocab)
        self.sot_id, self.eot_id = self._encoder[START_OF_TEXT], self._encoder[END_OF_TEXT]

    def _init_hf(self, content: str) -> None:
        from tokenizers import Tokenizer

        try:
            self._hf = Tokenizer.from_str(content)
        except Exception as exc:  # tokenizers raises its own Exception type for every parse error
            raise DistillcError(f"tokenizer {self.source!r} is not a readable tokenizer.json: "
                                f"{str(exc)[:160]}") from None
        ids = [self._hf.token_to_id(t) for t in (START_OF_TEXT, END_OF_TEXT)]
        if None in ids:
            raise DistillcError(f"tokenizer {self.source!r} has no {START_OF_TEXT} / {END_OF_TEXT} tokens; "
                                "it is not a CLIP tokenizer")
        self.sot_id, self.eot_id = ids
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)

    # -- encoding ----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without the start and end tokens and uncut."""
        if len(text) > MAX_TEXT_CHARS:
            raise DistillcError(f"a text of {len(text)} characters; a prompt has at most {MAX_TEXT_CHARS}")
        text = clean_text(text)
        if self.kind == "hf":
            return list(self._hf.encode(text, add_special_tokens=False).ids)
        import regex

        byte_map = bytes_to_unicode()
        ids: list[int] = []
        for piece in regex.findall(PATTERN, text, regex.IGNORECASE):
            word = "".join(byte_map[b] for b in piece.encode("utf-8"))
            ids.extend(self._encoder[token] for token in self._bpe(word))
        return ids

    def tokenize(self, texts: list[str], context_length: int = CONTEXT_LENGTH) -> Any:
        """int64 ids ``(len(texts), context_length)``: start, text, end (last when cut), zeros."""
        import numpy as np

        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_id
            out[row, :len(ids)] = ids
        return out

    def _bpe(self, word: str) -> list[str]:
        """Byte-level BPE of one piece (its characters already byte-mapped), ``</w>`` on the last."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self._ranks.get(pair, -1), pair) for pair in zip(parts, parts[1:])]
            ranked = [item for item in ranked if item[0] >= 0]
            if not ranked:
                break
            best = min(ranked)[1]
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        if len(self._cache) < 100_000:
            self._cache[word] = parts
        return parts


def _used_merges(text: str, source: str) -> str:
    """The merges OpenAI's tokenizer reads: after the ``#version`` line, at most MAX_MERGES."""
    lines = text.split("\n")
    if lines and lines[0].startswith("#"):
        lines = lines[1:]
    merges = [line for line in lines if line.strip()][:MAX_MERGES]
    if not merges:
        raise DistillcError(f"tokenizer {source!r} holds no BPE merges")
    return "\n".join(merges)


def file_kind(path: str | Path) -> str | None:
    """``"hf"``, ``"bpe"`` or None (not a tokenizer file name)."""
    name = Path(path).name.lower()
    if name.endswith(".json"):
        return "hf"
    if name.endswith((".txt.gz", ".txt")):
        return "bpe"
    return None


def check_fits(tokenizer: ClipTokenizer, model: Any, *, teacher: str) -> None:
    """A clear error unless ``model`` has a text tower whose vocabulary and context fit ``tokenizer``."""
    if not getattr(model, "has_text_tower", False) or not hasattr(model, "encode_text"):
        raise DistillcError(f"teacher {teacher!r} has a tokenizer but no text tower (built with text = false, "
                            f"or an architecture without one)")
    rows = int(model.token_embedding.weight.shape[0]) if hasattr(model, "token_embedding") else model.vocab_size
    if tokenizer.vocab_size != rows:
        raise DistillcError(f"teacher {teacher!r}: tokenizer {Path(tokenizer.source).name!r} has "
                            f"{tokenizer.vocab_size} tokens but the text tower's token_embedding has {rows} rows")

