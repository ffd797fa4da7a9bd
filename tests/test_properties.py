"""Properties that must hold for every input, checked on inputs hypothesis draws (any unicode, empty strings,
control characters, long texts): the tokenizer's truncation and padding, the CLI's reading of input rows,
and the encoder's independence from the other rows of its padded batch."""
import itertools
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers, processors

from minislm import classify
from minislm.encoder.tokenizer import Tokenizer
from minislm.experts import load_expert
from tests.model_folders import make_tiny_folder, tiny_tokenizer
from tests.tolerances import ENCODER_ATOL

# Few examples, no deadline: the whole file stays well under a minute on a shared machine.
FEW = settings(max_examples=40, deadline=None)
FEWER = settings(max_examples=25, deadline=None)

WORDS = [f"w{i}" for i in range(116)]  # the tiny tokenizers' vocabulary (model_folders.tiny_tokenizer)
ODD = ["", " ", "\x00", "\t", "\n", "\r\n", "\x1b", "\x7f", "\u200b", "\ufeff", "\u0301", "\u3000", "\U0001F600",
       "[CLS]", "[SEP]", "<s>", "</s>", "[PAD]", "##", "ß", "İ", "中文"]
# any text a UTF-8 file can hold (no lone surrogates), mixed with known words and characters known to be awkward
pieces = st.one_of(st.text(st.characters(codec="utf-8"), max_size=8), st.sampled_from(WORDS), st.sampled_from(ODD))
any_text = st.lists(pieces, max_size=40).map(" ".join) | st.text(st.characters(codec="utf-8"), max_size=60)


def wordpiece_tokenizer():
    """A BERT-style WordPiece tokenizer (BERT normaliser and pre-tokeniser, ## continuations) over letters and
    digits, built in memory: the same pipeline as the real experts' tokenizer.json, without a download."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = {t: i for i, t in enumerate(specials + chars + ["##" + c for c in chars] + ["the", "news"])}
    tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


@pytest.fixture(scope="module", params=["wordpiece", "bert", "mpnet"])
def tok(request, tmp_path_factory):
    """(Tokenizer with max_len 64, first special id, last special id, vocabulary size)."""
    hf = wordpiece_tokenizer() if request.param == "wordpiece" else tiny_tokenizer(request.param)
    path = tmp_path_factory.mktemp(f"tok-{request.param}") / "tokenizer.json"
    hf.save(str(path))
    pad_id, first, last = (1, 0, 2) if request.param == "mpnet" else (0, 2, 3)
    return Tokenizer.from_file(path, max_len=64, pad_id=pad_id), first, last, hf.get_vocab_size()


@FEW
@given(texts=st.lists(any_text, max_size=6), max_len=st.integers(2, 80))
def test_encode_fits_keeps_special_tokens_and_only_cuts(tok, texts, max_len):
    t, first, last, vocab = tok
    rows = t.encode(texts, max_len)
    assert len(rows) == len(texts)
    limit = min(max_len, t.max_len)
    full_tok = Tokenizer(t.hf, max_len=10_000, pad_id=t.pad_id)  # the same texts, never cut
    for text, row, full in zip(texts, rows, full_tok.encode(texts)):
        assert 2 <= len(row) <= limit
        assert row[0] == first and row[-1] == last            # [CLS] ... [SEP] survive the cut
        assert all(0 <= i < vocab for i in row)
        if len(full) <= limit:
            assert row == full
        else:                                                 # a cut keeps the first tokens, then [SEP]
            assert row[:-1] == full[:limit - 1]
    # a row's ids do not depend on the other texts of the call
    assert rows == [t.encode([x], max_len)[0] for x in texts]


@FEW
@given(texts=st.lists(any_text, max_size=6), max_len=st.integers(2, 80))
def test_padding_and_mask_agree(tok, texts, max_len):
    t, *_ = tok
    rows = t.encode(texts, max_len)
    ids, mask = t.encode_batch(texts, max_len)
    T = max((len(r) for r in rows), default=0)
    assert ids.shape == mask.shape == (len(texts), T) and ids.dtype == np.int64 and mask.dtype == bool
    for b, row in enumerate(rows):
        n = len(row)
        assert mask[b].sum() == n and mask[b, :n].all()       # right padding: real tokens first
        assert ids[b, :n].tolist() == row
        assert (ids[b, n:] == t.pad_id).all()


def test_max_len_below_two_is_refused(tok):
    t, *_ = tok
    with pytest.raises(ValueError, match="max_len=1 leaves no room"):
        t.encode(["w1"], max_len=1)


# --- the CLI's input rows: classify.items and classify.chunks ---

rows_in = st.lists(st.none() | any_text | st.text(" \t\n\r\u3000\x1c\x85", max_size=5), max_size=30)


@FEW
@given(raw=rows_in, limit=st.integers(1, 50))
def test_every_row_gives_one_item_in_order(raw, limit):
    with mock.patch.object(classify, "MAX_TEXT_CHARS", limit):  # a small limit, so cuts are drawn often
        out = list(classify.items(iter(raw)))
    assert len(out) == len(raw)
    for r, (text, note) in zip(raw, out):
        if r is None or all(c.isspace() for c in r):          # nothing to classify: skipped, with a reason
            assert text is None and "empty" in note
        elif len(r) > limit:
            assert text == r[:limit] and f"first {limit:,} characters" in note
        else:
            assert text == r and note == ""


def test_the_real_limit_cuts_long_texts():
    long = "w1 " * (classify.MAX_TEXT_CHARS // 3 + 10)
    (text, note), = classify.items([long])
    assert len(text) == classify.MAX_TEXT_CHARS == 100_000 and long.startswith(text) and "cut" in note


@FEW
@given(xs=st.lists(st.integers(), max_size=60), n=st.integers(1, 12))
def test_chunks_keep_order_and_cover_everything(xs, n):
    got = list(classify.chunks(iter(xs), n))
    assert [x for c in got for x in c] == xs
    assert len(got) == -(-len(xs) // n)                       # ceil: no empty chunk, none missing
    assert all(len(c) == n for c in got[:-1]) and all(1 <= len(c) <= n for c in got)


def test_items_and_chunks_are_lazy():
    # answers stream: the first batch must be ready before the input ends (here it never does)
    endless = (f"w{i % 100}" for i in itertools.count())
    first = next(classify.chunks(classify.items(endless), 5))
    assert [t for t, _ in first] == ["w0", "w1", "w2", "w3", "w4"]


# --- the encoder: a text's hidden states do not depend on its batch-mates ---

@pytest.fixture(scope="module", params=["bert", "mpnet"])
def tiny_expert(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    make_tiny_folder(path, request.param)
    return load_expert(str(path))


word_text = st.lists(st.sampled_from(WORDS + ["unknownword", "W7"]), max_size=75).map(" ".join)


@FEWER
@given(texts=st.lists(word_text, min_size=1, max_size=5), data=st.data())
def test_hidden_states_do_not_depend_on_the_batch(tiny_expert, texts, data):
    enc, t = tiny_expert.encoder, tiny_expert.tokenizer
    ids, mask = t.encode_batch(texts)
    batch = enc.forward(ids, mask)                            # [L+1, B, T, H]
    order = data.draw(st.permutations(range(len(texts))))
    shuffled = enc.forward(*t.encode_batch([texts[i] for i in order]))
    for b, text in enumerate(texts):
        n = int(mask[b].sum())
        alone = enc.forward(*t.encode_batch([text]))[:, 0]
        np.testing.assert_allclose(batch[:, b, :n], alone, atol=ENCODER_ATOL, rtol=0, err_msg="batch vs alone")
        np.testing.assert_allclose(shuffled[:, order.index(b), :n], alone, atol=ENCODER_ATOL, rtol=0,
                                   err_msg="another order")
