from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from lmlab.data.store import build_store
from lmlab.data.tokenizers import (
    SPECIAL_TOKENS,
    TextTokenizer,
    build_tokenizer,
    byte_tokenizer,
    load_pretrained,
    sentinel,
    train_bpe,
    word_starts,
)
from lmlab.errors import ConfigError

from .conftest import make_text

SAMPLE = "Thou art 'tis — naïve café ✓ 日本\n\n  spaced  out\t<|eos|> literally"


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([make_text(3000, i) for i in range(4)], vocab_size=400, num_sentinels=8)


def test_byte_tokenizer_round_trip_and_ids():
    tok = byte_tokenizer(num_sentinels=4)
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8"))  # id = byte value
    assert tok.decode(ids) == SAMPLE
    assert tok.vocab_size == 256 + 6 + 4
    assert [tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.cls_id, tok.sep_id] == list(
        range(256, 262)
    )
    assert tok.sentinel_ids == [262, 263, 264, 265]


def test_bpe_round_trip_specials_and_size(bpe):
    assert bpe.vocab_size <= 400  # the tiny corpus may run out of pairs to merge first
    ids = bpe.encode(SAMPLE)
    assert bpe.decode(ids) == SAMPLE
    # special tokens are never produced from plain text, even when the text spells them
    assert bpe.eos_id not in ids
    assert len(bpe.sentinel_ids) == 8
    assert bpe.decode([bpe.sentinel_ids[3]]) == sentinel(3)
    assert set(bpe.special.values()) | set(bpe.sentinel_ids) <= set(bpe.special_ids)
    # merges were learnt: common words are shorter than their bytes
    assert len(bpe.encode("the king and the queen")) < len("the king and the queen")


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_token_bytes_sum_to_utf8_length(which, bpe):
    tok = bpe if which == "bpe" else byte_tokenizer(4)
    tb = tok.token_bytes()
    assert len(tb) == tok.vocab_size
    assert sum(tb[i] for i in tok.encode(SAMPLE)) == len(SAMPLE.encode("utf-8"))
    assert all(tb[i] == 0 for i in tok.special_ids)


def test_pretrained_file_round_trip(tmp_path, bpe):
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    tok = load_pretrained(path)
    assert tok.special == bpe.special and tok.sentinel_ids == bpe.sentinel_ids
    assert tok.encode(SAMPLE) == bpe.encode(SAMPLE)


def test_pretrained_truncation_and_padding_are_switched_off(tmp_path, bpe):
    # Common in tokenizer.json files exported from transformers: kept, they would cut every
    # document of the token store to max_length and pad the short ones.
    tk = Tokenizer.from_str(bpe.to_str())
    tk.enable_truncation(max_length=8)
    tk.enable_padding(pad_id=bpe.pad_id, pad_token=SPECIAL_TOKENS["pad"])
    path = tmp_path / "tokenizer.json"
    tk.save(str(path))
    tok = load_pretrained(path)
    assert tok.tk.truncation is None and tok.tk.padding is None
    texts = ["a", SAMPLE]
    assert tok.encode_batch(texts) == [bpe.encode(t) for t in texts]
    store = build_store(iter(texts), tok, tmp_path, "k")
    assert store.tokens.tolist() == [i for t in texts for i in (*bpe.encode(t), bpe.eos_id)]


def wordpiece(words: list[str], normalize: bool = False) -> tuple[Tokenizer, TextTokenizer]:
    """A BERT-style tokenizer over ``words`` (the first five are its specials)."""
    tk = Tokenizer(models.WordPiece({t: i for i, t in enumerate(words)}, unk_token="[UNK]"))
    if normalize:
        tk.normalizer = normalizers.BertNormalizer()
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    tk.add_special_tokens(words[:5])
    return tk, TextTokenizer(tk, "pretrained")


def test_wordpiece_word_starts_are_the_pieces_without_hashes():
    # BERT-style: every piece not continuing a word ("##...") begins one, even between two words
    # of letters, which hold no space to tell them apart.
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "the",
        "quick",
        "fox",
        "jump",
        "##s",
        ".",
    ]
    tk, tok = wordpiece(words, normalize=True)
    ids = np.array([tok.cls_id, *tok.encode("the quick fox jumps."), tok.sep_id])
    assert [tk.id_to_token(int(i)) for i in ids[1:-1]] == words[5:]  # the pieces after the specials
    special = np.zeros(tok.vocab_size, dtype=bool)
    special[tok.special_ids] = True
    got = word_starts(ids, tok.word_start_table(), special)
    assert got.astype(int).tolist() == [1, 1, 1, 1, 1, 0, 1, 1]


def test_pretrained_missing_specials_are_added(tmp_path):
    tk = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2, "</s>": 3}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["</s>"])
    path = tmp_path / "wl.json"
    tk.save(str(path))
    tok = load_pretrained(path)
    assert tok.eos_id == tok.sep_id == 3  # found by their usual spelling (RoBERTa-style)
    assert tok.vocab_size == 4 + 4  # pad, bos, mask, cls appended
    assert tok.tk.id_to_token(tok.mask_id) == SPECIAL_TOKENS["mask"]


def test_pretrained_sentinels_are_the_files_own_or_appended_up_to_num_sentinels(
    tmp_path, compose_cfg
):
    """A GPT-2- or Llama-style tokenizer.json has no T5 sentinels: span corruption with it is
    refused before any data work, naming tokenizer.num_sentinels, which appends them (it had no
    effect on pretrained files, though the message named it)."""
    from lmlab.train import check_settings

    tk = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "wl.json"
    tk.save(str(path))
    cfg = OmegaConf.create({"kind": "pretrained", "path": str(path), "num_sentinels": None})
    tok = build_tokenizer(cfg, list, "fp", tmp_path)
    assert tok.sentinel_ids == [] and tok.vocab_size == 3 + len(SPECIAL_TOKENS)
    cfg.num_sentinels = 5
    tok = build_tokenizer(cfg, list, "fp", tmp_path)
    first = 3 + len(SPECIAL_TOKENS)
    assert tok.sentinel_ids == list(range(first, first + 5)) and tok.vocab_size == first + 5
    assert tok.tk.id_to_token(tok.sentinel_ids[-1]) == sentinel(4)
    again = TextTokenizer.from_str(tok.to_str(), "checkpoint")  # the run's tokenizer.json
    assert again.sentinel_ids == tok.sentinel_ids and again.special == tok.special
    cfg.num_sentinels = 2  # fewer than the file (here: the saved run's) has: kept as they are
    saved = tmp_path / "run.json"
    tok.save(saved)
    cfg.path = str(saved)
    assert build_tokenizer(cfg, list, "fp", tmp_path).sentinel_ids == tok.sentinel_ids

    span = ["model=encoder_decoder", "objective=span", "tokenizer=pretrained", "seq_len=64"]
    with pytest.raises(ConfigError, match=r"but the tokenizer has 0 .* tokenizer\.num_sentinels>="):
        check_settings(compose_cfg(*span, f"tokenizer.path={path}"))
    check_settings(compose_cfg(*span, f"tokenizer.path={path}", "tokenizer.num_sentinels=100"))
    with pytest.raises(ConfigError, match=r"tokenizer\.num_sentinels=-1 is not a whole number"):
        check_settings(compose_cfg(*span, f"tokenizer.path={path}", "tokenizer.num_sentinels=-1"))


def test_pretrained_errors(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer file not found"):
        load_pretrained(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"is not a Hugging Face tokenizer\.json"):
        load_pretrained(bad)
    cfg = OmegaConf.create({"kind": "pretrained", "path": None})
    with pytest.raises(ConfigError, match=r"needs tokenizer\.path"):
        build_tokenizer(cfg, list, "fp", tmp_path)


def test_bpe_vocab_too_small_is_refused():
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size=300 is too small"):
        train_bpe(["abc"], vocab_size=300, num_sentinels=100)


def test_trained_bpe_is_cached(tmp_path):
    cfg = OmegaConf.create(
        {"kind": "bpe", "vocab_size": 300, "num_sentinels": 2, "min_frequency": 2}
    )
    calls = []

    def texts():
        calls.append(1)
        return [make_text(500, 0)]

    a = build_tokenizer(cfg, texts, "corpus-1", tmp_path)
    b = build_tokenizer(cfg, texts, "corpus-1", tmp_path)
    assert len(calls) == 1 and a.to_str() == b.to_str()
    build_tokenizer(cfg, texts, "corpus-2", tmp_path)  # another corpus trains again
    assert len(calls) == 2
    # min_frequency reaches the trainer (a merge needs that many occurrences: fewer merges) and
    # the cache key (another setting trains again)
    cfg.min_frequency = 50
    rare = build_tokenizer(cfg, texts, "corpus-1", tmp_path)
    assert len(calls) == 3
    assert rare.tk.get_vocab_size() < a.tk.get_vocab_size() == 300


def test_byte_scale_is_one_when_the_pieces_spell_the_text_and_corrects_wordpiece(tmp_path):
    """Bits per byte divide by counted bytes x TokenStore.byte_scale: over the whole split, the
    text's own bytes. Byte-level BPE and the byte tokenizer spell the text exactly (scale 1);
    WordPiece pieces hold no spaces, so their counts fall short by the spaces."""
    texts = [make_text(300, i) for i in range(3)]
    for name, tok in (
        ("bpe", train_bpe(texts, vocab_size=400, num_sentinels=0)),
        ("byte", byte_tokenizer(0)),
    ):
        store = build_store(iter(texts), tok, tmp_path, name)
        assert store.byte_scale(tok.token_bytes()) == 1.0
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "##s", "."]
    _, tok = wordpiece(words)
    text = "the cats sat. the cat sat."  # 26 bytes; the pieces spell 21 of them (no spaces)
    store = build_store(iter([text]), tok, tmp_path, "wordpiece")
    assert int(tok.token_bytes()[store.tokens].sum()) == 21
    assert store.byte_scale(tok.token_bytes(), chunk=4) == pytest.approx(26 / 21)


def test_a_role_goes_to_a_special_token_never_to_an_ordinary_piece(tmp_path):
    """The file's eos is the special "<eos>"; "</s>" and "<s>" are ordinary pieces, which text
    spells: they were taken for eos, cls and sep (the first alias found anywhere)."""
    from tokenizers import AddedToken

    vocab = {
        "<pad>": 0,
        "<eos>": 1,
        "<bos>": 2,
        "<unk>": 3,
        "<mask>": 4,
        "a": 5,
        "</s>": 6,
        "<s>": 7,
    }
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(
        [AddedToken(t, special=True) for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")]
    )
    path = tmp_path / "wl.json"
    tk.save(str(path))
    tok = load_pretrained(path)
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.mask_id) == (0, 1, 2, 4)
    assert tok.tk.id_to_token(tok.cls_id) == SPECIAL_TOKENS["cls"]  # appended, not "<s>"
    assert tok.tk.id_to_token(tok.sep_id) == SPECIAL_TOKENS["sep"]
    assert tok.encode("a </s> a") == [5, 6, 5] and not {5, 6} & set(tok.special_ids)


@pytest.mark.parametrize("vocab", [{"[UNK]": 0, "a": 1, "b": 70000}, {"[UNK]": 0, "a": 1, "b": 4}])
def test_a_vocabulary_with_gaps_in_its_ids_is_refused(tmp_path, vocab):
    """Id 70000 was stored as 4464 (uint16 chosen from the count) and bits per byte failed after
    the whole corpus was tokenized; in a gap below the largest id the appended pad and bos took
    the ids of "b" and the next token."""
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "gaps.json"
    tk.save(str(path))
    largest = max(vocab.values())
    with pytest.raises(ConfigError, match=rf"with gaps \(no id 2; the largest is {largest}\)"):
        load_pretrained(path)


def test_added_tokens_count_their_own_bytes_and_keep_lines_apart_only_without_stripping(bpe):
    """A byte-level tokenizer's added tokens hold plain text: "café" counted 4 bytes (é read as
    one of GPT-2's byte characters). A non-special added token that takes in the spaces before it
    (lstrip, as RoBERTa's <mask>) sees another neighbour where the store cuts a document."""
    from tokenizers import AddedToken

    tok = TextTokenizer(Tokenizer.from_str(bpe.to_str()), "pretrained")
    tok.tk.add_tokens(["café", "über"])
    tb = tok.token_bytes()
    text = "a café über"
    assert sum(tb[i] for i in tok.encode(text)) == len(text.encode("utf-8"))
    assert tb[tok.tk.token_to_id("café")] == 5
    assert tok.encodes_lines_apart  # plain added tokens are cut like any text
    tok.tk.add_tokens([AddedToken("<tag>", lstrip=True, special=False)])
    assert not TextTokenizer(tok.tk, "pretrained").encodes_lines_apart


def test_text_spelling_a_special_piece_of_the_model_is_stored_as_unknown(tmp_path, caplog):
    """A SentencePiece Unigram file (T5, ALBERT) holds "</s>" and "<pad>" as pieces of its model
    too: text that spells them (HTML's strikethrough </s>) was stored as a document end inside the
    document, whatever the added-token matcher does."""
    import logging

    from tokenizers import AddedToken

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), ("a", -3.0), ("b", -3.0)]
    vocab += [("<", -4.0), ("/", -4.0), ("s", -4.0), (">", -4.0), ("▁a", -2.5), ("▁b", -2.5)]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "</s>", "<unk>")])
    path = tmp_path / "unigram.json"
    tk.save(str(path))
    tok = load_pretrained(path)
    assert (tok.eos_id, tok.pad_id, tok.unk_id) == (1, 0, 2)
    assert tok.encode("a</s>b") == [10, 1, 5]  # the model's own choice
    with caplog.at_level(logging.WARNING, logger="lmlab.data.store"):
        store = build_store(iter(["a</s>b<pad>", "ab"]), tok, tmp_path, "k")
    assert store.tokens.tolist() == [10, 2, 5, 2, 1, 10, 5, 1]  # eos only at the documents' ends
    assert "('</s>' x1, '<pad>' x1); stored as its unknown token" in caplog.text
    caplog.clear()
    unknown = build_store(iter(["a c"]), tok, tmp_path, "k2")  # "c": the model's own <unk>
    assert tok.unk_id in unknown.tokens.tolist() and not caplog.text
