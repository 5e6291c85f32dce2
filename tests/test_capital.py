"""Capital-word prediction: lowercased inputs, the case labels of word starts, the token head."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.data.base import Example
from lmlab.data.capital import CapitalWordDataModule, case_tables
from lmlab.data.collate import IGNORE
from lmlab.data.denoise import token_texts
from lmlab.data.store import build_store
from lmlab.data.tokenizers import byte_tokenizer, train_bpe
from lmlab.errors import ConfigError
from lmlab.models.encoder import EncoderLM

from .conftest import make_text, tiny_encoder


@pytest.fixture
def tok():
    return byte_tokenizer(2)


@pytest.fixture
def store(tok, tmp_path):
    return build_store(iter([make_text(400, 0), make_text(300, 1)]), tok, tmp_path, "c")


def test_case_tables_of_the_byte_tokenizer(tok):
    lower, case, blank = case_tables(tok)
    assert lower[ord("A")] == ord("a") and case[ord("A")] == 1
    assert lower[ord("a")] == ord("a") and case[ord("a")] == 0
    for char in " 1.\n":
        assert lower[ord(char)] == ord(char) and case[ord(char)] == IGNORE
    assert blank[ord(" ")] and blank[ord("\n")] and not blank[ord("a")]
    assert case[0xC3] == IGNORE  # a lone UTF-8 lead byte is no letter
    for special in tok.special_ids:
        assert lower[special] == special and case[special] == IGNORE and not blank[special]


def test_case_tables_of_a_trained_bpe_map_each_capital_to_its_lowercase_token(tmp_path):
    text = "The king and the queen. Love is blind; THE END. Love, love.\n" * 50
    tok = train_bpe(iter([text]), vocab_size=300, num_sentinels=2)
    lower, case, _ = case_tables(tok)
    texts = token_texts(tok)
    for t, text in enumerate(texts):
        if case[t] == 1:  # scored capital: its lowercase token spells the same text in lower case
            assert texts[lower[t]] == text.lower() != text
        elif case[t] == 0:
            assert text.lstrip()[0].islower()
        elif lower[t] == t and text.lstrip()[:1].isupper():
            assert text.lower() not in texts  # no lowercase counterpart: not scored
    encoded = tok.encode("The king")
    assert case[encoded[0]] == 1 and texts[lower[encoded[0]]] == texts[encoded[0]].lower()


def test_batches_read_lowercase_score_the_cased_text_and_label_word_starts(tok, store):
    dm = CapitalWordDataModule(tok, store, store, seq_len=32, batch_size=1, mask_prob=0.2)
    text = "Love my Crown. THE end x!"
    ex = Example(0, np.array(tok.encode(text)), store=store)
    batch = dm.make_batch([ex])
    ids = np.array([tok.cls_id, *tok.encode(text), tok.sep_id])
    n = len(ids)
    inputs, labels = batch["input_ids"][0, :n].numpy(), batch["labels"][0, :n].numpy()
    selected = labels != IGNORE
    # the input is the lowercased text, except where masking changed it
    assert tok.decode(inputs[~selected][1:-1].tolist()) == tok.decode(
        [t for t, s in zip(tok.encode(text.lower()), selected[1:-1], strict=True) if not s]
    )
    # the masked LM scores the original (cased) tokens
    assert (labels[selected] == ids[selected]).all() and selected.sum() == round(0.2 * (n - 2))
    # case labels at each word's first letter: "Love", "my", "Crown", "THE", "end", "x"
    case = batch["token_labels"][0, :n].numpy()
    want = np.full(n, IGNORE)
    for i, label in ((1, 1), (6, 0), (9, 1), (16, 1), (20, 0), (24, 0)):
        want[i] = label
    assert case.tolist() == want.tolist(), [tok.decode([int(t)]) for t in ids[case != IGNORE]]
    assert dm.token_labels_of(ex).tolist() == want.tolist()
    assert dm.original_ids(ex).tolist() == ids.tolist()
    # random replacements are lowercase tokens: the input never shows a capital
    lower, _, _ = case_tables(tok)
    assert (lower[dm.random_ids] == dm.random_ids).all()
    assert ord("A") not in dm.random_ids and ord("a") in dm.random_ids


def test_settings_and_model_settings(tok, store):
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ConfigError, match=r"token_weight=.* must be a finite number >= 0"):
            CapitalWordDataModule(tok, store, store, seq_len=32, batch_size=1, token_weight=bad)
    dm = CapitalWordDataModule(tok, store, store, seq_len=32, batch_size=1, token_weight=0.5)
    assert dm.model_settings() == {
        "token_task": "capital_word",
        "token_classes": 2,
        "token_weight": 0.5,
    }


def test_token_head_loss_is_the_cross_entropy_at_the_labelled_positions(tok, store):
    dm = CapitalWordDataModule(tok, store, store, seq_len=32, batch_size=4)
    torch.manual_seed(0)
    m = tiny_encoder(tok, **dm.model_settings())
    starts = range(0, 8 * 30, 30)
    batch = dm.make_batch(
        [Example(s, np.asarray(store.tokens[s : s + 30], np.int64)) for s in starts]
    )
    y = batch["token_labels"]
    m.eval()
    nll, count, _, _, t_nll, t_count, t_correct = m.nll(batch)
    hidden = m.backbone(batch["input_ids"], batch["attention_mask"], head=False)
    logits = m.backbone.token_head(hidden).flatten(0, 1)
    scored = y.flatten() != IGNORE
    assert t_count == int(scored.sum()) > 0 and 0 < int(y[y != IGNORE].sum()) < int(t_count)
    torch.testing.assert_close(t_nll, F.cross_entropy(logits, y.flatten(), reduction="sum"))
    assert t_correct == int((logits.argmax(-1) == y.flatten())[scored].sum())
    m.train()
    loss = m.training_step(dict(batch), 0)
    torch.testing.assert_close(loss, (nll / count + t_nll / t_count).detach(), rtol=1e-5, atol=0)
    assert m.latest_train_metrics()["train/capital_word_loss"] == pytest.approx(
        float(t_nll.detach() / t_count), rel=1e-5
    )
    # FLOPs: 6 x the head's weights at every position
    plain = tiny_encoder(tok)
    assert m.step_flops(batch) - plain.step_flops(batch) == 6 * 2 * 32 * 8 * 32
    again = EncoderLM(**m.hparams)
    assert again.backbone.token_head is not None and again.aux_weights == {"capital_word": 1.0}
    with pytest.raises(
        ValueError, match="token_task='x' and token_classes=0 must be given together"
    ):
        EncoderLM(**{**m.hparams, "token_task": "x", "token_classes": 0})


def test_a_capital_word_run_reports_its_head(tiny_cfg):
    from lmlab.train import train

    metrics, objects = train(tiny_cfg("model=encoder", "objective=capital_word"))
    assert 0 <= metrics["val/capital_word_acc"] <= 1 and metrics["train/capital_word_loss"] > 0
    samples = (objects["output_dir"] / "samples.txt").read_text()
    lines = [line for line in samples.splitlines() if line.startswith("capital_word: ")]
    assert len(lines) == 4  # two samples at each of the two validations
    assert all(
        re.match(r"capital_word: \d+/\d+ right; the model's capitalized: ", x) for x in lines
    )
    # the original lines are the cased text, the masked lines the lowercased input (capitals
    # left only where the vocabulary has no lowercase token)
    upper = lambda prefix: sum(
        c.isupper() for x in samples.splitlines() if x.startswith(prefix) for c in x
    )
    assert upper("masked:") < upper("original:")


def metaspace_tokenizer(text: str, lowercase: bool = False):
    """A SentencePiece-style BPE ("▁" marks a word start), trained on ``text``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from lmlab.data.tokenizers import SPECIAL_TOKENS, TextTokenizer

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    if lowercase:
        tk.normalizer = normalizers.Lowercase()
    specials = ["<unk>", *SPECIAL_TOKENS.values()]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    tk.train_from_iterator([text], trainer)
    return TextTokenizer(tk, "pretrained")


TEXT = "The king and the queen. Love is blind; THE END. So the end, love.\n" * 50


def test_sentencepiece_tokens_keep_their_space_when_lowercased(tmp_path):
    """Decoding "▁The" alone gives "The", as "The" does: looked up by that, "▁The" became "the",
    and the input lost the space before every capitalized word (which also showed the label)."""
    tok = metaspace_tokenizer(TEXT)
    store = build_store(iter([TEXT]), tok, tmp_path, "m")
    dm = CapitalWordDataModule(tok, store, store, seq_len=32, batch_size=1, mask_prob=0.01)
    text = "So The king said The end"
    ex = Example(0, np.array(tok.encode(text)))
    inputs, labels = dm.mask_example(ex)
    selected = labels != IGNORE
    lowered = np.where(selected, dm.lower[dm.original_ids(ex)], inputs)
    assert tok.decode(lowered[1:-1].tolist()) == "So the king said the end"  # "So": no "▁so"
    pieces = [tok.tk.id_to_token(int(t)) for t in ex.tokens]
    case = dm.token_labels_of(ex)[1:-1]
    assert [p for p, c in zip(pieces, case, strict=True) if c == 1] == ["▁The", "▁The"]
    # an uncased tokenizer: nothing is ever capitalized, refused
    uncased = metaspace_tokenizer(TEXT, lowercase=True)
    store = build_store(iter([TEXT]), uncased, tmp_path, "u")
    with pytest.raises(ConfigError, match="no token of this tokenizer is a capitalized word"):
        CapitalWordDataModule(uncased, store, store, seq_len=32, batch_size=1)


def test_words_whose_lowercased_split_is_not_the_tokenizers_own_are_not_scored(tmp_path):
    """ " KING" is " K" "ING", lowercased " k" "ing", where the tokenizer writes " king": that
    split only ever stands for capitals, so the word is left out; " King" -> " king" stays."""
    text = " the king and the King" * 200 + " KING"
    tok = train_bpe(iter([text]), vocab_size=300, num_sentinels=2)
    store = build_store(iter([text]), tok, tmp_path, "k")
    dm = CapitalWordDataModule(tok, store, store, seq_len=32, batch_size=1)
    texts = [tok.decode([t]) for t in tok.encode(" king King KING")]
    assert texts[:2] == [" king", " King"] and len(texts) > 3  # KING is split
    ex = Example(0, np.array(tok.encode(" king King KING")))
    case = dm.token_labels_of(ex)[1:-1]
    assert case[:2].tolist() == [0, 1] and (case[2:] == IGNORE).all()
    assert dm.own_split(tuple(tok.encode(" King"))) and not dm.own_split(tuple(tok.encode(" KING")))


def test_random_replacements_hold_no_capital(tmp_path):
    """Drawn from exactly the text tokens without capitals: a capitalized token without a
    lowercase counterpart (" So" here: the text has no " so") was drawn too, and put capitals
    into the input."""
    tok = train_bpe(iter([TEXT]), vocab_size=300, num_sentinels=2)
    store = build_store(iter([TEXT]), tok, tmp_path, "r")
    dm = CapitalWordDataModule(tok, store, store, seq_len=32, batch_size=1)
    raw = tok.raw_texts()
    want = {t for t, text in enumerate(raw) if text is not None and text == text.lower()}
    assert set(dm.random_ids.tolist()) == want - set(tok.special_ids)
    (so,) = [t for t, text in enumerate(raw) if text == " So"]
    assert dm.lower[so] == so and so not in dm.random_ids  # no " so" token: kept, never drawn


def test_generate_lowercases_the_prompt_of_a_capital_word_model(tok, store):
    dm = CapitalWordDataModule(tok, store, store, seq_len=32, batch_size=1)
    m = tiny_encoder(tok, **dm.model_settings())
    m.set_token_bytes(tok.token_bytes())  # as generate does: which tokens are text
    (text,) = m.generate_text(tok, ["The <|mask|> King"], top_k=2)
    first = text.split("\n")[0]
    assert first.startswith("the ") and first.endswith(" king")
    plain = tiny_encoder(tok)
    plain.set_token_bytes(tok.token_bytes())
    (text,) = plain.generate_text(tok, ["The <|mask|> King"], top_k=2)
    first = text.split("\n")[0]  # (splitlines also cuts at control characters)
    assert first.startswith("The ") and first.endswith(" King")


def test_a_cased_mask_token_stays_in_the_lowercased_prompt():
    """BERT-cased's "[MASK]" was lowercased with the prompt, which then held no mask token."""
    from lmlab.models.encoder import lowercase_text

    from .test_tokenizers import wordpiece

    assert lowercase_text("The [MASK] King [SEP]", ["[MASK]", "[SEP]"]) == "the [MASK] king [SEP]"
    assert lowercase_text("[MASK][MASK] A", ["[MASK]", ""]) == "[MASK][MASK] a"
    _, tok = wordpiece(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "king", "The", "King"])
    m = tiny_encoder(tok, token_task="capital_word", token_classes=2)
    m.set_token_bytes(tok.token_bytes())
    (text,) = m.generate_text(tok, ["The [MASK] King"], top_k=2)
    first = text.split("\n")[0]
    assert first.startswith("the ") and first.endswith(" king")
