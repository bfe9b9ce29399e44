"""One rank of tests/e2e/test_fsdp.py (run under torchrun): BLOOM's blocks sharded
with FSDP2's ``fully_shard`` over gloo, a fastprompt training step, the loss
and prompt gradient written to ``<output>/rank<r>.pt``."""

import sys

import torch
import torch.distributed as dist
from models import padded_batch, peft_prompt, prompt_config, tiny_causal_lm
from torch.distributed.fsdp import fully_shard

import fastprompt  # noqa: F401  (first: it quiets bitsandbytes' optional-kernel warning)


def main(output: str) -> None:
    dist.init_process_group("gloo")
    base = tiny_causal_lm("bloom")
    for block in base.transformer.h:
        fully_shard(block)
    torch.manual_seed(0)
    model = fastprompt.get_peft_model(base, prompt_config(6))
    model.train()
    ids, mask, labels = padded_batch(3, 8, 512, side="left")
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.save(
        {"loss": loss.detach(), "grad": peft_prompt(model).grad, "path": model.fast_path},
        f"{output}/rank{dist.get_rank()}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
