"""Stage 2: weighted multi-token-prediction fine-tuning (baseline, critic, rho1-weighted, rho1-tokenskip).

python train_mtp.py [--config config.yaml] [--algo critic] [--set key=value ...] [--resume auto|PATH]
accelerate launch --config_file fsdp.yaml train_mtp.py --config config.yaml
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

import io_stream
from wmtp import Config
from wmtp_data import (
    ValueHead,
    critic_weights,
    mtp_loss,
    mtp_targets,
    next_token_ce,
    rho1_excess,
    rho1_weights,
    value_targets,
    weight_stats,
)
from wmtp_model import save_model
from wmtp_train import (
    Throughput,
    artifact_uri,
    batch_rewards,
    config_dict,
    find_resume,
    iter_batches,
    load_base,
    load_side_model,
    lr_lambda,
    make_accelerator,
    mlflow_start,
    parse_args,
    prune_ckpts,
    resolve_mlflow_uri,
    rng_state,
    run_cli,
    run_name_for,
    set_rng_state,
    setup,
)


def load_value_head(cfg: Config, dim: int) -> ValueHead:
    """The stage-1 value head from critic.value_head (path, runs:/ or models:/ URI) or paths.value_head."""
    src = cfg.critic.value_head or cfg.paths.value_head
    if src.startswith(("runs:/", "models:/")):
        import mlflow

        mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
        src = resolve_mlflow_uri(src)
        if not src.endswith(".safetensors"):
            src = io_stream.join(src, "value_head.safetensors")
    head = ValueHead(dim)
    state = io_stream.read_safetensors(src)
    missing = set(head.state_dict()) ^ set(state)
    if missing:
        raise ValueError(f"{src}: not a value head for dim {dim} (keys differ: {sorted(missing)})")
    head.load_state_dict(state)
    return head


def train(cfg: Config, resume: str | None = None, *, stop_after: int | None = None) -> dict:
    """Run stage 2; returns {"run_dir", "run_id", "losses": [per optimizer step]}."""
    t = cfg.train
    algo = t.algo
    acc = make_accelerator(cfg, t.grad_accum)
    ckpt_path = find_resume(resume, cfg.paths.checkpoints, t.run_name, algo)
    state = io_stream.load_ckpt(ckpt_path) if ckpt_path else None
    if state is not None and state["config"]["train"]["algo"] != algo:
        raise ValueError(
            f"{ckpt_path}: checkpoint is from algo {state['config']['train']['algo']!r}, not {algo!r}"
        )

    torch.manual_seed(t.seed)
    tokenizer, model = load_base(cfg)
    H = model.n_heads
    ref = rm = value_head = None
    if algo.startswith("rho1"):
        if not cfg.paths.models.ref:
            raise ValueError(f"--algo {algo} needs paths.models.ref (the reference model)")
        ref = load_side_model(cfg.paths.models.ref, "causal", tokenizer, "reference").to(acc.device)
    if algo == "critic":
        value_head = load_value_head(cfg, model.config.hidden_size)
        if cfg.critic.value_coef > 0 and cfg.paths.models.rm:
            rm = load_side_model(cfg.paths.models.rm, "reward", tokenizer, "reward").to(acc.device)
    train_value = value_head is not None and cfg.critic.value_coef > 0
    if value_head is not None:
        value_head.requires_grad_(train_value)

    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": t.lr}]
    if train_value:
        groups.append(
            {
                "params": list(value_head.parameters()),
                "lr": cfg.critic.value_lr,
                "weight_decay": 0.0,
            }
        )
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(t.warmup_steps, t.max_steps, t.schedule)
    )
    if state is not None:
        model.load_state_dict(state["model"])
    if train_value:
        model, value_head, opt = acc.prepare(model, value_head, opt)
    else:
        model, opt = acc.prepare(model, opt)
        if value_head is not None:
            value_head.to(acc.device)
    step, epoch, done_in_epoch = 0, 0, 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if train_value:
            acc.unwrap_model(value_head).load_state_dict(state["value_head"])
        step, epoch, done_in_epoch = state["step"], state["epoch"], state["batches_done"]
        set_rng_state(state["rng"])
    run_name = state["run_name"] if state else run_name_for(acc, t.run_name, algo)
    run_dir = io_stream.join(cfg.paths.checkpoints, run_name)

    main = acc.is_main_process
    mlflow = None
    run_id = state["mlflow_run_id"] if state else None
    if main:
        import mlflow

        run_id = mlflow_start(cfg, run_name, run_id).info.run_id
        mlflow.set_tags({"algo": algo, "run_dir": run_dir})
    losses: list[float] = []
    bar = tqdm(
        total=t.max_steps, initial=step, disable=not main, desc=f"{algo}", dynamic_ncols=True
    )
    speed = Throughput()
    model.train()
    stash: dict = {}
    window: dict[str, list[float]] = {}

    def weights_for(labels: torch.Tensor, ref_ce: torch.Tensor | None):
        """The per-algo weight function handed to mtp_loss (called once with CE and head-0 hidden)."""
        if algo == "baseline":
            return None

        def fn(ce: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
            if algo == "critic":
                with torch.set_grad_enabled(train_value):
                    values = value_head(hidden.float())
                stash["values"] = values
                c = cfg.critic
                w = critic_weights(
                    values.detach(),
                    labels,
                    discount=c.discount,
                    temperature=c.temperature,
                    normalize=c.normalize,
                    eps=c.eps,
                    max_weight=c.max_weight,
                )
            else:
                r = cfg.rho1
                mode = "skip" if algo == "rho1-tokenskip" else "weighted"
                w = rho1_weights(
                    rho1_excess(ce, ref_ce),
                    labels,
                    mode=mode,
                    temperature=r.temperature,
                    keep_ratio=r.keep_ratio,
                    normalize=r.normalize,
                    eps=r.eps,
                    max_weight=r.max_weight,
                )
            stash["weights"] = w
            return w

        return fn

    while step < t.max_steps and epoch < t.epochs:
        batches = iter_batches(
            cfg,
            tokenizer,
            t.batch_size,
            epoch=epoch,
            rank=acc.process_index,
            world=acc.num_processes,
            skip=done_in_epoch,
        )
        for batch in batches:
            ids = batch["input_ids"].to(acc.device)
            attn = batch["attention_mask"].to(acc.device)
            labels = mtp_targets(ids, batch["loss_mask"].to(acc.device), H)
            with acc.accumulate(model):
                ref_ce = None
                if ref is not None:
                    with torch.no_grad():
                        ref_ce = next_token_ce(
                            ref(input_ids=ids, attention_mask=attn).logits.float(), ids
                        )
                with acc.autocast():
                    loss, head_ce = mtp_loss(
                        model, ids, labels, weights=weights_for(labels, ref_ce), attention_mask=attn
                    )
                total = loss
                if train_value:
                    mask = batch["loss_mask"].to(acc.device).float()
                    target = value_targets(
                        batch_rewards(batch, rm, acc.device), mask, cfg.critic.gamma
                    )
                    vloss = (
                        (stash["values"].float() - target) ** 2 * mask
                    ).sum() / mask.sum().clamp(min=1)
                    total = loss + cfg.critic.value_coef * vloss
                    window.setdefault("value_loss", []).append(vloss.item())
                acc.backward(total)
                grad_norm = None
                if acc.sync_gradients:
                    params = [p for g in opt.param_groups for p in g["params"]]
                    grad_norm = acc.clip_grad_norm_(params, t.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            done_in_epoch += 1
            speed.add(int(attn.sum()) * acc.num_processes)
            window.setdefault("loss", []).append(loss.item())
            for k in range(H):
                window.setdefault(f"ce_head{k}", []).append(head_ce[k].item())
            if "weights" in stash:
                for k, v in weight_stats(stash.pop("weights"), labels).items():
                    window.setdefault(f"weight_{k}", []).append(v)
            if not acc.sync_gradients:
                continue
            sched.step()
            step += 1
            step_loss = sum(window["loss"][-t.grad_accum :]) / min(
                t.grad_accum, len(window["loss"])
            )
            losses.append(step_loss)
            if grad_norm is not None:
                window.setdefault("grad_norm", []).append(float(grad_norm))
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                metrics = {k: sum(v) / len(v) for k, v in window.items()}
                metrics.update(lr=sched.get_last_lr()[0], tokens_per_s=speed.rate())
                window.clear()
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}"
                )
                if main:
                    mlflow.log_metrics(metrics, step=step)
            if step % t.save_every == 0 or step == t.max_steps:
                save_checkpoint(
                    acc,
                    cfg,
                    run_dir,
                    step,
                    epoch,
                    done_in_epoch,
                    model,
                    opt,
                    sched,
                    value_head if train_value else None,
                    run_id,
                    run_name,
                )
            if stop_after is not None and step >= stop_after:
                bar.close()
                if main:
                    mlflow.end_run(status="KILLED")
                return {"run_dir": run_dir, "run_id": run_id, "losses": losses}
            if step >= t.max_steps:
                break
        else:
            epoch += 1
            done_in_epoch = 0
    bar.close()
    final = io_stream.join(run_dir, "final")
    acc.wait_for_everyone()
    if main:
        unwrapped = acc.unwrap_model(model)
        save_model(unwrapped, final, tokenizer)
        mlflow.set_tag("final_model", final)
        art = artifact_uri("model")
        if art is not None:
            save_model(unwrapped, art, tokenizer)
        if train_value:
            io_stream.write_safetensors(
                acc.unwrap_model(value_head).state_dict(),
                io_stream.join(run_dir, "value_head.safetensors"),
            )
        mlflow.log_metrics({"final_loss": losses[-1] if losses else float("nan")}, step=step)
        mlflow.end_run()
    acc.wait_for_everyone()
    return {"run_dir": run_dir, "run_id": run_id, "losses": losses}


def save_checkpoint(
    acc, cfg, run_dir, step, epoch, done_in_epoch, model, opt, sched, value_head, run_id, run_name
) -> str:
    """Write step_<N> (manifest last), record it in MLflow, keep the last train.keep_last."""
    path = io_stream.join(run_dir, f"step_{step}")
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {
            "model": acc.unwrap_model(model).state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "step": step,
            "epoch": epoch,
            "batches_done": done_in_epoch,
            "rng": rng_state(),
            "config": config_dict(cfg),
            "mlflow_run_id": run_id,
            "run_name": run_name,
            "saved_at": time.time(),
        }
        if value_head is not None:
            state["value_head"] = acc.unwrap_model(value_head).state_dict()
        io_stream.save_ckpt(state, path)
        prune_ckpts(run_dir, cfg.train.keep_last)
        import mlflow

        mlflow.set_tags({"checkpoint_latest": path, f"checkpoint_step_{step}": path})
    acc.wait_for_everyone()
    return path


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    args = parse_args(argv, __doc__.splitlines()[0], with_algo=True)
    cfg = setup(args)
    train(cfg, args.resume)


if __name__ == "__main__":
    run_cli(main)
