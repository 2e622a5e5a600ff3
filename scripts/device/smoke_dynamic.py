import torch, chimera, time
from chimera.drafters import resolve_drafter
model, tok = chimera.load_base("smollm2-135m-instruct", dtype="float32", device="cuda")
drafter = resolve_drafter("auto", model)
ids = torch.tensor([chimera.SpeculativeDecoder(model, tok).prepare("Explain how a bicycle stays upright.")], device="cuda")
ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=96)[0, ids.shape[1]:].tolist()
for graphs in (False, True):
    d = chimera.SpeculativeDecoder(model, tok, drafter, tree="auto", cuda_graphs=graphs)
    d.generate("hi", max_new_tokens=8)
    r = d.generate("Explain how a bicycle stays upright.", max_new_tokens=96)
    print("graphs", graphs, d.tree.topology.describe(), "exact", r.token_ids == ref, "tau", round(r.tau, 2), "tok/s", round(r.tokens_per_s, 1), flush=True)
