"""CLIP's byte-level BPE tokenizer (OpenAI CLIP / OpenCLIP), on the `tokenizers` package.

Both SD 1.x (OpenAI ViT-L/14 text) and SD 2.x (OpenCLIP ViT-H/14 text) use the same
49,408-token vocabulary, built from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (shipped
unchanged in `minivid/data/`). What the original tokenizer does, step by step:

1. clean: `html.unescape` twice, Unicode NFC, collapse whitespace runs to one space,
   strip, lower-case (OpenAI's `basic_clean` + `whitespace_clean` + `.lower()`; ftfy's
   other repairs - mojibake, curly quotes, full-width forms - are not reproduced);
2. split into words with CLIP's pattern (contractions, letter runs, single digits,
   punctuation runs; whitespace dropped);
3. map each word's UTF-8 bytes to printable characters (GPT-2's byte-to-unicode table),
   mark the last character with `</w>`, merge pairs by BPE rank;
4. wrap in `<|startoftext|>` (49406) ... `<|endoftext|>` (49407), truncate to 77 with the
   end token kept, pad: SD 1.x pads with the end token (HF CLIPTokenizer as ldm's
   `FrozenCLIPEmbedder` uses it), SD 2.x / OpenCLIP with 0 (`open_clip.tokenize`).
"""
from __future__ import annotations

import gzip
import html
import logging
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Literal, Sequence

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

__all__ = ["CLIPTokenizer", "clean_text", "bytes_to_unicode", "load_bpe", "BPE_PATH", "SOT", "EOT", "VOCAB_SIZE"]

logger = logging.getLogger(__name__)

BPE_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = 49406, 49407                      # <|startoftext|>, <|endoftext|>
VOCAB_SIZE = 49408
SPECIALS = ("<|startoftext|>", "<|endoftext|>")
N_MERGES = 49152 - 256 - 2                   # merges kept from the file (its first line is a header)

# CLIP's word pattern: its special tokens, contractions, letter runs, ONE digit, punctuation runs.
WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_WHITESPACE = re.compile(r"\s+")


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the remaining 68 (controls, space, ...)
    map to U+0100 onwards in byte order, so BPE never sees whitespace or control characters.
    The dict lists the printable bytes first, then the shifted ones: CLIP's first 256
    vocabulary entries are its values in this order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}                   # insertion order matters: it is the vocab order
    shifted = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return table


def load_bpe(path: str | Path = BPE_PATH) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges derived from OpenAI's BPE file the way CLIP derives them.

    vocab = the 256 byte characters, the same with `</w>`, one token per merge (first
    49,152 - 256 - 2 merges after the header line), `<|startoftext|>`, `<|endoftext|>`
    -> 49,408 tokens; ids are positions in that list.
    """
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: expected {N_MERGES} BPE merges of two symbols each after the header line")
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(SPECIALS)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{path}: derived {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def clean_text(text: str) -> str:
    """CLIP's text cleanup: html-unescape twice, NFC, collapse whitespace, strip, lower-case."""
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text)
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower()


class CLIPTokenizer:
    """CLIP BPE tokenizer producing fixed-length id tensors for the CLIP text encoders.

    pad="end": pad with `<|endoftext|>` (49407) - SD 1.x;
    pad="zero": pad with 0 - SD 2.x / OpenCLIP. Texts longer than `max_length` tokens
    (start and end included) are truncated, keeping the end token, with a logged warning.
    """

    def __init__(self, pad: Literal["end", "zero"] = "end", max_length: int = 77, bpe_path: str | Path = BPE_PATH):
        if pad not in ("end", "zero"):
            raise ValueError(f"pad must be 'end' (SD 1.x) or 'zero' (SD 2.x / OpenCLIP), got {pad!r}")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {max_length}")
        self.pad, self.max_length = pad, max_length
        self.pad_id = EOT if pad == "end" else 0
        self.sot_id, self.eot_id = SOT, EOT
        vocab, merges = load_bpe(bpe_path)
        self.vocab_size = len(vocab)
        self._id_to_token = {i: t for t, i in vocab.items()}
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}

        bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="")
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            # keep the pattern's matches as words, drop what lies between them (whitespace)
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
            # bytes -> printable characters; no GPT-2 re-split, no prefix space
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.add_special_tokens(list(SPECIALS))     # written literally in a prompt, they keep their ids
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        """Token ids of one text after CLIP's cleanup, without start/end tokens, untruncated."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(clean_text(text), add_special_tokens=False).ids

    def __call__(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """Texts -> LongTensor [B, max_length]: start, tokens, end, padding."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise TypeError("CLIPTokenizer expects a str or a list of str")
        out = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [SOT, *self.encode(text), EOT]
            if len(ids) > self.max_length:
                dropped = self.decode(ids[self.max_length - 1:-1])
                logger.warning(
                    "CLIP can only handle %d tokens; %d were dropped from prompt %d: %r",
                    self.max_length, len(ids) - self.max_length, i, dropped,
                )
                ids = ids[: self.max_length - 1] + [EOT]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids -> text. A leading start token is dropped and decoding stops at the first end token
        (whatever follows it is padding); words are separated by single spaces."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects one sequence of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
        if ids and ids[0] == SOT:
            ids = ids[1:]
        if EOT in ids:
            ids = ids[: ids.index(EOT)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        chars = "".join(self._id_to_token[i] for i in ids)
        # special tokens and `</w>` are not byte characters: map `</w>` to a space, keep specials as text
        out, buf = [], bytearray()
        for piece in re.split(r"(</w>|<\|startoftext\|>|<\|endoftext\|>)", chars):
            if piece == "</w>":
                buf += b" "
            elif piece in SPECIALS:
                out.append(buf.decode("utf-8", errors="replace"))
                out.append(piece)
                buf = bytearray()
            else:
                buf += bytes(self._byte_decoder[c] for c in piece)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out).strip()

    def __repr__(self) -> str:
        return f"CLIPTokenizer(pad={self.pad!r}, max_length={self.max_length}, vocab_size={self.vocab_size})"
