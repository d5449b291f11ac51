"""The names of what a training run folder holds, in one light module that every stage (and the
dashboard, which must start without importing the model stack) reads them from.

    <run>/config.yaml                 the TrainConfig the run was made with
    <run>/metrics.jsonl               one line per logged step and SAE (and per `saelab eval`)
    <run>/summary.json                each SAE's numbers over the last training steps
    <run>/compare.json                `saelab compare <run>`: how many features its SAEs share (+ compare.html)
    <run>/graphs/<slug>.json          `saelab attribute --run <run>`: circuit graph files (+ <slug>.html)
    <run>/checkpoints/                atomic training checkpoints
    <run>/saes/<label>/               an SAE in the SAELens format, plus eval.json, probing.json, features.sqlite,
                                      explanations.jsonl, token_summaries.jsonl and autointerp.json
"""

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
SAE_DIR = "saes"
EVAL_FILE = "eval.json"
FEATURES_FILE = "features.sqlite"
PROBING_FILE = "probing.json"
EXPLANATIONS_FILE = "explanations.jsonl"
TOKEN_SUMMARIES_FILE = "token_summaries.jsonl"  # `saelab explain`'s token-summary labels and their scores
AUTOINTERP_FILE = "autointerp.json"
COMPARE_FILE = "compare.json"
GRAPHS_DIR = "graphs"
