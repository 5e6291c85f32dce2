"""Generation from a module (prompts, lengths, candidates) and the generate command's settings,
checked before any checkpoint is read."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf, open_dict

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


def served_by_generate(compose_cfg, monkeypatch, family: str):
    """(module, tokenizer) of ``family``, which `python -m lmlab.generate` (``generate(cfg)``)
    then loads from any ckpt_path."""
    import lmlab.generate as command

    module, tok = module_and_tokenizer(compose_cfg, family)
    monkeypatch.setattr(command, "load_run", lambda path, device: (module, tok, None))
    monkeypatch.setattr(command, "model_class", lambda path: type(module))
    return module, tok


def test_a_long_prompt_keeps_its_end_and_leaves_room_for_the_new_tokens(compose_cfg, caplog):
    """32 positions, 20 new tokens: the prompt keeps its last 16 (it kept 31, leaving one new
    token); room is left for at most half the positions, so a short prompt is never cut."""
    module, tok = module_and_tokenizer(compose_cfg, "decoder")
    prompt = "abcdefghij" * 5  # 50 byte tokens
    fed = []
    generate_ids = module.backbone.generate

    def spy(x, *args, **kwargs):
        fed.append(x[0].tolist())
        return generate_ids(x, *args, **kwargs | {"eos_id": None})  # never stopped by eos

    module.backbone.generate = spy
    (text,) = module.generate_text(tok, [prompt], max_new_tokens=20, temperature=0.0)
    assert fed == [tok.encode(prompt)[-16:]]
    assert "the prompt is 50 tokens" in caplog.text and "its last 16 are used" in caplog.text
    # half the positions are left for new tokens: 16 of the 20 asked for
    assert "the model's 32 positions ended after 16 of the 20 new tokens" in caplog.text
    assert text.startswith(prompt)
    caplog.clear()
    module.generate_text(tok, ["ROMEO:", "ROMEO", ""], max_new_tokens=120, temperature=0.0)
    assert fed[-1] == [tok.eos_id] and not caplog.text  # said once per model (first figures)

    def fresh_model(generate):
        fresh, _ = module_and_tokenizer(compose_cfg, "decoder")
        fresh.backbone.generate = generate
        return fresh

    fresh_model(spy).generate_text(tok, ["ROMEO:"], max_new_tokens=120, temperature=0.0)
    assert fed[-1] == tok.encode("ROMEO:") and "the prompt is" not in caplog.text
    assert "the model's 32 positions ended after 26 of the 120 new tokens asked for" in caplog.text
    caplog.clear()
    fresh_model(spy).generate_text(tok, ["ROMEO:"], max_new_tokens=26, temperature=0.0)  # fits
    assert not caplog.text
    # a row that ends on eos at the last position stopped on its own: nothing to say
    ended = lambda x, n, **kw: torch.cat([x, torch.full((1, 32 - x.shape[1]), tok.eos_id)], 1)
    fresh_model(ended).generate_text(tok, ["ROMEO:"], max_new_tokens=120, temperature=0.0)
    assert not caplog.text


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


def test_fill_mask_fills_each_mask_with_the_most_likely_text_token(compose_cfg):
    torch.manual_seed(0)
    module, tok = module_and_tokenizer(compose_cfg, "encoder")
    ids = [tok.cls_id, 65, tok.mask_id, 66, tok.mask_id, tok.sep_id]
    top, prob = module.predict_masked(ids, top_k=4)
    with torch.no_grad():
        logits = module.backbone(torch.tensor([ids]))[0, :, : tok.vocab_size].float()
    logits[:, tok.special_ids] = float("-inf")
    assert torch.equal(top[:, 0], logits.argmax(-1))
    torch.testing.assert_close(prob, logits.softmax(-1).gather(1, top))
    assert (prob[:, :-1] >= prob[:, 1:]).all()  # best first
    (text,) = module.fill_mask(tok, ["A<|mask|>B<|mask|>"], top_k=4)
    filled = tok.decode([65, int(top[2, 0]), 66, int(top[4, 0])])
    assert text.startswith(filled + "\n")  # (the filled tokens may be line breaks themselves)
    first_mask = text[len(filled) + 1 :].split("\n")[0]  # candidates' reprs escape line breaks
    assert first_mask.startswith("  mask at token 1: ") and first_mask.count(", ") == 3  # top_k


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_the_commands_sampling_settings_reach_the_sampler(compose_cfg, monkeypatch, family):
    """temperature, top_k and top_p of `python -m lmlab.generate` are what every decoding step
    samples with."""
    import lmlab.nn.sampling as sampling

    served_by_generate(compose_cfg, monkeypatch, family)
    seen, sample = [], sampling.sample_next

    def spy(logits, **settings):
        seen.append({k: settings[k] for k in ("temperature", "top_k", "top_p")})
        return sample(logits, **settings)

    monkeypatch.setattr(sampling, "sample_next", spy)
    settings = dict(temperature=0.7, top_k=3, top_p=0.9)
    prompt = "ab" if family == "decoder" else "a <extra_id_0> b"
    cfg = command_cfg("generate", ckpt_path="x", device="cpu", prompt=prompt, max_new_tokens=4)
    with open_dict(cfg):
        cfg.update(settings)
    generate(cfg)
    assert seen and all(s == settings for s in seen)


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_the_commands_seed_decides_the_samples(compose_cfg, monkeypatch, family):
    """seed=7 samples the same texts every time, other texts than seed=0 (temperature 1)."""
    torch.manual_seed(0)
    served_by_generate(compose_cfg, monkeypatch, family)
    prompt = "ab" if family == "decoder" else "a <extra_id_0> b"

    def texts(seed: int) -> list[str]:
        cfg = command_cfg("generate", ckpt_path="x", device="cpu", prompt=prompt, seed=seed)
        with open_dict(cfg):
            cfg.update(temperature=1.0, max_new_tokens=12, num_samples=3)
        return generate(cfg)

    assert texts(7) == texts(7)
    assert texts(7) != texts(0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"top_p": 0}, r"top_p must be in \(0, 1\] or null, got 0"),
        ({"temperature": -1}, r"temperature must be a finite number >= 0"),
        ({"top_k": 0}, r"top_k must be a whole number >= 1 or null"),
        ({"max_new_tokens": -1}, r"max_new_tokens=-1 must be a whole number >= 0"),
        ({"num_samples": 0}, r"num_samples=0 must be a whole number >= 1"),
        ({"seed": None}, r"seed=None must be a whole number >= 0"),  # was a torch traceback
        ({"seed": "abc"}, r"seed='abc' must be a whole number >= 0"),
        ({"seed": True}, r"seed=True must be a whole number >= 0"),
        ({"prompt": "caf\udce9"}, r"the prompt is not valid UTF-8 text"),
        # a misspelt key added with "+" (as Hydra advises) generated from the empty prompt
        (
            {"promt": "hello"},
            r"promt is not a setting of python -m lmlab.generate; did you mean prompt",
        ),
    ],
)
def test_generate_settings_are_checked_before_the_checkpoint_is_read(settings, message):
    cfg = command_cfg("generate", ckpt_path="/nonexistent/last.ckpt", device="cpu", **settings)
    with pytest.raises(ConfigError, match=message):
        generate(cfg)


def test_generate_takes_a_number_or_null_as_a_prompt(compose_cfg, tmp_path, monkeypatch):
    """Hydra reads prompt=1984 as an int and prompt=null as None; both are text to the command."""
    served_by_generate(compose_cfg, monkeypatch, "decoder")
    for prompt, start in ((1984, "1984"), (None, "")):
        cfg = command_cfg("generate", ckpt_path="x", device="cpu", prompt=prompt, max_new_tokens=3)
        assert OmegaConf.select(cfg, "prompt") == prompt
        (text,) = generate(cfg)
        assert text.startswith(start)


def test_decoder_generation_never_samples_special_tokens_but_eos(compose_cfg):
    """An early model gives the specials (sentinels, mask, pad) probability: samples.txt showed
    <extra_id_73> in the text. Here every special id has by far the highest logit."""
    module, tok = module_and_tokenizer(compose_cfg, "decoder")
    specials = [i for i in tok.special_ids if i != tok.eos_id]
    next_logits = module.backbone.next_logits

    def favour_specials(tokens, caches, prefix_len=None):
        logits = next_logits(tokens, caches, prefix_len)
        logits[:, specials] = 1e4
        return logits

    module.backbone.next_logits = favour_specials
    sampled = []
    generate_ids = module.backbone.generate
    module.backbone.generate = lambda *a, **kw: (
        sampled.append(generate_ids(*a, **kw)) or sampled[-1]
    )
    module.generate_text(tok, ["ab"], max_new_tokens=12, temperature=1.0)
    new = sampled[0][0, 2:].tolist()
    assert new and not set(new) & set(specials)
    greedy = module.backbone.generate(
        torch.tensor([tok.encode("ab")]), 4, temperature=0.0, suppress=specials[1:]
    )
    assert greedy[0, 2:].tolist() == [specials[0]] * 4  # only the listed ids are suppressed


def test_a_list_of_prompts_is_required_and_numbers_are_text(compose_cfg):
    """sample.prompts=ROMEO: gave one prompt per character; [1984] and null failed at the first
    validation, before its checkpoint was written."""
    from lmlab.train import check_optim_and_sampling

    cfg = compose_cfg()
    for bad in ("ROMEO:", [["a"]], [True]):
        OmegaConf.update(cfg, "sample.prompts", bad, merge=False)
        with pytest.raises(ConfigError, match=r"sample.prompts=.* must be a list of texts"):
            check_optim_and_sampling(cfg)
    for good in (["ROMEO:", ""], [1984], [], None):
        OmegaConf.update(cfg, "sample.prompts", good, merge=False)
        check_optim_and_sampling(cfg)
    module, tok = module_and_tokenizer(compose_cfg, "decoder")
    (text,) = module.samples(tok, None, prompts=OmegaConf.create([1984]), max_new_tokens=2)
    assert text.startswith("1984")
    assert module.samples(tok, None, prompts=None, max_new_tokens=2) == []


def test_reconstructions_are_cut_with_their_targets_and_say_so(compose_cfg, tmp_path):
    """A denoising target is the whole window: cut to sample.max_new_tokens, the generation could
    never reach the target's rest (the target was shown whole); now both are cut, and the target
    says it was."""
    from lmlab.data.denoise import DenoisingDataModule
    from lmlab.data.store import build_store

    module, tok = module_and_tokenizer(compose_cfg, "encoder_decoder")
    text = "The quick brown fox jumps over the lazy dog. " * 20  # no line breaks
    val = build_store(iter([text]), tok, tmp_path, "v")
    dm = DenoisingDataModule(tok, None, val, seq_len=24, batch_size=2)
    short = module.samples(tok, dm, max_new_tokens=5)
    assert len(short) == 2
    for text in short:
        target = text.split("\n")[1]
        assert target.endswith("[first 5 of 23 tokens: sample.max_new_tokens]")
        assert len(target.removeprefix("target:   ").split(" [first")[0]) == 5  # byte tokens
    whole = module.samples(tok, dm, max_new_tokens=100)  # the target's 23 tokens and eos fit
    assert all("[first" not in text for text in whole)
    assert all(len(text.split("\n")[1]) == len("target:   ") + 23 for text in whole)
    none = module.samples(tok, dm, max_new_tokens=0)
    assert all(text.endswith("generated:") for text in none)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", r"device='gpu' is not a device; use auto, cpu, cuda or cuda:N"),
        ("tpu", r"device='tpu' is not a device"),
        ("cuda:x", r"device='cuda:x' is not a device"),
        ("cuda:1", r"device=cuda:1 but this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_a_device_that_is_not_one_is_refused_before_the_checkpoint_is_read(
    command, device, message, monkeypatch
):
    """device=gpu ran evaluate on the CPU without a word (and generate failed after loading);
    cuda:1 ran evaluate on GPU 0."""
    from lmlab.evaluate import evaluate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = command_cfg(command, ckpt_path="/nonexistent/last.ckpt", device=device)
    with pytest.raises(ConfigError, match=message):
        (generate if command == "generate" else evaluate)(cfg)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        # Hydra parses these: str() of what it made is not what was typed
        ({"prompt": ["a", "b"]}, r"prompt=\['a', 'b'\] is not text as typed .* 'prompt=\"...\"'"),
        ({"prompt": True}, r"prompt=True is not text as typed"),
        ({"prompt": 3.1}, r"prompt=3.1 is not text as typed"),
        ({"ckpt_path": "last"}, r"ckpt_path=last names a run's own checkpoint in training only"),
        ({"ckpt_path": "null"}, r"ckpt_path is required: .* \(not None\)"),  # a TypeError
        ({"ckpt_path": 123}, r"ckpt_path is required: .* \(not 123\)"),
    ],
)
def test_generate_refuses_what_it_would_misread(settings, message):
    cfg = command_cfg("generate", **{"ckpt_path": "/nonexistent/last.ckpt", **settings})
    with open_dict(cfg):
        cfg.device = "cpu"
    with pytest.raises(ConfigError, match=message):
        generate(cfg)


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_a_run_folder_or_no_checkpoint_is_one_clear_error(command, tmp_path):
    """A run folder named for its checkpoint was "a folder but not a sharded checkpoint"; no
    ckpt_path at all was a MissingMandatoryValue traceback."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmlab.evaluate import evaluate
    from lmlab.paths import CONF_DIR

    run = generate if command == "generate" else evaluate
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    cfg = command_cfg(command, ckpt_path=str(tmp_path), device="cpu")
    with pytest.raises(
        ConfigError,
        match=rf"is a run folder, not a checkpoint: pass ckpt_path={tmp_path}/checkpoints/last.ckpt",
    ):
        run(cfg)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        bare = compose(command)
    GlobalHydra.instance().clear()
    with pytest.raises(
        ConfigError, match=rf"ckpt_path is required: python -m lmlab.{command} ckpt_path="
    ):
        run(bare)


def test_an_encoder_refuses_a_prompt_without_a_mask(compose_cfg):
    """It used to return the prompt as it was: nothing to fill, and no word why."""
    module, tok = module_and_tokenizer(compose_cfg, "encoder")
    with pytest.raises(ConfigError, match=r"prompt='To be' has no <\|mask\|>: an encoder fills"):
        module.generate_text(tok, ["To be"])
    (text,) = module.generate_text(tok, ["To <|mask|>"], top_k=2)
    assert "mask at token 3: " in text


def test_an_encoder_warns_of_the_sampling_settings_it_does_not_read(
    compose_cfg, monkeypatch, caplog
):
    """Fill-mask reads top_k alone: a temperature, a seed or more samples gave the same text
    without a word. Said before the weights load; the decoder reads them all."""
    import logging

    served_by_generate(compose_cfg, monkeypatch, "encoder")
    prompt = "a <|mask|> b"
    said = r"not read by this checkpoint's model \(EncoderLM, whose generation takes top_k only\)"
    for settings, named in (
        ({"temperature": 1.0}, "temperature=1.0"),
        ({"seed": 3, "num_samples": 2}, "seed=3, num_samples=2"),
        ({"max_new_tokens": 5, "top_k": 3}, "max_new_tokens=5"),
    ):
        caplog.clear()
        cfg = command_cfg("generate", ckpt_path="x", device="cpu", prompt=prompt, **settings)
        with caplog.at_level(logging.WARNING, logger="lmlab"):
            texts = generate(cfg)
        assert re.search(f"{named}: {said}", caplog.text), caplog.text
        assert len(set(texts)) == 1  # num_samples=2: the same text twice, as the warning says
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        generate(command_cfg("generate", ckpt_path="x", device="cpu", prompt=prompt, top_k=3))
    assert "not read" not in caplog.text
    served_by_generate(compose_cfg, monkeypatch, "decoder")
    cfg = command_cfg("generate", ckpt_path="x", device="cpu", prompt="ab", temperature=1.0)
    with open_dict(cfg):
        cfg.update(seed=3, num_samples=2, max_new_tokens=4)
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        assert len(generate(cfg)) == 2
    assert "not read" not in caplog.text
