"""Writes the tiny model's CLIP BPE tokenizer files (vocab.json, merges.txt) from a word list.

The real CLIP vocabulary has 49,408 tokens and cannot be downloaded here. The tiny model needs a *real* CLIPTokenizer
(same BPE algorithm, same special tokens, same byte fallback), not a big vocabulary: every byte is a token, so any text
still tokenizes, and the words of the model's world (colors, shapes, styles) get whole-word tokens.

Run: python -m sd_lora.models.make_tokenizer  (output is committed under sd_lora/models/tiny/tokenizer/)
"""

import json
from pathlib import Path

WORDS = """
a an the on in of with and or at to by for from is as this that it
image picture photo painting drawing illustration render art artwork sketch style styled in
background foreground scene shape shapes object small large big tiny medium huge little
left right top bottom center middle corner upper lower
red green blue yellow white black purple orange pink brown gray grey cyan magenta gold golden silver cream
circle square triangle star rectangle ellipse dot disk ring diamond heart hexagon
frame framed ornamental ornate paper texture ink outline outlined border classical baroque
mozart ink violin piano music dog cat tree house flower sky sea mountain portrait landscape
bright dark light pale deep vivid soft simple flat plain colorful colored solid
one two three four many some very
""".split()  # noqa: SIM905 (one word list, easier to read and edit as text)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode table (same as GPT-2's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    base = list(bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    seen = set(vocab)
    for word in dict.fromkeys(words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in seen:
                merges.append((left, right))
                vocab.append(merged)
                seen.add(merged)
            left = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write(folder: Path) -> int:
    vocab, merges = build(WORDS)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return len(vocab)


if __name__ == "__main__":
    n = write(Path(__file__).parent / "tiny" / "tokenizer")
    print(f"wrote tokenizer with {n} tokens")
