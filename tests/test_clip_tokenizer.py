"""CLIP's tokenizer from local files: OpenAI's BPE merges (.txt.gz) and a Hugging Face tokenizer.json
give the ids of OpenAI's published algorithm, re-implemented here on its own."""

from __future__ import annotations

import gzip
import html
import json
from collections import Counter
from pathlib import Path

import ftfy
import numpy as np
import pytest
import regex

from distillc.errors import DistillcError
from distillc.plugins.models.clip_tokenizer import ClipTokenizer

# -- an independent reference: OpenAI's clip/simple_tokenizer.py, as its paper's code describes it ---------

SPLIT = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                      regex.IGNORECASE)


def reference_byte_chars() -> list[str]:
    """The 256 byte characters in vocabulary order: printable Latin-1 bytes as themselves first,
    then the others shifted past 255, in byte order."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    order = keep + [b for b in range(256) if b not in keep]
    char = {}
    shifted = 0
    for b in order:
        if b in keep:
            char[b] = chr(b)
        else:
            char[b] = chr(256 + shifted)
            shifted += 1
    return [char[b] for b in order], char


class Reference:
    """OpenAI's tokenizer, written plainly: clean, split, byte-map, BPE by lowest rank, ids."""

    def __init__(self, merges: list[tuple[str, str]]):
        symbols, self.char = reference_byte_chars()
        vocab = symbols + [s + "</w>" for s in symbols]
        vocab += [a + b for a, b in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.rank = {pair: i for i, pair in enumerate(merges)}
        self.size = len(vocab)

    def bpe(self, piece: str) -> list[str]:
        if piece in ("<|startoftext|>", "<|endoftext|>"):
            return [piece]
        word = [self.char[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while True:
            candidates = [(self.rank[(word[k], word[k + 1])], k) for k in range(len(word) - 1)
                          if (word[k], word[k + 1]) in self.rank]
            if not candidates:
                return word
            best_rank = min(candidates)[0]
            first, second = next(p for p, r in self.rank.items() if r == best_rank)
            out, k = [], 0
            while k < len(word):
                if k < len(word) - 1 and word[k] == first and word[k + 1] == second:
                    out.append(first + second)
                    k += 2
                else:
                    out.append(word[k])
                    k += 1
            word = out

    def __call__(self, text: str, context: int = 77) -> list[int]:
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        body = [self.ids[t] for piece in SPLIT.findall(text) for t in self.bpe(piece)]
        ids = [self.ids["<|startoftext|>"]] + body + [self.ids["<|endoftext|>"]]
        if len(ids) > context:
            ids = ids[:context - 1] + [self.ids["<|endoftext|>"]]
        return ids + [0] * (context - len(ids))


# -- a tiny vocabulary, learnt here ------------------------------------------------------------------------

CORPUS = ("a photo of a cat. a photo of the dog! the small dog and the big cat; photos of cats and dogs. "
          "a café, a naïve résumé, emoji 🐱🐶 and numbers 1234, it's what we're doing, they'll say hello "
          "zero one two three four five six seven eight nine digit digits")


def learn_merges(text: str, count: int) -> list[tuple[str, str]]:
    """Byte-level BPE training by pair frequency, on the reference's pieces (deterministic ties)."""
    _, char = reference_byte_chars()
    words = Counter()
    for piece in SPLIT.findall(text.lower()):
        symbols = [char[b] for b in piece.encode("utf-8")]
        symbols[-1] += "</w>"
        words[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        merged = Counter()
        for word, n in words.items():
            out, k = [], 0
            while k < len(word):
                if k < len(word) - 1 and (word[k], word[k + 1]) == best:
                    out.append(word[k] + word[k + 1])
                    k += 2
                else:
                    out.append(word[k])
                    k += 1
            merged[tuple(out)] += n
        words = merged
    return merges


MERGES = learn_merges(CORPUS, 80)
VOCAB_SIZE = 512 + len(MERGES) + 2


def write_bpe(path: Path, merges: list[tuple[str, str]]) -> Path:
    """The merges as OpenAI ships them: a '#version' line, one 'a b' pair a line, gzipped."""
    text = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return path


def write_hf(path: Path, merges: list[tuple[str, str]]) -> Path:
    """The same vocabulary as a Hugging Face CLIP tokenizer.json, built with the tokenizers library."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    symbols, _ = reference_byte_chars()
    vocab_list = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    vocab["<|startoftext|>"] = len(vocab_list)
    vocab["<|endoftext|>"] = len(vocab_list) + 1
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<|endoftext|>",
                                     continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                 normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT.pattern), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<|startoftext|>", special=True),
                                  AddedToken("<|endoftext|>", special=True)])
    tokenizer.post_processor = processors.RobertaProcessing(("<|endoftext|>", vocab["<|endoftext|>"]),
                                                            ("<|startoftext|>", vocab["<|startoftext|>"]))
    tokenizer.save(str(path))
    return path


TRICKY = [
    "a photo of a cat.",
    "A Photo Of THE Dog!!!",
    "   many    spaces\tand\nnewlines   ",
    "café naïve résumé Ångström",
    "emoji 🐱🐶 and 👍🏽 too",
    "html &amp; entities &lt;b&gt; &amp;amp; &quot;quoted&quot;",
    "it's what we're doing; they'll say: I'd've",
    "numbers 1234 and 3.14 and ½",
    "mojibake: cafÃ© â€œquotesâ€\x9d",
    "<|startoftext|> literal special tokens <|endoftext|>",
    "punctuation...!?;:()[]{}--__//\\\\",
    "日本語のテキスト and Ελληνικά",
    "",
    "zero one two three four five six seven eight nine " * 12,  # well over 77 tokens
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    return write_bpe(folder / "bpe_simple_vocab_16e6.txt.gz", MERGES), write_hf(folder / "tokenizer.json", MERGES)


def test_the_learnt_vocabulary_merges_whole_words():
    assert len(MERGES) == 80 and VOCAB_SIZE == 594
    assert Reference(MERGES).bpe("photo") == ["photo</w>"]


@pytest.mark.parametrize("kind", ["bpe", "hf"])
def test_token_ids_equal_openais_algorithm_on_tricky_strings(files, kind):
    tokenizer = ClipTokenizer.from_file(files[0] if kind == "bpe" else files[1])
    reference = Reference(MERGES)
    assert tokenizer.vocab_size == reference.size == VOCAB_SIZE
    assert (tokenizer.sot_id, tokenizer.eot_id) == (VOCAB_SIZE - 2, VOCAB_SIZE - 1)
    got = tokenizer.tokenize(TRICKY)
    assert got.shape == (len(TRICKY), 77) and got.dtype == np.int64
    for text, row in zip(TRICKY, got):
        assert row.tolist() == reference(text), text


def test_an_over_long_prompt_is_cut_to_77_with_the_end_token_last(files):
    tokenizer = ClipTokenizer.from_file(files[0])
    row = tokenizer.tokenize([TRICKY[-1]])[0]
    assert row[0] == tokenizer.sot_id and row[76] == tokenizer.eot_id
    assert (row[1:76] != tokenizer.eot_id).all() and (row != 0).all()
    short = tokenizer.tokenize(["a cat"], context_length=8)[0]
    assert short[0] == tokenizer.sot_id and list(short).index(tokenizer.eot_id) < 7 and short[-1] == 0


def test_both_files_give_the_same_ids_and_survive_the_artifact(files):
    bpe, hf = (ClipTokenizer.from_file(f) for f in files)
    assert (bpe.tokenize(TRICKY) == hf.tokenize(TRICKY)).all()
    for tokenizer in (bpe, hf):
        stored = json.loads(json.dumps(tokenizer.to_meta()))
        again = ClipTokenizer.from_content(stored)
        assert (again.tokenize(TRICKY) == tokenizer.tokenize(TRICKY)).all()
        assert stored["vocab_size"] == VOCAB_SIZE


def test_openais_file_is_read_to_its_merge_limit(tmp_path):
    from distillc.plugins.models.clip_tokenizer import MAX_MERGES

    many = [(f"a{i}", f"b{i}") for i in range(MAX_MERGES + 10)]
    tokenizer = ClipTokenizer.from_file(write_bpe(tmp_path / "big.txt.gz", many))
    assert tokenizer.vocab_size == 49408  # CLIP's: 256 + 256 + 48894 + 2


@pytest.mark.parametrize("name, content, message", [
    ("vocab.txt.gz", b"not gzip", "cannot be read"),
    ("merges.txt", b"#version: 0.2\n", "holds no BPE merges"),
    ("merges.txt", b"#version: 0.2\na b c\n", "merge 1 is not two symbols"),
    ("tokenizer.json", b"{\"model\": 1}", "not a readable tokenizer.json"),
    ("vocab.bin", b"", "expected a Hugging Face tokenizer.json or a BPE merges file"),
])
def test_unreadable_tokenizer_files_are_one_clear_error(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DistillcError, match=message):
        ClipTokenizer.from_file(tmp_path / name)


def test_a_tokenizer_json_without_clips_special_tokens_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])).save(str(tmp_path / "t.json"))
    with pytest.raises(DistillcError, match="no <\\|startoftext\\|> / <\\|endoftext\\|> tokens"):
        ClipTokenizer.from_file(tmp_path / "t.json")
