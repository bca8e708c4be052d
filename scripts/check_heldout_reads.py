"""Check (issue 15): bytes read from disk per forward / bytes of the distinct experts that forward used, converted
tiny-mixtral, 8 held-out prompts of 128 tokens, without a budget and with cpu_memory = 25% of the
experts; logits compared with the in-memory model's. Writes bench/results/heldout-bytes-read.json.

    python scripts/check_heldout_reads.py
"""
import json
import os
import tempfile

import torch

import moe_infer
from moe_infer import assets
from moe_infer.traces.corpus import is_heldout, stdlib_files
from moe_infer.experts.convert import convert
from moe_infer.models import load_model

torch.set_num_threads(1)
out = tempfile.mkdtemp() + "/converted"
convert(assets.path("tiny-mixtral"), out)
memory_model, _ = load_model("tiny-mixtral", device="cpu", dtype="float32")
_, files = stdlib_files()
texts = [p.read_bytes() for rel, p in files if is_heldout(rel)]
prompts = [torch.tensor([list(t[:128])]) for t in texts if len(t) >= 128][:8]
rows = []
for share in (None, 0.25):
    probe = moe_infer.load(out)
    ex = moe_infer.executor(probe)
    nbytes = ex.layers[0].expert_source.expert_nbytes()
    if share is not None:
        total = sum(l.num_experts for l in ex.layers) * nbytes
        probe = moe_infer.load(out, cpu_memory=int(share * total))
        ex = moe_infer.executor(probe)
    store = ex.layers[0].expert_source.store
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = memory_model(prompt).logits
            ex.reset_stats()
            before = store.bytes_read
            got = probe(prompt).logits
        used = sum(l["experts_used"] for l in ex.stats()["layers"].values())
        rows.append({"budget": "none" if share is None else f"cpu_memory {share:.0%} of the experts", "prompt": i,
                     "bytes_read": store.bytes_read - before, "distinct_expert_bytes": used * nbytes,
                     "ratio": (store.bytes_read - before) / (used * nbytes), "logits_equal": bool(torch.equal(got, expected))})
    ex.close()
path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results",
                    "heldout-bytes-read.json")
with open(path, "w") as f:
    json.dump({"command": "python scripts/check_heldout_reads.py", "torch": torch.__version__, "rows": rows}, f, indent=1)
for row in rows:
    print(f"{row['budget']:34s} prompt {row['prompt']}: read / distinct experts {row['ratio']:.3f}, "
          f"logits equal: {row['logits_equal']}")
print(f"max ratio {max(r['ratio'] for r in rows):.3f}; wrote {path}")
