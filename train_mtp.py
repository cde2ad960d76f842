"""Stage 2: weighted multi-token-prediction fine-tuning (baseline, critic, rho1-weighted, rho1-tokenskip).

python train_mtp.py [--config config.yaml] [--algo critic] [--set key=value ...] [--resume auto|PATH]
                    [--resume-with-changes] [--force-unlock] [--quiet]
accelerate launch --config_file fsdp.yaml train_mtp.py --config config.yaml
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from wmtp_cli import parse_args, run_cli

if TYPE_CHECKING:  # the functions import torch & co. themselves: --help answers at once
    import torch

    from wmtp import Config
    from wmtp_data import ValueHead


def load_value_head(cfg: Config, dim: int) -> tuple[ValueHead, dict[str, str]]:
    """The stage-1 value head from critic.value_head (path, runs:/ or models:/ URI) or
    paths.value_head, and MLflow tags that link this run to it: where it came from and the
    stage-1 run that trained it (recorded in the file's metadata)."""
    import io_stream
    from wmtp_data import ValueHead
    from wmtp_train import mlflow_connect, resolve_mlflow_uri

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


def make_weight_fn(
    cfg: Config, labels: torch.Tensor, ref_ce, value_head, train_value: bool, stash: dict
):
    """The per-algo weight function handed to mtp_loss (called once with CE and head-0's hidden)."""
    import torch

    from wmtp_data import critic_weights, rho1_excess, rho1_weights

    algo = cfg.train.algo
    if algo == "baseline":
        return None

    def weights(ce: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if algo == "critic":
            c = cfg.critic
            with torch.set_grad_enabled(train_value):
                stash["values"] = value_head(hidden)
            w = critic_weights(
                stash["values"].detach(),
                labels,
                discount=c.discount,
                temperature=c.temperature,
                normalize=c.normalize,
                eps=c.eps,
                max_weight=c.max_weight,
            )
        else:
            r = cfg.rho1
            w = rho1_weights(
                rho1_excess(ce, ref_ce),
                labels,
                mode="skip" if algo == "rho1-tokenskip" else "weighted",
                temperature=r.temperature,
                keep_ratio=r.keep_ratio,
                normalize=r.normalize,
                eps=r.eps,
                max_weight=r.max_weight,
                scope=r.scope,
            )
        stash["weights"] = w
        return w

    weights.needs_ce = algo != "critic"  # the critic reads only head 0's hidden state: no CE pass
    return weights


def train(
    cfg: Config,
    resume: str | None = None,
    *,
    stop_after: int | None = None,
    allow_changes: bool = False,
    force_unlock: bool = False,
) -> dict:
    """Run stage 2; returns {"run_dir", "run_id", "losses": [rank 0's loss per optimizer step]}.
    allow_changes: resume although hyperparameters changed; force_unlock: take a live-looking lock.
    Runs under wmtp_train.tracked_run (MLflow status FAILED/KILLED on errors, locks released)."""
    from wmtp_train import tracked_run

    return tracked_run(_train)(
        cfg,
        resume,
        stop_after=stop_after,
        allow_changes=allow_changes,
        force_unlock=force_unlock,
    )


def _train(
    cfg: Config,
    resume: str | None,
    *,
    stop_after: int | None,
    allow_changes: bool,
    force_unlock: bool,
) -> dict:
    """train's body."""
    import torch
    from tqdm import tqdm

    import io_stream
    from wmtp_data import (
        IGNORE,
        mtp_loss,
        mtp_targets,
        next_token_ce,
        value_mask,
        value_targets,
        weight_stats,
    )
    from wmtp_eval import greedy_pass_at_1
    from wmtp_model import save_model
    from wmtp_train import (
        Throughput,
        all_reduce_grads,
        apply_hparams,
        batch_rewards,
        claim_run,
        config_dict,
        describe_changes,
        fallback_tags,
        find_resume,
        full_model_on_rank0,
        iter_batches,
        load_base,
        load_base_ref,
        load_frozen,
        load_train_state,
        log,
        log_head_plots,
        log_pyfunc,
        log_startup,
        lr_schedule,
        make_accelerator,
        mlflow_start,
        prune_ckpts,
        quiet,
        read_ckpt_meta,
        resume_changes,
        run_name_for,
        save_train_state,
        set_lock_run_id,
        shared_value,
        weight_histogram,
    )

    t = cfg.train
    algo = t.algo
    kind = f"mtp-{algo}"  # run names by stage: mtp-<algo>-<time>; stage 1's are critic-<time>
    acc = make_accelerator(cfg, t.grad_accum)
    ckpt_path = shared_value(
        acc, lambda: find_resume(resume, cfg.paths.checkpoints, t.run_name, kind)
    )
    saved = shared_value(acc, lambda: read_ckpt_meta(ckpt_path)) if ckpt_path else None
    run_name = run_name_for(acc, saved["run_name"] if saved else t.run_name, kind)
    run_dir = io_stream.join(cfg.paths.checkpoints, run_name)
    run_id = saved.get("mlflow_run_id") if saved else None
    shared_value(acc, lambda: claim_run(cfg, run_dir, run_id, force=force_unlock))
    changes = resume_changes(ckpt_path, saved["config"], cfg, allow_changes) if saved else {}

    torch.manual_seed(t.seed)
    tokenizer, model = load_base(cfg, acc)
    # fp32 master weights and optimizer state whatever the stored dtype (a bf16 step of lr 1e-5
    # leaves most weights unchanged); compute follows train.mixed_precision through autocast.
    # The final model is saved in the stored dtype again (a bf16 7B base stays 13.5 GB, not 27).
    stored_dtype = next(model.parameters()).dtype
    model.float()
    H = model.n_heads
    ref = rm = value_head = None
    value_head_tags: dict[str, str] = {}
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
        value_head, value_head_tags = load_value_head(cfg, model.config.hidden_size)
        value_head = value_head.to(acc.device)
        if cfg.critic.value_coef > 0 and cfg.paths.models.rm:
            rm = load_frozen(
                acc, cfg.paths.models.rm, "reward", tokenizer, "reward", t.shard_frozen_over_gib
            )
    train_value = value_head is not None and cfg.critic.value_coef > 0
    value_opt = None
    if value_head is not None:
        value_head.requires_grad_(train_value)
        if train_value:  # small and replicated: its own optimizer, gradients averaged by hand
            value_opt = torch.optim.AdamW(
                value_head.parameters(), lr=cfg.critic.value_lr, weight_decay=0.0
            )

    opt = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay
    )
    model, opt = acc.prepare(model, opt)  # under FSDP2 model and optimizer are sharded together
    sched = lr_schedule(opt, t.schedule, t.warmup_steps, t.max_steps)
    step, epoch, examples_done = 0, 0, 0
    if ckpt_path:
        state = load_train_state(ckpt_path, model, opt)
        sched.load_state_dict(state["scheduler"])
        if train_value:
            value_head.load_state_dict(state["value_head"])
            value_opt.load_state_dict(state["value_optimizer"])
        step, epoch, examples_done = state["step"], state["epoch"], state["examples_done"]
        if changes:
            apply_hparams(cfg, opt, sched, value_opt)
        log.info("resuming from %s at step %d", ckpt_path, step)

    main = acc.is_main_process
    mlflow = None
    if main:
        import mlflow

        run = mlflow_start(cfg, run_name, run_id)
        run_id = run.info.run_id
        mlflow.set_tags(
            {
                "stage": "mtp",
                "algo": algo,
                "run_dir": run_dir,
                "world_size": acc.num_processes,
                **value_head_tags,
                **fallback_tags(),
            }
        )
        set_lock_run_id(run_dir, run_id)
        if changes:
            mlflow.set_tag(f"resumed_with_changes_at_step_{step}", describe_changes(changes))
    run_id = shared_value(acc, lambda: run_id)
    if main:
        models = {"model": model, "reference": ref, "value head": value_head, "reward model": rm}
        log_startup(acc, cfg, run, models)
    losses: list[float] = []
    bar = tqdm(
        total=t.max_steps, initial=step, disable=not main or quiet(), desc=algo, dynamic_ncols=True
    )
    speed = Throughput()
    model.train()
    stash: dict = {}
    hist = None  # rank 0's per-head weight histogram since the last plot
    top = cfg.critic.max_weight if algo == "critic" else cfg.rho1.max_weight  # weights' bound
    window: dict[str, list[float]] = {}
    per_step = t.batch_size * acc.num_processes  # examples consumed per micro-step, all ranks
    # one objective per optimizer step: Σ w·m·CE over all its micro-batches and ranks / their Σ w·m
    # (accelerate divides each backward by grad_accum, DDP and FSDP average over the ranks)
    micro_share = acc.num_processes * t.grad_accum
    new_step = True

    while step < t.max_steps and epoch < t.epochs:
        batches = iter_batches(
            cfg,
            tokenizer,
            t.batch_size,
            epoch=epoch,
            rank=acc.process_index,
            world=acc.num_processes,
            skip_examples=examples_done,
        )
        for batch in batches:
            ids = batch["input_ids"].to(acc.device)
            attn = batch["attention_mask"].to(acc.device)
            loss_mask = batch["loss_mask"].to(acc.device)
            labels = mtp_targets(ids, loss_mask, H, attention_mask=attn)
            valid = labels != IGNORE
            if new_step:
                # [Σ w·m·CE, Σ w·m, per-head Σ CE (H), per-head slots (H)] of the step, then the
                # step's slot count, which stands in for its Σ w·m until that is known
                sums = torch.zeros(2 + 2 * H, dtype=torch.float64, device=acc.device)
                provisional = acc.reduce(valid.sum().double(), "sum").clamp_min(1) * t.grad_accum
            with acc.accumulate(model):
                ref_ce = None
                if ref is not None:
                    with torch.no_grad():
                        ref_ce = next_token_ce(
                            ref(input_ids=ids, attention_mask=attn).logits.float(), ids
                        )
                weights = make_weight_fn(cfg, labels, ref_ce, value_head, train_value, stash)
                with acc.autocast():
                    loss, head_ce = mtp_loss(
                        model,
                        ids,
                        labels,
                        weights=weights,
                        attention_mask=attn,
                        denominator=provisional / micro_share,
                    )
                acc.backward(loss)  # gradient so far: Σ ∇(Σ w·m·CE) / provisional
                w = stash["weights"] if "weights" in stash else valid
                slots = valid.sum((0, 1)).double()
                sums += torch.cat(
                    [
                        torch.stack(
                            [loss.detach() * provisional / micro_share, (w * valid).sum()]
                        ).double(),
                        head_ce.double().nan_to_num() * slots,
                        slots,
                    ]
                )
                if train_value:
                    mask = value_mask(loss_mask).float()
                    target = value_targets(
                        batch_rewards(batch, rm, acc.device), mask, cfg.critic.gamma
                    )
                    vloss = ((stash.pop("values") - target) ** 2 * mask).sum() / mask.sum().clamp(
                        min=1
                    )
                    (cfg.critic.value_coef * vloss / t.grad_accum).backward()
                    window.setdefault("value_loss", []).append(vloss.item())
                grad_norm = None
                if acc.sync_gradients:
                    sums = acc.reduce(sums, "sum")
                    fix = float(provisional / sums[1].clamp_min(torch.finfo(torch.float32).tiny))
                    for p in model.parameters():  # now Σ ∇(Σ w·m·CE) / the step's Σ w·m
                        if p.grad is not None:
                            p.grad.mul_(fix)
                    grad_norm = acc.clip_grad_norm_(model.parameters(), t.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            new_step = acc.sync_gradients
            examples_done += per_step
            speed.add(int(attn.sum()) * acc.num_processes)
            window.setdefault("examples_cut", []).append(batch["n_cut"])
            if "weights" in stash:
                if main and t.plot_every:
                    counts = weight_histogram(stash["weights"], valid, top)
                    hist = counts if hist is None else hist + counts
                for k, v in weight_stats(stash.pop("weights"), labels).items():
                    window.setdefault(f"weight_{k}", []).append(v)
            if not acc.sync_gradients:
                continue
            if train_value:
                all_reduce_grads(acc, value_head)
                torch.nn.utils.clip_grad_norm_(value_head.parameters(), t.grad_clip)
                value_opt.step()
                value_opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            losses.append((sums[0] / sums[1]).item())
            window.setdefault("loss", []).append(losses[-1])
            for k, ce in enumerate((sums[2 : 2 + H] / sums[2 + H :]).tolist()):
                window.setdefault(f"ce_head{k}", []).append(ce)
            if grad_norm is not None:
                window.setdefault("grad_norm", []).append(float(grad_norm))
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                metrics = {k: sum(v) / len(v) for k, v in window.items() if k != "examples_cut"}
                metrics.update(
                    lr=sched.get_last_lr()[0],
                    tokens_per_s=speed.rate(),
                    examples_cut=sum(window["examples_cut"]),
                )
                window.clear()
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}"
                )
                if main:
                    mlflow.log_metrics(metrics, step=step)
            if main and t.plot_every and (step % t.plot_every == 0 or step == t.max_steps):
                log_head_plots(run_id, step, H, hist, top)
                hist = None
            if cfg.eval.every and step % cfg.eval.every == 0:  # every rank: FSDP gathers on rank 0
                scores = greedy_pass_at_1(full_model_on_rank0(model), tokenizer, cfg, acc.device)
                if main:
                    mlflow.log_metrics(scores, step=step)
            if step % t.save_every == 0 or step == t.max_steps:
                path = io_stream.join(run_dir, f"step_{step}")
                extra = {
                    "scheduler": sched.state_dict(),
                    "step": step,
                    "epoch": epoch,
                    "examples_done": examples_done,
                    "config": config_dict(cfg),
                    "mlflow_run_id": run_id,
                    "run_name": run_name,
                    "saved_at": time.time(),
                }
                if train_value:
                    extra |= {
                        "value_head": value_head.state_dict(),
                        "value_optimizer": value_opt.state_dict(),
                    }
                path = save_train_state(path, model, opt, extra, fallback=t.checkpoint_fallback)
                log.info("checkpoint written to %s", path)
                if main:
                    prune_ckpts(run_dir, t.keep_last, fallback=t.checkpoint_fallback)
                    latest = {"checkpoint_latest": path, f"checkpoint_step_{step}": path}
                    mlflow.set_tags({**latest, **fallback_tags()})
            if stop_after is not None and step >= stop_after:
                bar.close()
                if main:
                    mlflow.end_run(status="KILLED")
                return {"run_dir": run_dir, "run_id": run_id, "losses": losses}
            if step >= t.max_steps:
                break
        else:
            epoch += 1
            names = ", ".join(cfg.data.train)
            log.info("epoch %d done: %d examples of %s", epoch, examples_done, names)
            examples_done = 0
    bar.close()
    final = io_stream.join(run_dir, "final")
    full = full_model_on_rank0(model)
    if main:
        full.to(stored_dtype)  # training is over: the fp32 masters are no longer needed
        save_model(full, final, tokenizer)  # the one copy: the MLflow model below points at it
        mlflow.set_tag("final_model", final)
        config = {"pyfunc": "mtp", "final_model": final, "max_new_tokens": cfg.eval.max_new_tokens}
        name = cfg.mlflow.mtp_model
        uri = f"models:/{name}/{log_pyfunc('model', name, config)}"
        mlflow.set_tag("final_model_version", uri)
        log.info("final model written to %s, registered as %s", final, uri)
        if train_value:
            io_stream.write_safetensors(
                value_head.state_dict(), io_stream.join(run_dir, "value_head.safetensors")
            )
        mlflow.log_metrics({"final_loss": losses[-1] if losses else float("nan")}, step=step)
        mlflow.end_run()
    acc.wait_for_everyone()
    return {"run_dir": run_dir, "run_id": run_id, "losses": losses}


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    args = parse_args(argv, __doc__.splitlines()[0], with_algo=True)
    from wmtp_train import end_distributed, setup

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
