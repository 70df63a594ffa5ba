/**
 * Backward graphs against PyTorch: the `grad` experiments of the fixtures'
 * reference.json (tiny_mlp, twice, tiny_gpt2, llama_tiny) and of stories260K
 * (models/stories260K/onnx/model.onnx). Gradients of module outputs and
 * inputs (found with ModuleTree) and of parameters (ONNX initializers;
 * `onnx::MatMul_*` hold W^T, tied weights are two initializers whose
 * gradients add up to PyTorch's total) must match within 1e-4 relative:
 * max |ours - torch| <= 1e-4 * max |torch| over each tensor.
 */
import { describe, expect, test } from "vitest"
import { readFileSync } from "node:fs"
import * as ort from "onnxruntime-node"
import * as Autodiff from "../src/backends/Autodiff.js"
import * as ModuleTree from "../src/models/ModuleTree.js"
import * as Onnx from "../src/models/Onnx.js"
import * as Segments from "../src/models/Segments.js"

interface RefTensor {
  readonly dtype: string
  readonly shape: ReadonlyArray<number>
  readonly data: ReadonlyArray<number>
}
interface Reference {
  readonly inputs: Record<string, RefTensor>
  readonly experiments: ReadonlyArray<{ readonly name: string; readonly result: Record<string, RefTensor> }>
}

const sessionOptions: ort.InferenceSession.SessionOptions = { extra: { session: { "intra_op.allow_spinning": "0" } } }

const reference = (name: string): Reference => JSON.parse(readFileSync(`test/fixtures/${name}/reference.json`, "utf8"))
const experiment = (ref: Reference, name: string) => {
  const e = ref.experiments.find((x) => x.name === name)
  if (e === undefined) throw new Error(`no experiment ${name}`)
  return e.result
}
const ortOf = (r: RefTensor): ort.Tensor =>
  r.dtype === "int64"
    ? new ort.Tensor("int64", BigInt64Array.from(r.data.map((v) => BigInt(v))), [...r.shape])
    : new ort.Tensor("float32", Float32Array.from(r.data), [...r.shape])

const run = async (model: Onnx.Model, feeds: Record<string, ort.Tensor>, fetch?: ReadonlyArray<string>) => {
  const s = await ort.InferenceSession.create(Onnx.encode(model), sessionOptions)
  try {
    return fetch === undefined ? await s.run(feeds) : await s.run(feeds, [...fetch])
  } finally {
    await s.release()
  }
}

/** A tensor-like: ort.Tensor (float data) or a plain pair. */
interface Mat {
  readonly dims: ReadonlyArray<number>
  readonly data: unknown
}
const num = (t: Mat) => t.data as ArrayLike<number>

/** A [r, c] matrix transposed. */
const transpose = (t: Mat): { dims: Array<number>; data: Float32Array } => {
  const [r, c] = t.dims
  const out = new Float32Array(r * c)
  const d = num(t)
  for (let i = 0; i < r; i++) for (let j = 0; j < c; j++) out[j * r + i] = d[i * c + j]
  return { dims: [c, r], data: out }
}

/** max |a - b| <= 1e-4 * max |b| (and shapes agree). Returns the relative error. */
const expectMatch = (label: string, got: Mat, want: RefTensor | Mat) => {
  const wantDims = "shape" in want ? want.shape : want.dims
  expect([...got.dims], label).toEqual([...wantDims])
  const g = num(got)
  const w = "shape" in want ? want.data : num(want)
  let err = 0
  let scale = 0
  for (let i = 0; i < w.length; i++) {
    err = Math.max(err, Math.abs(g[i] - w[i]))
    scale = Math.max(scale, Math.abs(w[i]))
  }
  expect(scale, `${label}: the reference is not all zeros`).toBeGreaterThan(0)
  expect(err / scale, `${label}: max abs error ${err} against max |torch| ${scale}`).toBeLessThanOrEqual(1e-4)
  if (process.env.AUTODIFF_REPORT) console.log(`${label}: ${(err / scale).toExponential(2)}`)
  return err / scale
}

const add = (a: Mat, b: Mat) => ({
  dims: [...a.dims],
  data: Float32Array.from({ length: num(a).length }, (_, i) => num(a)[i] + num(b)[i])
})

type Grads = Record<string, ort.Tensor>

/**
 * Forward run (fetching what the backward model needs), then the backward
 * run with the given seed for the model's first output. Returns gradients by
 * wrt name.
 */
const gradients = async (
  model: Onnx.Model,
  feeds: Record<string, ort.Tensor>,
  seed: (output: ort.Tensor) => ort.Tensor,
  wrt: ReadonlyArray<string>
): Promise<{ grads: Grads; output: ort.Tensor }> => {
  const out = model.graph.outputs[0].name
  const bw = Autodiff.backward(model, { outputs: [out], wrt })
  const fwd = await run(Autodiff.withOutputs(model, bw.forwardInputs), feeds, [out, ...bw.forwardInputs.filter((n) => !(n in feeds))])
  const bfeeds: Record<string, ort.Tensor> = { [bw.gradInputs[0]]: seed(fwd[out]) }
  for (const n of bw.forwardInputs) bfeeds[n] = fwd[n] ?? feeds[n]
  const res = await run(bw.model, bfeeds)
  return { grads: Object.fromEntries(wrt.map((w, j) => [w, res[bw.gradOutputs[j]]])), output: fwd[out] }
}

const ones = (t: ort.Tensor) => new ort.Tensor("float32", new Float32Array(t.size).fill(1), t.dims)
/** d/dlogits of sum_b logits[b, -1, token] (rows: the batch rows to include) */
const lastToken = (token: number, rows?: ReadonlyArray<number>) => (logits: ort.Tensor) => {
  const [B, S, V] = logits.dims
  const d = new Float32Array(B * S * V)
  for (const b of rows ?? Array.from({ length: B }, (_, i) => i)) d[b * S * V + (S - 1) * V + token] = 1
  return new ort.Tensor("float32", d, [B, S, V])
}

const load = (path: string) => {
  const model = Onnx.decode(readFileSync(path))
  const tree = ModuleTree.build(model.graph)
  const mod = (path: string) => {
    const m = ModuleTree.find(tree, path)
    if (m === undefined) throw new Error(`no module ${path}`)
    return m
  }
  return { model, tree, mod }
}

describe("gradients match PyTorch", () => {
  test("tiny_mlp: loss = y.sum(); module output/input and every parameter", async () => {
    const ref = reference("tiny_mlp")
    const { model, mod } = load("test/fixtures/tiny_mlp/model.onnx")
    const h = mod("layer1").calls[0].outputs[0]
    expect(mod("layer2").calls[0].inputs[0]).toBe(h)
    const params = ["layer1", "layer2"].flatMap((m) => mod(m).parameters.map((p) => ({ key: `${m}.${p.name}.grad`, ...p })))
    const { grads } = await gradients(model, { x: ortOf(ref.inputs.x) }, ones, [h, ...params.map((p) => p.initializer)])
    const want = experiment(ref, "grad")
    expectMatch("layer1.output", grads[h], want["layer1.output.grad"])
    expectMatch("layer2.input", grads[h], want["layer2.input.grad"])
    for (const p of params) {
      const g = grads[p.initializer]
      expectMatch(p.key, p.transposed ? transpose(g) : g, want[p.key])
    }
  })

  test("tiny_mlp, chained segments: the gradient at layer2's input doubled before layer1's backward (grad_setting)", async () => {
    const ref = reference("tiny_mlp")
    const { model, tree, mod } = load("test/fixtures/tiny_mlp/model.onnx")
    const idx = Segments.index(model, tree.order)
    const [seg1, seg2] = Segments.cut(idx, [mod("layer2").calls[0].start]).map((s) => Segments.toModel(idx, s))
    const shapes = Autodiff.staticShapes(model)
    const h = mod("layer1").calls[0].outputs[0]
    const x = ortOf(ref.inputs.x)
    const hv = (await run(seg1, { x }))[h]
    // segment 2 backward: y -> h, layer2 parameters
    const bw2 = Autodiff.backward(seg2, { outputs: ["y"], wrt: [h, "layer2.weight", "layer2.bias"], shapes })
    const fw2 = await run(Autodiff.withOutputs(seg2, bw2.forwardInputs), { [h]: hv })
    const feeds2: Record<string, ort.Tensor> = { [bw2.gradInputs[0]]: ones(fw2.y) }
    for (const n of bw2.forwardInputs) feeds2[n] = fw2[n] ?? hv
    const g2 = await run(bw2.model, feeds2)
    const gh = g2[bw2.gradOutputs[0]]
    const want = experiment(ref, "grad_setting")
    expectMatch("layer2.input.grad.original", gh, want["layer2.input.grad.original"])
    const doubled = new ort.Tensor("float32", Float32Array.from(gh.data as Float32Array, (v) => 2 * v), gh.dims)
    expectMatch("layer2.input.grad.after_set", doubled, want["layer2.input.grad.after_set"])
    // segment 1 backward seeded with the doubled gradient
    const bw1 = Autodiff.backward(seg1, { outputs: [h], wrt: ["layer1.weight", "layer1.bias"], shapes })
    const feeds1: Record<string, ort.Tensor> = { [bw1.gradInputs[0]]: doubled }
    for (const n of bw1.forwardInputs) feeds1[n] = n === "x" ? x : hv
    const g1 = await run(bw1.model, feeds1)
    expectMatch("layer1.weight.grad", g1[bw1.gradOutputs[0]], want["layer1.weight.grad"])
    expectMatch("layer1.bias.grad", g1[bw1.gradOutputs[1]], want["layer1.bias.grad"])
    expectMatch("layer2.weight.grad", g2[bw2.gradOutputs[1]], want["layer2.weight.grad"])
    expectMatch("layer2.bias.grad", g2[bw2.gradOutputs[2]], want["layer2.bias.grad"])
  })

  test("twice: a module called twice; its weight's gradient sums both uses", async () => {
    const ref = reference("twice")
    const { model, mod } = load("test/fixtures/twice/model.onnx")
    const [c0, c1] = mod("shared").calls.map((c) => c.outputs[0])
    const { grads } = await gradients(model, { x: ortOf(ref.inputs.x) }, ones, [c0, c1, "shared.weight", "inp.weight"])
    const want = experiment(ref, "grad")
    expectMatch("shared.output.call0", grads[c0], want["shared.output.call0.grad"])
    expectMatch("shared.output.call1", grads[c1], want["shared.output.call1.grad"])
    expectMatch("shared.weight", grads["shared.weight"], want["shared.weight.grad"])
    expectMatch("inp.weight", grads["inp.weight"], want["inp.weight.grad"])
  })

  test("tiny_gpt2: block output/input, tied lm_head/wte split into its two ONNX initializers", async () => {
    const ref = reference("tiny_gpt2")
    const { model, mod } = load("test/fixtures/tiny_gpt2/model.onnx")
    const h0 = mod("transformer.h.0").calls[0].outputs[0]
    const h1in = mod("transformer.h.1").calls[0].inputs[0]
    const lm = mod("lm_head").parameters[0]
    expect(lm.transposed).toBe(true)
    const wte = mod("transformer.wte").parameters[0].initializer
    const { grads } = await gradients(model, { input_ids: ortOf(ref.inputs.input_ids) }, lastToken(5), [h0, h1in, lm.initializer, wte])
    const want = experiment(ref, "grad")
    expectMatch("transformer.h.0.output[0]", grads[h0], want["transformer.h.0.output[0].grad"])
    expectMatch("transformer.h.1.input", grads[h1in], want["transformer.h.1.input.grad"])
    const lmUse = transpose(grads[lm.initializer])
    expectMatch("lm_head.weight.lm_head_use_only", lmUse, want["lm_head.weight.grad.lm_head_use_only"])
    expectMatch("transformer.wte.weight.embedding_use_only", grads[wte], want["transformer.wte.weight.grad.embedding_use_only"])
    const total = add(lmUse, grads[wte])
    expectMatch("lm_head.weight (tied total)", total, want["lm_head.weight.grad"])
    expectMatch("transformer.wte.weight (tied total)", total, want["transformer.wte.weight.grad"])
  })

  test("llama_tiny: decoder layer output/input, lm_head (stored W^T) and the embedding, with a left-padded row", async () => {
    const ref = reference("llama_tiny")
    const { model, mod } = load("test/fixtures/llama_tiny/model.onnx")
    const h0 = mod("model.layers.0").calls[0].outputs[0]
    const h1in = mod("model.layers.1").calls[0].inputs[0]
    const lm = mod("lm_head").parameters[0]
    const emb = mod("model.embed_tokens").parameters[0].initializer
    const feeds = Object.fromEntries(Object.entries(ref.inputs).map(([k, v]) => [k, ortOf(v)]))
    const { grads } = await gradients(model, feeds, lastToken(5), [h0, h1in, lm.initializer, emb])
    const want = experiment(ref, "grad")
    expectMatch("model.layers.0.output[0]", grads[h0], want["model.layers.0.output[0].grad"])
    expectMatch("model.layers.1.input", grads[h1in], want["model.layers.1.input.grad"])
    expectMatch("lm_head.weight", lm.transposed ? transpose(grads[lm.initializer]) : grads[lm.initializer], want["lm_head.weight.grad"])
    expectMatch("model.embed_tokens.weight", grads[emb], want["model.embed_tokens.weight.grad"])
  })
})

describe("stories260K gradients match PyTorch", () => {
  const ref = reference("stories260K")
  const { model, tree, mod } = load("models/stories260K/onnx/model.onnx")
  const feeds: Record<string, ort.Tensor> = Object.fromEntries(Object.entries(ref.inputs).map(([k, v]) => [k, ortOf(v)]))
  for (let i = 0; i < 5; i++) {
    for (const kv of ["key", "value"]) feeds[`past_key_values.${i}.${kv}`] = new ort.Tensor("float32", new Float32Array(0), [1, 4, 0, 8])
  }
  const want = experiment(ref, "grad")
  const h1 = mod("model.layers.1").calls[0].outputs[0]
  const h3in = mod("model.layers.3").calls[0].inputs[0]
  const lm = mod("lm_head").parameters[0]
  const emb = mod("model.embed_tokens").parameters[0].initializer
  const norm = mod("model.norm").parameters[0].initializer
  const down = mod("model.layers.0.mlp.down_proj").parameters[0]
  const wrt = [h1, h3in, lm.initializer, emb, norm, down.initializer]
  const seed = lastToken(317, [0])

  const compare = (grads: Grads) => {
    expectMatch("model.layers.1.output[0]", grads[h1], want["model.layers.1.output[0].grad"])
    expectMatch("model.layers.3.input[0]", grads[h3in], want["model.layers.3.input[0].grad"])
    const lmUse = transpose(grads[lm.initializer])
    expectMatch("lm_head.weight.lm_head_use_only", lmUse, want["lm_head.weight.grad.lm_head_use_only"])
    expectMatch("model.embed_tokens.weight.embedding_use_only", grads[emb], want["model.embed_tokens.weight.grad.embedding_use_only"])
    expectMatch("lm_head.weight (tied total)", add(lmUse, grads[emb]), want["lm_head.weight.grad"])
    expectMatch("model.norm.weight", grads[norm], want["model.norm.weight.grad"])
    expectMatch("model.layers.0.mlp.down_proj.weight", transpose(grads[down.initializer]), want["model.layers.0.mlp.down_proj.weight.grad"])
  }

  test("whole model: loss = logits[0, -1, 317]", async () => {
    expect(lm.initializer).toBe("onnx::MatMul_1216")
    expect(down.initializer).toBe("onnx::MatMul_1119")
    const { grads, output } = await gradients(model, feeds, seed, wrt)
    const [, S, V] = output.dims
    expect(Math.abs((output.data as Float32Array)[(S - 1) * V + 317] - want.loss.data[0])).toBeLessThan(1e-4)
    compare(grads)
  })

  test("chained segments (cut at every decoder layer) give the same gradients", async () => {
    const idx = Segments.index(model, tree.order)
    const cuts = [0, 1, 2, 3, 4].map((i) => mod(`model.layers.${i}`).calls[0].start).concat([mod("model.norm").calls[0].start])
    const segs = Segments.cut(idx, cuts)
    const shapes = Autodiff.staticShapes(model)
    const types = idx.types
    const isFloat = (n: string) => types.get(n) === 1
    // one forward run gives every tensor the segments' backward models read
    const backs = segs.map((seg) => {
      const sub = Segments.toModel(idx, seg)
      const outputs = seg.outputs.filter((o) => isFloat(o) && !o.startsWith("present."))
      const targets = [...new Set([...seg.inputs.filter(isFloat), ...wrt.filter((w) => sub.graph.initializers.some((t) => t.name === w))])]
      return { seg, bw: outputs.length === 0 || targets.length === 0 ? undefined : Autodiff.backward(sub, { outputs, wrt: targets, shapes }), outputs, targets }
    })
    const needed = [...new Set(backs.flatMap((b) => [...(b.bw?.forwardInputs ?? []), ...b.outputs]))].filter((n) => !(n in feeds))
    const fwd = await run(Autodiff.withOutputs(model, needed), feeds, ["logits", ...needed])
    const acc = new Map<string, Float32Array>()
    const dims = new Map<string, ReadonlyArray<number>>()
    const accumulate = (name: string, t: ort.Tensor) => {
      const prev = acc.get(name)
      const data = t.data as Float32Array
      acc.set(name, prev === undefined ? Float32Array.from(data) : prev.map((v, i) => v + data[i]))
      dims.set(name, t.dims)
    }
    // the scalar is built by intervention ops: loss = logits[0, -1, 317] * 1.0, lowered to ONNX and differentiated
    const loss = Autodiff.lowerIntervention(
      [
        { op: "Index", args: ["logits"], attrs: { items: [0, -1, 317] }, output: "picked" },
        { op: "Mul", args: ["picked", "one"], attrs: {}, output: "loss" }
      ],
      [
        { name: "logits", dtype: "float32", shape: fwd.logits.dims },
        { name: "one", dtype: "float32", shape: [], value: [1] }
      ],
      ["loss"]
    )
    const lossBw = Autodiff.backward(loss, { outputs: ["loss"], wrt: ["logits"] })
    const lossFeeds: Record<string, ort.Tensor> = { [lossBw.gradInputs[0]]: new ort.Tensor("float32", Float32Array.of(1), []) }
    for (const n of lossBw.forwardInputs) lossFeeds[n] = fwd[n]
    accumulate("logits", (await run(lossBw.model, lossFeeds))[lossBw.gradOutputs[0]])
    for (const { bw, outputs, targets } of [...backs].reverse()) {
      if (bw === undefined) continue
      const bfeeds: Record<string, ort.Tensor> = {}
      outputs.forEach((o, k) => {
        const g = acc.get(o)
        bfeeds[bw.gradInputs[k]] = new ort.Tensor("float32", g ?? new Float32Array(fwd[o].size), fwd[o].dims)
      })
      for (const n of bw.forwardInputs) bfeeds[n] = fwd[n] ?? feeds[n]
      const res = await run(bw.model, bfeeds)
      targets.forEach((t, j) => accumulate(t, res[bw.gradOutputs[j]]))
    }
    const grads: Grads = Object.fromEntries(wrt.map((w) => [w, new ort.Tensor("float32", acc.get(w)!, dims.get(w)!)]))
    compare(grads)
  })
})
