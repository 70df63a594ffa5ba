#!/usr/bin/env python3
"""Export the small ONNX test fixtures of nnsight-ts and their PyTorch reference values.

Dev-only tool: users and CI never run it; its outputs under test/fixtures/ are committed.
Needs Debian's python3-torch (1.13) and python3-onnx (1.12):

    /usr/bin/python3 scripts/export_fixtures.py            # export all fixtures, then verify
    /usr/bin/python3 scripts/export_fixtures.py tiny_mlp   # only the named fixtures
    /usr/bin/python3 scripts/export_fixtures.py --no-verify

For each fixture NAME it writes test/fixtures/NAME/model.onnx (torch.onnx.export, opset 14)
and test/fixtures/NAME/reference.json (module list, repr, call counts, inputs, outputs,
forward-hook captures of every module call, intervention experiments computed with
PyTorch hooks, and notes on how the exporter named things). See test/fixtures/README.md.

Verification (unless --no-verify): onnx.checker on every model, a re-export that must be
byte-identical, and -- when node and the repo's node_modules/onnxruntime-node are
present -- onnxruntime-node runs of each model on every recorded input set, compared with
the PyTorch outputs (max abs diff <= 1e-5), plus a check that every module call's hook
outputs can be found among the tensors its ONNX scope produces (-v lists where).
"""

import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import OrderedDict

import numpy as np
import onnx
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "test", "fixtures")
OPSET = 14
# Constant folding on, as in real exports (HF optimum, the repo's stories260K): node names
# keep their module scopes either way (checked), but with folding the transposed weights of
# MatMul-lowered Linear layers become initializers named like "onnx::MatMul_123".
CONSTANT_FOLDING = True
TOL = 1e-5


# ----------------------------------------------------------------------------------------
# JSON encoding of tensors

def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def tensor_json(t):
    t = t.detach().cpu().contiguous()
    flat = t.reshape(-1)
    if t.dtype.is_floating_point:
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("non-finite value in a reference tensor")
        # 9 significant digits round-trip float32 exactly
        data = [float("%.9g" % v) for v in flat.tolist()]
    elif t.dtype == torch.bool:
        data = [bool(v) for v in flat.tolist()]
    else:
        data = [int(v) for v in flat.tolist()]
    return {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "data": data}


def flatten_tensors(x):
    """Tensors of a (nested) tuple/list in order; None and non-tensors are skipped."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        out = []
        for y in x:
            out.extend(flatten_tensors(y))
        return out
    return []


def named_json(d):
    return {k: tensor_json(v) for k, v in d.items()}


# ----------------------------------------------------------------------------------------
# Models


def make_tiny_mlp():
    return nn.Sequential(OrderedDict([
        ("layer1", nn.Linear(5, 10)),
        ("layer2", nn.Linear(10, 2)),
    ]))


class Twice(nn.Module):
    """One Linear (`shared`) and one activation module (`act`) called twice per forward."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.act(self.inp(x))
        h = self.shared(h)
        h = self.shared(self.act(h))
        return self.out(h)


# --- GPT-2 (Hugging Face module names; Linear instead of HF's Conv1D) -------------------

class NewGELUActivation(nn.Module):
    """GELU, tanh approximation, written out as in HF transformers (GPT-2's `act`)."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2Attention(nn.Module):
    def __init__(self, n_embd, n_head, n_positions):
        super().__init__()
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.split_size = n_embd
        self.register_buffer(
            "bias",
            torch.tril(torch.ones((n_positions, n_positions), dtype=torch.bool)).view(1, 1, n_positions, n_positions),
            persistent=False,
        )
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(0.1)
        self.resid_dropout = nn.Dropout(0.1)

    def _split_heads(self, t):
        new_shape = t.size()[:-1] + (self.n_head, self.head_dim)
        return t.view(new_shape).permute(0, 2, 1, 3)

    def _merge_heads(self, t):
        t = t.permute(0, 2, 1, 3).contiguous()
        new_shape = t.size()[:-2] + (self.n_head * self.head_dim,)
        return t.view(new_shape)

    def forward(self, hidden_states):
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        query = self._split_heads(query)
        key = self._split_heads(key)
        value = self._split_heads(value)
        attn_weights = torch.matmul(query, key.transpose(-1, -2)) / (self.head_dim ** 0.5)
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length: key_length, :key_length]
        mask_value = torch.full([], torch.finfo(attn_weights.dtype).min, dtype=attn_weights.dtype)
        attn_weights = torch.where(causal_mask, attn_weights, mask_value)
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_weights = self.attn_dropout(attn_weights)
        attn_output = torch.matmul(attn_weights, value)
        attn_output = self._merge_heads(attn_output)
        attn_output = self.c_proj(attn_output)
        attn_output = self.resid_dropout(attn_output)
        return (attn_output,)


class GPT2MLP(nn.Module):
    def __init__(self, n_embd, n_inner):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, n_inner)
        self.c_proj = nn.Linear(n_inner, n_embd)
        self.act = NewGELUActivation()
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states):
        hidden_states = self.c_fc(hidden_states)
        hidden_states = self.act(hidden_states)
        hidden_states = self.c_proj(hidden_states)
        hidden_states = self.dropout(hidden_states)
        return hidden_states


class GPT2Block(nn.Module):
    def __init__(self, n_embd, n_head, n_positions):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.attn = GPT2Attention(n_embd, n_head, n_positions)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.mlp = GPT2MLP(n_embd, 4 * n_embd)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.ln_1(hidden_states)
        attn_output = self.attn(hidden_states)[0]
        hidden_states = attn_output + residual
        residual = hidden_states
        hidden_states = self.ln_2(hidden_states)
        feed_forward_hidden_states = self.mlp(hidden_states)
        hidden_states = residual + feed_forward_hidden_states
        return (hidden_states,)


class GPT2Model(nn.Module):
    def __init__(self, vocab_size, n_positions, n_embd, n_layer, n_head):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.drop = nn.Dropout(0.1)
        self.h = nn.ModuleList([GPT2Block(n_embd, n_head, n_positions) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)

    def forward(self, input_ids):
        seq_len = input_ids.size(-1)
        position_ids = torch.arange(0, seq_len, dtype=torch.long, device=input_ids.device).unsqueeze(0)
        hidden_states = self.wte(input_ids) + self.wpe(position_ids)
        hidden_states = self.drop(hidden_states)
        for block in self.h:
            hidden_states = block(hidden_states)[0]
        return self.ln_f(hidden_states)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4):
        super().__init__()
        self.transformer = GPT2Model(vocab_size, n_positions, n_embd, n_layer, n_head)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in HF GPT-2

    def forward(self, input_ids):
        return self.lm_head(self.transformer(input_ids))


# --- Llama (Hugging Face module names, recent layout with model.rotary_emb) --------------

class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, head_dim, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, position_ids):
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        freqs = (inv_freq_expanded @ position_ids_expanded).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(hidden_states, n_rep):
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


class LlamaAttention(nn.Module):
    def __init__(self, hidden_size, num_heads, num_kv_heads):
        super().__init__()
        self.head_dim = hidden_size // num_heads
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_key_value_groups = num_heads // num_kv_heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask, cos, sin):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos_u, sin_u = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q * cos_u) + (rotate_half(q) * sin_u)
        k = (k * cos_u) + (rotate_half(k) * sin_u)
        k = repeat_kv(k, self.num_key_value_groups)
        v = repeat_kv(v, self.num_key_value_groups)
        attn_weights = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        attn_weights = attn_weights + attention_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
        attn_output = torch.matmul(attn_weights, v)
        attn_output = attn_output.transpose(1, 2).contiguous()
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return (self.o_proj(attn_output),)


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hidden_size, num_heads, num_kv_heads, intermediate_size, eps):
        super().__init__()
        self.self_attn = LlamaAttention(hidden_size, num_heads, num_kv_heads)
        self.mlp = LlamaMLP(hidden_size, intermediate_size)
        self.input_layernorm = LlamaRMSNorm(hidden_size, eps)
        self.post_attention_layernorm = LlamaRMSNorm(hidden_size, eps)

    def forward(self, hidden_states, attention_mask, cos, sin):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.self_attn(hidden_states, attention_mask, cos, sin)[0]
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return (hidden_states,)


class LlamaModel(nn.Module):
    def __init__(self, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, eps):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList([
            LlamaDecoderLayer(hidden_size, num_heads, num_kv_heads, intermediate_size, eps)
            for _ in range(num_layers)
        ])
        self.norm = LlamaRMSNorm(hidden_size, eps)
        self.rotary_emb = LlamaRotaryEmbedding(hidden_size // num_heads)

    def forward(self, input_ids, attention_mask, position_ids):
        inputs_embeds = self.embed_tokens(input_ids)
        seq_len = input_ids.shape[1]
        # additive 4-D mask [batch, 1, q, k]: causal AND not padding, dtype-min where masked
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=input_ids.device).tril()
        allowed = causal[None, None, :, :] & attention_mask[:, None, None, :].bool()
        min_value = torch.finfo(inputs_embeds.dtype).min
        causal_mask = torch.zeros_like(allowed, dtype=inputs_embeds.dtype).masked_fill(~allowed, min_value)
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, causal_mask, cos, sin)[0]
        return self.norm(hidden_states)


class LlamaForCausalLM(nn.Module):
    def __init__(self, vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=64, eps=1e-6):
        super().__init__()
        self.model = LlamaModel(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, eps)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, input_ids, attention_mask, position_ids):
        return self.lm_head(self.model(input_ids, attention_mask, position_ids))


def randomize_norms(model, gen):
    """LayerNorm/RMSNorm weights 1 + 0.1*N(0,1), biases 0.1*N(0,1): catches misuse of norm params."""
    with torch.no_grad():
        for _, mod in model.named_modules():
            if isinstance(mod, (nn.LayerNorm, LlamaRMSNorm)):
                mod.weight.copy_(1.0 + 0.1 * torch.randn(mod.weight.shape, generator=gen))
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))


# ----------------------------------------------------------------------------------------
# Hook helpers

def module_dict(model):
    return dict(model.named_modules())


def capture_hooks(model, run):
    """Run `run()` with a forward hook on every non-root module; return (result, hooks, calls)."""
    records = []
    calls = OrderedDict((name, 0) for name, _ in model.named_modules() if name != "")
    handles = []
    for name, mod in model.named_modules():
        if name == "":
            continue

        def hook(mod, inputs, output, name=name):
            i = calls[name]
            calls[name] += 1
            records.append({
                "module": name,
                "call": i,
                "input": [tensor_json(t) for t in flatten_tensors(inputs)],
                "output": [tensor_json(t) for t in flatten_tensors(output)],
            })

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            result = run()
    finally:
        for h in handles:
            h.remove()
    return result, records, dict(calls)


class Hooks:
    """Context manager that removes the hooks it registered."""

    def __init__(self):
        self.handles = []

    def forward(self, mod, fn):
        self.handles.append(mod.register_forward_hook(fn))

    def pre(self, mod, fn):
        self.handles.append(mod.register_forward_pre_hook(fn))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


def first(output):
    return output[0] if isinstance(output, tuple) else output


def retain_first_output(mod, store, key, hooks):
    def fn(m, i, o):
        t = first(o)
        t.retain_grad()
        store[key] = t
    hooks.forward(mod, fn)


def retain_first_input(mod, store, key, hooks):
    def fn(m, i):
        i[0].retain_grad()
        store[key] = i[0]
    hooks.pre(mod, fn)


# ----------------------------------------------------------------------------------------
# Fixture definitions

def fixture_tiny_mlp():
    torch.manual_seed(0)
    model = make_tiny_mlp().eval()
    gen = torch.Generator().manual_seed(1)
    inputs = {"x": torch.rand((2, 5), generator=gen)}
    inputs_b = {"x": torch.rand((1, 5), generator=gen)}
    m = module_dict(model)
    run = lambda inp: model(inp["x"])
    exps = []

    with torch.no_grad(), Hooks() as h:
        h.forward(m["layer1"], lambda mod, i, o: torch.zeros_like(o))
        exps.append({"name": "layer1_zero",
                     "description": "layer1 output set to zero (replaced by zeros) -> output y",
                     "result": {"y": tensor_json(run(inputs))}})
    with torch.no_grad(), Hooks() as h:
        h.forward(m["layer1"], lambda mod, i, o: o * 2)
        exps.append({"name": "layer1_times_2",
                     "description": "layer1 output multiplied by 2 -> output y",
                     "result": {"y": tensor_json(run(inputs))}})
    with torch.no_grad(), Hooks() as h:
        def set_col(mod, i, o):
            o = o.clone()
            o[:, 2] = 5
            return o
        h.forward(m["layer1"], set_col)
        exps.append({"name": "layer1_col2_set_5",
                     "description": "layer1 output[:, 2] = 5 (nnsight test_external_proxy_intervention) -> output y and layer1 output",
                     "result": {"y": tensor_json(run(inputs))}})

    # gradients: loss = y.sum()
    def grads(double_at_layer2_input):
        model.zero_grad(set_to_none=True)
        store = {}
        with Hooks() as h:
            if double_at_layer2_input:
                def pre(mod, i):
                    def set_grad(g):
                        store["original"] = g.detach().clone()
                        store["after_set"] = (g * 2).detach().clone()
                        return g * 2
                    i[0].register_hook(set_grad)
                h.pre(m["layer2"], pre)
            else:
                retain_first_output(m["layer1"], store, "layer1.output", h)
                retain_first_input(m["layer2"], store, "layer2.input", h)
            y = run(inputs)
            y.sum().backward()
        res = OrderedDict()
        if double_at_layer2_input:
            res["layer2.input.grad.original"] = store["original"]
            res["layer2.input.grad.after_set"] = store["after_set"]
        else:
            res["layer1.output.grad"] = store["layer1.output"].grad
            res["layer2.input.grad"] = store["layer2.input"].grad
        for pname, p in model.named_parameters():
            res[pname + ".grad"] = p.grad
        res = OrderedDict((k, v.detach().clone()) for k, v in res.items())
        model.zero_grad(set_to_none=True)
        return res

    g = grads(False)
    exps.append({"name": "grad",
                 "description": "loss = y.sum(); loss.backward(): grads of layer1 output, layer2 input "
                                "(the same tensor), and of every parameter",
                 "result": named_json(g)})
    g2 = grads(True)
    assert torch.allclose(g2["layer1.weight.grad"], 2 * g["layer1.weight.grad"])
    assert torch.allclose(g2["layer2.input.grad.original"], g["layer2.input.grad"])
    exps.append({"name": "grad_setting",
                 "description": "loss = y.sum(); the gradient flowing back at layer2's input (= layer1's output) is "
                                "replaced by itself * 2 (as nnsight test_grad_setting does with "
                                "layer1.output.grad = layer1.output.grad * 2). '.original' is the grad before the "
                                "set, '.after_set' the grad read after it; layer1.weight.grad and layer1.bias.grad "
                                "double, layer2's parameter grads are unchanged",
                 "result": named_json(g2)})

    return {
        "model": model,
        "inputs": inputs,
        "input_sets": {"inputs": inputs, "inputs_b": inputs_b},
        "run": run,
        "export": {
            "args": (inputs["x"],),
            "input_names": ["x"],
            "output_names": ["y"],
            "dynamic_axes": {"x": {0: "batch"}, "y": {0: "batch"}},
        },
        "experiments": exps,
        "notes": [],
    }


def fixture_twice():
    torch.manual_seed(0)
    model = Twice().eval()
    gen = torch.Generator().manual_seed(2)
    inputs = {"x": torch.randn((2, 4), generator=gen)}
    inputs_b = {"x": torch.randn((1, 4), generator=gen)}
    m = module_dict(model)
    run = lambda inp: model(inp["x"])
    exps = []

    def on_call(k, fn):
        state = {"n": 0}

        def hook(mod, i, o):
            n = state["n"]
            state["n"] += 1
            return fn(o) if n == k else None
        return hook

    with torch.no_grad(), Hooks() as h:
        h.forward(m["shared"], on_call(1, lambda o: torch.zeros_like(o)))
        exps.append({"name": "shared_call1_zero",
                     "description": "second call (iteration 1) of `shared`: output set to zero -> y",
                     "result": {"y": tensor_json(run(inputs))}})
    with torch.no_grad(), Hooks() as h:
        h.forward(m["shared"], on_call(0, lambda o: o * 2))
        exps.append({"name": "shared_call0_times_2",
                     "description": "first call (iteration 0) of `shared`: output multiplied by 2 -> y",
                     "result": {"y": tensor_json(run(inputs))}})
    with torch.no_grad(), Hooks() as h:
        h.forward(m["act"], on_call(1, lambda o: o + 1))
        exps.append({"name": "act_call1_plus_1",
                     "description": "second call (iteration 1) of `act`: output + 1 -> y",
                     "result": {"y": tensor_json(run(inputs))}})

    model.zero_grad(set_to_none=True)
    store = {}
    with Hooks() as h:
        def keep(mod, i, o):
            o.retain_grad()
            store.setdefault("shared.output", []).append(o)
        h.forward(m["shared"], keep)
        y = run(inputs)
        y.sum().backward()
    exps.append({"name": "grad",
                 "description": "loss = y.sum(): grads of shared's output at call 0 and call 1, and of "
                                "shared.weight (sum of both uses) and inp.weight",
                 "result": named_json({
                     "shared.output.call0.grad": store["shared.output"][0].grad,
                     "shared.output.call1.grad": store["shared.output"][1].grad,
                     "shared.weight.grad": m["shared"].weight.grad.clone(),
                     "inp.weight.grad": m["inp"].weight.grad.clone(),
                 })})
    model.zero_grad(set_to_none=True)

    return {
        "model": model,
        "inputs": inputs,
        "input_sets": {"inputs": inputs, "inputs_b": inputs_b},
        "run": run,
        "export": {
            "args": (inputs["x"],),
            "input_names": ["x"],
            "output_names": ["y"],
            "dynamic_axes": {"x": {0: "batch"}, "y": {0: "batch"}},
        },
        "experiments": exps,
        "notes": [],
    }


def lm_experiments(model, run, inputs, inputs_b, names):
    """Shared experiments of the two causal LMs. `names` maps roles to module names."""
    m = module_dict(model)
    exps = []
    block0, block1 = m[names["block0"]], m[names["block1"]]

    with torch.no_grad(), Hooks() as h:
        h.forward(m[names["mlp0"]], lambda mod, i, o: torch.zeros_like(o))
        exps.append({"name": "zero_ablate_mlp0",
                     "description": f"zero-ablate {names['mlp0']} output (all positions, whole batch) -> logits",
                     "result": {"logits": tensor_json(run(inputs))}})

    # activation patching
    store = {}
    with torch.no_grad(), Hooks() as h:
        h.forward(block1, lambda mod, i, o: store.__setitem__("src", o[0][0, -1, :].clone()))
        run(inputs_b)
    src = store["src"]

    def patch(mod, i, o):
        hs = o[0].clone()
        hs[0, -1, :] = src
        return (hs,) + o[1:]

    with torch.no_grad(), Hooks() as h:
        h.forward(block1, patch)
        patched = run(inputs)
    exps.append({"name": "activation_patch",
                 "description": f"run inputs_b, take {names['block1']} output[0][0, -1, :] (row 0, last position); "
                                f"run inputs with {names['block1']} output[0][0, -1, :] set to it -> logits "
                                "(only logits[0, -1] change)",
                 "result": {"source": tensor_json(src), "logits": tensor_json(patched)}})

    # logit lens
    with torch.no_grad(), Hooks() as h:
        h.forward(block0, lambda mod, i, o: store.__setitem__("h0", o[0]))
        run(inputs)
        lens = m["lm_head"](m[names["final_norm"]](store["h0"]))
    exps.append({"name": "logit_lens",
                 "description": f"lm_head({names['final_norm']}({names['block0']} output[0])) on inputs "
                                "(modules applied ad hoc)",
                 "result": {"logits": tensor_json(lens)}})

    # steering
    hidden = m["lm_head"].in_features
    v = 0.1 * torch.arange(hidden, dtype=torch.float32)

    def steer(mod, args):
        return (args[0] + v,) + tuple(args[1:])

    with torch.no_grad(), Hooks() as h:
        h.pre(block1, steer)
        steered = run(inputs)
    exps.append({"name": "steering",
                 "description": f"add v = 0.1 * arange({hidden}) to {names['block1']}'s input (hidden state, "
                                "every position and batch row) -> logits",
                 "result": {"v": tensor_json(v), "logits": tensor_json(steered)}})

    # gradients
    model.zero_grad(set_to_none=True)
    store = {}
    with Hooks() as h:
        retain_first_output(block0, store, "b0", h)
        retain_first_input(block1, store, "b1", h)
        logits = run(inputs)
        loss = logits[:, -1, 5].sum()
        loss.backward()
    res = OrderedDict()
    res[names["block0"] + ".output[0].grad"] = store["b0"].grad
    res[names["block1"] + ".input.grad"] = store["b1"].grad
    res["lm_head.weight.grad"] = m["lm_head"].weight.grad.clone()
    res[names["embed"] + ".weight.grad"] = m[names["embed"]].weight.grad.clone()
    desc = ("loss = logits[:, -1, 5].sum(); loss.backward(): grads of "
            f"{names['block0']} output[0], {names['block1']} input (same tensor), lm_head.weight, "
            f"{names['embed']}.weight")
    if m["lm_head"].weight is m[names["embed"]].weight:
        # tied: both are one Parameter; also give the two contributions separately
        lm_in = {}
        with Hooks() as h:
            h.forward(m["lm_head"], lambda mod, i, o: lm_in.__setitem__("x", i[0].detach()))
            with torch.no_grad():
                run(inputs)
        gout = torch.zeros(logits.shape)
        gout[:, -1, 5] = 1.0
        lm_part = torch.einsum("bsv,bsd->vd", gout, lm_in["x"])
        res["lm_head.weight.grad.lm_head_use_only"] = lm_part
        res[names["embed"] + ".weight.grad.embedding_use_only"] = res["lm_head.weight.grad"] - lm_part
        desc += (". lm_head.weight IS " + names["embed"] + ".weight (tied): both entries hold the total grad; "
                 "'.lm_head_use_only' is the contribution through lm_head (dL/dlogits^T @ lm_head input), "
                 "'.embedding_use_only' the rest (through the Gather)")
    model.zero_grad(set_to_none=True)
    exps.append({"name": "grad", "description": desc, "result": named_json(res)})
    return exps


def fixture_tiny_gpt2():
    torch.manual_seed(0)
    model = GPT2LMHeadModel().eval()
    gen = torch.Generator().manual_seed(3)
    randomize_norms(model, gen)
    with torch.no_grad():  # embeddings N(0, 0.2^2): keeps the tied logits small (|logits| < ~10)
        model.transformer.wte.weight.mul_(0.2)
        model.transformer.wpe.weight.mul_(0.2)
    inputs = {"input_ids": torch.randint(0, 64, (2, 6), generator=gen, dtype=torch.int64)}
    inputs_b = {"input_ids": torch.randint(0, 64, (2, 6), generator=gen, dtype=torch.int64)}
    inputs_short = {"input_ids": torch.randint(0, 64, (1, 3), generator=gen, dtype=torch.int64)}
    run = lambda inp: model(inp["input_ids"])
    exps = lm_experiments(model, run, inputs, inputs_b, {
        "block0": "transformer.h.0", "block1": "transformer.h.1", "mlp0": "transformer.h.0.mlp",
        "final_norm": "transformer.ln_f", "embed": "transformer.wte",
    })
    return {
        "model": model,
        "inputs": inputs,
        "input_sets": {"inputs": inputs, "inputs_b": inputs_b, "inputs_short": inputs_short},
        "run": run,
        "export": {
            "args": (inputs["input_ids"],),
            "input_names": ["input_ids"],
            "output_names": ["logits"],
            "dynamic_axes": {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}},
        },
        "experiments": exps,
        "notes": [
            "lm_head.weight is tied to transformer.wte.weight (one Parameter, as in HF GPT-2); "
            "named_parameters() lists it once as transformer.wte.weight.",
            "c_attn/c_proj/c_fc are nn.Linear (HF GPT-2 uses Conv1D with transposed weights); "
            "the causal mask is the non-persistent bool buffer transformer.h.N.attn.bias [1,1,16,16] "
            "sliced to the sequence length, as in HF; max sequence length 16.",
            "Dropout modules (transformer.drop, attn.attn_dropout, attn.resid_dropout, mlp.dropout) are "
            "called in the forward but export to no ONNX node in eval mode.",
            "config: vocab 64, n_positions 16, n_embd 32, n_layer 2, n_head 4, n_inner 128, "
            "layer_norm_epsilon 1e-5, GELU tanh approximation written out (NewGELUActivation); "
            "wte/wpe drawn N(0, 0.2^2), LayerNorm weights 1 + 0.1*N(0,1) and biases 0.1*N(0,1).",
        ],
        "observed": [
            "Observed (export_fixtures.py -v, onnxruntime-node): each PyTorch hook output is an ONNX value "
            "produced by a node of the module's scope, often of a CHILD scope: transformer.h.0.attn output = "
            "/transformer/h.0/attn/c_proj/Add_output_0, transformer.h.0.mlp output = "
            "/transformer/h.0/mlp/c_proj/Add_output_0, transformer output = /transformer/ln_f/Add_1_output_0, "
            "transformer.h.0 output[0] = /transformer/h.0/Add_1_output_0, lm_head output = logits.",
            "Observed: node-less (dropout) modules output their input value unchanged, so several modules share "
            "one ONNX value: transformer.drop = /transformer/Add_output_0 (wte + wpe); "
            "h.N.attn.attn_dropout = /transformer/h.N/attn/Softmax_output_0; h.N.attn.resid_dropout output = "
            "h.N.attn.c_proj output = h.N.attn output; h.N.mlp.dropout output = h.N.mlp.c_proj output = h.N.mlp output.",
            "The lm_head/wte tie does not survive constant folding: /lm_head/MatMul reads its own initializer "
            "(transformer.wte.weight transposed), /transformer/wte/Gather reads transformer.wte.weight. A "
            "gradient for that initializer corresponds to the experiment value 'lm_head.weight.grad.lm_head_use_only' "
            "(transposed).",
        ],
    }


def fixture_llama_tiny():
    torch.manual_seed(0)
    model = LlamaForCausalLM().eval()
    gen = torch.Generator().manual_seed(4)
    randomize_norms(model, gen)

    def make(batch_ids, pad_left):
        ids = batch_ids.clone()
        mask = torch.ones_like(ids)
        for row, n in enumerate(pad_left):
            mask[row, :n] = 0
            ids[row, :n] = 0  # pad token id 0
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # HF convention for left padding
        return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}

    inputs = make(torch.randint(1, 64, (2, 6), generator=gen, dtype=torch.int64), [0, 2])
    inputs_b = make(torch.randint(1, 64, (2, 6), generator=gen, dtype=torch.int64), [0, 0])
    inputs_short = make(torch.randint(1, 64, (1, 3), generator=gen, dtype=torch.int64), [0])
    run = lambda inp: model(inp["input_ids"], inp["attention_mask"], inp["position_ids"])
    exps = lm_experiments(model, run, inputs, inputs_b, {
        "block0": "model.layers.0", "block1": "model.layers.1", "mlp0": "model.layers.0.mlp",
        "final_norm": "model.norm", "embed": "model.embed_tokens",
    })
    dyn = {0: "batch", 1: "sequence"}
    return {
        "model": model,
        "inputs": inputs,
        "input_sets": {"inputs": inputs, "inputs_b": inputs_b, "inputs_short": inputs_short},
        "run": run,
        "export": {
            "args": (inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]),
            "input_names": ["input_ids", "attention_mask", "position_ids"],
            "output_names": ["logits"],
            "dynamic_axes": {"input_ids": dyn, "attention_mask": dyn, "position_ids": dyn, "logits": dyn},
        },
        "experiments": exps,
        "notes": [
            "config: vocab 64, hidden 32, 2 layers, 4 query heads sharing 2 key/value heads (head_dim 8), "
            "intermediate 64, rms_norm_eps 1e-6, rope_theta 10000, lm_head NOT tied, no KV cache.",
            "inputs row 1 is left-padded by 2 (attention_mask 0, token 0, position_ids = cumsum(mask)-1 "
            "with 1 at padded places, HF convention); padded query positions attend to nothing allowed, "
            "their additive mask row is all dtype-min, so softmax is uniform there (finite, meaningless).",
            "Rotary embeddings are the module model.rotary_emb (recent HF layout), called once per forward; "
            "its output is the tuple (cos, sin) [batch, seq, head_dim].",
            "Decoder layers and self_attn are called with POSITIONAL arguments (hidden_states, "
            "attention_mask_4d, cos, sin) so that forward hooks (torch 1.13, no with_kwargs) see them all; "
            "HF passes them as keywords. Decoder layers and self_attn return 1-tuples.",
        ],
        "observed": [
            "Observed (export_fixtures.py -v, onnxruntime-node): model.layers.N.self_attn output = "
            "/model/layers.N/self_attn/o_proj/MatMul_output_0; mlp output = /model/layers.N/mlp/down_proj/MatMul_output_0; "
            "model.layers.N output[0] = /model/layers.N/Add_1_output_0; model output = /model/norm/Mul_1_output_0; "
            "model.rotary_emb outputs (cos, sin) = /model/rotary_emb/Cast_1_output_0, /model/rotary_emb/Cast_2_output_0; "
            "act_fn (SiLU) = Sigmoid + Mul in scope act_fn.",
            "The rotary inv_freq buffer is folded into the unscoped Constant_28 feeding /model/rotary_emb/Expand; the "
            "4-D additive mask is built in the root scope /model/ (Trilu, And, Not, Where...).",
        ],
    }


FIXTURES_DEF = OrderedDict([
    ("tiny_mlp", fixture_tiny_mlp),
    ("tiny_gpt2", fixture_tiny_gpt2),
    ("twice", fixture_twice),
    ("llama_tiny", fixture_llama_tiny),
])


# ----------------------------------------------------------------------------------------
# Export and naming facts

def export_bytes(model, spec):
    f = io.BytesIO()
    torch.onnx.export(
        model, spec["args"], f,
        input_names=spec["input_names"], output_names=spec["output_names"],
        dynamic_axes=spec["dynamic_axes"], opset_version=OPSET,
        do_constant_folding=CONSTANT_FOLDING,
    )
    return f.getvalue()


def scope_of(node_name):
    """'/transformer/h.0/attn/c_attn/MatMul' -> 'transformer/h.0/attn/c_attn'; '' when unscoped."""
    if not node_name.startswith("/"):
        return None
    parts = node_name[1:].split("/")
    return "/".join(parts[:-1])


def naming_facts(mp, module_names):
    g = mp.graph
    nodes = list(g.node)
    unscoped = [n.name for n in nodes if scope_of(n.name) is None]
    top_level = [n.name for n in nodes if scope_of(n.name) == ""]
    scopes = OrderedDict()
    for n in nodes:
        s = scope_of(n.name)
        if s:
            scopes.setdefault(s, 0)
            scopes[s] += 1
    known = set(module_names)
    # a scope segment like "shared_1" is a repeated call of module "shared"
    repeated = sorted({s for s in scopes if re.search(r"_\d+(/|$)", s) and s.replace("/", ".") not in known})
    consumers = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n.name)
    shared_unscoped = [
        {"node": n.name, "output": n.output[0], "consumers": consumers.get(n.output[0], [])}
        for n in nodes if scope_of(n.name) is None and len(consumers.get(n.output[0], [])) > 1
    ]
    shared_inits = [
        {"initializer": i.name, "consumers": consumers.get(i.name, [])}
        for i in g.initializer if len(consumers.get(i.name, [])) > 1
    ]
    return {
        "node_count": len(nodes),
        "op_types": sorted({n.op_type for n in nodes}),
        "scopes": [{"scope": s, "module": s.replace("/", "."), "nodes": c} for s, c in scopes.items()],
        "unscoped_nodes": unscoped,
        "root_scope_nodes": top_level,
        "repeated_call_scopes": repeated,
        "unscoped_nodes_with_several_consumers": shared_unscoped,
        "initializers_with_several_consumers": shared_inits,
        "initializers": [
            {"name": i.name, "dtype": onnx.TensorProto.DataType.Name(i.data_type), "shape": list(i.dims)}
            for i in g.initializer
        ],
        "graph_inputs": [vi.name for vi in g.input],
        "graph_outputs": [vi.name for vi in g.output],
    }


def initializer_sources(mp, model):
    """Which parameter/buffer each initializer holds: same name, or found by value (possibly transposed)."""
    from onnx import numpy_helper
    tensors = OrderedDict()
    for n, p in model.named_parameters():
        tensors[n] = ("parameter", p.detach().numpy())
    for n, b in model.named_buffers():
        tensors[n] = ("buffer", b.detach().numpy())
    out = OrderedDict()
    for init in mp.graph.initializer:
        arr = numpy_helper.to_array(init)
        src = None
        if init.name in tensors:
            src = {"source": init.name, "kind": tensors[init.name][0], "transposed": False}
        else:
            for n, (kind, t) in tensors.items():
                if t.shape == arr.shape and np.array_equal(t, arr):
                    src = {"source": n, "kind": kind, "transposed": False}
                    break
                if t.ndim == 2 and t.T.shape == arr.shape and np.array_equal(t.T, arr):
                    src = {"source": n, "kind": kind, "transposed": True}
                    break
        out[init.name] = src
    return out


def tensor_shape_json(vi):
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        dims.append(d.dim_param if d.HasField("dim_param") else d.dim_value)
    return {"name": vi.name, "dtype": onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type), "shape": dims}


def build(name):
    fx = FIXTURES_DEF[name]()
    model = fx["model"]
    out_dir = os.path.join(FIXTURES, name)
    os.makedirs(out_dir, exist_ok=True)

    onnx_bytes = export_bytes(model, fx["export"])
    mp = onnx.load_from_string(onnx_bytes)
    onnx.checker.check_model(mp)
    with open(os.path.join(out_dir, "model.onnx"), "wb") as f:
        f.write(onnx_bytes)

    module_names = [n for n, _ in model.named_modules() if n != ""]
    with torch.no_grad():
        outputs = {k: {fx["export"]["output_names"][0]: tensor_json(fx["run"](v))} for k, v in fx["input_sets"].items()}
    _, hooks, calls = capture_hooks(model, lambda: fx["run"](fx["inputs"]))

    facts = naming_facts(mp, module_names)
    facts["initializer_sources"] = initializer_sources(mp, model)
    notes = list(fx["notes"]) + auto_notes(name, facts, module_names, calls) + list(fx.get("observed", []))

    ref = OrderedDict()
    ref["fixture"] = name
    ref["generator"] = "scripts/export_fixtures.py"
    ref["torch_version"] = torch.__version__
    ref["onnx_export"] = {
        "opset_version": OPSET,
        "do_constant_folding": CONSTANT_FOLDING,
        "input_names": fx["export"]["input_names"],
        "output_names": fx["export"]["output_names"],
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in fx["export"]["dynamic_axes"].items()},
        "graph_inputs": [tensor_shape_json(vi) for vi in mp.graph.input],
        "graph_outputs": [tensor_shape_json(vi) for vi in mp.graph.output],
    }
    ref["modules"] = module_names
    ref["root_type"] = type(model).__name__
    ref["module_types"] = {n: type(mod).__name__ for n, mod in model.named_modules() if n != ""}
    ref["repr"] = str(model)
    ref["parameters"] = {n: list(p.shape) for n, p in model.named_parameters()}
    ref["calls"] = calls
    ref["inputs"] = named_json(fx["inputs"])
    ref["outputs"] = outputs["inputs"]
    for k, v in fx["input_sets"].items():
        if k != "inputs":
            ref[k] = named_json(v)
            ref["outputs" + k[len("inputs"):]] = outputs[k]
    ref["hooks"] = hooks
    ref["experiments"] = fx["experiments"]
    ref["onnx_naming"] = facts
    ref["notes"] = notes
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(ref, f, separators=(",", ":"))
        f.write("\n")
    return fx, onnx_bytes, ref


def auto_notes(name, facts, module_names, calls):
    notes = []
    inits = [i["name"] for i in facts["initializers"]]
    kept = [n for n in inits if not n.startswith("onnx::")]
    renamed = [n for n in inits if n.startswith("onnx::")]
    notes.append("Initializers keeping their PyTorch names: " + (", ".join(kept) or "(none)") + ".")
    if renamed:
        src = facts.get("initializer_sources", {})

        def describe(n):
            s = src.get(n)
            if not s:
                return n + " (no parameter)"
            return n + " = " + s["source"] + (" transposed" if s["transposed"] else "")
        notes.append("Initializers with exporter names (constant folding of the weight transpose of Linear "
                     "layers lowered to MatMul+Add; see onnx_naming.initializer_sources): "
                     + ", ".join(describe(n) for n in renamed) + ".")
    if facts["unscoped_nodes"]:
        notes.append("Nodes without a scope (name not starting with '/'): " + ", ".join(facts["unscoped_nodes"]) + ".")
    else:
        notes.append("Every node name starts with '/' and carries its module scope "
                     "('/a/b.0/c/OpType' or '/a/b.0/c/OpType_N'); nodes in the root module's own forward "
                     "have names '/OpType[_N]'.")
    for u in facts["unscoped_nodes_with_several_consumers"]:
        notes.append(f"Unscoped {u['node']} (output {u['output']}) is shared by nodes of several modules: "
                     + ", ".join(u["consumers"]) + ".")
    for u in facts["initializers_with_several_consumers"]:
        notes.append(f"Initializer {u['initializer']} is consumed by several nodes: " + ", ".join(u["consumers"]) + ".")
    if facts["root_scope_nodes"]:
        notes.append("Nodes in the root scope: " + ", ".join(facts["root_scope_nodes"]) + ".")
    scoped = {s["module"] for s in facts["scopes"]}
    no_nodes = [m for m in module_names if m not in scoped and calls.get(m, 0) > 0
                and not any(s.startswith(m + ".") for s in scoped)]
    if no_nodes:
        notes.append("Modules called in the forward that own no ONNX node: " + ", ".join(no_nodes) + ".")
    never = [m for m in module_names if calls.get(m, 0) == 0]
    if never:
        notes.append("Modules never called themselves (containers): " + ", ".join(never) + ".")
    if facts["repeated_call_scopes"]:
        notes.append("Scopes of repeated calls (a module called k times gets scopes 'name', 'name_1', ..., "
                     "'name_{k-1}' in its parent's scope): " + ", ".join(facts["repeated_call_scopes"]) + ".")
    return notes


# ----------------------------------------------------------------------------------------
# Verification with onnxruntime-node

NODE_VERIFY_JS = r"""
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
const require = createRequire(process.cwd() + "/package.json");
const ort = require("onnxruntime-node");
const [jobPath] = process.argv.slice(2);
const job = JSON.parse(readFileSync(jobPath, "utf8"));
const typed = (t) => {
  if (t.dtype === "float32") return new ort.Tensor("float32", Float32Array.from(t.data), t.shape);
  if (t.dtype === "int64") return new ort.Tensor("int64", BigInt64Array.from(t.data.map((v) => BigInt(v))), t.shape);
  throw new Error("dtype " + t.dtype);
};
const result = [];
for (const run of job.runs) {
  const session = await ort.InferenceSession.create(run.model, { graphOptimizationLevel: run.opt ?? "all" });
  const feeds = {};
  for (const [k, v] of Object.entries(run.feeds)) feeds[k] = typed(v);
  const out = await session.run(feeds);
  const values = {};
  for (const name of run.fetch) {
    const t = out[name];
    values[name] = { dims: Array.from(t.dims), data: Array.from(t.data, (x) => Number(x)) };
  }
  result.push(values);
  await session.release();
}
process.stdout.write(JSON.stringify(result));
"""


def node_available():
    ort_dir = os.path.join(ROOT, "node_modules", "onnxruntime-node")
    try:
        subprocess.run(["node", "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return os.path.isdir(ort_dir)


def run_node(runs):
    with tempfile.TemporaryDirectory() as tmp:
        job = os.path.join(tmp, "job.json")
        script = os.path.join(tmp, "verify.mjs")
        with open(job, "w") as f:
            json.dump({"runs": runs}, f)
        with open(script, "w") as f:
            f.write(NODE_VERIFY_JS)
        # the script resolves onnxruntime-node from the repo root (cwd)
        proc = subprocess.run(["node", script, job], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError("node verification failed:\n" + proc.stderr)
        return json.loads(proc.stdout)


def with_all_values_as_outputs(mp):
    """Copy of the model whose graph outputs also expose every node output (for scope checks)."""
    m = onnx.ModelProto()
    m.CopyFrom(mp)
    existing = {o.name for o in m.graph.output}
    names = []
    for n in m.graph.node:
        if n.op_type == "Constant":
            continue
        for o in n.output:
            if o and o not in existing:
                m.graph.output.append(onnx.ValueInfoProto(name=o))
                existing.add(o)
                names.append(o)
    return m, names


def close(a, b, tol=TOL):
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    return a.shape == b.shape and (a.size == 0 or float(np.max(np.abs(a - b))) <= tol)


def verify(names, built, verbose=False):
    ok = True
    # 1. determinism of the export
    for name in names:
        fx = FIXTURES_DEF[name]()
        again = export_bytes(fx["model"], fx["export"])
        same = again == built[name][1]
        print(f"[{name}] re-export byte-identical: {same}")
        ok &= same
    if not node_available():
        print("node or node_modules/onnxruntime-node missing: skipping onnxruntime checks")
        return ok
    # 2. outputs on every input set, and 3. hook outputs found inside each module's scope
    with tempfile.TemporaryDirectory() as tmp:
        runs, meta = [], []
        for name in names:
            ref = built[name][2]
            model_path = os.path.join(FIXTURES, name, "model.onnx")
            out_name = ref["onnx_export"]["output_names"][0]
            for key in ref:
                if key == "inputs" or (key.startswith("inputs_") and isinstance(ref[key], dict)):
                    for opt in ("disabled", "all"):
                        runs.append({"model": model_path, "feeds": ref[key], "fetch": [out_name], "opt": opt})
                        meta.append(("outputs", name, key + " (graph optimization " + opt + ")"))
            full, value_names = with_all_values_as_outputs(onnx.load(model_path))
            full_path = os.path.join(tmp, name + "_all.onnx")
            onnx.save(full, full_path)
            runs.append({"model": full_path, "feeds": ref["inputs"], "fetch": value_names + [out_name],
                         "opt": "disabled"})
            meta.append(("values", name, "inputs"))
        results = run_node(runs)
    for (kind, name, key), res in zip(meta, results):
        ref = built[name][2]
        out_name = ref["onnx_export"]["output_names"][0]
        if kind == "outputs":
            set_name = key.split(" ")[0]
            want = ref["outputs" + set_name[len("inputs"):]][out_name]
            got = res[out_name]
            diff = float(np.max(np.abs(np.array(got["data"]) - np.array(want["data"])))) \
                if got["dims"] == want["shape"] else float("inf")
            good = got["dims"] == want["shape"] and diff <= TOL
            print(f"[{name}] onnxruntime-node {key}: shape {got['dims']} max|diff| {diff:.3g} {'OK' if good else 'FAIL'}")
            ok &= good
        else:
            ok &= check_scopes(name, ref, onnx.load(os.path.join(FIXTURES, name, "model.onnx")), res, verbose)
    return ok


def check_scopes(name, ref, mp, values, verbose):
    """Informative: for every hook record, look for each PyTorch hook output among the values
    produced by nodes of the module's ONNX scope (call i > 0: the scope with suffix _i), and for
    modules that own no node, among the values equal to their hook input (pass-through)."""
    producers = {}
    for n in mp.graph.node:
        for o in n.output:
            producers[o] = n.name
    lines, unmatched = [], 0
    for rec in ref["hooks"]:
        mod, call = rec["module"], rec["call"]
        scope = module_to_scope(mod) + (f"_{call}" if call > 0 else "")
        candidates = [v for v, p in producers.items() if p.startswith("/" + scope + "/") and v in values]
        for k, t in enumerate(rec["output"]):
            match = [v for v in candidates if values[v]["dims"] == t["shape"] and close(values[v]["data"], t["data"])]
            if match:
                lines.append(f"  {mod} call {call} output {k} = {match[-1]} (last matching value of scope /{scope}/)")
                continue
            if not candidates:
                same = [v for v in values if values[v]["dims"] == t["shape"] and close(values[v]["data"], t["data"])]
                lines.append(f"  {mod} call {call} output {k}: module owns no node; equal values: {', '.join(same)}")
            else:
                lines.append(f"  {mod} call {call} output {k}: NO value of scope /{scope}/ matches")
                unmatched += 1
    print(f"[{name}] hook outputs located in the ONNX graph: {len(lines) - unmatched}/{len(lines)} "
          f"({'' if verbose else '-v lists them'})")
    for l in lines:
        if verbose or "NO value" in l:
            print(l)
    return unmatched == 0


def module_to_scope(mod):
    """'transformer.h.0.attn' -> 'transformer/h.0/attn' (numeric segments join the previous one)."""
    parts = mod.split(".")
    out = []
    for p in parts:
        if p.isdigit() and out:
            out[-1] = out[-1] + "." + p
        else:
            out.append(p)
    return "/".join(out)


def main(argv):
    do_verify = "--no-verify" not in argv
    names = [a for a in argv if not a.startswith("-")] or list(FIXTURES_DEF)
    for n in names:
        if n not in FIXTURES_DEF:
            raise SystemExit(f"unknown fixture {n}; known: {', '.join(FIXTURES_DEF)}")
    torch.set_num_threads(1)
    built = {}
    for name in names:
        fx, onnx_bytes, ref = build(name)
        built[name] = (fx, onnx_bytes, ref)
        size = len(onnx_bytes)
        jsize = os.path.getsize(os.path.join(FIXTURES, name, "reference.json"))
        print(f"[{name}] model.onnx {size} bytes, reference.json {jsize} bytes, "
              f"{ref['onnx_naming']['node_count']} nodes")
    if do_verify:
        if not verify(names, built, verbose="-v" in argv):
            raise SystemExit("verification FAILED")
        print("verification OK")


if __name__ == "__main__":
    main(sys.argv[1:])
