#!/usr/bin/env python3
"""PyTorch-hook references for generation with per-step interventions on models/stories260K.

Dev-only tool (users and CI never run Python); its output is committed:

    /usr/bin/python3 scripts/generation_reference.py

Needs Debian's python3-torch (1.13) and python3-onnx. Reuses the plain-torch rebuild of
stories260K in scripts/stories_reference.py (weights loaded from the ONNX initializers, graph
mirrored op for op, verified against onnxruntime there) and decodes greedily with the same
KV-cache stepping as src/backends/Generate.ts: step 0 runs the whole prompt with an empty past;
step s > 0 runs the one token chosen at step s - 1 with the presents of step s - 1 as past, an
all-ones attention mask over the whole sequence and position id = sequence length - 1. Step s of
generation is forward pass s, so "a hook on step s" is the hook's s-th call. Rows that produced
an end-of-sequence token get the pad token afterwards (their attention mask stays 1, as in
Generate.ts); generation stops when every row has finished or after max_new_tokens tokens.

Writes test/fixtures/stories260K/generation.json (read by test/generate.test.ts):
- prompt_ids: reference_greedy.json llama2c_ids (14 tokens); max_new_tokens 6; lily 317, tim 326
- baseline_ids: greedy, no intervention (= reference_greedy.json greedy_ids[:20])
- steering.v: 2 * (E[tim] - E[lily]) (E = model.embed_tokens.weight), 64 floats; added to
  model.layers.3's input[0] (every position of the pass) on
  - all_steps: every step -> ids
  - step_2: step 2 only -> ids
  - steps_1_to_3: steps 1, 2, 3 -> ids
- zero_ablate_mlp0_all_steps: model.layers.0.mlp output := 0 on every step -> ids (the same as
  baseline_ids) and logits_last: lm_head output at the last position of each step, [1, 512] x 6
  (each differs from the unablated logits by > 1e-2)
- layer4_per_step: model.layers.4 output[0] of each step (no intervention): [1, 14, 64], then
  [1, 1, 64] x 5 (tensor format of stories_reference.py)
- eos: batch [prompt A, prompt B] (both 14 tokens, no padding), eos_token_id = A's greedy token at
  step 2, pad_token_id 0 -> ids [2, 20] (A stops after step 2 and is padded); eos_single: prompt A
  alone with the same eos -> ids [1, 17] (generation stops early)
"""

import json
import os
import sys
from collections import OrderedDict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stories_reference as sr  # noqa: E402

OUT = os.path.join(sr.OUT_DIR, "generation.json")
STEPS = 6


def generate(model, rows, steps, hooks=(), eos=(), pad=0):
    """Greedy decoding of equal-length rows with KV cache; hooks: (kind, module, fn(step, ...))."""
    step = [0]
    handles = []
    for kind, mod, fn in hooks:
        if kind == "pre":
            handles.append(mod.register_forward_pre_hook(lambda m, args, fn=fn: fn(step[0], args)))
        else:
            handles.append(mod.register_forward_hook(lambda m, args, out, fn=fn: fn(step[0], args, out)))
    try:
        with torch.no_grad():
            batch = len(rows)
            tokens = [list(r) for r in rows]
            finished = [False] * batch
            inp = sr.make_inputs(rows)
            logits, past = model(inp["input_ids"], inp["attention_mask"], inp["position_ids"])
            for s in range(steps):
                nxt = [pad if finished[b] else int(logits[b, -1].argmax()) for b in range(batch)]
                for b, t in enumerate(nxt):
                    tokens[b].append(t)
                    if t in eos:
                        finished[b] = True
                if all(finished) or s == steps - 1:
                    break
                step[0] = s + 1
                n = len(tokens[0])
                logits, past = model(torch.tensor([[t] for t in nxt]), torch.ones(batch, n, dtype=torch.int64),
                                     torch.tensor([[n - 1]] * batch), past)
            return tokens
    finally:
        for h in handles:
            h.remove()


def main():
    torch.set_num_threads(1)
    model, cfg, _mp, _pmap, _rope = sr.load_model()
    m = dict(model.named_modules())
    with open(os.path.join(sr.MODEL_DIR, "reference_greedy.json")) as f:
        greedy_ref = json.load(f)
    ids_a = list(greedy_ref["llama2c_ids"])
    ids_b = ids_a[:10] + sr.BOY_IDS + ids_a[13:]
    n = len(ids_a)

    baseline = generate(model, [ids_a], STEPS)[0]
    assert baseline == greedy_ref["greedy_ids"][: n + STEPS], baseline

    emb = model.model.embed_tokens.weight.detach()
    v = 2.0 * (emb[sr.TIM] - emb[sr.LILY])

    def steer(steps):
        def fn(step, args):
            if step in steps:
                return (args[0] + v,) + tuple(args[1:])
            return None
        return [("pre", m["model.layers.3"], fn)]

    all_steps = generate(model, [ids_a], STEPS, steer(range(STEPS)))[0]
    step_2 = generate(model, [ids_a], STEPS, steer({2}))[0]
    steps_1_3 = generate(model, [ids_a], STEPS, steer({1, 2, 3}))[0]
    # the interventions visibly change the text, and differently
    assert all_steps != baseline and step_2 != baseline and steps_1_3 != baseline
    assert step_2[: n + 2] == baseline[: n + 2], "step 2 steering cannot change tokens chosen before step 2"
    assert steps_1_3[: n + 1] == baseline[: n + 1]
    assert len({tuple(all_steps), tuple(step_2), tuple(steps_1_3)}) == 3, (all_steps, step_2, steps_1_3)

    # zero ablation leaves the greedy ids as they are, so the last-position logits of every step are recorded too
    ablated_logits, plain_logits = [], []
    ablated = generate(model, [ids_a], STEPS,
                       [("fwd", m["model.layers.0.mlp"], lambda step, args, out: torch.zeros_like(out)),
                        ("fwd", m["lm_head"], lambda step, args, out: ablated_logits.append(out[:, -1].clone()))])[0]
    generate(model, [ids_a], STEPS, [("fwd", m["lm_head"], lambda step, args, out: plain_logits.append(out[:, -1].clone()))])
    assert len(ablated_logits) == STEPS
    assert all(float((a - b).abs().max()) > 1e-2 for a, b in zip(ablated_logits, plain_logits))

    saved = []
    generate(model, [ids_a], STEPS, [("fwd", m["model.layers.4"], lambda step, args, out: saved.append(out[0].clone()))])
    assert [list(t.shape) for t in saved] == [[1, n, 64]] + [[1, 1, 64]] * (STEPS - 1)

    eos_id = baseline[n + 2]
    rows_b = generate(model, [ids_b], STEPS)[0]
    assert eos_id not in rows_b[n:], "prompt B must not reach the chosen eos"
    eos_batch = generate(model, [ids_a, ids_b], STEPS, eos={eos_id}, pad=0)
    assert eos_batch[0] == baseline[: n + 3] + [0] * (STEPS - 3) and eos_batch[1] == rows_b, eos_batch
    eos_single = generate(model, [ids_a], STEPS, eos={eos_id}, pad=0)
    assert eos_single == [baseline[: n + 3]]

    ref = OrderedDict()
    ref["fixture"] = "stories260K"
    ref["generator"] = "scripts/generation_reference.py"
    ref["torch_version"] = torch.__version__
    ref["prompt_ids"] = ids_a
    ref["prompt_b_ids"] = ids_b
    ref["max_new_tokens"] = STEPS
    ref["lily"] = sr.LILY
    ref["tim"] = sr.TIM
    ref["baseline_ids"] = baseline
    ref["steering"] = OrderedDict([
        ("description", "v = 2 * (model.embed_tokens.weight[tim] - model.embed_tokens.weight[lily]) added to "
                        "model.layers.3 input[0] (all positions of the pass) on the given steps; greedy, KV cache"),
        ("v", [float("%.9g" % x) for x in v.tolist()]),
        ("all_steps", all_steps),
        ("step_2", step_2),
        ("steps_1_to_3", steps_1_3),
    ])
    ref["zero_ablate_mlp0_all_steps"] = OrderedDict([
        ("description", "model.layers.0.mlp output := 0 on every step; greedy ids (unchanged by the ablation) and "
                        "lm_head output at the last position of each step ([1, 512] per step)"),
        ("ids", ablated),
        ("logits_last", [sr.tensor_json(t) for t in ablated_logits]),
    ])
    ref["layer4_per_step"] = [sr.tensor_json(t) for t in saved]
    ref["eos"] = OrderedDict([
        ("description", "batch [prompt_ids, prompt_b_ids] (equal length, no padding); eos_token_id = the greedy "
                        "token of prompt A at step 2; pad_token_id 0; max_new_tokens 6"),
        ("eos_token_id", eos_id),
        ("pad_token_id", 0),
        ("ids", eos_batch),
        ("single_ids", eos_single),
    ])
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(ref, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {os.path.relpath(OUT, sr.ROOT)}")
    print("baseline     ", baseline[n:])
    print("all_steps    ", all_steps[n:])
    print("step_2       ", step_2[n:])
    print("steps_1_to_3 ", steps_1_3[n:])
    print("ablated      ", ablated[n:])
    print("eos", eos_id, eos_batch)


if __name__ == "__main__":
    main()
