"""Stage 2: weighted multi-token-prediction fine-tuning (baseline, critic, rho1-weighted, rho1-tokenskip).

python train_mtp.py [--config config.yaml] [--algo critic] [--set key=value ...] [--resume auto|PATH]
                    [--resume-with-changes] [--force-unlock] [--quiet]
accelerate launch --config_file fsdp.yaml train_mtp.py --config config.yaml

Read top to bottom: the parts of a run (models, optimizers) -> the weights of one batch ->
`micro_step` (forward, weights, backward) -> `optimizer_step` -> logging and checkpoints ->
`train`, the loop of those named steps.
"""

from __future__ import annotations

from wmtp_cli import parse_args, run_cli

if __name__ == "__main__":  # --help and a bad flag answer before torch & co. are imported
    parse_args(None, __doc__.splitlines()[0], with_algo=True)

import contextlib  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from typing import NamedTuple  # noqa: E402

import mlflow  # noqa: E402
import torch  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from msgspec.structs import asdict  # noqa: E402
from tqdm import tqdm  # noqa: E402

import io_stream  # noqa: E402
from wmtp import Config, config_params  # noqa: E402
from wmtp_ckpt import (  # noqa: E402
    apply_hparams,
    config_dict,
    describe_changes,
    fallback_tags,
    find_resume,
    load_train_state,
    prune_ckpts,
    read_ckpt_meta,
    resume_changes,
    save_train_state,
)
from wmtp_data import dataset_file, iter_batches  # noqa: E402
from wmtp_dist import (  # noqa: E402
    end_distributed,
    full_model_on_rank0,
    log,
    make_accelerator,
    quiet,
    replicate,
    shared_value,
)
from wmtp_eval import greedy_pass_at_1  # noqa: E402
from wmtp_loss import (  # noqa: E402
    IGNORE,
    ValueHead,
    critic_weights,
    mtp_loss,
    mtp_targets,
    next_token_ce,
    rho1_excess,
    rho1_weights,
    value_mask,
    value_targets,
    weight_summary,
)
from wmtp_model import save_model  # noqa: E402
from wmtp_runs import (  # noqa: E402
    claim_run,
    drop_checkpoint_tags,
    log_head_plots,
    log_inputs,
    log_pyfunc,
    log_startup,
    mlflow_connect,
    mlflow_start,
    resolve_mlflow_uri,
    run_name_for,
    set_lock_run_id,
    tracked_run,
    weight_histogram,
)
from wmtp_train import (  # noqa: E402
    Throughput,
    batch_rewards,
    compile_blocks,
    load_base,
    load_base_ref,
    load_frozen,
    lr_schedule,
    setup,
)

# ---------------------------------------------------------------------------------------------
# The parts of a run


class Parts(NamedTuple):
    """What a stage-2 run trains and reads: the model and its optimizer, the frozen reference or
    reward model, and the critic's value head (trained alongside when critic.value_coef > 0,
    through value_head_ddp with several ranks)."""

    tokenizer: object
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: object
    ref: torch.nn.Module | None
    rm: torch.nn.Module | None
    value_head: ValueHead | None
    value_opt: torch.optim.Optimizer | None
    stored_dtype: torch.dtype
    n_heads: int
    # the value head's DDP wrapper (trained head, several ranks; None otherwise): forward and
    # backward go through it, state_dict and the optimizer use value_head itself
    value_head_ddp: torch.nn.parallel.DistributedDataParallel | None = None


def load_value_head(cfg: Config, dim: int) -> tuple[ValueHead, dict[str, str]]:
    """The stage-1 value head from critic.value_head (path, runs:/ or models:/ URI) or
    paths.value_head, and MLflow tags that link this run to it: where it came from and the
    stage-1 run that trained it (recorded in the file's metadata)."""
    src = cfg.critic.value_head or cfg.paths.value_head
    tags = {"value_head": src}
    if src.startswith(("runs:/", "models:/")):
        mlflow_connect(cfg)
        src = resolve_mlflow_uri(src)
        if not src.endswith(".safetensors"):
            src = io_stream.join(src, "value_head.safetensors")
        tags["value_head_file"] = src
    head = ValueHead(dim)
    try:
        state = io_stream.read_safetensors(src)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{exc} (the critic's value head: run `python train_critic.py` first or set critic.value_head)"
        ) from None
    differ = set(head.state_dict()) ^ set(state)
    if differ:
        raise ValueError(f"{src}: not a value head for dim {dim} (keys differ: {sorted(differ)})")
    head.load_state_dict(state)
    stage1 = io_stream.read_safetensors_header(src)[1].get("mlflow_run_id")
    return head, tags | ({"value_head_run_id": stage1} if stage1 else {})


def build(cfg: Config, acc) -> tuple[Parts, dict[str, str]]:
    """Load the models the algorithm needs, make the optimizers and the LR schedule; returns the
    parts and MLflow tags naming the value head (critic)."""
    t, algo = cfg.train, cfg.train.algo
    tokenizer, model = load_base(cfg, acc)
    # fp32 master weights and optimizer state whatever the stored dtype (a bf16 step of lr 1e-5
    # leaves most weights unchanged); compute follows train.mixed_precision through autocast.
    # The final model is saved in the stored dtype again (a bf16 7B base stays 13.5 GB, not 27).
    stored_dtype = next(model.parameters()).dtype
    model.float()
    if t.compile:
        compile_blocks(model)
    ref = rm = value_head = value_opt = value_head_ddp = None
    tags: dict[str, str] = {}
    if algo.startswith("rho1"):
        if not cfg.paths.models.ref:
            raise ValueError(
                f"--algo {algo} needs paths.models.ref: a reference model folder, or `base` "
                "(a frozen copy of the base model as it is at step 0)"
            )
        if cfg.paths.models.ref == "base":
            ref = load_base_ref(cfg, acc)
        else:
            ref = load_frozen(
                acc, cfg.paths.models.ref, "causal", tokenizer, "reference", t.shard_frozen_over_gib
            )
    if algo == "critic":
        value_head, tags = load_value_head(cfg, model.config.hidden_size)
        value_head = value_head.to(acc.device)
        train_value = cfg.critic.value_coef > 0
        if train_value and cfg.paths.models.rm:
            rm = load_frozen(
                acc, cfg.paths.models.rm, "reward", tokenizer, "reward", t.shard_frozen_over_gib
            )
        value_head.requires_grad_(train_value)
        if train_value:  # small and replicated: its own optimizer, gradients averaged by DDP
            value_opt = torch.optim.AdamW(
                value_head.parameters(), lr=cfg.critic.value_lr, weight_decay=0.0
            )
            value_head_ddp = replicate(acc, value_head)
    opt = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay
    )
    n_heads = model.n_heads
    model, opt = acc.prepare(model, opt)  # under FSDP2 model and optimizer are sharded together
    sched = lr_schedule(opt, t.schedule, t.warmup_steps, t.max_steps)
    parts = Parts(
        tokenizer, model, opt, sched, ref, rm, value_head, value_opt, stored_dtype, n_heads,
        value_head_ddp,
    )  # fmt: skip
    return parts, tags


# ---------------------------------------------------------------------------------------------
# One micro-batch and one optimizer step


class StepSums(NamedTuple):
    """An optimizer step's sums over its micro-batches, then over all ranks (one all-reduce)."""

    weighted_ce: torch.Tensor  # Σ w·m·CE
    weight: torch.Tensor  # Σ w·m
    head_ce: torch.Tensor  # [H]: Σ CE over each head's valid slots
    head_slots: torch.Tensor  # [H]: each head's valid slots


class MicroStep(NamedTuple):
    """What one micro-batch gives the loop besides its gradients (tensors on the device)."""

    sums: StepSums
    labels: torch.Tensor  # [B,S,H] MTP targets
    weights: torch.Tensor | None  # [B,S,H] the weights applied (None: baseline, uniform)
    value_loss: torch.Tensor | None  # the value head's masked MSE (critic with value_coef > 0)
    tokens: torch.Tensor  # this rank's non-pad tokens


def add_sums(a: StepSums, b: StepSums) -> StepSums:
    """Field-wise a + b."""
    return StepSums(*(x + y for x, y in zip(a, b)))


def reduce_sums(acc, sums: StepSums) -> StepSums:
    """The sums of every rank, as one all-reduce."""
    H = len(sums.head_ce)
    flat = acc.reduce(torch.cat([sums.weighted_ce[None], sums.weight[None], *sums[2:]]), "sum")
    return StepSums(flat[0], flat[1], flat[2 : 2 + H], flat[2 + H :])


def weight_fn(cfg: Config, labels: torch.Tensor, ref_ce: torch.Tensor | None, value_head):
    """The algorithm's weight function for mtp_loss (None for baseline): it gets each slot's CE
    and head 0's final normed hidden state and returns detached weights [B,S,H]."""
    algo = cfg.train.algo
    if algo == "baseline":
        return None

    def weights(ce: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
        if algo == "critic":
            c = cfg.critic
            with torch.no_grad():
                values = value_head(hidden)
            return critic_weights(
                values,
                labels,
                discount=c.discount,
                temperature=c.temperature,
                normalize=c.normalize,
                eps=c.eps,
                max_weight=c.max_weight,
            )
        mode = "skip" if algo == "rho1-tokenskip" else "weighted"
        return rho1_weights(rho1_excess(ce, ref_ce), labels, mode=mode, **asdict(cfg.rho1))

    weights.needs_ce = algo != "critic"  # the critic reads only head 0's hidden state: no CE pass
    return weights


def provisional_weight(acc, batch: dict, n_heads: int) -> torch.Tensor:
    """All ranks' valid slots in this micro-batch: times grad_accum, it stands in for the step's
    Σ w·m until the step's last micro-batch makes that known (optimizer_step then rescales)."""
    ids = batch["input_ids"].to(acc.device)
    labels = mtp_targets(
        ids,
        batch["loss_mask"].to(acc.device),
        n_heads,
        attention_mask=batch["attention_mask"].to(acc.device),
    )
    return acc.reduce((labels != IGNORE).sum().double(), "sum").clamp_min(1)


def micro_step(cfg: Config, acc, parts: Parts, batch: dict, denominator: torch.Tensor) -> MicroStep:
    """Forward, weights and backward of one micro-batch. The loss is Σ w·m·CE / `denominator`
    (the step's Σ w·m as far as it is known, see optimizer_step), so that the gradients of all
    micro-batches and ranks add up to those of one mean over the step's slots."""
    model, H = parts.model, parts.n_heads
    ids = batch["input_ids"].to(acc.device)
    attn = batch["attention_mask"].to(acc.device)
    loss_mask = batch["loss_mask"].to(acc.device)
    labels = mtp_targets(ids, loss_mask, H, attention_mask=attn)
    valid = labels != IGNORE
    ref_ce = None
    if parts.ref is not None:
        with torch.no_grad():
            ref_ce = next_token_ce(
                parts.ref(input_ids=ids, attention_mask=attn).logits.float(), ids
            )
    with acc.autocast():
        loss, head_ce, weights, hidden = mtp_loss(
            model,
            ids,
            labels,
            weights=weight_fn(cfg, labels, ref_ce, parts.value_head),
            attention_mask=attn,
            denominator=denominator,
            details=True,
        )
    acc.backward(loss)  # gradient so far: Σ ∇(Σ w·m·CE) / denominator
    slots = valid.sum((0, 1)).double()
    sums = StepSums(
        (loss.detach() * denominator).double(),
        weights.sum().double(),
        head_ce.double().nan_to_num() * slots,
        slots,
    )
    value_loss = None
    if parts.value_opt is not None:
        mask = value_mask(loss_mask).float()
        target = value_targets(batch_rewards(batch, parts.rm, acc.device), mask, cfg.critic.gamma)
        ddp = parts.value_head_ddp
        # several ranks: DDP averages the head's gradients in the backward of the step's last
        # micro-batch (acc.sync_gradients, set by the loop's acc.accumulate); before it, no_sync
        # lets them add up on each rank
        local = ddp is not None and not acc.sync_gradients
        with ddp.no_sync() if local else contextlib.nullcontext():
            values = (parts.value_head if ddp is None else ddp)(hidden)
            value_loss = ((values - target) ** 2 * mask).sum() / mask.sum().clamp(min=1)
            (cfg.critic.value_coef * value_loss / cfg.train.grad_accum).backward()
        value_loss = value_loss.detach()
    uniform = cfg.train.algo == "baseline"
    return MicroStep(sums, labels, None if uniform else weights, value_loss, attn.sum())


def optimizer_step(
    cfg: Config, acc, parts: Parts, sums: StepSums, provisional: torch.Tensor
) -> tuple[torch.Tensor, str]:
    """Rescale the gradients from the provisional denominator to the step's Σ w·m (all ranks),
    clip, step the optimizers and the schedule; returns the gradient norm before clipping and
    what of the step was not finite ('' when all was: otherwise no parameter moved)."""
    fix = provisional / sums.weight.clamp_min(torch.finfo(torch.float32).tiny)
    grads = [p.grad for p in parts.model.parameters() if p.grad is not None]
    torch._foreach_mul_(grads, fix.float())  # now Σ ∇(Σ w·m·CE) / the step's Σ w·m
    grad_norm = acc.clip_grad_norm_(parts.model.parameters(), cfg.train.grad_clip)
    bad = nonfinite(sums, grad_norm)  # the one host sync of a step
    if not bad:
        parts.opt.step()
    parts.opt.zero_grad(set_to_none=True)
    if parts.value_opt is not None:  # its gradients already averaged over the ranks (DDP)
        torch.nn.utils.clip_grad_norm_(parts.value_head.parameters(), cfg.train.grad_clip)
        if not bad:
            parts.value_opt.step()
        parts.value_opt.zero_grad(set_to_none=True)
    parts.sched.step()
    return grad_norm, bad


def nonfinite(sums: StepSums, grad_norm) -> str:
    """What of an optimizer step is NaN or infinite: its weights' sum (non-finite scores give
    non-finite weights), its loss, its gradient norm; '' when all are finite."""
    values = {
        "weights": float(sums.weight),
        "loss": float(sums.weighted_ce / sums.weight),
        "gradient norm": float(grad_norm),
    }
    return ", ".join(f"{name} {v}" for name, v in values.items() if not math.isfinite(v))


def check_step(cfg: Config, step: int, bad: str, skipped: int) -> int:
    """Count a step that was not applied; past train.max_nonfinite_steps, stop the run with a
    one-line error naming the step and what was not finite. Returns the count."""
    if not bad:
        return skipped
    skipped += 1
    allowed = cfg.train.max_nonfinite_steps
    if skipped > allowed:
        raise ValueError(
            f"step {step}: non-finite {bad}; the step was not applied, and train.max_nonfinite_steps"
            f" ({allowed}) allows skipping {allowed} such step(s)"
        )
    log.warning("step %d: non-finite %s: skipped (%d of %d allowed)", step, bad, skipped, allowed)
    return skipped


def check_parameters(acc, model) -> None:
    """Refuse to write a model with a NaN or infinite parameter (every rank checks its shards)."""
    bad = torch.zeros((), dtype=torch.int64, device=acc.device)
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        bad += (~torch.isfinite(local.detach())).sum().to(bad.device)
    if int(acc.reduce(bad, "sum")):
        raise ValueError(
            "the model has non-finite parameters: no checkpoint or final model written"
        )


# ---------------------------------------------------------------------------------------------
# Logging and checkpoints


def shown_weight_stats(cfg: Config) -> tuple[str, ...]:
    """The weight statistics worth a chart: not the mean (1 by construction for soft weights, the
    kept fraction for tokenskip), and the kept fraction only where weights can be 0."""
    algo, eps = cfg.train.algo, cfg.critic.eps if cfg.train.algo == "critic" else cfg.rho1.eps
    return ("std", "max", "entropy") + (("kept",) if algo == "rho1-tokenskip" or eps == 0 else ())


def note_micro_step(window: dict, micro: MicroStep, batch: dict, shown: tuple[str, ...]) -> None:
    """Add a micro-batch's statistics to the logging window (tensors: read once per log line)."""
    window.setdefault("train/examples_cut", []).append(batch["n_cut"])
    if micro.weights is not None:
        stats = weight_summary(micro.weights, micro.labels)
        for name, value in zip(("mean", "std", "max", "entropy", "kept"), stats):
            if name in shown:
                window.setdefault(f"weights/{name}", []).append(value)
    if micro.value_loss is not None:
        window.setdefault("train/value_loss", []).append(micro.value_loss)


def note_step(window: dict, sums: StepSums, grad_norm: torch.Tensor) -> torch.Tensor:
    """Add an optimizer step's loss, per-head CE and gradient norm to the window; returns the loss."""
    loss = sums.weighted_ce / sums.weight
    window.setdefault("train/loss", []).append(loss)
    for k, ce in enumerate(sums.head_ce / sums.head_slots):
        window.setdefault(f"train/ce_head{k}", []).append(ce)
    if grad_norm is not None:
        window.setdefault("train/grad_norm", []).append(grad_norm)
    return loss


def evaluate_due(
    cfg: Config, acc, parts: Parts, step: int, window: dict, speed: Throughput
) -> bool:
    """After an optimizer step: the held-out CE and the periodic pass@1 when they are due, their
    time in time/eval_s and not in tokens_per_s. Returns whether the held-out CE was computed."""
    t, t0 = cfg.train, time.perf_counter()
    due = step == t.max_steps or bool(t.heldout_every and step % t.heldout_every == 0)
    heldout = bool(cfg.data.heldout) and due
    if heldout:
        log_heldout(cfg, acc, parts, step)
    if cfg.eval.every and step % cfg.eval.every == 0:
        evaluate_now(cfg, acc, parts, step)
    note_time(window, speed, "eval_s", time.perf_counter() - t0)
    return heldout


def save_due(
    cfg: Config, acc, parts: Parts, run: dict, pos: dict, window: dict, speed: Throughput
) -> None:
    """The checkpoint when it is due, its time in time/checkpoint_s (logged with the next
    window) and not in tokens_per_s."""
    t, t0 = cfg.train, time.perf_counter()
    if pos["step"] % t.save_every == 0 or pos["step"] == t.max_steps:
        save_checkpoint(cfg, acc, parts, run, pos)
    note_time(window, speed, "checkpoint_s", time.perf_counter() - t0)


def note_time(window: dict, speed: Throughput, name: str, seconds: float) -> None:
    """Time spent outside training steps: a time/<name> sum in the window, out of tokens_per_s."""
    speed.exclude(seconds)
    if seconds > 1e-3:
        window.setdefault(f"time/{name}", []).append(seconds)


def log_window(window: dict, step: int, sched, speed: Throughput, bar, main: bool) -> None:
    """Means over the window (sums for examples_cut and time/*), lr and tokens/s (training steps
    only) to MLflow (rank 0)."""
    cut = sum(window.pop("train/examples_cut", []))
    spent = {k: sum(window.pop(k)) for k in [k for k in window if k.startswith("time/")]}
    metrics = spent | {
        k: float(torch.stack([torch.as_tensor(x) for x in v]).double().mean())
        for k, v in window.items()
    }
    metrics |= {
        "train/lr": sched.get_last_lr()[0],
        "time/tokens_per_s": speed.rate(),
        "train/examples_cut": cut,
    }
    window.clear()
    bar.set_postfix(
        loss=f"{metrics['train/loss']:.3f}", tok_s=f"{metrics['time/tokens_per_s']:.0f}"
    )
    if main:
        mlflow.log_metrics(metrics, step=step)


def save_checkpoint(cfg: Config, acc, parts: Parts, run: dict, position: dict) -> None:
    """Write the train state at `position` (step, epoch, examples_done) to <run_dir>/step_<N>,
    prune old checkpoints and tag the MLflow run (rank 0)."""
    step = position["step"]
    extra = {
        "scheduler": parts.sched.state_dict(),
        **position,
        "config": config_dict(cfg),
        "mlflow_run_id": run["run_id"],
        "run_name": run["run_name"],
        "saved_at": time.time(),
    }
    if parts.value_opt is not None:
        extra |= {
            "value_head": parts.value_head.state_dict(),
            "value_optimizer": parts.value_opt.state_dict(),
        }
    t = cfg.train
    check_parameters(acc, parts.model)
    path = io_stream.join(run["run_dir"], f"step_{step}")
    path = save_train_state(path, parts.model, parts.opt, extra, fallback=t.checkpoint_fallback)
    log.info("checkpoint written to %s", path)
    if acc.is_main_process:
        kept = prune_ckpts(run["run_dir"], t.keep_last, fallback=t.checkpoint_fallback)
        latest = {"checkpoint_latest": path, f"checkpoint_step_{step}": path}
        mlflow.set_tags({**latest, **fallback_tags()})
        drop_checkpoint_tags(kept)


def heldout_ce(cfg: Config, acc, parts: Parts) -> dict[str, float]:
    """The number every algorithm shares: plain (unweighted) per-head CE over every valid slot of
    data.heldout (split data.heldout_split), in eval mode without gradients, each example scored
    once on one rank, sums reduced over all ranks; {"heldout/ce_head{k}", "heldout/ce" (their
    mean)}. Every rank runs it (FSDP gathers shards in each forward)."""
    H = parts.n_heads
    sums = torch.zeros(2 * H, dtype=torch.float64, device=acc.device)  # Σ CE, slots per head
    parts.model.eval()
    with torch.no_grad():
        for batch in iter_batches(
            cfg, parts.tokenizer, cfg.train.batch_size, epoch=0, rank=acc.process_index,
            world=acc.num_processes, shuffle=False, drop_last=False, names=cfg.data.heldout,
            split=cfg.data.heldout_split,
        ):  # fmt: skip
            ids = batch["input_ids"].to(acc.device)
            attn = batch["attention_mask"].to(acc.device)
            labels = mtp_targets(ids, batch["loss_mask"].to(acc.device), H, attention_mask=attn)
            _, head_ce = mtp_loss(parts.model, ids, labels, attention_mask=attn)
            slots = (labels != IGNORE).sum((0, 1)).double()
            sums += torch.cat([head_ce.double().nan_to_num() * slots, slots])
    parts.model.train()
    sums = acc.reduce(sums, "sum")
    ce = (sums[:H] / sums[H:]).tolist()
    return {f"heldout/ce_head{k}": v for k, v in enumerate(ce)} | {"heldout/ce": sum(ce) / H}


def log_heldout(cfg: Config, acc, parts: Parts, step: int) -> None:
    """heldout_ce at `step`, to MLflow (rank 0) and the log."""
    scores = heldout_ce(cfg, acc, parts)
    log.info(
        "step %d: held-out CE %.4f (%s)", step, scores["heldout/ce"], ", ".join(cfg.data.heldout)
    )
    if acc.is_main_process:
        mlflow.log_metrics(scores, step=step)


def evaluate_now(cfg: Config, acc, parts: Parts, step: int) -> None:
    """The periodic greedy pass@1 (eval.every), on every rank: FSDP gathers the model on rank 0."""
    scores = greedy_pass_at_1(full_model_on_rank0(parts.model), parts.tokenizer, cfg, acc.device)
    if acc.is_main_process:
        mlflow.log_metrics(scores, step=step)


def stop(acc, bar, run: dict, losses: list) -> dict:
    """End a run cut short by stop_after: its MLflow run is KILLED, as after a crash."""
    bar.close()
    if acc.is_main_process:
        mlflow.end_run(status="KILLED")
    return {
        "run_dir": run["run_dir"],
        "run_id": run["run_id"],
        "losses": [float(x) for x in losses],
    }


def finish(cfg: Config, acc, parts: Parts, run: dict, step: int, losses: list[float]) -> None:
    """Write the final model (in its stored dtype) and register it; the value head beside it."""
    final = io_stream.join(run["run_dir"], "final")
    check_parameters(acc, parts.model)
    full = full_model_on_rank0(parts.model)
    if acc.is_main_process:
        full.to(parts.stored_dtype)  # training is over: the fp32 masters are no longer needed
        save_model(full, final, parts.tokenizer)  # the one copy: the MLflow model points at it
        mlflow.set_tag("final_model", final)
        config = {"pyfunc": "mtp", "final_model": final, "max_new_tokens": cfg.eval.max_new_tokens}
        name = cfg.mlflow.mtp_model
        tags = {
            "run_id": run["run_id"],
            "algo": cfg.train.algo,
            "steps": str(step),
            "data": ", ".join(cfg.data.train),
        }
        version = log_pyfunc("model", name, config, tags=tags, description=describe_run(cfg))
        if version is None:
            log.info("final model written to %s (mlflow.mtp_model null: not registered)", final)
        else:
            uri = f"models:/{name}/{version}"
            mlflow.set_tag("final_model_version", uri)
            log.info("final model written to %s, registered as %s", final, uri)
        if parts.value_opt is not None:
            io_stream.write_safetensors(
                parts.value_head.state_dict(),
                io_stream.join(run["run_dir"], "value_head.safetensors"),
            )
        mlflow.log_metrics({"train/final_loss": losses[-1] if losses else float("nan")}, step=step)
        mlflow.end_run()
    acc.wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# The run


def open_run(cfg: Config, acc, resume: str | None, allow_changes: bool, force_unlock: bool) -> dict:
    """Find the checkpoint to resume (if any), name and lock the run folder; returns the run's
    {run_name, run_dir, run_id, ckpt, changes} (the MLflow run starts in start_tracking)."""
    t, kind = cfg.train, f"mtp-{cfg.train.algo}"  # run names mtp-<algo>-<time>; stage 1's critic-
    ckpt = shared_value(acc, lambda: find_resume(resume, cfg.paths.checkpoints, t.run_name, kind))
    saved = shared_value(acc, lambda: read_ckpt_meta(ckpt)) if ckpt else None
    run_name = run_name_for(acc, saved["run_name"] if saved else t.run_name, kind)
    run_dir = io_stream.join(cfg.paths.checkpoints, run_name)
    run_id = saved.get("mlflow_run_id") if saved else None
    shared_value(acc, lambda: claim_run(cfg, run_dir, run_id, force=force_unlock))
    changes = resume_changes(ckpt, saved["config"], cfg, allow_changes) if saved else {}
    return {
        "run_name": run_name,
        "run_dir": run_dir,
        "run_id": run_id,
        "ckpt": ckpt,
        "changes": changes,
    }


def restore(cfg: Config, parts: Parts, run: dict) -> dict:
    """The loop's position {step, epoch, examples_done}: from the checkpoint being resumed (model,
    optimizers, schedule and RNG restored in place), else the start."""
    if not run["ckpt"]:
        return {"step": 0, "epoch": 0, "examples_done": 0}
    state = load_train_state(run["ckpt"], parts.model, parts.opt)
    parts.sched.load_state_dict(state["scheduler"])
    if parts.value_opt is not None:
        parts.value_head.load_state_dict(state["value_head"])
        parts.value_opt.load_state_dict(state["value_optimizer"])
    if run["changes"]:
        apply_hparams(cfg, parts.opt, parts.sched, parts.value_opt)
    log.info("resuming from %s at step %d", run["ckpt"], state["step"])
    return {k: state[k] for k in ("step", "epoch", "examples_done")}


def stage2_unused(cfg: Config) -> list[str]:
    """The config keys stage 2 does not read with this algorithm: left out of its MLflow params."""
    used = {*cfg.data.train, *cfg.data.heldout, *(cfg.eval.datasets if cfg.eval.every else [])}
    skip = [f"paths.datasets.{n}" for n in cfg.paths.datasets if n not in used]
    skip += ["decode", "mlflow.value_head_model", "data.heldout_fraction"]
    skip += [f"critic.{k}" for k in ("lr", "max_steps", "batch_size", "eval_every", "patience")]
    skip += ["critic.min_delta"]
    if cfg.train.algo != "critic":
        skip += ["critic", "paths.value_head", "paths.models.rm"]
    elif cfg.critic.value_coef == 0:
        skip += ["critic.value_lr", "paths.models.rm"]  # the value head stays frozen
    if not cfg.train.algo.startswith("rho1"):
        skip += ["rho1", "paths.models.ref"]
    if cfg.eval.every == 0:
        skip += [f"eval.{k}" for k in ("datasets", "split", "n", "k", "temperature", "top_p")]
        skip += [f"eval.{k}" for k in ("batch_size", "limit", "workers")]  # max_new_tokens: pyfunc
        skip += ["eval.timeout", "eval.seed", "eval.sandbox"]
    return skip


def describe_run(cfg: Config) -> str:
    """The run page's (and the registered version's) description: algorithm, model, data, steps."""
    t, base = cfg.train, cfg.paths.models.base
    model = base or f"a random {cfg.model.n_heads}-head model (dim {cfg.model.dim})"
    return (
        f"Stage 2, algorithm {t.algo}: {model}; data {', '.join(cfg.data.train)} (split "
        f"{cfg.data.split}), held-out CE on {', '.join(cfg.data.heldout)} ({cfg.data.heldout_split}); "
        f"up to {t.max_steps} steps of {t.batch_size} x {t.grad_accum} examples per rank, lr {t.lr:g}."
    )


def start_tracking(cfg: Config, acc, parts: Parts, run: dict, tags: dict, step: int) -> None:
    """Start (or continue) the MLflow run on rank 0, tag it, say what the run is; every rank
    learns its id."""
    run_id = run["run_id"]
    if acc.is_main_process:
        params = config_params(cfg, skip=stage2_unused(cfg))
        active = mlflow_start(
            cfg, run["run_name"], run_id, params=params, description=describe_run(cfg)
        )
        if run_id is None:  # a resumed run has them
            d = cfg.data
            log_inputs(
                {f"{n}/{d.split}": dataset_file(cfg.paths.datasets[n], d.split) for n in d.train},
                "training",
            )
            log_inputs(
                {f"{n}/{d.heldout_split}": dataset_file(cfg.paths.datasets[n], d.heldout_split)
                 for n in d.heldout},
                "heldout",
            )  # fmt: skip
        run_id = active.info.run_id
        mlflow.set_tags(
            {
                "stage": "mtp",
                "algo": cfg.train.algo,
                "seed": cfg.train.seed,
                "run_dir": run["run_dir"],
                "world_size": acc.num_processes,
                **tags,
                **fallback_tags(),
            }
        )
        set_lock_run_id(run["run_dir"], run_id)
        if run["changes"]:
            mlflow.set_tag(f"resumed_with_changes_at_step_{step}", describe_changes(run["changes"]))
        models = {
            "model": parts.model,
            "reference": parts.ref,
            "value head": parts.value_head,
            "reward model": parts.rm,
        }
        log_startup(acc, cfg, active, models)
    run["run_id"] = shared_value(acc, lambda: run_id)


def train(
    cfg: Config,
    resume: str | None = None,
    *,
    stop_after: int | None = None,
    allow_changes: bool = False,
    force_unlock: bool = False,
    accelerator=None,
) -> dict:
    """Run stage 2; returns {"run_dir", "run_id", "losses": [rank 0's loss per optimizer step]}.
    allow_changes: resume although hyperparameters changed; force_unlock: take a live-looking lock;
    accelerator: an Accelerator to use instead of make_accelerator(cfg, train.grad_accum).
    Runs under wmtp_runs.tracked_run (MLflow status FAILED/KILLED on errors, locks released)."""
    return tracked_run(_train)(cfg, resume, stop_after, allow_changes, force_unlock, accelerator)


def _train(cfg: Config, resume, stop_after, allow_changes, force_unlock, accelerator) -> dict:
    """train's loop: open the run, build, then per optimizer step its micro-steps and one
    optimizer step; log, evaluate, checkpoint; finish."""
    t = cfg.train
    acc = accelerator or make_accelerator(cfg, t.grad_accum)
    run = open_run(cfg, acc, resume, allow_changes, force_unlock)
    set_seed(t.seed)  # Python, NumPy and torch (CUDA too) on every rank
    parts, tags = build(cfg, acc)
    pos = restore(cfg, parts, run)
    start_tracking(cfg, acc, parts, run, tags, pos["step"])
    main = acc.is_main_process
    bar = tqdm(
        total=t.max_steps, initial=pos["step"], disable=not main or quiet(),
        desc=f"stage 2: {t.algo}", dynamic_ncols=True, leave=False,
    )  # fmt: skip
    speed, window, losses, hist, heldout_at, skipped = Throughput(), {}, [], None, None, 0
    top = cfg.critic.max_weight if t.algo == "critic" else cfg.rho1.max_weight  # weights' bound
    micro_share = acc.num_processes * t.grad_accum  # micro-batches in one step, all ranks
    shown = shown_weight_stats(cfg)
    parts.model.train()
    new_step = True
    while pos["step"] < t.max_steps and pos["epoch"] < t.epochs:
        dropped: list[int] = []  # the epoch's last incomplete group, when the stream ends
        for batch in iter_batches(
            cfg, parts.tokenizer, t.batch_size, epoch=pos["epoch"], rank=acc.process_index,
            world=acc.num_processes, skip_examples=pos["examples_done"], dropped=dropped,
        ):  # fmt: skip
            if new_step:
                sums, provisional = (
                    None,
                    provisional_weight(acc, batch, parts.n_heads) * t.grad_accum,
                )
            with acc.accumulate(parts.model):
                micro = micro_step(cfg, acc, parts, batch, provisional / micro_share)
                sums = micro.sums if sums is None else add_sums(sums, micro.sums)
                if acc.sync_gradients:
                    sums = reduce_sums(acc, sums)
                    grad_norm, bad = optimizer_step(cfg, acc, parts, sums, provisional)
            new_step = acc.sync_gradients
            pos["examples_done"] += t.batch_size * acc.num_processes
            speed.add(micro.tokens * acc.num_processes)
            note_micro_step(window, micro, batch, shown)
            if main and t.plot_every and micro.weights is not None:
                counts = weight_histogram(micro.weights, micro.labels != IGNORE, top)
                hist = counts if hist is None else hist + counts
            if not acc.sync_gradients:
                continue
            pos["step"] += 1
            step = pos["step"]
            skipped = check_step(cfg, step, bad, skipped)
            losses.append(note_step(window, sums, grad_norm))
            bar.update(1)
            if evaluate_due(cfg, acc, parts, step, window, speed):
                heldout_at = step
            if step % t.log_every == 0 or step == t.max_steps:
                log_window(window, step, parts.sched, speed, bar, main)
            if main and t.plot_every and (step % t.plot_every == 0 or step == t.max_steps):
                log_head_plots(run["run_id"], step, parts.n_heads, hist, top)
                hist = None
            save_due(cfg, acc, parts, run, pos, window, speed)
            if stop_after is not None and step >= stop_after:  # tests: a run cut short
                return stop(acc, bar, run, losses)
            if step >= t.max_steps:
                break
        else:
            pos["epoch"] += 1
            log.info(
                "epoch %d done: %d examples of %s, %d more left out (an incomplete last batch of "
                "batch_size x ranks %d)", pos["epoch"], pos["examples_done"],
                ", ".join(cfg.data.train), sum(dropped), t.batch_size * acc.num_processes,
            )  # fmt: skip
            pos["examples_done"] = 0
    bar.close()
    if pos["step"] == 0:  # nothing to register: an empty dataset, or every example cut short
        raise ValueError(
            f"datasets {', '.join(cfg.data.train)}: not one optimizer step of training data "
            f"(batch_size x ranks {t.batch_size * acc.num_processes}); nothing trained or registered"
        )
    if cfg.data.heldout and heldout_at != pos["step"]:  # the data ran out before max_steps
        log_heldout(cfg, acc, parts, pos["step"])
    losses = [float(x) for x in losses]
    if main and window:  # the last checkpoint's time
        mlflow.log_metrics(
            {k: sum(v) for k, v in window.items() if k.startswith("time/")}, step=pos["step"]
        )
    finish(cfg, acc, parts, run, pos["step"], losses)
    return {"run_dir": run["run_dir"], "run_id": run["run_id"], "losses": losses}


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    args = parse_args(argv, __doc__.splitlines()[0], with_algo=True)
    cfg = setup(args)
    train(
        cfg,
        args.resume,
        allow_changes=args.resume_with_changes,
        force_unlock=args.force_unlock,
    )
    end_distributed()


if __name__ == "__main__":
    run_cli(main)
