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

from wmtp_cli import parse_args, run_cli

if __name__ == "__main__":  # --help and a bad flag answer before torch & co. are imported
    parse_args(None, __doc__.splitlines()[0], with_algo=False, with_resume=False)

import math  # noqa: E402

import mlflow  # noqa: E402
import torch  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from tqdm import tqdm  # noqa: E402

import io_stream  # noqa: E402
from wmtp import Config, config_params  # noqa: E402
from wmtp_ckpt import fallback_tags  # noqa: E402
from wmtp_data import dataset_file, iter_batches, iter_examples  # noqa: E402
from wmtp_dist import (  # noqa: E402
    end_distributed,
    is_fsdp,
    log,
    make_accelerator,
    quiet,
    replicate,
    shard_frozen,
)
from wmtp_loss import ValueHead, value_mask, value_targets  # noqa: E402
from wmtp_runs import (  # noqa: E402
    log_inputs,
    log_pyfunc,
    log_startup,
    mlflow_start,
    run_name_for,
    tracked_run,
)
from wmtp_train import batch_rewards, head0_hidden, load_base, load_frozen, setup  # noqa: E402

# the config keys stage 1 reads: its MLflow params (stage 2's train.algo etc. do not apply)
STAGE1_KEYS = (
    "paths.models.base",
    "paths.models.rm",
    "paths.value_head",
    "s3",
    "mlflow.tracking_uri",
    "mlflow.registry_uri",
    "mlflow.experiment",
    "mlflow.artifact_location",
    "mlflow.value_head_model",
    "model",
    "data.train",
    "data.split",
    "data.heldout_fraction",
    "data.max_length",
    "data.prompt_loss",
    "data.shuffle",
    "train.epochs",
    "train.grad_clip",
    "train.log_every",
    "train.seed",
    "train.mixed_precision",
    "train.deterministic",
    "train.shard_frozen_over_gib",
    "critic.gamma",
    "critic.lr",
    "critic.max_steps",
    "critic.batch_size",
    "critic.eval_every",
    "critic.patience",
    "critic.min_delta",
)


def describe_run(cfg: Config) -> str:
    """The run page's description: what stage 1 trains, on what, for how long."""
    c, base = cfg.critic, cfg.paths.models.base
    model = base or f"a random {cfg.model.n_heads}-head model (dim {cfg.model.dim})"
    rewards = f"reward model {cfg.paths.models.rm}" if cfg.paths.models.rm else "dataset labels"
    data = ", ".join(cfg.data.train)
    return (
        f"Stage 1: a value head on {model} (frozen), rewards from {rewards}; data {data} "
        f"(split {cfg.data.split}, {cfg.data.heldout_fraction:g} held out); up to {c.max_steps} "
        f"steps of batch {c.batch_size}, lr {c.lr:g}, gamma {c.gamma:g}."
    )


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


def build(cfg: Config, acc):
    """(tokenizer, frozen base model, reward model or None, value head, the head to train through
    (its DDP wrapper with several ranks, else the head itself), its optimizer); checks that there
    is data with rewards to train on."""
    tokenizer, model = load_base(cfg, acc)
    model.eval().requires_grad_(False)
    model = shard_frozen(acc, model) if is_fsdp(acc) else model.to(acc.device)  # frozen
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
    # the head is small: replicated on every rank, its gradients averaged by DDP (several ranks);
    # the plain head is what is optimized, evaluated and saved
    head = ValueHead(acc.unwrap_model(model).config.hidden_size).to(acc.device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.critic.lr)
    ddp = replicate(acc, head)
    return tokenizer, model, rm, head, head if ddp is None else ddp, opt


def critic_step(cfg: Config, acc, model, head, opt, batch: dict, rm) -> dict[str, float]:
    """One optimizer step of the value head (its DDP wrapper with several ranks, see build) on a
    batch: one masked-MSE mean over every rank's tokens; returns the step's metrics (value_loss
    is that mean)."""
    loss, values, targets, mask = value_step(model, head, batch, rm, cfg.critic.gamma, acc.device)
    count = mask.sum()
    sums = acc.reduce(torch.stack([loss.detach() * count, count]), "sum")  # all ranks
    # DDP's backward averages the gradients over the ranks, hence the factor num_processes: the
    # result is the gradient of the one mean over every rank's tokens
    (loss * count * acc.num_processes / sums[1].clamp(min=1)).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.train.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    v = values.detach()[mask.bool()]
    return {
        "train/value_loss": (sums[0] / sums[1].clamp(min=1)).item(),
        "train/explained_variance": explained_variance(values.detach(), targets, mask),
        "train/value_mean": v.mean().item(),
        "train/value_std": v.std().item() if v.numel() > 1 else 0.0,
        "train/grad_norm": float(grad_norm),
    }


def finish(cfg: Config, acc, model, state: dict, run_id, stopped: bool, best: float, step: int):
    """Write the value head (rank 0) with its metadata and register it; returns the version."""
    version = None
    acc.wait_for_everyone()
    if acc.is_main_process:
        c = cfg.critic
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
            tags={
                "run_id": run_id,
                "stage": "critic",
                "steps": str(step),
                "data": ", ".join(cfg.data.train),
            },
            description=describe_run(cfg),
        )
        mlflow.set_tags({"value_head": cfg.paths.value_head, "stopped_early": str(stopped)})
        if version is None:
            log.info("value head written to %s (mlflow.value_head_model null: not registered)",
                     cfg.paths.value_head)  # fmt: skip
        else:
            uri = f"models:/{cfg.mlflow.value_head_model}/{version}"
            log.info("value head written to %s, registered as %s", cfg.paths.value_head, uri)
        best_loss = best if best < math.inf else float("nan")
        mlflow.log_metrics({"heldout/best_value_loss": best_loss}, step=step)
        mlflow.end_run()
    acc.wait_for_everyone()
    return version


def train_critic(cfg: Config, *, accelerator=None) -> dict:
    """Run stage 1; returns {"value_head": path, "run_id", "version" (registered model version),
    "losses"}. accelerator: an Accelerator to use instead of make_accelerator(cfg). Runs under
    wmtp_runs.tracked_run (MLflow status on errors, locks released)."""
    return tracked_run(_train_critic)(cfg, accelerator)


def _train_critic(cfg: Config, accelerator) -> dict:
    """train_critic's loop: build, then per batch one step, held-out evaluation with early
    stopping, logging; finish with the best head."""
    c = cfg.critic
    acc = accelerator or make_accelerator(cfg)
    set_seed(cfg.train.seed)  # Python, NumPy and torch (CUDA too) on every rank
    tokenizer, model, rm, head, trained, opt = build(cfg, acc)
    main = acc.is_main_process
    run_name = run_name_for(acc, None, "critic")
    run_id = None
    if main:
        used = [f"paths.datasets.{n}" for n in cfg.data.train]
        params = config_params(cfg, [*STAGE1_KEYS, *used])
        run = mlflow_start(cfg, run_name, params=params, description=describe_run(cfg))
        run_id = run.info.run_id
        log_inputs(
            {f"{n}/{cfg.data.split}": dataset_file(cfg.paths.datasets[n], cfg.data.split)
             for n in cfg.data.train},
            "training",
        )  # fmt: skip
        mlflow.set_tags({"stage": "critic", "seed": cfg.train.seed, **fallback_tags()})
        models = {"base model (frozen)": model, "value head": head, "reward model": rm}
        log_startup(acc, cfg, run, models)
    best, bad, step, epoch, stop = math.inf, 0, 0, 0, False
    best_state, losses = None, []
    bar = tqdm(
        total=c.max_steps, disable=not main or quiet(), desc="stage 1: value head",
        dynamic_ncols=True, leave=False,
    )  # fmt: skip
    while not stop and step < c.max_steps and epoch < cfg.train.epochs:
        for batch in iter_batches(
            cfg, tokenizer, c.batch_size, epoch=epoch, rank=acc.process_index,
            world=acc.num_processes, part="train",
        ):  # fmt: skip
            metrics = critic_step(cfg, acc, model, trained, opt, batch, rm)
            step += 1
            losses.append(metrics["train/value_loss"])
            bar.update(1)
            bar.set_postfix(value_loss=f"{losses[-1]:.4f}")
            if step % c.eval_every == 0 or step == c.max_steps:
                held = evaluate(cfg, model, head, tokenizer, rm, acc)
                if held is not None:
                    metrics |= {f"heldout/{k.removeprefix('heldout_')}": v for k, v in held.items()}
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
    version = finish(cfg, acc, model, best_state or head.state_dict(), run_id, stop, best, step)
    return {
        "value_head": cfg.paths.value_head,
        "run_id": run_id,
        "version": version,
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    args = parse_args(argv, __doc__.splitlines()[0], with_algo=False, with_resume=False)
    train_critic(setup(args))
    end_distributed()


if __name__ == "__main__":
    run_cli(main)
