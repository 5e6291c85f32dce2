"""``python -m lmlab [group=option ...] [key=value ...]``: train one model (or a sweep with ``-m``).

Returns the value of ``optimized_metric`` (default ``val/bpb``) so Hydra sweepers can minimise it; a
name that lmlab does not report (``lmlab.sweep.METRICS``) is refused before any training. A
preemption stops a run, a search, or a whole sweep, with status 0 and how to resume it.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lmlab.errors import ConfigError, NonFiniteLoss, Preempted
from lmlab.paths import CONF_DIR

log = logging.getLogger("lmlab")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lmlab.sweep import check_optimized_metric, record_preempted
    from lmlab.train import train

    # Lightning attaches its own console handler at import; Hydra's root handler already prints
    # (and writes <run dir>/__main__.log), so drop Lightning's to avoid every line appearing twice.
    # (Lightning 2.6 attaches it to "lightning", earlier releases to the two below.)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
    log.info("Config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    metric = cfg.get("optimized_metric")
    if cfg.get("hparams_search"):
        from lmlab.search import run_search

        try:
            return run_search(cfg)["value"]
        except ConfigError as e:
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                raise  # Hydra records the job as failed and runs the others (as below)
            log.error("%s", e)
            sys.exit(2)
        except Preempted as e:
            log.warning("%s", e)
            sys.exit(0)  # a clean stop, as for one run: re-running the search resumes it
        except KeyboardInterrupt as e:
            log.warning("%s", e or "search interrupted")
            sys.exit(130)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        # In a sweep, errors must reach Hydra as exceptions: it records the job as failed and runs
        # the others (sys.exit would end the whole sweep). A bad metric name fails every job at
        # once, before any training.
        check_optimized_metric(metric, cfg=cfg)
        try:  # a job a resumed sweep finds finished (ckpt_path=auto) returns its summary at once
            metrics, _ = train(cfg)
        except Preempted as e:
            # ... except a preemption, which must end the whole sweep: the scheduler kills the
            # process soon, so a next job would die mid-step, and nothing would resume this one.
            log.warning("%s", record_preempted(e))
            sys.exit(0)  # a clean stop, as for one run: re-running the sweep resumes it
        return metrics.get(metric or "")
    try:
        check_optimized_metric(metric, cfg=cfg)
        metrics, _ = train(cfg)
    except ConfigError as e:
        log.error("%s", e)
        sys.exit(2)
    except NonFiniteLoss as e:
        log.error("%s", e)
        sys.exit(1)
    except Preempted as e:
        log.warning("%s", e)
        sys.exit(0)  # a clean stop: the scheduler's requeue (or you) resumes it
    return metrics.get(metric or "")


if __name__ == "__main__":
    main()
