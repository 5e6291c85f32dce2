"""lmlab's own callbacks; the rest (checkpoints, learning-rate monitor) are Lightning's.

``Throughput`` is written here rather than taken from Lightning's ``ThroughputMonitor`` because the
latter names its metrics ``train|...`` / ``device|...`` per sample; lmlab reports tokens, under the
slash-named keys every run and report uses (``train/tokens_per_sec``). ``ProgressBar`` is
Lightning's TQDM bar reading the training metrics only when it redraws (see its docstring).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger

from lmlab import flops
from lmlab.parallel import FSDP, any_attention_kernel

log = logging.getLogger(__name__)


class Throughput(L.Callback):
    """Logs ``train/tokens_per_sec`` (all devices together) over a sliding window of steps,
    ``train/mfu`` when the device's peak FLOP/s is known (:mod:`lmlab.flops`) or given (the time
    from a validation's start to the next training step, samples and checkpoints included, is left
    out of the window), and
    ``train/tokens_seen`` (input tokens trained on so far, all devices; also logged with every
    validation, so validation curves can be drawn against it: runs with different batch shapes compare
    by tokens, not steps), on the steps whose metrics Lightning writes (every
    ``trainer.log_every_n_steps``). ``tokens_seen`` is saved in checkpoints and continues on resume."""

    def __init__(self, window: int = 20, peak_flops: float | None = None) -> None:
        self.window, self.peak = window, peak_flops
        self._times: deque[float] = deque(maxlen=window + 1)
        self._tokens: deque[int] = deque(maxlen=window + 1)
        self.tokens_per_sec = float("nan")
        self._paused_at: float | None = None  # when the validation in progress started
        self.tokens_seen = 0
        self._flops_per_token: int | None = None

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))

    def on_train_start(self, trainer, pl_module) -> None:
        self.peak = self.peak or flops.peak_flops(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._times.append(time.perf_counter())
        self._tokens.append(batch["input_ids"].numel() * trainer.world_size)
        self.tokens_seen += self._tokens[-1]
        if len(self._times) > 1:
            # Tokens of the batches that finished after the oldest timestamp, over the time between.
            self.tokens_per_sec = sum(list(self._tokens)[1:]) / (self._times[-1] - self._times[0])
        # Logged only on the steps whose metrics Lightning writes (every trainer.log_every_n_steps,
        # as its own LearningRateMonitor and ThroughputMonitor do): `log` turns a number into a
        # device tensor, and on a GPU that copy waits for every kernel queued so far, so logging
        # at every step would stop the host from running ahead of the device.
        if not trainer._logger_connector.should_update_logs:
            return
        pl_module.log("train/tokens_seen", float(self.tokens_seen))
        if len(self._times) > 1:
            pl_module.log("train/tokens_per_sec", self.tokens_per_sec)
            if self.peak:
                if self._flops_per_token is None:  # batch shapes repeat: counted once
                    self._flops_per_token = pl_module.flops_per_token(batch)
                value = flops.mfu(
                    self.tokens_per_sec, self._flops_per_token, self.peak, trainer.world_size
                )
                pl_module.log("train/mfu", value)  # shown by ProgressBar, not prog_bar=True

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._paused_at is None:
            self._paused_at = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Validation is not training time, nor what follows it before training goes on (the
        # samples generated, the checkpoints saved: other callbacks' on_validation_end, which run
        # after this one's): the window's timestamps move forward by all of it.
        if self._paused_at is not None:
            spent = time.perf_counter() - self._paused_at
            self._times = deque((t + spent for t in self._times), maxlen=self.window + 1)
            self._paused_at = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # in training, and in train()'s final validation after it (the same Trainer)
        if not trainer.sanity_checking and (trainer.state.fn == "fit" or self.tokens_seen):
            pl_module.log("train/tokens_seen", float(self.tokens_seen))


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM progress bar, also showing the latest ``metrics`` of training (by default
    the loss and MFU), read when the bar redraws: every ``refresh_rate`` steps.

    Training metrics are therefore logged without ``prog_bar=True``: Lightning turns every
    progress-bar metric into a Python number after every step, and on a GPU reading a number
    waits for all the work queued so far, so the host could never run ahead of the device. Here
    that wait happens once per redraw (raise ``refresh_rate`` to make it rarer). The loss,
    perplexity and bits per byte shown are the last step's (``latest_train_metrics`` of lmlab's
    modules, which log them on logging steps only); other metrics the latest logged.
    """

    def __init__(
        self, refresh_rate: int = 10, metrics: Sequence[str] = ("train/loss", "train/mfu"), **kwargs
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self.metrics = tuple(metrics)

    def get_metrics(self, trainer, pl_module) -> dict:
        latest = dict(trainer.callback_metrics)  # tensors, as logged
        # the last step's loss, perplexity, bits per byte (lmlab logs them on logging steps only)
        if hasattr(pl_module, "latest_train_metrics"):
            latest.update(pl_module.latest_train_metrics())
        shown = {name: float(latest[name]) for name in self.metrics if name in latest}
        return {**shown, **super().get_metrics(trainer, pl_module)}


class Samples(L.Callback):
    """At the end of each validation, writes the model's generations / reconstructions.

    Appends to ``<output_dir>/samples.txt`` and, when a W&B logger is attached, logs a table with one
    row per sample and step.
    """

    def __init__(self, output_dir: str, enabled: bool = True, **settings) -> None:
        self.path = Path(output_dir) / "samples.txt"
        self.enabled, self.settings = enabled, settings
        self.rows: list[list] = []
        self.last: list[str] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        # Sharded weights are gathered collectively: every rank generates (the same text, from the
        # same seed), rank 0 writes. Unsharded, rank 0 alone generates.
        sharded = isinstance(trainer.strategy, FSDP)
        if not (sharded or trainer.is_global_zero):
            return
        dm = trainer.datamodule
        with any_attention_kernel():  # `attention=` is for training and validation steps
            self.last = pl_module.samples(dm.tokenizer, dm, **self.settings)
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            for i, text in enumerate(self.last):
                f.write(f"=== step {step} sample {i} ===\n{text}\n\n")
        log.info("Sample at step %d:\n%s", step, self.last[0] if self.last else "")
        self.rows += [[step, i, t] for i, t in enumerate(self.last)]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text("samples", columns=["step", "sample", "text"], data=self.rows)


class StopVote:
    """Whether any process of a multi-process run asked to stop, answered alike on all of them.

    Each call all-reduces (max) this process's flag and answers with the result of the call ``lag``
    calls earlier (``False`` until there is one), so every process gets the same answer from the
    same call. On a GPU the collective and the copy of its answer to pinned host memory are queued
    behind the step's kernels and read ``lag`` steps later, when the device has finished them: the
    host does not wait for the device. (Lightning's own per-step SIGTERM broadcast reads its answer
    at once, a wait for the whole queued step every step: Lightning-AI/pytorch-lightning#21487.)
    Elsewhere the collective (gloo) runs on the host and ``lag`` is 0.
    """

    def __init__(self, device: torch.device, lag: int | None = None) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.lag = (2 if self.cuda else 0) if lag is None else lag
        self._pending: deque[tuple[torch.Tensor, torch.cuda.Event | None]] = deque()

    def __call__(self, flag: bool) -> bool:
        vote = torch.tensor([int(flag)], dtype=torch.int32)
        if self.cuda:
            vote = vote.pin_memory().to(self.device, non_blocking=True)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        done = None
        if self.cuda:
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(vote, non_blocking=True)
            vote, done = host, torch.cuda.Event()
            done.record()
        self._pending.append((vote, done))
        if len(self._pending) <= self.lag:
            return False
        vote, done = self._pending.popleft()
        if done is not None:
            done.synchronize()  # recorded `lag` steps ago: long finished unless the device is behind
        return bool(vote[0])


class Preemption(Checkpoint):
    """On SIGTERM (what schedulers send before killing a job), SIGUSR1 (SLURM's advance warning,
    ``#SBATCH --signal=USR1@120``) or SIGUSR2 (submitit's), write ``last.ckpt`` at the end of the
    current optimizer step, then stop the run; ``train()`` turns that into a clean exit and
    ``ckpt_path=last`` resumes exactly.

    It saves where ``ModelCheckpoint`` saves (``on_train_batch_end``, after an optimizer step), so a
    preempted checkpoint resumes like a periodic one; being a ``Checkpoint``, Lightning runs it after
    the other callbacks, so the state it saves includes their updates for the step (``Throughput``'s
    token count). It takes SIGUSR1 over from Lightning's SLURM
    auto-requeue, so that one component owns preemption: requeueing is left to the job script or to
    a handler installed before training (submitit's, under ``hydra/launcher=slurm``), which is
    called once the checkpoint is written.

    From the sanity check to the end of training (and during a validation run after it) it also
    takes SIGTERM over from Lightning, whose handler is unsafe with several processes: it
    broadcasts from inside the signal handler and stops only the process that got the signal, so a
    signal that reaches one rank (a preempted node) or reaches the ranks at different steps ends in
    mismatched collectives and no checkpoint. Here every process records its signal, and with
    several processes they vote after each optimizer step (:class:`StopVote`): when any asked, all
    save the same step together and stop. Lightning's per-step SIGTERM broadcast, which the vote
    replaces, is switched off for the run.

    A signal during a validation inside training is acted on at once: the step the validation
    belongs to is saved after the current validation batch (with several processes, after each
    batch that every process runs, and at the end), the validation goes on so that its metrics
    are logged if the scheduler leaves time, and the run stops when it ends, without another
    training step; so does a validation that follows a step saved for a signal. A validation
    that outlasts the grace period thus costs no training, and the resumed run goes on from the
    next step (that step's validation is not repeated). With several GPU processes the vote's
    answers come two calls late, so a signal in a validation's last two batches is acted on after
    the next training step.
    """

    def __init__(
        self,
        dirpath: str,
        signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2"),
        hand_over: tuple[str, ...] = ("SIGUSR2",),
    ) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.signals = signals
        self.hand_over = hand_over  # signals whose earlier handler runs after the save (submitit)
        self.requested: str | None = None
        self.saved_step: int | None = None
        self._previous: dict = {}
        self._vote: StopVote | None = None
        self._val_votes = 0  # validation batches every process runs (votes during a validation)

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._take_signals()  # a signal during the sanity check is acted on after the first step

    def on_train_start(self, trainer, pl_module) -> None:
        self._take_signals()
        if trainer.world_size > 1:
            self._vote = StopVote(trainer.strategy.root_device)
            loop = trainer.fit_loop.epoch_loop
            if hasattr(loop, "_broadcast_sigterm_tensor"):  # Lightning >= 2.5.3
                loop._broadcast_sigterm_tensor = lambda: None  # instance attribute, removed below
        if trainer.received_sigterm and "SIGTERM" in self._previous:
            # a SIGTERM before training started, caught by Lightning's handler: ours from now on
            self.requested = "SIGTERM"
            trainer._signal_connector.received_sigterm = False

    def _take_signals(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for name in self.signals:
            if hasattr(signal, name):
                self._previous[name] = signal.signal(getattr(signal, name), self._request)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":  # train()'s final validation, after fit: the signal is
            self._take_signals()  # only recorded, and the run ends normally once it is done
            return
        if self._in_fit_validation(trainer) and self.saved_step == trainer.global_step:
            # saved at the end of this step: Lightning would cut the validation after one batch
            trainer._signal_connector.received_sigterm = False  # stop when it ends instead
        if self._vote is not None and not trainer.sanity_checking:
            # Ranks may hold one validation batch more than others: vote at those all of them run.
            n = min(sum(trainer.num_val_batches), 2**31 - 1)
            fewest = torch.tensor([n], dtype=torch.int64, device=trainer.strategy.root_device)
            dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
            self._val_votes = int(fewest.item())  # once per validation

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if self._in_fit_validation(trainer) and (self._vote is None or batch_idx < self._val_votes):
            self._save_if_asked(trainer)  # the stop comes when the validation ends

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._restore(trainer)
        elif self._in_fit_validation(trainer):
            self._save_if_asked(trainer)
            if self.saved_step == trainer.global_step:
                self._stop(trainer)  # after the validation, before another training step

    def _in_fit_validation(self, trainer) -> bool:
        """A validation inside training, after an optimizer step (not inside a gradient
        accumulation, where a checkpoint would lose the part-accumulated gradient)."""
        return (
            trainer.state.fn == "fit"
            and not trainer.sanity_checking
            and not trainer.fit_loop.epoch_loop._should_accumulate()
        )

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore(trainer)

    def _restore(self, trainer) -> None:
        """Give the signals back before Lightning restores its own originals (``trainer._teardown``
        runs before the callbacks' ``teardown``)."""
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)
        self._previous = {}
        vars(trainer.fit_loop.epoch_loop).pop("_broadcast_sigterm_tensor", None)

    def _request(self, signum, frame) -> None:
        self.requested = self.requested or signal.Signals(signum).name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # inside a gradient accumulation: no optimizer step yet
        if self._save_if_asked(trainer):
            self._stop(trainer)

    def _save_if_asked(self, trainer) -> bool:
        """Save ``last.ckpt`` if this process was signalled or (with several processes, all of
        which call this at the same point) any was; True when it saved now."""
        if self.saved_step is not None:
            return False
        local = self.requested or ("SIGTERM" if trainer.received_sigterm else None)
        stop = self._vote(local is not None) if self._vote is not None else local is not None
        if not stop:
            return False
        trainer.save_checkpoint(self.path)  # collective: every process is here at this step
        self.saved_step = trainer.global_step
        log.warning(
            "%s: saved %s at step %d; resume with ckpt_path=last",
            local or "another process's signal",
            self.path,
            trainer.global_step,
        )
        # A handler that was there before (submitit's USR2 handler requeues the SLURM job) runs
        # now that the checkpoint is written.
        previous = self._previous.get(local) if local in self.hand_over else None
        if callable(previous):
            log.warning("%s: handing over to %r (requeue)", local, previous)
            previous(getattr(signal, local), None)
        return True

    @staticmethod
    def _stop(trainer) -> None:
        """Lightning's own SIGTERM exit: SIGTERMException once this step's metrics are written (or
        once the current validation batch is done)."""
        trainer._signal_connector.received_sigterm = True


def last_saved_at_step(trainer) -> bool:
    """Whether a checkpoint callback that writes ``last.ckpt`` has saved at the current step
    (Lightning's private record of each callback's last save; tests/test_reliability.py names it)."""
    return any(
        isinstance(cb, ModelCheckpoint)
        and cb.save_last
        and cb._last_global_step_saved == trainer.global_step
        for cb in trainer.checkpoint_callbacks
    )


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that saves only between optimizer steps, as resuming needs.

    - At the end of training ``last.ckpt`` is written only when no checkpoint callback saved it at
      the final step already. Lightning's own ``on_train_end`` save comes after the run's last epoch
      is closed: a run resumed from it (to extend it) starts a new data epoch and labels its steps
      one higher, and the closed epoch's target count is gone. A save made during the final step
      (its validation's, or a periodic one) resumes exactly, so it is kept whenever there is one;
      Lightning's save would replace it whenever this callback saved nothing in the run (a run
      without validations: its ``save_last`` flag is per callback).
    - A resumed run does not save again at the step it resumed from. Lightning's record of the last
      saved step is not in the checkpoint, so with gradient accumulation a periodic save fell due at
      the resumed step's first micro-batch (``every_n_train_steps`` divides it): a checkpoint in the
      middle of an optimizer step, whose loader position counts a micro-batch whose gradient it
      does not hold.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step  # its weights are the checkpoint's

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and not last_saved_at_step(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class PeriodicCheckpoint(StepCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps (conf/callbacks/default.yaml's
    ``last_checkpoint``), saving only between optimizer steps (:class:`StepCheckpoint`).

    A save due at a step that a validation follows is made after the validation (Lightning's own
    deferral, for monitored metrics): made before it, a crash during the validation (out of
    memory, a killed node) resumed past it, Lightning's restart taking the validation for done,
    and that step was never validated nor ranked for ``best.ckpt``."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self._every_n_train_steps
        if (
            every >= 1
            and trainer.global_step % every == 0
            and not self._should_skip_saving_checkpoint(trainer)
            and validation_follows(trainer)
        ):
            self._defer_save_until_validation = True  # on_validation_end saves
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def validation_follows(trainer) -> bool:
    """Whether the training loop validates after the current batch (asked of Lightning's loop in
    ``on_train_batch_end``, where it decides so next; private names, as tests/test_reliability.py
    lists)."""
    loop = trainer.fit_loop.epoch_loop
    return (
        trainer.enable_validation
        and not loop._skip_next_val
        and loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
    )
