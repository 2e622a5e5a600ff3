import sys, chimera
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter
from chimera.generate import SpeculativeDecoder
quiet_libraries()
model, tok = chimera.load_base("smollm2-135m-instruct")
dr = resolve_drafter("auto", model)
P = SpeculativeDecoder(model, tok, None)
A = SpeculativeDecoder(model, tok, dr, adaptive=True)
F = SpeculativeDecoder(model, tok, dr, adaptive=False)
prompts = ["Explain in three sentences why the sky is blue.", "Write a short story about a robot who learns to paint.",
  "Give step-by-step instructions to bake bread.", "What are the main causes of inflation?",
  "Write a Python function that checks whether a string is a palindrome, and explain it.",
  "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences and must-see attractions."]
for d in (P, A, F): d.generate(prompts[0], max_new_tokens=8)
for p in prompts:
    rs = [d.generate(p, max_new_tokens=128) for d in (P, F, A)]
    assert rs[0].token_ids == rs[1].token_ids == rs[2].token_ids
    print(f"{p[:40]:40} plain {rs[0].tokens_per_s:5.1f} | fixed {rs[1].tokens_per_s:5.1f} tau {rs[1].tau:.2f} | adaptive {rs[2].tokens_per_s:5.1f} tau {rs[2].tau:.2f} paused {rs[2].plain_steps}/{rs[2].steps-1}  r={A.costs.break_even:.2f}")
