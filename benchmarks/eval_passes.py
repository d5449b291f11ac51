"""CE loss recovered with the spliced passes resumed from the hook's block, against every pass run in full.

`saelab eval` runs, per batch of contexts, the model clean, zero-ablated at the hook, and once per
SAE with its reconstruction spliced in. Today's path (`resume=False`) runs the whole model each
time; the resumed path runs the clean pass in full, recording what enters the hook's block, and the
others from that block on (`saelab.models.upper_layers`). Both accumulate the same losses on the
same contexts of the default corpus, through three untrained TopK SAEs (d_sae 4608, k 32) at one
hook; each row is one hook depth. The gain is bounded by the share of the model's work below the
hook's block (printed as "blocks skipped"; the unembedding and the losses over 49k tokens are paid
in every pass).

    python benchmarks/eval_passes.py [--layers 3 15 27] [--batches 3] [--batch-size 8] [--context 128]
"""

from __future__ import annotations

import argparse
import time
from itertools import islice

import torch

from saelab.eval.ce_loss import CELossAccumulator
from saelab.harvest.config import CorpusConfig
from saelab.harvest.corpus import iter_documents
from saelab.harvest.packing import iter_contexts
from saelab.models import SMOLLM2_SPEC, load_model
from saelab.sae.config import SAEConfig
from saelab.sae.registry import build_sae

N_SAES = 3


def timed_losses(model, batches: list[torch.Tensor], hook: str, saes: dict, resume: bool) -> tuple[float, dict]:
    """Seconds per batch (the first batch, which also checks the resumed pass, is not timed) and the losses."""
    accumulator = CELossAccumulator(model, hook, saes, resume=resume)
    accumulator.update(batches[0])
    start = time.perf_counter()
    for batch in batches[1:]:
        accumulator.update(batch)
    seconds = (time.perf_counter() - start) / (len(batches) - 1)
    result = accumulator.result()
    return seconds, {"clean": result.clean, "zero": result.zero, **result.sae}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    parser.add_argument("--batches", type=int, default=3, help="batches per path; the first is not timed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_model(SMOLLM2_SPEC, "cpu")
    stream = iter_contexts(iter_documents(CorpusConfig()), model.tokenizer, args.context, prepend_bos=True)
    contexts = torch.tensor(list(islice(stream, args.batches * args.batch_size)))
    batches = list(contexts.split(args.batch_size))
    d_model, n_blocks = model.cfg.d_model, len(model.blocks)
    saes = {f"topk-{i}": build_sae(SAEConfig(d_in=d_model, d_sae=8 * d_model, k=32)).eval() for i in range(N_SAES)}

    print(f"SmolLM2-135M, {N_SAES} SAEs + zero ablation, {args.batch_size} × {args.context} tokens a batch, CPU")
    print(f"{'hook':<28}{'full s/batch':>14}{'resumed':>10}{'speed-up':>10}{'blocks skipped':>16}{'max |ΔCE|':>12}")
    for layer in args.layers:
        hook = f"blocks.{layer}.hook_resid_post"
        full, full_losses = timed_losses(model, batches, hook, saes, resume=False)
        resumed, resumed_losses = timed_losses(model, batches, hook, saes, resume=True)
        delta = max(abs(full_losses[key] - resumed_losses[key]) for key in full_losses)
        skipped = layer * (len(saes) + 1) / ((n_blocks) * (len(saes) + 2))
        print(f"{hook:<28}{full:>14.2f}{resumed:>10.2f}{full / resumed:>9.2f}×{skipped:>16.0%}{delta:>12.1e}")


if __name__ == "__main__":
    main()
