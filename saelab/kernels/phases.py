"""Names for the parts of a training step, as profiler ranges: where `benchmarks/training_step.py
--breakdown` reads the step's time from.

A range costs a few microseconds when no profiler is running, against steps of tens of milliseconds.
"""

from __future__ import annotations

from torch.profiler import record_function

ENCODER_GEMM = "step: encoder GEMM"
SELECTION = "step: top-k selection"
DECODE = "step: sparse decode"
ENCODER_BACKWARD = "step: sparse backward (encoder)"
DECODER_BACKWARD = "step: sparse backward (decoder)"
ADAM = "step: Adam"
DECODER_CONSTRAINT = "step: decoder constraint"
PHASES = (ENCODER_GEMM, SELECTION, DECODE, ENCODER_BACKWARD, DECODER_BACKWARD, ADAM, DECODER_CONSTRAINT)


def phase(name: str) -> record_function:
    """A profiler range for one of `PHASES`: `with phase(ADAM): optimizer.step()`."""
    return record_function(name)
