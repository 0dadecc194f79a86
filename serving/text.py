"""Token ids to text while decoding: incremental detokenization, stop strings, token bytes.

Text is released only when it is final: a trailing partial UTF-8 character (decoded as
U+FFFD) and a tail that could still grow into a stop string are held back. A stop string
ends the row and the text is cut just before it; the token ids keep every sampled token.
"""

from __future__ import annotations

from functools import cache

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class Detokenizer:
    """Turns one row's token ids into released text, watching for stop strings."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.released = 0  # characters of the decoded text already handed out
        self.full = ""
        self.stopped = False

    def push(self, token_id: int, skip: bool = False) -> tuple[str, bool]:
        """Add a token (``skip``: an end token that adds no text); returns (released text, stop string hit)."""
        if self.stopped:
            return "", True
        if not skip:
            self.ids.append(token_id)
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            self.full = str(text)
        cut = self._stop_at()
        if cut is not None:
            self.full = self.full[:cut]
            self.stopped = True
            return self._release(len(self.full)), True
        return self._release(self._safe_end()), False

    def flush(self) -> str:
        """Release whatever was held back (the row has ended)."""
        return self._release(len(self.full))

    def _release(self, end: int) -> str:
        end = max(end, self.released)
        text = self.full[self.released:end]
        self.released = end
        return text

    def _stop_at(self) -> int | None:
        if not self.stop:
            return None
        # Only text past what was released (less a stop's length) can hold a new match.
        hits = [i for s in self.stop if (i := self.full.find(s, max(0, self.released - len(s) + 1))) >= 0]
        return min(hits) if hits else None

    def _safe_end(self) -> int:
        end = len(self.full)
        while end > self.released and self.full[end - 1] == REPLACEMENT:
            end -= 1
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if self.full.endswith(s[:k], 0, end):
                    held = max(held, k)
                    break
        return end - held


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: which byte each byte-level character stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_bytes(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bytes:
    """The exact bytes a token stands for (a byte-level token may be part of a character)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        table = _byte_decoder()
        if piece and all(ch in table for ch in piece) and token_id not in tokenizer.all_special_ids:
            return bytes(table[ch] for ch in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # sentencepiece byte fallback
            return bytes([int(piece[3:5], 16)])
    return str(tokenizer.decode([token_id], clean_up_tokenization_spaces=False)).encode()


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """A token as text for logprob listings (invalid UTF-8 of a partial character is replaced)."""
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="replace")
