"""Generation from a module (prompts, lengths, candidates) and the generate command's settings,
checked before any checkpoint is read."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lmlab.data.tokenizers import byte_tokenizer
from lmlab.errors import ConfigError
from lmlab.generate import generate
from lmlab.train import build

from .conftest import command_cfg

SMALL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.max_seq_len=32"]


def module_and_tokenizer(compose_cfg, family: str):
    tok = byte_tokenizer(4)
    cfg = compose_cfg(f"model={family}", *SMALL)
    module = build(cfg.model, vocab_size=tok.vocab_size, special_ids=tok.special, optim={})
    module.set_token_bytes(tok.token_bytes())
    return module.eval(), tok


def test_a_long_prompt_keeps_its_end_and_leaves_room_for_the_new_tokens(compose_cfg, caplog):
    """32 positions, 20 new tokens: the prompt keeps its last 16 (it kept 31, leaving one new
    token); room is left for at most half the positions, so a short prompt is never cut."""
    module, tok = module_and_tokenizer(compose_cfg, "decoder")
    prompt = "abcdefghij" * 5  # 50 byte tokens
    fed = []
    generate_ids = module.backbone.generate

    def spy(x, *args, **kwargs):
        fed.append(x[0].tolist())
        return generate_ids(x, *args, **kwargs)

    module.backbone.generate = spy
    (text,) = module.generate_text(tok, [prompt], max_new_tokens=20, temperature=0.0)
    assert fed == [tok.encode(prompt)[-16:]]
    assert "the prompt is 50 tokens" in caplog.text and "its last 16 are used" in caplog.text
    assert text.startswith(prompt)
    caplog.clear()
    module.generate_text(tok, ["ROMEO:"], max_new_tokens=120, temperature=0.0)
    assert fed[-1] == tok.encode("ROMEO:") and not caplog.text


@pytest.mark.parametrize("family", ["encoder", "encoder_decoder"])
def test_a_prompt_beyond_the_encoders_positions_is_a_clear_error(compose_cfg, family):
    module, tok = module_and_tokenizer(compose_cfg, family)
    with pytest.raises(ConfigError, match=r"the prompt is 4\d tokens .* max_seq_len=32; shorten"):
        module.generate_text(tok, ["word " * 8 + "<|mask|> <extra_id_0>"], max_new_tokens=4)


def test_fill_mask_never_proposes_special_tokens_even_for_a_large_top_k(compose_cfg):
    module, tok = module_and_tokenizer(compose_cfg, "encoder")
    top, prob = module.predict_masked([tok.cls_id, 65, tok.mask_id, 66, tok.sep_id], top_k=10_000)
    assert top.shape[1] == 256  # the byte tokens; the specials (zero probability) are left out
    assert not set(top.flatten().tolist()) & set(tok.special_ids)
    assert prob.sum(-1).tolist() == pytest.approx([1.0] * 5, abs=1e-5)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"top_p": 0}, r"top_p must be in \(0, 1\] or null, got 0"),
        ({"temperature": -1}, r"temperature must be a finite number >= 0"),
        ({"top_k": 0}, r"top_k must be a whole number >= 1 or null"),
        ({"max_new_tokens": -1}, r"max_new_tokens=-1 must be a whole number >= 0"),
        ({"num_samples": 0}, r"num_samples=0 must be a whole number >= 1"),
        ({"prompt": "caf\udce9"}, r"the prompt is not valid UTF-8 text"),
    ],
)
def test_generate_settings_are_checked_before_the_checkpoint_is_read(settings, message):
    cfg = command_cfg("generate", ckpt_path="/nonexistent/last.ckpt", device="cpu", **settings)
    with pytest.raises(ConfigError, match=message):
        generate(cfg)


def test_generate_takes_a_number_or_null_as_a_prompt(compose_cfg, tmp_path, monkeypatch):
    """Hydra reads prompt=1984 as an int and prompt=null as None; both are text to the command."""
    import lmlab.generate as command

    module, tok = module_and_tokenizer(compose_cfg, "decoder")
    monkeypatch.setattr(command, "load_run", lambda path, device: (module, tok, None))
    for prompt, start in ((1984, "1984"), (None, "")):
        cfg = command_cfg("generate", ckpt_path="x", device="cpu", prompt=prompt, max_new_tokens=3)
        assert OmegaConf.select(cfg, "prompt") == prompt
        (text,) = generate(cfg)
        assert text.startswith(start)
