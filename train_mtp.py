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
    all_reduce_grads,
    artifact_uri,
    batch_rewards,
    config_dict,
    find_resume,
    full_model_on_rank0,
    iter_batches,
    load_base,
    load_frozen,
    load_train_state,
    lr_lambda,
    make_accelerator,
    mlflow_connect,
    mlflow_start,
    parse_args,
    prune_ckpts,
    resolve_mlflow_uri,
    run_cli,
    run_name_for,
    save_train_state,
    setup,
    shared_value,
)


def load_value_head(cfg: Config, dim: int) -> ValueHead:
    """The stage-1 value head from critic.value_head (path, runs:/ or models:/ URI) or paths.value_head."""
    src = cfg.critic.value_head or cfg.paths.value_head
    if src.startswith(("runs:/", "models:/")):
        mlflow_connect(cfg)
        src = resolve_mlflow_uri(src)
        if not src.endswith(".safetensors"):
            src = io_stream.join(src, "value_head.safetensors")
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
    return head


def make_weight_fn(
    cfg: Config, labels: torch.Tensor, ref_ce, value_head, train_value: bool, stash: dict
):
    """The per-algo weight function handed to mtp_loss (called once with CE and head-0's hidden)."""
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
            )
        stash["weights"] = w
        return w

    weights.needs_ce = algo != "critic"  # the critic reads only head 0's hidden state: no CE pass
    return weights


def train(cfg: Config, resume: str | None = None, *, stop_after: int | None = None) -> dict:
    """Run stage 2; returns {"run_dir", "run_id", "losses": [rank 0's loss per optimizer step]}."""
    t = cfg.train
    algo = t.algo
    acc = make_accelerator(cfg, t.grad_accum)
    ckpt_path = shared_value(
        acc, lambda: find_resume(resume, cfg.paths.checkpoints, t.run_name, algo)
    )

    torch.manual_seed(t.seed)
    tokenizer, model = load_base(cfg, acc)
    H = model.n_heads
    ref = rm = value_head = None
    if algo.startswith("rho1"):
        if not cfg.paths.models.ref:
            raise ValueError(f"--algo {algo} needs paths.models.ref (the reference model)")
        ref = load_frozen(
            acc, cfg.paths.models.ref, "causal", tokenizer, "reference", t.shard_frozen_over_gib
        )
    if algo == "critic":
        value_head = load_value_head(cfg, model.config.hidden_size).to(acc.device)
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
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(t.warmup_steps, t.max_steps, t.schedule)
    )
    step, epoch, examples_done = 0, 0, 0
    state = None
    if ckpt_path:
        state = load_train_state(ckpt_path, model, opt)
        if state["config"]["train"]["algo"] != algo:
            raise ValueError(
                f"{ckpt_path}: checkpoint is from algo {state['config']['train']['algo']!r}, not {algo!r}"
            )
        sched.load_state_dict(state["scheduler"])
        if train_value:
            value_head.load_state_dict(state["value_head"])
            value_opt.load_state_dict(state["value_optimizer"])
        step, epoch, examples_done = state["step"], state["epoch"], state["examples_done"]
    run_name = state["run_name"] if state else run_name_for(acc, t.run_name, algo)
    run_dir = io_stream.join(cfg.paths.checkpoints, run_name)

    main = acc.is_main_process
    mlflow = None
    run_id = state["mlflow_run_id"] if state else None
    if main:
        import mlflow

        run_id = mlflow_start(cfg, run_name, run_id).info.run_id
        mlflow.set_tags({"algo": algo, "run_dir": run_dir, "world_size": acc.num_processes})
    run_id = shared_value(acc, lambda: run_id)
    losses: list[float] = []
    bar = tqdm(total=t.max_steps, initial=step, disable=not main, desc=algo, dynamic_ncols=True)
    speed = Throughput()
    model.train()
    stash: dict = {}
    window: dict[str, list[float]] = {}
    per_step = t.batch_size * acc.num_processes  # examples consumed per micro-step, all ranks

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
            labels = mtp_targets(ids, loss_mask, H)
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
                        model, ids, labels, weights=weights, attention_mask=attn
                    )
                acc.backward(loss)
                if train_value:
                    mask = loss_mask.float()
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
                    grad_norm = acc.clip_grad_norm_(model.parameters(), t.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            examples_done += per_step
            speed.add(int(attn.sum()) * acc.num_processes)
            window.setdefault("loss", []).append(loss.item())
            window.setdefault("examples_cut", []).append(batch["n_cut"])
            for k in range(H):
                window.setdefault(f"ce_head{k}", []).append(head_ce[k].item())
            if "weights" in stash:
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
            recent = window["loss"][-t.grad_accum :]
            losses.append(sum(recent) / len(recent))
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
                save_train_state(path, model, opt, extra)
                if main:
                    prune_ckpts(run_dir, t.keep_last)
                    mlflow.set_tags({"checkpoint_latest": path, f"checkpoint_step_{step}": path})
            if stop_after is not None and step >= stop_after:
                bar.close()
                if main:
                    mlflow.end_run(status="KILLED")
                return {"run_dir": run_dir, "run_id": run_id, "losses": losses}
            if step >= t.max_steps:
                break
        else:
            epoch += 1
            examples_done = 0
    bar.close()
    final = io_stream.join(run_dir, "final")
    full = full_model_on_rank0(model)
    if main:
        save_model(full, final, tokenizer)
        mlflow.set_tag("final_model", final)
        art = artifact_uri("model")
        if art is not None:
            save_model(full, art, tokenizer)
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
    cfg = setup(args)
    train(cfg, args.resume)


if __name__ == "__main__":
    run_cli(main)
