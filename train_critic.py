"""Stage 1: train a value head on the frozen base model's hidden states from sequence rewards.

    python train_critic.py [--config config.yaml] [--set key=value ...] [--quiet]
    accelerate launch --config_file fsdp.yaml train_critic.py --config config.yaml

Rewards come from the reward model (paths.models.rm) or, without one, from dataset labels
(e.g. CodeContests correct/incorrect solutions). Value targets G_t = gamma^(T-t) * R on the
completion tokens and the last prompt token, masked MSE as one mean over every rank's tokens,
early stopping on a held-out split scored from sums over all ranks (every rank stops together). The head is written to paths.value_head
and logged to MLflow as an artifact and a registered model version.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from wmtp_cli import parse_args, run_cli

if TYPE_CHECKING:  # the functions import torch & co. themselves: --help answers at once
    import torch

    from wmtp import Config


def masked_mse(values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the valid (mask = 1) tokens."""
    return ((values - targets) ** 2 * mask).sum() / mask.sum().clamp(min=1)


def explained_variance(values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(target - value) / Var(target) over valid tokens (1 = perfect, 0 = no better than the mean)."""
    m = mask.bool()
    t, v = targets[m].double(), values[m].double()
    var = t.var(unbiased=False)
    return float(1 - (t - v).var(unbiased=False) / var) if var > 0 else float("nan")


def value_step(
    model, head, batch: dict, rm, gamma: float, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, values, targets, mask) of the value head on one batch: masked MSE over the loss
    tokens and the position before the first one (see `value_mask`)."""
    from wmtp_data import value_mask, value_targets
    from wmtp_train import batch_rewards, head0_hidden

    ids = batch["input_ids"].to(device)
    attn = batch["attention_mask"].to(device)
    mask = value_mask(batch["loss_mask"].to(device)).float()
    hidden = head0_hidden(model, ids, attn)
    targets = value_targets(batch_rewards(batch, rm, device), mask, gamma)
    values = head(hidden.float())
    return masked_mse(values, targets, mask), values, targets, mask


def evaluate(cfg: Config, model, head, tokenizer, rm, acc) -> dict[str, float] | None:
    """Held-out value loss and explained variance over every held-out token, from sums reduced
    over the ranks (the same numbers on every rank); None when the held-out split is empty."""
    import torch

    from wmtp_train import iter_batches

    c = cfg.critic
    sums = torch.zeros(5, dtype=torch.float64, device=acc.device)  # n, ΣG, ΣG², Σe, Σe²; e = G − V
    head.eval()
    with torch.no_grad():
        for batch in iter_batches(
            cfg,
            tokenizer,
            c.batch_size,
            epoch=0,
            rank=acc.process_index,
            world=acc.num_processes,
            part="heldout",
            shuffle=False,
            drop_last=False,
        ):
            _, values, targets, mask = value_step(model, head, batch, rm, c.gamma, acc.device)
            m = mask.bool()
            g, e = targets[m].double(), (targets - values)[m].double()
            sums += torch.stack(
                [m.sum().double(), g.sum(), g.square().sum(), e.sum(), e.square().sum()]
            )
    head.train()
    n, g1, g2, e1, e2 = acc.reduce(sums, "sum").tolist()
    if n == 0:
        return None
    var_g, var_e = g2 / n - (g1 / n) ** 2, e2 / n - (e1 / n) ** 2
    return {
        "heldout_value_loss": e2 / n,
        "heldout_explained_variance": 1 - var_e / var_g if var_g > 0 else math.nan,
    }


def train_critic(cfg: Config) -> dict:
    """Run stage 1; returns {"value_head": path, "run_id", "version" (registered model version),
    "losses"}. Runs under wmtp_train.tracked_run (MLflow status on errors, locks released)."""
    from wmtp_train import tracked_run

    return tracked_run(_train_critic)(cfg)


def _train_critic(cfg: Config) -> dict:
    """train_critic's body."""
    import torch
    from tqdm import tqdm

    import io_stream
    from wmtp_data import ValueHead
    from wmtp_train import (
        all_reduce_grads,
        fallback_tags,
        is_fsdp,
        iter_batches,
        iter_examples,
        load_base,
        load_frozen,
        log,
        log_pyfunc,
        log_startup,
        make_accelerator,
        mlflow_start,
        quiet,
        run_name_for,
        shard_frozen,
    )

    c = cfg.critic
    acc = make_accelerator(cfg)
    torch.manual_seed(cfg.train.seed)
    tokenizer, model = load_base(cfg, acc)
    model.eval().requires_grad_(False)
    model = (
        shard_frozen(acc, model) if is_fsdp(acc) else model.to(acc.device)
    )  # frozen; sharded under FSDP
    rm = None
    if cfg.paths.models.rm:
        rm = load_frozen(
            acc, cfg.paths.models.rm, "reward", tokenizer, "reward", cfg.train.shard_frozen_over_gib
        )
    first = next(iter_examples(cfg, "train"), None)
    if first is None:
        raise ValueError(f"datasets {cfg.data.train}: no training examples")
    if rm is None and first.label is None:
        raise ValueError(
            f"datasets {cfg.data.train}: examples have no labels and paths.models.rm is not set; "
            "the value head needs rewards from one of them"
        )
    # the head is small: replicated on every rank, its gradients averaged by hand
    head = ValueHead(acc.unwrap_model(model).config.hidden_size).to(acc.device)
    opt = torch.optim.AdamW(head.parameters(), lr=c.lr)

    main = acc.is_main_process
    run_name = run_name_for(acc, None, "critic")
    run_id = None
    if main:
        import mlflow

        run = mlflow_start(cfg, run_name)
        run_id = run.info.run_id
        mlflow.set_tags({"stage": "critic", **fallback_tags()})
        models = {"base model (frozen)": model, "value head": head, "reward model": rm}
        log_startup(acc, cfg, run, models)
    best, bad, step, epoch = math.inf, 0, 0, 0
    best_state = None
    losses: list[float] = []
    bar = tqdm(total=c.max_steps, disable=not main or quiet(), desc="critic", dynamic_ncols=True)
    stop = False
    while not stop and step < c.max_steps and epoch < cfg.train.epochs:
        for batch in iter_batches(
            cfg,
            tokenizer,
            c.batch_size,
            epoch=epoch,
            rank=acc.process_index,
            world=acc.num_processes,
            part="train",
        ):
            loss, values, targets, mask = value_step(model, head, batch, rm, c.gamma, acc.device)
            # one mean over every rank's tokens: [Σ squared error, tokens] of the step, all ranks
            count = mask.sum()
            sums = acc.reduce(torch.stack([loss.detach() * count, count]), "sum")
            # all_reduce_grads averages over the ranks, hence the factor num_processes
            (loss * count * acc.num_processes / sums[1].clamp(min=1)).backward()
            all_reduce_grads(acc, head)
            grad_norm = torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            step_loss = (sums[0] / sums[1].clamp(min=1)).item()
            losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(value_loss=f"{step_loss:.4f}")
            v = values.detach()[mask.bool()]
            metrics = {
                "value_loss": step_loss,
                "explained_variance": explained_variance(values.detach(), targets, mask),
                "value_mean": v.mean().item(),
                "value_std": v.std().item() if v.numel() > 1 else 0.0,
                "grad_norm": float(grad_norm),
            }
            if step % c.eval_every == 0 or step == c.max_steps:
                held = evaluate(cfg, model, head, tokenizer, rm, acc)
                if held is not None:
                    metrics.update(held)
                    if held["heldout_value_loss"] < best - c.min_delta:
                        best, bad = held["heldout_value_loss"], 0
                        best_state = {k: t.detach().clone() for k, t in head.state_dict().items()}
                    else:
                        bad += 1
                        stop = bad >= c.patience
            if main and (step % cfg.train.log_every == 0 or stop or step == c.max_steps):
                mlflow.log_metrics(metrics, step=step)
            if stop or step >= c.max_steps:
                break
        else:
            epoch += 1
    bar.close()
    state = best_state or head.state_dict()
    version = None
    acc.wait_for_everyone()
    if main:
        meta = {
            "dim": str(model.config.hidden_size),
            "gamma": str(c.gamma),
            "mlflow_run_id": run_id,
        }
        io_stream.write_safetensors(state, cfg.paths.value_head, metadata=meta)
        version = log_pyfunc(
            "value_head",
            cfg.mlflow.value_head_model,
            {"pyfunc": "value_head"},
            artifacts={"value_head": cfg.paths.value_head},
        )
        mlflow.set_tags({"value_head": cfg.paths.value_head, "stopped_early": str(stop)})
        uri = f"models:/{cfg.mlflow.value_head_model}/{version}"
        log.info("value head written to %s, registered as %s", cfg.paths.value_head, uri)
        mlflow.log_metrics(
            {"best_heldout_value_loss": best if best < math.inf else float("nan")}, step=step
        )
        mlflow.end_run()
    acc.wait_for_everyone()
    return {
        "value_head": cfg.paths.value_head,
        "run_id": run_id,
        "version": version,
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    args = parse_args(argv, __doc__.splitlines()[0], with_algo=False, with_resume=False)
    from wmtp_train import end_distributed, setup

    train_critic(setup(args))
    end_distributed()


if __name__ == "__main__":
    run_cli(main)
