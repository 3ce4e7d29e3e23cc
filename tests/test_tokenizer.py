"""CLIPTokenizer against transformers' CLIPTokenizer built from the same vocabulary and merges.

transformers 5's CLIPTokenizer (the `tokenizers`-backed one) normalises with NFC, whitespace
collapse and lower-case, like OpenAI CLIP without ftfy, but it does not html-unescape and it
matches `<|endoftext|>` written in a prompt before lower-casing. minivid follows the original
CLIP code in both places; the strings where that matters are listed in HTML_STRINGS and
test_uppercase_special_token, and checked against what original CLIP produces.
"""
import html
import json
import logging

import pytest
import torch

from minivid.tokenizer import EOT, SOT, VOCAB_SIZE, CLIPTokenizer, bytes_to_unicode, clean_text, load_bpe

STRINGS = [
    "", " ", "a photo of a cat", "A Photo Of A CAT", "  leading and trailing   spaces  ",
    "tabs\tand\nnewlines\r\nmixed", "multiple     spaces between words",
    "an astronaut riding a horse on mars, highly detailed, 8k, trending on artstation",
    "it's a dog's life", "don't won't can't shouldn't", "we're they've I'm you'll she'd",
    "rock'n'roll", "'quoted' \"double quoted\"", "IT'S LOUD", "o'clock",
    "1234567890", "3.14159 pi", "year 2024, 60fps, 4k uhd", "1st 2nd 3rd 4th", "-42 +7 1e-5 0x1F",
    "hello, world!", "wait... what?!", "(parentheses) [brackets] {braces} <angles>",
    "email@example.com http://example.com/path?x=1&y=2", "snake_case kebab-case CamelCase",
    "#hashtag @mention $100 50% ^caret ~tilde `backtick`", "a/b\\c|d", "***bold*** __under__",
    "café naïve résumé façade", "Ünïcödé ÀÉÎÕÜ", "straße Ärger Übermut", "crème brûlée",
    "e\u0301 decomposed accent", "ǅ title-case digraph",
    "emoji 😀🎉🚀", "family 👨\u200d👩\u200d👧\u200d👦 zwj", "flags 🇫🇷🇯🇵", "thumbs 👍🏽 skin tone",
    "日本語のテキスト", "中文测试 汉字", "한국어 텍스트", "mixed 日本 and english",
    "русский текст", "ελληνικά ΣΟΦΙΑ", "עברית", "العربية", "हिन्दी", "ไทย",
    "ﬁ ligature", "ｆｕｌｌｗｉｄｔｈ", "curly ’quotes’ “double”", "em—dash en–dash",
    "non\u00a0breaking\u2009thin\u3000ideographic spaces", "zero\u200bwidth",
    "a photo<|endoftext|>of", "<|startoftext|>start",
    "ALLCAPS SHOUTING", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "supercalifragilisticexpialidocious",
    "a " * 100, "word, " * 60, "the quick brown fox jumps over the lazy dog " * 5, "🎉" * 30,
]
# CLIP html-unescapes (twice); transformers does not: compare with the oracle on unescaped text.
HTML_STRINGS = ["tom &amp; jerry", "&lt;3 &gt;_&lt;", "&amp;amp; double", "it&#39;s &quot;fine&quot;", "&nbsp;nbsp&nbsp;"]


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    """vocab.json + merges.txt (transformers' format) written from the shipped gz."""
    d = tmp_path_factory.mktemp("clip_bpe")
    vocab, merges = load_bpe()
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def oracle(bpe_files):
    """transformers' tokenizer (pads with <|endoftext|>, as SD 1.x)."""
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    return HFCLIPTokenizer(vocab=str(bpe_files / "vocab.json"), merges=str(bpe_files / "merges.txt"))


@pytest.fixture(scope="module")
def toks():
    return {"end": CLIPTokenizer(pad="end"), "zero": CLIPTokenizer(pad="zero")}


def oracle_ids(oracle, text, pad="end"):
    """The oracle's ids; for pad="zero" (open_clip.tokenize) its padding positions become 0.
    (transformers with pad_token="!" would also split a literal '!' out of the text.)"""
    enc = oracle(text, padding="max_length", max_length=77, truncation=True)
    ids, mask = torch.tensor(enc.input_ids), torch.tensor(enc.attention_mask)
    return ids.masked_fill(mask == 0, 0) if pad == "zero" else ids


def test_vocabulary_layout():
    vocab, merges = load_bpe()
    assert len(vocab) == VOCAB_SIZE and len(merges) == 49152 - 256 - 2
    assert vocab["<|startoftext|>"] == SOT == 49406 and vocab["<|endoftext|>"] == EOT == 49407
    chars = list(bytes_to_unicode().values())
    assert [vocab[c] for c in chars] == list(range(256))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256          # printable bytes first, then '</w>' copies
    assert vocab["".join(merges[0])] == 512


def test_known_ids():
    """Ids every CLIP user has seen: 'a photo of a cat'."""
    ids = CLIPTokenizer()("a photo of a cat")
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]


@pytest.mark.parametrize("pad", ["end", "zero"])
@pytest.mark.parametrize("text", STRINGS, ids=range(len(STRINGS)))
def test_matches_transformers(toks, oracle, text, pad):
    ours = toks[pad](text)
    assert ours.shape == (1, 77) and ours.dtype == torch.long
    assert torch.equal(ours[0], oracle_ids(oracle, text, pad))


@pytest.mark.parametrize("text", HTML_STRINGS)
def test_html_entities_unescaped_like_clip(toks, oracle, text):
    ours = toks["end"](text)[0]
    assert torch.equal(ours, oracle_ids(oracle, html.unescape(html.unescape(text))))
    assert not torch.equal(ours, oracle_ids(oracle, text))    # the documented difference


def test_uppercase_special_token():
    """Original CLIP lower-cases before finding special tokens: '<|ENDOFTEXT|>' is the end token."""
    ids = CLIPTokenizer()("<|ENDOFTEXT|> upper")[0].tolist()
    assert ids[:5] == [SOT, EOT, 7067, EOT, EOT]


def test_padding_modes(toks):
    end, zero = toks["end"]("a red car")[0], toks["zero"]("a red car")[0]
    n = int((end != EOT).sum()) + 1                                  # tokens up to and including the end token
    assert torch.equal(end[:n], zero[:n]) and end[n - 1] == EOT
    assert (end[n:] == EOT).all() and (zero[n:] == 0).all()


def test_truncation_warns(caplog):
    tok = CLIPTokenizer(pad="zero")
    with caplog.at_level(logging.WARNING, logger="minivid.tokenizer"):
        ids = tok(["tiny", "word " * 100])
    assert ids.shape == (2, 77)
    assert ids[1, 0] == SOT and ids[1, -1] == EOT and (ids[1, 1:-1] != 0).all()
    assert len(caplog.records) == 1 and "25 were dropped from prompt 1" in caplog.records[0].getMessage()


def test_short_max_length():
    ids = CLIPTokenizer(max_length=5)("one two three four")
    assert ids[0].tolist() == [SOT, *CLIPTokenizer().encode("one two three")[:3], EOT]


def test_encode_decode_roundtrip():
    tok = CLIPTokenizer()
    text = "a watercolor painting of 3 foxes in the snow, café au lait, 日本"
    ids = tok.encode(text)
    assert SOT not in ids and EOT not in ids
    assert tok.decode(ids) == "a watercolor painting of 3 foxes in the snow , café au lait , 日本"
    assert tok.decode(tok(text)[0]) == tok.decode(ids)                 # start/end/padding dropped
    assert tok.decode(CLIPTokenizer(pad="zero")(text)[0]) == tok.decode(ids)


def test_clean_text():
    assert clean_text("  A&amp;amp;B \t\n C  ") == "a&b c"
    assert clean_text("e\u0301") == "\u00e9"


def test_errors():
    with pytest.raises(ValueError, match="pad"):
        CLIPTokenizer(pad="left")
    with pytest.raises(ValueError, match="max_length"):
        CLIPTokenizer(max_length=1)
    tok = CLIPTokenizer()
    with pytest.raises(TypeError):
        tok(["ok", 3])
    with pytest.raises(TypeError):
        tok.encode(None)
    with pytest.raises(ValueError, match="one sequence"):
        tok.decode(torch.zeros(2, 77, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([SOT, 60000, EOT])
