"""Multi-process training: trainer=ddp_sim and trainer=fsdp (2 CPU processes, gloo) match one
process with the same global batch; FSDP's sharded checkpoints consolidate, serve generate and
evaluate, and resume exactly."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lmlab.checkpoint import consolidate, is_sharded, read_checkpoint
from lmlab.evaluate import evaluate
from lmlab.generate import generate
from lmlab.parallel import CPU_FSDP_TORCH, cpu_fsdp_supported

from .conftest import command_cfg, make_text

COMMON = [
    "data=files",
    "data.train=d*.txt",
    "seq_len=32",
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=2",
    "++tokenizer.vocab_size=400",
    "++tokenizer.num_sentinels=4",
    "trainer.max_steps=6",
    "trainer.val_check_interval=2",  # the validation loss at steps 2, 4, 6: a trajectory
    "trainer.limit_val_batches=3",
    "optim.warmup_steps=2",
    "callbacks.samples=null",
    "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "trainer.precision=32-true",
    "trainer.log_every_n_steps=1",
    "callbacks.last_checkpoint.every_n_train_steps=2",
    "++logger.csv.flush_logs_every_n_steps=1",
]


class Runs:
    """Runs of ``python -m lmlab`` on one small corpus, each in its own folder, cached by name."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        for i in range(4):
            (tmp / f"d{i}.txt").write_text(make_text(800, i))
        self.env = dict(os.environ, LMLAB_CACHE=str(tmp / "cache"), WANDB_MODE="offline")
        root = str(Path(__file__).resolve().parents[1])  # StopAt is imported from tests/
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p
        )
        self.done: dict[str, dict] = {}
        self.logs: dict[str, str] = {}  # each run's stdout + stderr

    def __call__(self, name: str, *extra: str, ok: bool = True) -> dict:
        if name not in self.done:
            p = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "lmlab",
                    *COMMON,
                    *extra,
                    f"hydra.run.dir={self.tmp / name}",
                ],
                cwd=self.tmp,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert (p.returncode == 0) == ok, p.stderr[-3000:]
            self.logs[name] = p.stdout + p.stderr
            summary = self.tmp / name / "summary.json"
            self.done[name] = json.loads(summary.read_text()) if ok else {}
        return self.done[name]

    def one(self) -> dict:
        """One process, batch 4: the reference for the two-process runs (batch 2 each)."""
        return self("one", "trainer=cpu", "data.batch_size=4")

    def losses(self, name: str, key: str = "train/loss") -> dict[int, float]:
        """step -> the value of ``key`` in the run's metrics.csv (the last row of each step)."""
        with (self.tmp / name / "metrics.csv").open(newline="") as f:
            return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}

    def assert_same_trajectory(
        self, name: str, reference: str, keys: tuple[str, ...] = ("val/loss", "val/bpb")
    ) -> None:
        # Validation loss and bits per byte at steps 2, 4 and 6 (the whole trajectory, not only its
        # end) equal to rel 1e-4; see the comment in the DDP test for the tolerance.
        for key in keys:
            want, got = self.losses(reference, key), self.losses(name, key)
            assert sorted(want) == [1, 3, 5]  # Lightning logs validation at the last step's index
            assert got == pytest.approx(want, rel=1e-4), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("scale"))


FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=2"]
FSDP += ["trainer.precision=32-true"]
cpu_fsdp = pytest.mark.skipif(
    not cpu_fsdp_supported(), reason=f"FSDP2 in CPU processes needs torch >= {CPU_FSDP_TORCH}"
)


@pytest.mark.slow
def test_ddp_sim_matches_one_process_with_the_same_global_batch(runs):
    one = runs.one()
    two = runs("ddp", "trainer=ddp_sim", "data.batch_size=2")
    # Same global batch: lmlab's sampler deals the same windows to the two ranks (rank r takes
    # every other window), gradients are averaged (= the mean over the 4 sequences, all of equal
    # length) and the first 12 validation windows are split 6 + 6. Only the order of
    # floating-point sums differs (all-reduce), so after 6 steps the numbers agree to ~1e-6; 1e-4
    # leaves room without hiding a wrong batch (a different batch moves val/loss by ~1e-2).
    assert two["trainer/global_step"] == one["trainer/global_step"] == 6
    for key in ("val/loss", "val/bpb", "val/acc"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    assert two["train/tokens"] == one["train/tokens"] == 6 * 4 * 32  # every process's targets
    runs.assert_same_trajectory("ddp", "one")
    # train/loss too, at every step: over both processes' targets (it was rank 0's alone)
    assert runs.losses("ddp") == pytest.approx(runs.losses("one"), rel=1e-4)
    assert two["train/loss"] == pytest.approx(one["train/loss"], rel=1e-4)
    assert (runs.tmp / "ddp" / "checkpoints" / "last.ckpt").is_file()
    # torch 2.13's deprecation of the preset's broadcast_buffers (kept: older torch lacks its
    # replacement) is not shown to users, once per process
    assert "`broadcast_buffers` is deprecated" not in runs.logs["ddp"]


@pytest.mark.slow
def test_ddp_sim_and_fsdp_with_accumulation_weigh_every_target_alike_under_prefix_lm(runs):
    """Prefix LM's random prefixes give every micro-batch its own target count. Two processes of
    two accumulated micro-batches of 1 sequence take the same 4 windows per step as one process
    with batch 4; the step's gradient is the large batch's when every target weighs alike (a mean
    of the 4 micro-batches' own means moves val/loss by ~7e-3 here)."""
    prefix = ["objective=prefix_lm"]
    one = runs("one-prefix", *prefix, "trainer=cpu", "data.batch_size=4")
    two = ["trainer=ddp_sim", "data.batch_size=1", "global_batch_size=4"]
    # validation batches of 1 sequence: 6 per process score the reference's 3 x 4 windows
    runs("ddp-prefix", *prefix, *two, "trainer.limit_val_batches=6")
    runs.assert_same_trajectory("ddp-prefix", "one-prefix")
    assert runs.losses("ddp-prefix") == pytest.approx(runs.losses("one-prefix"), rel=1e-4)
    assert one["trainer/global_step"] == 6
    if cpu_fsdp_supported():  # FSDP2's reduce-scatter averages as DDP's all-reduce does
        fsdp = [*FSDP, "data.batch_size=1", "global_batch_size=4"]
        runs("fsdp-prefix", *prefix, *fsdp, "trainer.limit_val_batches=6")
        runs.assert_same_trajectory("fsdp-prefix", "one-prefix")


class SaveStepGrads(L.Callback):
    """Saves the gradients each optimizer step steps with (the masters' under master weights,
    clipped where clipping is on), per process: ``<path>/rank<r>.pt`` holds one list of tensors
    per step."""

    def __init__(self, path: str) -> None:
        self.path, self.steps = Path(path), []

    def on_train_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        step = optimizer.step

        def saving_step(closure=None):
            # Lightning's closure: the last micro-batch's forward and backward, the hooks
            # before the step (master weights: the gradients into the masters'), clipping
            loss = closure() if closure is not None else None
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self.steps.append([p.grad.detach().clone() for p in params])
            step()
            return loss

        optimizer.step = saving_step

    def on_train_end(self, trainer, pl_module) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        torch.save(self.steps, self.path / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("sequences", [4, 2])
def test_ddp_with_master_weights_adds_and_all_reduces_gradients_in_fp32(runs, sequences):
    """bf16 weights with fp32 masters, 4 (2) micro-batches of 1 sequence per step: one process
    adds them up in fp32; two processes of 2 (1) each add theirs in fp32 and all-reduce the fp32
    sums (DDP's hook, lmlab/optim.py). Each micro-batch's bf16 gradient is the same in both (same
    weights, same sequence), so the step's gradients differ only by the order of fp32 sums
    (~1e-7 of their size); added and all-reduced in bf16, as DDP does on its own, they were off
    by ~5e-3 of the largest (4 sequences)."""
    settings = [
        "trainer.precision=bf16-true",
        "optim.master_weights=true",
        "data.batch_size=1",
        f"global_batch_size={sequences}",
        "trainer.max_steps=2",
        "optim.warmup_steps=1",
        "trainer.val_check_interval=1",
        "trainer.limit_val_batches=1",
        "trainer.gradient_clip_val=0",
        f"+callbacks.grads._target_={__name__}.SaveStepGrads",
    ]
    one, ddp = runs.tmp / f"g-one-{sequences}", runs.tmp / f"g-ddp-{sequences}"
    runs(f"one-masters-{sequences}", *settings, "trainer=cpu", f"+callbacks.grads.path={one}")
    # 4 sequences: DDP's buckets capped at ~10 KB: 4 at the second step (DDP rebuilds them after
    # the first, which had one, in the order the gradients came); 2: the default cap, one bucket
    buckets = ["++trainer.strategy.bucket_cap_mb=0.01"] if sequences == 4 else []
    two = [*settings, *buckets, "trainer=ddp_sim", f"+callbacks.grads.path={ddp}"]
    runs(f"ddp-masters-{sequences}", *two)
    one = torch.load(one / "rank0.pt")
    ranks = [torch.load(ddp / f"rank{r}.pt") for r in (0, 1)]
    assert len(one) == len(ranks[0]) == 2  # both steps
    for step, want in enumerate(one):
        for got in ranks:
            for g, g0, w in zip(got[step], ranks[0][step], want, strict=True):
                assert g.dtype == w.dtype == torch.float32
                assert torch.equal(g, g0)  # the same on every process
                assert (g - w).abs().max() <= 1e-5 * w.abs().max(), (step, (g - w).abs().max())


@cpu_fsdp
@pytest.mark.slow
def test_fsdp_matches_one_process_and_its_sharded_checkpoint_serves_generate_and_evaluate(
    runs, monkeypatch
):
    one = runs.one()
    two = runs("fsdp", *FSDP)
    # As for DDP (above): FSDP's reduce-scatter averages the same gradients, and each rank's
    # AdamW updates its half of every weight exactly as the single process updates the whole;
    # only the summation order of the reduction differs.
    assert two["trainer/global_step"] == 6
    for key in ("val/loss", "val/bpb", "val/acc"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    runs.assert_same_trajectory("fsdp", "one")
    assert runs.losses("fsdp") == pytest.approx(runs.losses("one"), rel=1e-4)  # all processes'

    folder = runs.tmp / "fsdp" / "checkpoints" / "last.ckpt"
    assert is_sharded(folder) and len(list(folder.glob("*.distcp"))) == 2  # one shard per rank
    # Written into a temporary folder that then replaced the previous one: nothing left over.
    assert sorted(p.name for p in folder.parent.iterdir()) == ["best.ckpt", "last.ckpt"]
    # The folder, its consolidated file and the single-process checkpoint hold the same model.
    single = runs.tmp / "one" / "checkpoints" / "last.ckpt"
    merged = consolidate(folder)
    assert merged == folder.with_name("last.ckpt.consolidated.ckpt") and merged.is_file()
    sharded, flat, ref = (read_checkpoint(p)["state_dict"] for p in (folder, merged, single))
    assert sharded.keys() == flat.keys() == ref.keys()
    for key, value in ref.items():
        assert torch.equal(sharded[key], flat[key]), key
        torch.testing.assert_close(sharded[key], value, rtol=1e-3, atol=1e-5, msg=key)
    assert read_checkpoint(merged)["optimizer_states"][0]["state"]  # resumable too

    # generate and evaluate take the folder as they take a file.
    settings = dict(prompt="the king", max_new_tokens=8, temperature=0.0, device="cpu")
    texts = generate(command_cfg("generate", ckpt_path=str(folder), **settings))
    assert texts == generate(command_cfg("generate", ckpt_path=str(merged), **settings))
    cache = str(runs.tmp / "cache")
    monkeypatch.chdir(runs.tmp)  # the runs' data.train is relative to where they ran
    got = evaluate(command_cfg("evaluate", ckpt_path=str(folder), **{"paths.cache_dir": cache}))
    want = evaluate(command_cfg("evaluate", ckpt_path=str(single), **{"paths.cache_dir": cache}))
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)


@cpu_fsdp
@pytest.mark.slow
@pytest.mark.parametrize(
    "family",
    [
        ("model=encoder", "objective=mlm"),
        ("model=encoder", "objective=sop"),
        ("model=encoder_decoder", "objective=span"),
    ],
)
def test_fsdp_matches_one_process_for_the_encoder_and_the_encoder_decoder(runs, family):
    """The output head and loss run outside the backbone's forward (on the MLM's selected positions;
    fused in chunks on a CPU), as the sentence head of sop does, and generation at validation
    gathers the weights: all under FSDP."""
    name = "-".join(f.split("=")[1] for f in family)
    one = runs(f"one-{name}", *family, "trainer=cpu", "data.batch_size=4")
    samples = "{_target_:lmlab.callbacks.Samples,output_dir:${paths.output_dir},max_new_tokens:8}"
    samples = f"callbacks.samples={samples}"
    runs(f"fsdp-{name}", *family, *FSDP, samples)
    runs.assert_same_trajectory(f"fsdp-{name}", f"one-{name}")
    if "objective=sop" in family:
        runs.assert_same_trajectory(f"fsdp-{name}", f"one-{name}", keys=("val/sop_loss",))
        assert runs.losses(f"fsdp-{name}", "train/sop_loss") == pytest.approx(
            runs.losses(f"one-{name}", "train/sop_loss"), rel=1e-4
        )
    assert one["trainer/global_step"] == 6
    written = (runs.tmp / f"fsdp-{name}" / "samples.txt").read_text()
    # Every rank generates (the gathered weights), rank 0 alone writes: one block per validation.
    assert [written.count(f"=== step {s} sample 0 ===") for s in (2, 4, 6)] == [1, 1, 1]


@cpu_fsdp
@pytest.mark.slow
def test_fsdp_stopped_then_resumed_matches_the_uninterrupted_run(runs):
    runs("fsdp", *FSDP)
    stop = ["+callbacks.stop._target_=tests.test_resume.StopAt", "+callbacks.stop.step=4"]
    runs("fsdp-stopped", *FSDP, *stop, ok=False)  # both ranks stop before step 4
    step = read_checkpoint(runs.tmp / "fsdp-stopped" / "checkpoints" / "last.ckpt", weights=False)
    assert step["global_step"] == 4  # saved every 2 steps
    runs.done.pop("fsdp-stopped")
    runs("fsdp-stopped", *FSDP, "ckpt_path=last")
    want, got = runs.losses("fsdp"), runs.losses("fsdp-stopped")
    # Rank 0's loss at each step after the checkpoint: the same windows on every rank (the
    # sampler's position is restored per rank) and the same sharded weights and optimizer state.
    assert sorted(want) == list(range(6))
    assert {s: got[s] for s in (4, 5)} == pytest.approx({s: want[s] for s in (4, 5)}, rel=1e-6)


@cpu_fsdp
@pytest.mark.slow
def test_fsdp_meta_init_with_activation_checkpointing_trains_from_a_sane_start(runs):
    runs("fsdp-meta", *FSDP, "trainer.strategy.meta_init=true", "activation_checkpointing=true")
    losses = runs.losses("fsdp-meta")
    # Weights initialised shard by shard as N(0, 0.02): near-uniform predictions over the padded
    # vocabulary (384 rows) at step 0, as an ordinary model's (memory left uninitialised would
    # give losses far from it, or NaN), then learning.
    assert losses[0] == pytest.approx(math.log(384), rel=0.03)
    assert losses[5] < losses[0] - 0.5


@cpu_fsdp
@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="torch.compile on CPU (inductor) needs a C compiler",
)
def test_fsdp_compiled_matches_one_process(runs):
    """trainer=fsdp with compile=true: each block compiled inside FSDP's hooks, then the output
    head + loss, in both processes. Inductor's kernels reorder float sums (a compiled step equals an
    eager one to ~1e-6, test_parallel.py): the trajectory stays within the tolerance of the other
    multi-process runs."""
    runs.one()
    runs("fsdp-compiled", *FSDP, "compile=true")
    runs.assert_same_trajectory("fsdp-compiled", "one")


class DtypeProbe(L.Callback):
    """Writes ``dtypes-<rank>.json`` into ``path``: the dtype of the first block's q/k/v weight and
    input as its forward sees them, and after the first optimizer step the stored (sharded)
    weights' and AdamW's moments' dtypes."""

    def __init__(self, path: str) -> None:
        self.path, self.seen = Path(path), {}

    def on_fit_start(self, trainer, pl_module) -> None:
        def probe(module, args):
            self.seen.setdefault("forward weight", str(module.weight.dtype))
            self.seen.setdefault("forward input", str(args[0].dtype))

        pl_module.backbone.blocks[0].attn.qkv.register_forward_pre_hook(probe)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "stored" in self.seen:
            return
        params = list(pl_module.parameters())
        state = trainer.optimizers[0].state
        self.seen["stored"] = sorted({str(p.dtype) for p in params})
        self.seen["moments"] = sorted({str(state[p]["exp_avg"].dtype) for p in params})
        self.seen["sharded"] = all(type(p).__name__ == "DTensor" for p in params)
        out = self.path / f"dtypes-{trainer.global_rank}.json"
        out.write_text(json.dumps(self.seen))


@cpu_fsdp
@pytest.mark.slow
def test_fsdp_param_dtype_bf16_computes_in_bf16_over_fp32_shards(runs):
    """trainer.strategy.param_dtype=bf16 (FSDP's own mixed precision, under 32-true): each block
    gathers its weights in bf16 and computes in bf16, while the stored shards and AdamW's moments
    stay fp32. It trains the trajectory of fp32 FSDP to within bf16's rounding (val/loss 0.8-1.4e-4
    apart, relative, at steps 2, 4, 6 here, where fp32 runs agree to ~1e-6)."""
    runs("fsdp", *FSDP)
    probe = [
        "+callbacks.probe._target_=tests.test_scale.DtypeProbe",
        "+callbacks.probe.path=${paths.output_dir}",
    ]
    runs("fsdp-bf16", *FSDP, "trainer.strategy.param_dtype=bf16", *probe)
    for rank in (0, 1):
        seen = json.loads((runs.tmp / "fsdp-bf16" / f"dtypes-{rank}.json").read_text())
        assert seen == {
            "forward weight": "torch.bfloat16",
            "forward input": "torch.bfloat16",
            "stored": ["torch.float32"],
            "moments": ["torch.float32"],
            "sharded": True,
        }
    want, got = runs.losses("fsdp", "val/loss"), runs.losses("fsdp-bf16", "val/loss")
    assert sorted(got) == sorted(want) == [1, 3, 5]
    assert got == pytest.approx(want, rel=2e-3)
    assert got != pytest.approx(want, rel=1e-5)  # bf16 was in effect


@pytest.mark.parametrize("preset", ["ddp", "ddp_sim"])
def test_ddp_presets_skip_the_buffer_broadcast_which_lmlab_models_do_not_need(compose_cfg, preset):
    """DDP broadcasts every buffer from rank 0 before each forward unless told not to. lmlab's
    buffers are constants computed alike on every rank (token byte counts, RoPE tables), so the
    presets turn that off, and keep gradients in the all-reduce buckets (one copy less per step).
    A new buffer that changes during training would need the broadcast: this lists them."""
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    from lmlab.train import build

    cfg = compose_cfg(f"trainer={preset}")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs == {"broadcast_buffers": False, "gradient_as_bucket_view": True}
    for model in ("decoder", "encoder", "encoder_decoder"):
        mcfg = compose_cfg(f"model={model}").model
        special = {name: i for i, name in enumerate(("pad", "bos", "eos", "mask", "cls", "sep"))}
        module = build(mcfg, vocab_size=300, special_ids=special, optim={})
        assert {name for name, _ in module.named_buffers()} == {
            "token_bytes",
            "backbone.rotary.cos",
            "backbone.rotary.sin",
        }, model


def _materialize_on_two_ranks(rank: int, rendezvous: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lmlab.models.decoder import DecoderLM
    from lmlab.parallel import blocks, materialize

    # a file to meet at, not a TCP port: a port found free and released could be taken by another
    # test's processes before these two bind it
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        torch.manual_seed(1234)  # as L.seed_everything(cfg.seed): the same seed in every process
        dims = dict(vocab_size=400, special_ids={}, optim={}, n_layers=2, d_model=32, n_heads=2)
        backbone = DecoderLM(**dims, max_seq_len=32, init_device="meta").backbone
        mesh = init_device_mesh("cpu", (2,))
        for block in blocks(backbone):
            fully_shard(block, mesh=mesh)
        fully_shard(backbone, mesh=mesh)
        materialize(backbone, torch.device("cpu"))
        full = {n: p.full_tensor() for n, p in backbone.named_parameters() if p.dim() == 2}
        if rank == 0:
            torch.save(full, out)
        # both processes reach here before either tears gloo down (as PyTorch's own DTensor tests
        # do): a process that shut down while the other still talked to it died with SIGABRT
        # ("terminate called without an active exception") once in CI
        dist.barrier()
    finally:
        dist.destroy_process_group()


@cpu_fsdp
@pytest.mark.slow
def test_meta_init_on_a_cpu_mesh_draws_each_shard_anew(tmp_path):
    """On CPU meshes DTensor has no random-number tracker: every process drew its shard from the
    same seed, and every weight was two equal halves (SwiGLU's gate = its up projection, embedding
    row i = row i + V/2). Each shard is now drawn from its process's own seed."""
    import torch.multiprocessing as mp

    out = tmp_path / "full.pt"
    mp.spawn(_materialize_on_two_ranks, args=(str(tmp_path / "rendezvous"), str(out)), nprocs=2)
    full = torch.load(out)
    assert len(full) == 9  # embedding (the tied head) and 4 matrices per block
    for name, w in full.items():
        half = w.shape[0] // 2
        assert not torch.equal(w[:half], w[half:]), name
    for name in ("embed.weight", "blocks.0.mlp.gate_up.weight"):
        assert full[name].std().item() == pytest.approx(0.02, rel=0.1), name
