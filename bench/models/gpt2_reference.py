#!/usr/bin/env python3
"""Dev-only: export Hugging Face's GPT2LMHeadModel (transformers 4.3x modeling_gpt2.py, eager
attention, KV cache; re-written in plain torch with HF module names, nn.Linear for Conv1D) with
PyTorch's own exporter, in the transformers.js input/output layout, so that
bench/models/check-gpt2.ts can compare bench/models/gpt2.ts's generated graph with it.
Needs Debian's python3-torch (1.13) and python3-onnx:

    /usr/bin/python3 bench/models/gpt2_reference.py /tmp/ref.onnx 64,16,32,2,4   # vocab,positions,embd,layers,heads[,inner]
    npx tsx bench/models/check-gpt2.ts /tmp/ref.onnx 64,16,32,2,4

LayerNorm parameters are randomised: with equal ones the exporter deduplicates them (Identity nodes).
"""
import math, sys, io, json
import torch, torch.nn as nn, numpy as np, onnx

class NewGELUActivation(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))

class GPT2Attention(nn.Module):
    def __init__(self, n_embd, n_head, n_positions):
        super().__init__()
        self.num_heads = n_head; self.head_dim = n_embd // n_head; self.split_size = n_embd; self.embed_dim = n_embd
        self.register_buffer("bias", torch.tril(torch.ones((n_positions, n_positions), dtype=torch.bool)).view(1, 1, n_positions, n_positions), persistent=False)
        self.register_buffer("masked_bias", torch.tensor(-1e4), persistent=False)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(0.1); self.resid_dropout = nn.Dropout(0.1)
    def _attn(self, query, key, value, attention_mask=None):
        attn_weights = torch.matmul(query, key.transpose(-1, -2))
        attn_weights = attn_weights / torch.full([], value.size(-1) ** 0.5, dtype=attn_weights.dtype, device=attn_weights.device)
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length : key_length, :key_length]
        mask_value = torch.finfo(attn_weights.dtype).min
        mask_value = torch.full([], mask_value, dtype=attn_weights.dtype).to(attn_weights.device)
        attn_weights = torch.where(causal_mask, attn_weights.to(attn_weights.dtype), mask_value)
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_weights = attn_weights.type(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)
        attn_output = torch.matmul(attn_weights, value)
        return attn_output, attn_weights
    def _split_heads(self, tensor, num_heads, attn_head_size):
        new_shape = tensor.size()[:-1] + (num_heads, attn_head_size)
        tensor = tensor.view(new_shape)
        return tensor.permute(0, 2, 1, 3)
    def _merge_heads(self, tensor, num_heads, attn_head_size):
        tensor = tensor.permute(0, 2, 1, 3).contiguous()
        new_shape = tensor.size()[:-2] + (num_heads * attn_head_size,)
        return tensor.view(new_shape)
    def forward(self, hidden_states, layer_past=None, attention_mask=None, use_cache=True):
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        query = self._split_heads(query, self.num_heads, self.head_dim)
        key = self._split_heads(key, self.num_heads, self.head_dim)
        value = self._split_heads(value, self.num_heads, self.head_dim)
        if layer_past is not None:
            past_key, past_value = layer_past
            key = torch.cat((past_key, key), dim=-2)
            value = torch.cat((past_value, value), dim=-2)
        present = (key, value) if use_cache else None
        attn_output, attn_weights = self._attn(query, key, value, attention_mask)
        attn_output = self._merge_heads(attn_output, self.num_heads, self.head_dim)
        attn_output = self.c_proj(attn_output)
        attn_output = self.resid_dropout(attn_output)
        return (attn_output, present)

class GPT2MLP(nn.Module):
    def __init__(self, n_embd, n_inner):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, n_inner); self.c_proj = nn.Linear(n_inner, n_embd)
        self.act = NewGELUActivation(); self.dropout = nn.Dropout(0.1)
    def forward(self, hidden_states):
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))

class GPT2Block(nn.Module):
    def __init__(self, n_embd, n_head, n_positions, n_inner):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5); self.attn = GPT2Attention(n_embd, n_head, n_positions)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5); self.mlp = GPT2MLP(n_embd, n_inner)
    def forward(self, hidden_states, layer_past=None, attention_mask=None, use_cache=True):
        residual = hidden_states
        hidden_states = self.ln_1(hidden_states)
        attn_outputs = self.attn(hidden_states, layer_past=layer_past, attention_mask=attention_mask, use_cache=use_cache)
        attn_output = attn_outputs[0]; outputs = attn_outputs[1:]
        hidden_states = attn_output + residual
        residual = hidden_states
        hidden_states = self.ln_2(hidden_states)
        feed_forward_hidden_states = self.mlp(hidden_states)
        hidden_states = residual + feed_forward_hidden_states
        return (hidden_states,) + outputs

class GPT2Model(nn.Module):
    def __init__(self, vocab_size, n_positions, n_embd, n_layer, n_head, n_inner):
        super().__init__()
        self.embed_dim = n_embd
        self.wte = nn.Embedding(vocab_size, n_embd); self.wpe = nn.Embedding(n_positions, n_embd)
        self.drop = nn.Dropout(0.1)
        self.h = nn.ModuleList([GPT2Block(n_embd, n_head, n_positions, n_inner) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)
    def forward(self, input_ids, past_key_values, attention_mask, position_ids):
        input_shape = input_ids.size()
        input_ids = input_ids.view(-1, input_shape[-1])
        batch_size = input_ids.shape[0]
        position_ids = position_ids.view(-1, input_shape[-1])
        attention_mask = attention_mask.view(batch_size, -1)
        attention_mask = attention_mask[:, None, None, :]
        attention_mask = attention_mask.to(dtype=torch.float32)
        attention_mask = (1.0 - attention_mask) * torch.finfo(torch.float32).min
        inputs_embeds = self.wte(input_ids)
        position_embeds = self.wpe(position_ids)
        hidden_states = inputs_embeds + position_embeds
        hidden_states = self.drop(hidden_states)
        output_shape = (-1,) + input_shape[1:] + (hidden_states.size(-1),)
        presents = ()
        for i, (block, layer_past) in enumerate(zip(self.h, past_key_values)):
            outputs = block(hidden_states, layer_past=layer_past, attention_mask=attention_mask, use_cache=True)
            hidden_states = outputs[0]
            presents = presents + (outputs[1],)
        hidden_states = self.ln_f(hidden_states)
        hidden_states = hidden_states.view(output_shape)
        return hidden_states, presents

class GPT2LMHeadModel(nn.Module):
    def __init__(self, vocab_size, n_positions, n_embd, n_layer, n_head, n_inner=None):
        super().__init__()
        self.transformer = GPT2Model(vocab_size, n_positions, n_embd, n_layer, n_head, n_inner or 4 * n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.n_layer = n_layer
    def forward(self, input_ids, attention_mask, position_ids, *past):
        pkv = tuple((past[2 * i], past[2 * i + 1]) for i in range(self.n_layer))
        hidden_states, presents = self.transformer(input_ids, pkv, attention_mask, position_ids)
        lm_logits = self.lm_head(hidden_states)
        out = (lm_logits,)
        for k, v in presents: out = out + (k, v)
        return out

if __name__ == "__main__":
    dims = [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else [64, 16, 32, 2, 4]
    V, P, E, L, H = dims[:5]
    torch.manual_seed(0)
    m = GPT2LMHeadModel(V, P, E, L, H, dims[5] if len(dims) > 5 else None).eval()
    for n, p in m.named_parameters():
        if 'ln' in n:
            with torch.no_grad(): p.add_(0.1 * torch.randn(p.shape))
    hd = E // H
    B, S, PS = 2, 3, 2
    ids = torch.randint(0, V, (B, S)); mask = torch.ones(B, PS + S, dtype=torch.long)
    pos = torch.arange(PS, PS + S).unsqueeze(0).repeat(B, 1)
    past = [torch.randn(B, H, PS, hd) for _ in range(2 * L)]
    in_names = ["input_ids", "attention_mask", "position_ids"]
    out_names = ["logits"]
    dyn = {"input_ids": {0: "batch_size", 1: "sequence_length"}, "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
           "position_ids": {0: "batch_size", 1: "sequence_length"}, "logits": {0: "batch_size", 1: "sequence_length"}}
    for i in range(L):
        for kv in ("key", "value"):
            in_names.append(f"past_key_values.{i}.{kv}"); dyn[in_names[-1]] = {0: "batch_size", 2: "past_sequence_length"}
    for i in range(L):
        for kv in ("key", "value"):
            out_names.append(f"present.{i}.{kv}"); dyn[out_names[-1]] = {0: "batch_size", 2: "total_sequence_length"}
    with torch.no_grad():
        torch.onnx.export(m, (ids, mask, pos, *past), sys.argv[1], input_names=in_names, output_names=out_names,
                          dynamic_axes=dyn, opset_version=14, do_constant_folding=True)
