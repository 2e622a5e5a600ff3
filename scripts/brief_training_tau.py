"""Train a drafter briefly on the default model's own greedy answers to 10 prompts, then decode them.

Usage: python scripts/brief_training_tau.py STEPS ROOTS_PER_SEQ LR   (figures in the issue notes: 150 32 3e-3)
"""
import torch, time, sys, numpy as np

from chimera import load_base, SpeculativeDecoder
from chimera.train.trainer import TrainConfig, train
from chimera.drafters.chimera import load_drafter
from chimera.cli import quiet_libraries
quiet_libraries()
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion to a child.",
    "List three uses of a paperclip.", "Translate 'good morning' into Spanish and German.",
    "Give me a recipe for pancakes.", "Why do cats purr?", "Describe a sunset in two sentences.",
    "What is photosynthesis?", "Name five famous painters."]
model, tok = load_base("smollm2-135m-instruct")
dec = SpeculativeDecoder(model, tok)
t=time.time(); samples=[]; refs=[]
for p in PROMPTS:
    ids = dec.prepare(p)
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=128)[0].tolist()
    refs.append(out[len(ids):])
    samples.append((np.array(out), np.array([0]*len(ids)+[1]*(len(out)-len(ids)), dtype=bool)))
print("ref gen", time.time()-t)
steps=int(sys.argv[1]); 
cfg = TrainConfig(steps=steps, batch_size=2, max_len=200, roots_per_seq=int(sys.argv[2]), depth=5, cache_base=True, lr=float(sys.argv[3]), warmup_steps=5, heldout_fraction=0, eval_every=10**9, save_every=10**9)
t=time.time(); train(model, samples, "/tmp/fx", cfg, resume=False, progress=False); print("train", time.time()-t)
dr = load_drafter("/tmp/fx/drafter", model)
for tree in ["small","chain4"]:
    d2 = SpeculativeDecoder(model, tok, dr, tree=tree)
    t=time.time(); ok=0; toks=0; steps_=0
    for p, ref in zip(PROMPTS, refs):
        r = d2.generate(p, max_new_tokens=128); ok += r.token_ids==ref; toks+=r.new_tokens; steps_+=r.steps
    print(tree, "exact", ok, "tau", toks/steps_, "time", time.time()-t)
