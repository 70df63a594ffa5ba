import { afterAll, beforeAll, describe, expect } from "vitest"
import { fc, test } from "@fast-check/vitest"
import { mkdtemp, readFile, rm } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { isDeepStrictEqual } from "node:util"
import * as ort from "onnxruntime-node"
import * as Onnx from "../src/models/Onnx.js"
import * as Gpt2 from "../bench/models/gpt2.js"

// The tiny GPT-2 with larger weights than GPT-2's 0.02, so that attention is far from uniform
// and every mistake in masking or caching moves the logits well past the tolerances.
const config = Gpt2.tiny
const { vocabSize: V, nEmbd: E, nHead: H, nLayer: L, nPositions: P } = config
const hd = E / H
const model = Gpt2.build(config, 1, { std: 0.1 })
const sessionOptions: ort.InferenceSession.SessionOptions = { extra: { session: { "intra_op.allow_spinning": "0" } } }

const sessions: Array<ort.InferenceSession> = []
const open = async (m: Onnx.Model) => {
  const s = await ort.InferenceSession.create(Onnx.encode(m), sessionOptions)
  sessions.push(s)
  return s
}
let session: ort.InferenceSession
beforeAll(async () => {
  session = await open(model)
})
afterAll(async () => {
  await Promise.all(sessions.map((s) => s.release()))
})

const int64 = (rows: ReadonlyArray<ReadonlyArray<number>>) =>
  new ort.Tensor("int64", BigInt64Array.from(rows.flat(), BigInt), [rows.length, rows[0].length])

type Outputs = Record<string, ort.Tensor>

/** One run: token rows, mask rows over past + new, position rows; past from an earlier run's presents. */
const run = async (
  s: ort.InferenceSession,
  ids: ReadonlyArray<ReadonlyArray<number>>,
  options: { mask?: ReadonlyArray<ReadonlyArray<number>>; positions?: ReadonlyArray<ReadonlyArray<number>>; past?: Outputs } = {}
): Promise<Outputs> => {
  const B = ids.length
  const n = ids[0].length
  const pastLength = options.past ? options.past["present.0.key"].dims[2] : 0
  const feeds: Record<string, ort.Tensor> = {
    input_ids: int64(ids),
    attention_mask: int64(options.mask ?? ids.map(() => Array(pastLength + n).fill(1))),
    position_ids: int64(options.positions ?? ids.map(() => Array.from({ length: n }, (_, k) => pastLength + k)))
  }
  for (let l = 0; l < L; l++)
    for (const kv of ["key", "value"])
      feeds[`past_key_values.${l}.${kv}`] =
        options.past?.[`present.${l}.${kv}`] ?? new ort.Tensor("float32", new Float32Array(0), [B, H, 0, hd])
  return s.run(feeds)
}

/** logits[row, position, :] */
const logitsAt = (out: Outputs, row: number, position: number): Float32Array => {
  const [, n] = out.logits.dims
  return (out.logits.data as Float32Array).subarray((row * n + position) * V, (row * n + position + 1) * V)
}

const maxDiff = (a: ArrayLike<number>, b: ArrayLike<number>): number => {
  expect(a.length).toBe(b.length)
  let d = 0
  for (let k = 0; k < a.length; k++) d = Math.max(d, Math.abs(a[k] - b[k]))
  return d
}

const initializer = (m: Onnx.Model, name: string): Float32Array => {
  const t = m.graph.initializers.find((i) => i.name === name)
  if (t === undefined) throw new Error(`no initializer ${name}`)
  return Onnx.tensorData(t) as Float32Array
}
/** The initializer a node reads: `weightOf("/transformer/h.0/attn/c_attn/MatMul", 1)`. */
const inputOf = (m: Onnx.Model, node: string, k: number): string => {
  const n = m.graph.nodes.find((x) => x.name === node)
  if (n === undefined) throw new Error(`no node ${node}`)
  return n.inputs[k]
}

const tokens = (n: number) => fc.array(fc.integer({ min: 0, max: V - 1 }), { minLength: n, maxLength: n })

describe("generated GPT-2 (tiny)", () => {
  test("has the exporter's module scopes, node and output names, and the transformers.js signature", () => {
    const names = new Set(model.graph.nodes.map((n) => n.name))
    for (const name of [
      "/transformer/wte/Gather",
      "/transformer/wpe/Gather",
      "/transformer/h.0/ln_1/ReduceMean",
      "/transformer/h.0/attn/c_attn/MatMul",
      "/transformer/h.0/attn/c_attn/Add",
      "/transformer/h.0/attn/Split",
      "/transformer/h.0/attn/Softmax",
      "/transformer/h.0/attn/c_proj/Add",
      "/transformer/h.0/Add",
      "/transformer/h.1/mlp/act/Tanh",
      "/transformer/h.1/mlp/c_proj/MatMul",
      "/transformer/h.1/Add_1",
      "/transformer/ln_f/Add_1",
      "/lm_head/MatMul"
    ])
      expect(names).toContain(name)
    const scopes = new Set(
      model.graph.nodes.filter((n) => n.name.startsWith("/")).map((n) => n.name.slice(1, n.name.lastIndexOf("/")))
    )
    // (`mlp` has no nodes of its own, as in the export)
    const blocks = (l: number) =>
      ["", "/ln_1", "/attn", "/attn/c_attn", "/attn/c_proj", "/ln_2", "/mlp/c_fc", "/mlp/act", "/mlp/c_proj"].map(
        (s) => `transformer/h.${l}${s}`
      )
    expect([...scopes].sort()).toEqual(
      ["transformer", "transformer/wte", "transformer/wpe", ...blocks(0), ...blocks(1), "transformer/ln_f", "lm_head"].sort()
    )
    const graphOutputs = new Set(model.graph.outputs.map((o) => o.name))
    for (const n of model.graph.nodes) {
      if (!n.name.startsWith("/")) {
        // folded constants the exporter leaves unscoped
        expect(n.opType).toBe("Constant")
        expect(n.outputs[0]).toMatch(/^onnx::(Unsqueeze|Slice|Where)_\d+$/)
      } else
        n.outputs.forEach((o, k) => {
          if (!graphOutputs.has(o)) expect(o).toBe(`${n.name}_output_${k}`)
        })
    }
    expect(inputOf(model, "/transformer/h.0/attn/Concat_3", 0)).toBe("past_key_values.0.key")
    expect(model.graph.nodes.find((n) => n.name === "/transformer/h.1/attn/Concat_4")?.outputs).toEqual(["present.1.value"])
    expect(model.graph.inputs.map((i) => i.name)).toEqual([
      "input_ids",
      "attention_mask",
      "position_ids",
      ...Array.from({ length: L }, (_, l) => [`past_key_values.${l}.key`, `past_key_values.${l}.value`]).flat()
    ])
    expect(model.graph.outputs.map((o) => o.name)).toEqual([
      "logits",
      ...Array.from({ length: L }, (_, l) => [`present.${l}.key`, `present.${l}.value`]).flat()
    ])
    expect(model.opsetImports).toEqual([{ domain: "", version: 14n }])
    // Linear weights are [in, out] initializers named by the exporter; biases keep their names
    expect(inputOf(model, "/transformer/h.0/attn/c_attn/MatMul", 1)).toMatch(/^onnx::MatMul_\d+$/)
    expect(model.graph.initializers.find((t) => t.name === inputOf(model, "/transformer/h.0/mlp/c_fc/MatMul", 1))?.dims).toEqual([E, 4 * E])
    expect(inputOf(model, "/transformer/h.0/attn/c_attn/Add", 0)).toBe("transformer.h.0.attn.c_attn.bias")
  })

  test("is deterministic in the seed", () => {
    const again = Gpt2.build(config, 1, { std: 0.1 })
    expect(isDeepStrictEqual(Onnx.encode(again), Onnx.encode(model))).toBe(true)
    const other = Gpt2.build(config, 2, { std: 0.1 })
    expect(maxDiff(initializer(other, "transformer.wte.weight"), initializer(model, "transformer.wte.weight"))).toBeGreaterThan(0.1)
    // N(0, std) weights, LayerNorm weights around 1
    const w = Gpt2.fillNormal(new Float32Array(200_000), 5, 0, 0.02)
    const mean = w.reduce((a, b) => a + b, 0) / w.length
    const sd = Math.sqrt(w.reduce((a, b) => a + b * b, 0) / w.length - mean * mean)
    expect(Math.abs(mean)).toBeLessThan(0.0002)
    expect(Math.abs(sd - 0.02)).toBeLessThan(0.0002)
    expect(initializer(model, "transformer.ln_f.weight").every((x) => x > 0.5 && x < 1.5)).toBe(true)
  })

  test("runs in onnxruntime: logits and presents of the declared shapes", async () => {
    const out = await run(session, [
      [1, 2, 3, 4, 5],
      [6, 7, 8, 9, 10]
    ])
    expect(out.logits.dims).toEqual([2, 5, V])
    expect(out["present.1.value"].dims).toEqual([2, H, 5, hd])
    expect((out.logits.data as Float32Array).every(Number.isFinite)).toBe(true)
    // rows are independent
    expect(maxDiff(logitsAt(out, 0, 4), logitsAt(out, 1, 4))).toBeGreaterThan(0.01)
  })

  test.prop([fc.integer({ min: 2, max: P }).chain(tokens)], { numRuns: 6 })(
    "KV cache: a step on the returned presents gives the full run's last logits and presents",
    async (ids) => {
      const n = ids.length
      const full = await run(session, [ids])
      const prefix = await run(session, [ids.slice(0, n - 1)])
      const step = await run(session, [ids.slice(n - 1)], { past: prefix })
      expect(maxDiff(logitsAt(step, 0, 0), logitsAt(full, 0, n - 1))).toBeLessThan(1e-5)
      for (let l = 0; l < L; l++) {
        expect(step[`present.${l}.key`].dims).toEqual([1, H, n, hd])
        expect(maxDiff(step[`present.${l}.key`].data as Float32Array, full[`present.${l}.key`].data as Float32Array)).toBeLessThan(1e-5)
        expect(maxDiff(step[`present.${l}.value`].data as Float32Array, full[`present.${l}.value`].data as Float32Array)).toBeLessThan(1e-5)
      }
    }
  )

  test.prop([fc.integer({ min: 1, max: 6 }).chain(tokens), fc.integer({ min: 1, max: 5 }), fc.integer({ min: 0, max: V - 1 })], {
    numRuns: 6
  })("left padding: a padded row in a batch gives the unpadded row's logits, before and after a cached step", async (ids, pad, next) => {
    const n = ids.length
    const width = n + pad
    // row 0: `pad` padding tokens then ids (HF position ids: cumsum(mask) - 1, 1 where masked);
    // row 1: an unpadded row of the full width
    const other = Array.from({ length: width }, (_, k) => (k * 5 + 3) % V)
    const batch = await run(session, [[...Array(pad).fill(0), ...ids], other], {
      mask: [[...Array(pad).fill(0), ...Array(n).fill(1)], Array(width).fill(1)],
      positions: [[...Array(pad).fill(1), ...ids.map((_, k) => k)], other.map((_, k) => k)]
    })
    const alone = await run(session, [ids])
    expect(maxDiff(logitsAt(batch, 0, width - 1), logitsAt(alone, 0, n - 1))).toBeLessThan(1e-5)
    // one more token on the cache: the padding stays masked
    const stepBatch = await run(session, [[next], [next]], {
      past: batch,
      mask: [[...Array(pad).fill(0), ...Array(n + 1).fill(1)], Array(width + 1).fill(1)],
      positions: [[n], [width]]
    })
    const stepAlone = await run(session, [[next]], { past: alone })
    expect(maxDiff(logitsAt(stepBatch, 0, 0), logitsAt(stepAlone, 0, 0))).toBeLessThan(1e-5)
  })

  test("with attention and MLP outputs zeroed, logits = ln_f(wte[token] + wpe[position]) @ wte^T", async () => {
    const zeroed = new Set(
      Array.from({ length: L }, (_, l) => [
        inputOf(model, `/transformer/h.${l}/attn/c_proj/MatMul`, 1),
        `transformer.h.${l}.attn.c_proj.bias`,
        inputOf(model, `/transformer/h.${l}/mlp/c_proj/MatMul`, 1),
        `transformer.h.${l}.mlp.c_proj.bias`
      ]).flat()
    )
    const zeroModel: Onnx.Model = {
      ...model,
      graph: {
        ...model.graph,
        initializers: model.graph.initializers.map((t) =>
          zeroed.has(t.name) ? Onnx.makeTensor(t.name, "float32", t.dims, new Float32Array(Onnx.elementCount(t.dims))) : t
        )
      }
    }
    const ids = [5, 0, 63, 17]
    const out = await run(await open(zeroModel), [ids])
    const wte = initializer(model, "transformer.wte.weight")
    const wpe = initializer(model, "transformer.wpe.weight")
    const g = initializer(model, "transformer.ln_f.weight")
    const b = initializer(model, "transformer.ln_f.bias")
    ids.forEach((t, p) => {
      const x = Array.from({ length: E }, (_, k) => wte[t * E + k] + wpe[p * E + k])
      const mean = x.reduce((a, c) => a + c, 0) / E
      const variance = x.reduce((a, c) => a + (c - mean) ** 2, 0) / E
      const y = x.map((c, k) => ((c - mean) / Math.sqrt(variance + 1e-5)) * g[k] + b[k])
      const expected = Array.from({ length: V }, (_, v) => y.reduce((a, c, k) => a + c * wte[v * E + k], 0))
      expect(maxDiff(logitsAt(out, 0, p), expected)).toBeLessThan(1e-5)
    })
  })

  test("matches a plain-JS float64 forward pass of GPT-2", async () => {
    const w = (name: string) => Float64Array.from(initializer(model, name))
    const matmulWeight = (node: string) => w(inputOf(model, node, 1))
    const layerNorm = (x: Float64Array, g: Float64Array, b: Float64Array) => {
      const mean = x.reduce((a, c) => a + c, 0) / x.length
      const variance = x.reduce((a, c) => a + (c - mean) ** 2, 0) / x.length
      return x.map((c, k) => ((c - mean) / Math.sqrt(variance + 1e-5)) * g[k] + b[k])
    }
    const linear = (x: Float64Array, weight: Float64Array, bias: Float64Array | undefined, out: number) =>
      Float64Array.from({ length: out }, (_, j) => x.reduce((a, c, i) => a + c * weight[i * out + j], bias ? bias[j] : 0))
    const gelu = (x: number) => 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3)))

    const ids = [3, 14, 15, 9, 26, 5, 35]
    const wte = w("transformer.wte.weight")
    const wpe = w("transformer.wpe.weight")
    let h = ids.map((t, p) => Float64Array.from({ length: E }, (_, k) => wte[t * E + k] + wpe[p * E + k]))
    for (let l = 0; l < L; l++) {
      const s = `/transformer/h.${l}`
      const p = `transformer.h.${l}`
      const qkv = h.map((x) =>
        linear(layerNorm(x, w(`${p}.ln_1.weight`), w(`${p}.ln_1.bias`)), matmulWeight(`${s}/attn/c_attn/MatMul`), w(`${p}.attn.c_attn.bias`), 3 * E)
      )
      const attn = qkv.map((_, i) => {
        const out = new Float64Array(E)
        for (let head = 0; head < H; head++) {
          const q = (j: number, k: number) => qkv[j][head * hd + k]
          const key = (j: number, k: number) => qkv[j][E + head * hd + k]
          const value = (j: number, k: number) => qkv[j][2 * E + head * hd + k]
          const scores = Array.from({ length: i + 1 }, (_, j) => {
            let d = 0
            for (let k = 0; k < hd; k++) d += q(i, k) * key(j, k)
            return d / Math.sqrt(hd)
          })
          const max = Math.max(...scores)
          const e = scores.map((x) => Math.exp(x - max))
          const z = e.reduce((a, c) => a + c, 0)
          for (let k = 0; k < hd; k++) out[head * hd + k] = e.reduce((a, c, j) => a + (c / z) * value(j, k), 0)
        }
        return out
      })
      h = h.map((x, i) => x.map((c, k) => c + linear(attn[i], matmulWeight(`${s}/attn/c_proj/MatMul`), w(`${p}.attn.c_proj.bias`), E)[k]))
      h = h.map((x) => {
        const y = layerNorm(x, w(`${p}.ln_2.weight`), w(`${p}.ln_2.bias`))
        const fc = linear(y, matmulWeight(`${s}/mlp/c_fc/MatMul`), w(`${p}.mlp.c_fc.bias`), 4 * E).map(gelu)
        const ff = linear(fc, matmulWeight(`${s}/mlp/c_proj/MatMul`), w(`${p}.mlp.c_proj.bias`), E)
        return x.map((c, k) => c + ff[k])
      })
    }
    const lmHead = matmulWeight("/lm_head/MatMul")
    const out = await run(session, [ids])
    let worst = 0
    h.forEach((x, i) => {
      const logits = linear(layerNorm(x, w("transformer.ln_f.weight"), w("transformer.ln_f.bias")), lmHead, undefined, V)
      worst = Math.max(worst, maxDiff(logitsAt(out, 0, i), logits))
    })
    expect(worst).toBeLessThan(1e-4)
    // lm_head holds wte transposed
    expect(maxDiff(lmHead, Float64Array.from({ length: E * V }, (_, k) => wte[(k % V) * E + Math.floor(k / V)]))).toBe(0)
  })

  test("writeModelDir writes model.onnx (decoding to the built model) and config.json once per config and seed", async () => {
    const dir = await mkdtemp(join(tmpdir(), "gpt2-"))
    try {
      const first = await Gpt2.writeModelDir(dir, config, 3)
      expect(first.generated).toBe(true)
      const written = Onnx.decode(await readFile(first.modelPath))
      expect(isDeepStrictEqual(written, Onnx.decode(Onnx.encode(Gpt2.build(config, 3))))).toBe(true)
      const hf = JSON.parse(await readFile(join(dir, "config.json"), "utf8"))
      expect(hf).toMatchObject({ model_type: "gpt2", vocab_size: V, n_positions: P, n_embd: E, n_layer: L, n_head: H })
      expect((await Gpt2.writeModelDir(dir, config, 3)).generated).toBe(false)
      expect((await Gpt2.writeModelDir(dir, config, 4)).generated).toBe(true)
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })
})
