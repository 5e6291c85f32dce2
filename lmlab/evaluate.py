"""``python -m lmlab.evaluate ckpt_path=… [data=files data.val=…]``: loss, perplexity, bits per byte.

Evaluates a checkpoint over a whole validation split (by default the run's own) with the run's
tokenizer and objective, prints the metrics and writes them as JSON next to the run.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from lmlab.checkpoint import check_command_keys, load_run, read_checkpoint, run_info
from lmlab.data.corpus import check_data, make_corpus
from lmlab.data.store import build_store, store_key
from lmlab.errors import ConfigError, show_warnings
from lmlab.generate import pick_device
from lmlab.parallel import use_tf32
from lmlab.paths import CONF_DIR
from lmlab.train import build, check_objective, check_val_docs

log = logging.getLogger("lmlab")


def check_settings(cfg: DictConfig) -> None:
    """The command's own keys and numbers, before the checkpoint loads."""
    check_command_keys(cfg, "evaluate")
    for key in ("seq_len", "batch_size", "limit_batches"):
        value = cfg.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ConfigError(f"{key}={value!r} must be a whole number >= 1, or null")
    if not isinstance(cfg.get("document_mask"), bool | None):  # `1 in (True,)` holds
        raise ConfigError(f"document_mask={cfg.document_mask!r} must be true, false or null")


def objective_of(cfg: DictConfig, run_cfg: DictConfig) -> DictConfig:
    """The run's objective config with every setting's value (a run from before a setting existed
    gets its default), and evaluate's ``document_mask`` in place of the run's where it is given:
    the objectives that take it score with or without document masks whichever way the model was
    trained; ``true`` is refused by the others (``false`` changes nothing there). Checked, as
    training checks it, against the data and ``seq_len`` evaluate reads (a run's objective that
    needs pairs of texts or tables is refused other data before the data is read)."""
    own = get_class(run_cfg.objective._target_).objective_settings()
    defaults = {k: v for k, v in own.items() if v is not inspect.Parameter.empty}
    objective = OmegaConf.merge(defaults, run_cfg.objective)
    if cfg.get("document_mask") is not None:
        if "document_mask" in own:
            objective = OmegaConf.merge(objective, {"document_mask": cfg.document_mask})
        elif cfg.document_mask:
            raise ConfigError(
                f"document_mask=true: the run's objective={run_cfg.objective.name} has no "
                "document masks (clm, prefix_lm, mlm, capital_word and tlm have); leave it null"
            )
    checked = OmegaConf.create(OmegaConf.to_container(run_cfg, resolve=True))  # never struct
    checked.objective = objective
    if cfg.get("data") is not None:
        checked.data = cfg.data
    checked.seq_len = cfg.get("seq_len") or run_cfg.seq_len
    check_objective(checked, data_key="data.val")  # what the class itself refuses
    return objective


def output_path(cfg: DictConfig, data_name: str) -> Path:
    """Where the metrics go: ``output_file``, else ``evaluate-<data name>.json`` in the run folder
    of a ``<run>/checkpoints/`` checkpoint (beside any other); its folder must exist before any
    work."""
    if cfg.output_file:
        out = Path(cfg.output_file).expanduser()
    else:
        ckpt = Path(cfg.ckpt_path).expanduser().resolve()
        run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        out = run / f"evaluate-{data_name}.json"
    if not out.parent.is_dir():
        raise ConfigError(
            f"the metrics would go to {out}, but {out.parent} is not a folder; create it or pass "
            "output_file=<path>"
        )
    return out


def evaluate(cfg: DictConfig) -> dict[str, float]:
    check_settings(cfg)
    device = pick_device(cfg.device)
    # the checks first, from the checkpoint's settings (its tensors mapped, not read)
    saved = run_info(read_checkpoint(cfg.ckpt_path, weights=False), cfg.ckpt_path)
    run_cfg = OmegaConf.create(saved["lmlab"]["config"])
    max_len = saved["hyper_parameters"].get("max_seq_len")
    if cfg.seq_len and max_len is not None and cfg.seq_len > max_len:
        raise ConfigError(
            f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={max_len} (its positions); "
            f"use seq_len<={max_len}, or null for the run's own ({run_cfg.seq_len})"
        )
    objective = objective_of(cfg, run_cfg)
    if cfg.get("data") is not None:
        check_data(cfg.data, sizes=False)  # evaluate's own batch_size decides
    data_cfg = cfg.data if cfg.get("data") is not None else run_cfg.data
    out = output_path(cfg, data_cfg.name)
    module, tokenizer, _ = load_run(cfg.ckpt_path, "cpu")
    corpus = make_corpus(data_cfg, need_train=False)
    if cfg.get("data") is None:  # the run's own data: its held-out documents, unless they changed
        check_val_docs(module.extra_checkpoint, corpus.identity(corpus.val), cfg.ckpt_path)
    cache = Path(cfg.paths.cache_dir)
    key = store_key(corpus.fingerprint(corpus.val), tokenizer)
    total = corpus.total_bytes(corpus.val)
    val = build_store(
        corpus.texts(corpus.val), tokenizer, cache, key, total_bytes=total, label="val"
    )
    seq_len = cfg.seq_len or run_cfg.seq_len
    dm = build(  # the run's objective with its settings (mask rate, noise density, ...)
        objective,
        tokenizer=tokenizer,
        train=None,
        val=val,
        seq_len=seq_len,
        # as the run validated (limit_batches then scores the same windows)
        batch_size=cfg.batch_size or run_cfg.data.get("eval_batch_size") or run_cfg.data.batch_size,
        num_workers=0,
        seed=run_cfg.seed,
    )
    module.set_token_bytes(tokenizer.token_bytes(), val.byte_scale(tokenizer.token_bytes()))
    use_tf32(run_cfg.get("tf32", False))  # as the run validated (runs from before the key: fp32)
    trainer = L.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=[int(device.partition(":")[2] or 0)] if device.startswith("cuda") else 1,
        precision=run_cfg.trainer.get("precision", "32-true"),  # as the run validated
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=cfg.limit_batches or 1.0,
    )
    (raw,) = trainer.validate(module, dataloaders=dm.val_dataloader(), verbose=False)
    metrics = {k.removeprefix("val/"): float(v) for k, v in raw.items()}
    metrics.update(  # the split's size; with limit_batches only the first `batches` were scored
        tokens=float(len(val)),
        bytes=float(val.n_bytes),
        documents=float(val.n_docs),
        seq_len=float(seq_len),
        batches=float(trainer.num_val_batches[0]),
        whole_split=float(trainer.num_val_batches[0] >= len(dm.val_dataloader())),
    )
    # what was scored, beside the scores: another evaluation on the same data option's name writes
    # the same file
    scored = {
        "checkpoint": str(cfg.ckpt_path),
        "data": data_record(OmegaConf.to_container(data_cfg, resolve=True)),
        "objective": OmegaConf.to_container(objective, resolve=True),
        "batch_size": dm.eval_batch_size,
    }
    replaced = _read_json(out) or {}
    if isinstance(replaced.get("data"), dict):  # files from before the loader keys were dropped
        replaced["data"] = data_record(replaced["data"])
    for key in ("data", "objective"):  # files from before a key was written: not compared
        if replaced.get(key, scored[key]) != scored[key]:
            log.warning("%s held an evaluation on other %s (%s): replaced", out, key, replaced[key])
    out.write_text(json.dumps({**metrics, **scored}, indent=2, sort_keys=True))
    metrics["output_file"] = str(out)
    return metrics


LOADER_SIZES = ("batch_size", "eval_batch_size", "num_workers")


def data_record(data: dict) -> dict:
    """The data settings an evaluation records: what was read, without the loader's sizes, which
    evaluate's own ``batch_size`` decides (recorded beside them)."""
    return {k: v for k, v in data.items() if k not in LOADER_SIZES}


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    show_warnings()
    with open_dict(cfg):
        cfg.paths.output_dir = "."
    try:
        m = evaluate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    split = f"{int(m['tokens'])} tokens, {int(m['bytes'])} bytes"
    scored = (
        f"whole split: {split}"
        if m["whole_split"]
        else (f"first {int(m['batches'])} batches of the split's {split}")
    )
    print(
        f"loss {m['loss']:.4f}  perplexity {m['ppl']:.3f}  bits/byte {m['bpb']:.4f}  "
        f"({scored}) -> {m['output_file']}"
    )
    log.debug(OmegaConf.to_yaml(cfg))


if __name__ == "__main__":
    main()
