"""Tokenizers built on Hugging Face ``tokenizers``: trained byte-level BPE, raw bytes, or any tokenizer.json.

Every tokenizer carries the special tokens all objectives need, reserved from the start so a vocabulary
never has to change between pre-training objectives: pad, bos, eos, mask, cls, sep and the T5 sentinels
``<extra_id_0>`` ... (Raffel et al., 2020). ``token_bytes`` gives the UTF-8 length of every token, which
the bits-per-byte metric divides by so runs with different tokenizers compare fairly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmlab.errors import ConfigError

log = logging.getLogger(__name__)

# role -> token text for the tokenizers lmlab builds itself
SPECIAL_TOKENS = {
    "pad": "<|pad|>",
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "mask": "<|mask|>",
    "cls": "<|cls|>",
    "sep": "<|sep|>",
}
# spellings of each role found in common pretrained tokenizer.json files (first match wins)
PRETRAINED_ALIASES = {
    "pad": ["<|pad|>", "<pad>", "[PAD]", "<|padding|>"],
    "bos": ["<|bos|>", "<s>", "<|begin_of_text|>", "<bos>", "[CLS]"],
    "eos": ["<|eos|>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]"],
    "mask": ["<|mask|>", "<mask>", "[MASK]"],
    "cls": ["<|cls|>", "[CLS]", "<cls>", "<s>"],
    "sep": ["<|sep|>", "[SEP]", "<sep>", "</s>"],
}


def _byte_class(b: int) -> int:
    """0 whitespace, 1 letter (ASCII letters and every non-ASCII byte), 2 digit, 3 other."""
    if chr(b).isspace() and b < 0x80:
        return 0
    if b >= 0x80 or chr(b).isalpha():
        return 1
    return 2 if chr(b).isdigit() else 3


def word_starts(ids: np.ndarray, table: np.ndarray, special: np.ndarray) -> np.ndarray:
    """Bool per position: does this token begin a new word?

    A token begins a word when its table row says it always does (it starts with whitespace, or it
    is a WordPiece piece without ``##``), when its first character's class differs from the previous
    token's last (letters -> punctuation, ...), after a special token, or at the start. A single space
    attaches to the word that follows it (GPT-2's `` ?\\p{L}+``), and WordPiece ``##`` pieces always
    continue.
    """
    t = table[ids]
    starts = np.ones(len(ids), dtype=bool)
    if len(ids) > 1:
        prev_last, first = t[:-1, 2], t[1:, 1]
        after_space = (t[:-1, 4] == 1) & (first != 0)
        same_class = (first == prev_last) | after_space
        starts[1:] = (t[1:, 0] == 1) | ~same_class | special[ids[:-1]]
        starts[1:] &= t[1:, 3] == 0
    return starts | special[ids]


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, as used by ``ByteLevel``."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


BYTE_TO_CHAR = _bytes_to_unicode()
BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte pieces
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


@dataclass
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids of lmlab's special-token roles."""

    tk: Tokenizer
    kind: str = "bpe"

    def __post_init__(self) -> None:
        # A role goes to a special token of the file, the first of the role's spellings it has;
        # never to an ordinary piece of that spelling (a file whose eos is the special "<eos>" may
        # also hold a piece "</s>", which text can spell): a role without one is appended below.
        specials = {
            t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if t.special
        }
        self.special: dict[str, int] = {}
        for role in SPECIAL_TOKENS:
            found = [specials[n] for n in PRETRAINED_ALIASES[role] if n in specials]
            if found:
                self.special[role] = found[0]
        self.sentinel_ids: list[int] = []
        while (i := self.tk.token_to_id(sentinel(len(self.sentinel_ids)))) is not None:
            self.sentinel_ids.append(i)
        missing = [r for r in SPECIAL_TOKENS if r not in self.special]
        if missing:
            # Pretrained files lacking a role get it appended, so every objective has what it needs.
            self.tk.add_special_tokens([SPECIAL_TOKENS[r] for r in missing])
            for r in missing:
                self.special[r] = self.tk.token_to_id(SPECIAL_TOKENS[r])
        self._token_bytes: np.ndarray | None = None
        self._no_length_limits()
        # Text that happens to spell a special token ("<|eos|>") is encoded as plain text: only lmlab
        # itself inserts special ids, so corpora cannot forge document boundaries or masks.
        self.tk.encode_special_tokens = True

    def add_sentinels(self, n: int) -> None:
        """Append T5 sentinels ``<extra_id_i>`` as special tokens until there are ``n`` (a
        pretrained file may have fewer, or none; span corruption needs one per noise span)."""
        new = [sentinel(i) for i in range(len(self.sentinel_ids), n)]
        if new:
            self.tk.add_special_tokens(new)
            self.sentinel_ids += [self.tk.token_to_id(t) for t in new]
            self._token_bytes = None

    def _no_length_limits(self) -> None:
        """Switch off the truncation and padding a tokenizer.json may carry (common in exports from
        ``transformers``): lmlab encodes whole documents into the token store and cuts and pads
        windows itself, so either would silently cut every document or fill the store with pads."""
        for setting, switch_off in (
            ("truncation", self.tk.no_truncation),
            ("padding", self.tk.no_padding),
        ):
            if getattr(self.tk, setting) is not None:
                log.info(
                    "Tokenizer: switched off the file's %s (lmlab makes its own windows)", setting
                )
                switch_off()

    # -- ids -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    pad_id = property(lambda self: self.special["pad"])
    bos_id = property(lambda self: self.special["bos"])
    eos_id = property(lambda self: self.special["eos"])
    mask_id = property(lambda self: self.special["mask"])
    cls_id = property(lambda self: self.special["cls"])
    sep_id = property(lambda self: self.special["sep"])

    @property
    def special_ids(self) -> list[int]:
        """Every id that is not text: the roles, the sentinels and any other added special token."""
        ids = set(self.special.values()) | set(self.sentinel_ids)
        ids |= {i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        return sorted(ids)

    @property
    def unk_id(self) -> int | None:
        """The model's id for unknown text, if it has one."""
        model = json.loads(self.to_str())["model"]
        if model.get("unk_id") is not None:  # Unigram
            return model["unk_id"]
        return self.tk.token_to_id(model["unk_token"]) if model.get("unk_token") else None

    # -- text ------------------------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; with ``allow_special`` the special tokens it spells (``<|mask|>``,
        ``<extra_id_0>``) become their ids (for prompts; corpora never get this)."""
        if not allow_special:
            return self.tk.encode(text, add_special_tokens=False).ids
        self.tk.encode_special_tokens = False
        try:
            return self.tk.encode(text, add_special_tokens=False).ids
        finally:
            self.tk.encode_special_tokens = True

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- bytes -----------------------------------------------------------------------------------
    def token_bytes(self) -> np.ndarray:
        """UTF-8 byte length of each token id (0 for special tokens), shape (vocab_size,).

        Byte-level tokenizers map exactly through GPT-2's byte table. Others (SentencePiece-style
        files) count the bytes of the piece with ``▁`` as a space and ``<0xNN>`` as one byte.
        """
        if self._token_bytes is not None:
            return self._token_bytes
        out = np.zeros(self.vocab_size, dtype=np.int64)
        specials = set(self.special_ids)
        added = set(self.tk.get_added_tokens_decoder())  # ids whose text is as it is, not mapped
        byte_level = isinstance(self.tk.decoder, decoders.ByteLevel)
        for tok, i in self.tk.get_vocab(with_added_tokens=True).items():
            if i in specials:
                continue
            if i in added:
                out[i] = len(tok.encode("utf-8"))
            elif byte_level and all(c in CHAR_TO_BYTE for c in tok):
                out[i] = len(tok)
            elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                out[i] = 1
            else:
                out[i] = len(tok.replace("▁", " ").removeprefix("##").encode("utf-8"))
        self._token_bytes = out
        return out

    def word_start_table(self) -> np.ndarray:
        """Per token id, as int8 columns: [always begins a word, class of first byte, class of last
        byte, is a continuation piece ("##…"), ends with a plain space]; classes 0 whitespace,
        1 letter, 2 digit, 3 other.

        :func:`word_starts` turns these into word boundaries that match the byte-level (GPT-2)
        pre-tokenizer's pieces, so whole-word masking can work on token ids alone. A token always
        begins a word when it starts with whitespace; with a WordPiece model (BERT), whose pieces
        hold no spaces, when it is not a ``##`` continuation: its pre-tokenizer cut the text there.
        """
        if getattr(self, "_word_table", None) is not None:
            return self._word_table
        table = np.zeros((self.vocab_size, 5), dtype=np.int8)
        added = set(self.tk.get_added_tokens_decoder())  # ids whose text is as it is, not mapped
        byte_level = isinstance(self.tk.decoder, decoders.ByteLevel)
        wordpiece = isinstance(self.tk.model, models.WordPiece)
        for tok, i in self.tk.get_vocab(with_added_tokens=True).items():
            if i in added:
                raw = tok.encode("utf-8")
            elif byte_level and all(c in CHAR_TO_BYTE for c in tok):
                raw = bytes(CHAR_TO_BYTE[c] for c in tok)
            else:
                raw = tok.replace("▁", " ").removeprefix("##").encode("utf-8")
            if not raw:
                continue
            table[i] = (
                _byte_class(raw[0]) == 0 or (wordpiece and not tok.startswith("##")),
                _byte_class(raw[0]),
                _byte_class(raw[-1]),
                tok.startswith("##"),
                raw[-1] == 0x20,
            )
        self._word_table = table
        return table

    def raw_texts(self) -> list[str | None]:
        """Per token id, the text the token stands for as it stands in the vocabulary (None for
        added tokens and SentencePiece byte-fallback pieces "<0xNN>"): a byte-level token's bytes
        (decoded with ``surrogateescape``, so a piece of a UTF-8 character keeps its byte), a
        SentencePiece piece with "▁" as a space, a WordPiece piece with its "##". Unlike decoding
        one token alone, nothing is dropped: "▁The" and "The" stay apart."""
        out: list[str | None] = [None] * self.vocab_size
        added = set(self.tk.get_added_tokens_decoder())
        byte_level = isinstance(self.tk.decoder, decoders.ByteLevel)
        for tok, i in self.tk.get_vocab(with_added_tokens=False).items():
            if i in added or i >= self.vocab_size or BYTE_FALLBACK.fullmatch(tok):
                continue
            if byte_level and all(c in CHAR_TO_BYTE for c in tok):
                out[i] = bytes(CHAR_TO_BYTE[c] for c in tok).decode("utf-8", "surrogateescape")
            else:
                out[i] = tok.replace("▁", " ")
        return out

    @property
    def encodes_lines_apart(self) -> bool:
        """Whether encoding a text cut at line starts that begin a non-space character, piece by
        piece, gives exactly the ids of encoding it whole (:func:`lmlab.data.store._pieces`).

        True for a GPT-2 style byte-level pre-tokenizer without a normalizer or a prefix space (its
        regex never makes a pre-token span such a cut) and for lmlab's byte tokenizer (no regex, no
        merges: one token per byte). Not for others: a SentencePiece-style ``Metaspace`` adds a
        "▁" at the start of every piece, a prepending normalizer likewise, and merges across lines
        are possible without the regex. Non-special added tokens that hold a newline could also be
        cut apart, and those that take in the spaces around them (``lstrip`` / ``rstrip``) or match
        whole words only (``single_word``) see other neighbours at a cut.
        """
        pre = self.tk.pre_tokenizer
        if self.tk.normalizer is not None or not isinstance(pre, pre_tokenizers.ByteLevel):
            return False
        if pre.add_prefix_space:
            return False
        added = self.tk.get_added_tokens_decoder().values()
        if any(
            "\n" in t.content or t.lstrip or t.rstrip or t.single_word
            for t in added
            if not t.special
        ):
            return False
        return pre.use_regex or self._has_no_merges()

    def _has_no_merges(self) -> bool:
        model = json.loads(self.to_str())["model"]
        return model.get("type") == "BPE" and not model.get("merges")

    # -- persistence -----------------------------------------------------------------------------
    def to_str(self) -> str:
        return self.tk.to_str()

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_str().encode()).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.to_str())
        os.replace(tmp, path)

    @classmethod
    def from_str(cls, s: str, kind: str = "pretrained") -> TextTokenizer:
        return cls(Tokenizer.from_str(s), kind)


def _special_list(num_sentinels: int) -> list[str]:
    return list(SPECIAL_TOKENS.values()) + [sentinel(i) for i in range(num_sentinels)]


def byte_tokenizer(num_sentinels: int = 100) -> TextTokenizer:
    """256 byte tokens (ids 0-255 = the byte values) followed by the special tokens."""
    vocab = {BYTE_TO_CHAR[b]: b for b in range(256)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(_special_list(num_sentinels))
    return TextTokenizer(tk, "byte")


def _check_bpe_vocab(vocab_size: int, num_sentinels: int) -> None:
    need = 256 + len(_special_list(num_sentinels))
    if vocab_size < need:
        raise ConfigError(
            f"tokenizer.vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens "
            f"plus {need - 256} special tokens; use at least {need} (or fewer tokenizer.num_sentinels)"
        )


def train_bpe(
    texts: Iterable[str], vocab_size: int, num_sentinels: int = 100, min_frequency: int = 2
) -> TextTokenizer:
    """Train a GPT-2 style byte-level BPE; ``vocab_size`` includes the 256 bytes and the specials."""
    specials = _special_list(num_sentinels)
    _check_bpe_vocab(vocab_size, num_sentinels)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    return TextTokenizer(tk, "bpe")


def load_pretrained(path: str | os.PathLike) -> TextTokenizer:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"tokenizer file not found: {p}. Pass tokenizer.path=<path to a Hugging Face "
            "tokenizer.json> (or use tokenizer=bpe / tokenizer=byte)"
        )
    try:
        tk = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ConfigError(
            f"{p} is not a Hugging Face tokenizer.json file ({e}). Save one with "
            "`tokenizer.save('tokenizer.json')` or `AutoTokenizer...backend_tokenizer.save(...)`"
        ) from None
    ids = sorted(set(tk.get_vocab(with_added_tokens=True).values()))
    if ids != list(range(len(ids))):
        # Ids above the count were stored wrapped (uint16) and broke bits per byte after the whole
        # corpus was tokenized; appended special tokens took ids that text tokens use in a gap.
        gap = next(i for i, v in enumerate(ids) if v != i)
        raise ConfigError(
            f"{p} numbers its {len(ids)} tokens with gaps (no id {gap}; the largest is {ids[-1]}): "
            "lmlab needs the ids 0..n-1; renumber the vocabulary, or train one (tokenizer=bpe)"
        )
    return TextTokenizer(tk, "pretrained")


def check_tokenizer(cfg) -> None:
    """The tokenizer settings' own errors, raised before any data is read (``lmlab.train`` calls
    this with the other settings checks): an unknown kind, a pretrained tokenizer without a
    readable file, a BPE vocabulary too small for the bytes and the special tokens."""
    whole = {
        "bpe": ("vocab_size", "num_sentinels", "min_frequency"),
        "byte": ("num_sentinels",),
        "pretrained": ("num_sentinels",),  # null there: the file's own
    }
    own = {kind: ("kind", *keys) for kind, keys in whole.items()}
    own["pretrained"] += ("path",)
    every = {key for keys in own.values() for key in keys}
    unknown = sorted(set(cfg) - every)
    if unknown:
        raise ConfigError(
            f"tokenizer.{unknown[0]} is not a setting of any tokenizer; tokenizer={cfg.get('kind')}'s "
            f"settings are {', '.join(own.get(cfg.get('kind'), sorted(every)))}"
        )
    for key in sorted(set(cfg) - set(own.get(cfg.get("kind"), every))):
        # another kind's (an experiment's vocab_size under tokenizer=pretrained): harmless
        log.warning(
            "tokenizer.%s is a setting of another tokenizer kind; tokenizer=%s does not use it",
            key,
            cfg.kind,
        )
    for key in whole.get(cfg.kind, ()):
        value = cfg.get(key)
        if value is None and cfg.kind == "pretrained":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"tokenizer.{key}={value!r} is not a whole number >= 0")
    if cfg.kind == "pretrained":
        _pretrained(cfg)
    elif cfg.kind == "bpe":
        _check_bpe_vocab(cfg.vocab_size, cfg.num_sentinels)
    elif cfg.kind != "byte":
        raise ConfigError(
            f"unknown tokenizer.kind={cfg.kind!r}; choose one of bpe, byte, pretrained"
        )


def _pretrained(cfg) -> TextTokenizer:
    """The tokenizer file, with sentinels appended up to ``tokenizer.num_sentinels`` (null: as is)."""
    if not cfg.get("path"):
        raise ConfigError("tokenizer=pretrained needs tokenizer.path=<path to tokenizer.json>")
    tok = load_pretrained(cfg.path)
    tok.add_sentinels(cfg.get("num_sentinels") or 0)
    return tok


def sentinel_count(cfg) -> int:
    """How many T5 sentinels the tokenizer that ``cfg`` (the ``tokenizer`` group) builds has."""
    if cfg.get("kind") == "pretrained":
        return len(_pretrained(cfg).sentinel_ids)
    return cfg.get("num_sentinels") or 0


def build_tokenizer(
    cfg, train_texts: Callable[[], Iterable[str]], corpus_fingerprint: str, cache_dir: str | Path
) -> TextTokenizer:
    """Build the tokenizer named by ``cfg.kind``; a trained BPE is cached by corpus and settings."""
    kind = cfg.kind
    if kind == "byte":
        return byte_tokenizer(cfg.num_sentinels)
    if kind == "pretrained":
        return _pretrained(cfg)
    check_tokenizer(cfg)  # an unknown kind, a vocabulary too small: before any training
    key = hashlib.sha256(
        f"bpe|{corpus_fingerprint}|{cfg.vocab_size}|{cfg.num_sentinels}|{cfg.min_frequency}".encode()
    ).hexdigest()[:16]
    path = Path(cache_dir) / "tokenizers" / f"bpe-{cfg.vocab_size}-{key}.json"
    if path.is_file():
        log.info("Tokenizer: cached BPE %s", path)
        return TextTokenizer(Tokenizer.from_file(str(path)), "bpe")
    log.info("Tokenizer: training byte-level BPE (vocab %d) on the training split", cfg.vocab_size)
    tok = train_bpe(train_texts(), cfg.vocab_size, cfg.num_sentinels, cfg.min_frequency)
    tok.save(path)  # processes starting together wait for it: lmlab.train.prepare_data's lock
    return tok
