"""Runs the reference `rwkv` pip package in its own process: RWKV-7 mode (``RWKV_V7_ON=1``)
unless the job says ``"v7": False`` (RWKV-4/5/6 run in its generic class).

Its import sets process-wide torch flags and module globals (dtype, device), so the tests never
import it themselves. Usage: ``python oracle_runner.py JOB OUT`` where JOB is a torch-saved dict
``{"model": path without .pth, "strategy": str, "runs": {name: {"chunks": [[id, ...], ...], "full_output": bool}}}``
(a run may give its starting ``"state"``: the package's own list of per-layer tensors);
OUT receives, per run, the logits after each chunk and the final state. An optional
``"generations": {name: {"prompt": str, "token_count": int, "args": {PIPELINE_ARGS kwargs}}}``
runs ``rwkv.utils.PIPELINE.generate`` with the World tokenizer (or ``"tokenizer"``: an HF
``tokenizer.json`` path) and records its text and every token its sampler returned.
"""

import os
import sys

import torch

torch.set_num_threads(1)


def main(job_path: str, out_path: str) -> None:
    job = torch.load(job_path)
    if job.get("v7", True):
        os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "1")
    from rwkv.model import RWKV
    from rwkv.utils import PIPELINE, PIPELINE_ARGS

    model = RWKV(model=job["model"], strategy=job["strategy"])
    results = {}
    for name, run in job.get("runs", {}).items():
        state, logits = ([s.clone() for s in run["state"]] if "state" in run else None), []
        for chunk in run["chunks"]:
            out, state = model.forward(chunk, state, full_output=run["full_output"]) if len(chunk) > 1 else model.forward(chunk, state)
            logits.append(out.float().clone())
        results[name] = {"logits": logits, "state": [s.float().clone() for s in state]}
    pipeline = PIPELINE(model, job.get("tokenizer", "rwkv_vocab_v20230424"))  # or an HF tokenizer.json path
    sample_logits = pipeline.sample_logits
    for name, gen in job.get("generations", {}).items():
        sampled = []
        pipeline.sample_logits = lambda *a, **k: sampled.append(sample_logits(*a, **k)) or sampled[-1]
        text = pipeline.generate(gen["prompt"], token_count=gen["token_count"], args=PIPELINE_ARGS(**gen["args"]))
        results[name] = {"text": text, "sampled": sampled}
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
