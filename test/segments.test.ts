/**
 * Segments: a model cut anywhere along its linear order, each piece run as
 * its own onnxruntime session and chained by tensor name, computes exactly
 * what the whole model computes.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { fc, test } from "@fast-check/vitest"
import * as fs from "node:fs"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import * as ort from "onnxruntime-node"
import * as Loaded from "../src/models/Loaded.js"
import * as Onnx from "../src/models/Onnx.js"
import * as Segments from "../src/models/Segments.js"

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..")
const sessionOptions: ort.InferenceSession.SessionOptions = { extra: { session: { "intra_op.allow_spinning": "0" } } }

/**
 * Without graph optimisation, segments are bitwise equal to the whole model.
 * With it (the default), onnxruntime fuses differently across segment borders
 * (MatMul+Add, Gelu, SimplifiedLayerNorm, ...), and results differ by a few
 * float32 ulps: observed max |diff| / max |whole| 6.5e-7 over 150 random cuts
 * per model (stories260K logits: 1.34e-5 at magnitude 20.5). The bound is 3x that.
 */
const modes = [
  { mode: "optimisation disabled: bitwise equal", options: { ...sessionOptions, graphOptimizationLevel: "disabled" }, relTol: 0 },
  { mode: "default optimisation: within 2e-6 of the scale", options: sessionOptions, relTol: 2e-6 }
] as const satisfies ReadonlyArray<{ mode: string; options: ort.InferenceSession.SessionOptions; relTol: number }>

interface RefTensor {
  readonly dtype: "float32" | "int64" | "bool"
  readonly shape: ReadonlyArray<number>
  readonly data: ReadonlyArray<number | boolean>
}

const fixtures = {
  tiny_mlp: "test/fixtures/tiny_mlp/model.onnx",
  twice: "test/fixtures/twice/model.onnx",
  tiny_gpt2: "test/fixtures/tiny_gpt2/model.onnx",
  llama_tiny: "test/fixtures/llama_tiny/model.onnx",
  stories260K: "models/stories260K/onnx/model.onnx"
} as const
type Fixture = keyof typeof fixtures

const cache = new Map<Fixture, Loaded.Loaded>()
const load = (name: Fixture): Loaded.Loaded => {
  let loaded = cache.get(name)
  if (loaded === undefined) cache.set(name, (loaded = Loaded.fromBytes(new Uint8Array(fs.readFileSync(path.join(root, fixtures[name]))))))
  return loaded
}

const toOrt = (t: RefTensor): ort.Tensor =>
  t.dtype === "int64"
    ? new ort.Tensor("int64", BigInt64Array.from(t.data, (v) => BigInt(v as number)), [...t.shape])
    : t.dtype === "bool"
    ? new ort.Tensor("bool", Uint8Array.from(t.data, (v) => (v ? 1 : 0)), [...t.shape])
    : new ort.Tensor("float32", Float32Array.from(t.data as ReadonlyArray<number>), [...t.shape])

/** The graph inputs of a fixture's main reference input set (stories260K: empty KV caches too). */
const feedsOf = (name: Fixture, loaded: Loaded.Loaded): Record<string, ort.Tensor> => {
  const ref = JSON.parse(fs.readFileSync(path.join(root, "test/fixtures", name, "reference.json"), "utf8"))
  const feeds: Record<string, ort.Tensor> = {}
  for (const [k, v] of Object.entries(ref.inputs as Record<string, RefTensor>)) feeds[k] = toOrt(v)
  for (const v of loaded.model.graph.inputs) {
    if (v.name.startsWith("past_key_values.")) feeds[v.name] = new ort.Tensor("float32", new Float32Array(0), [1, 4, 0, 8])
  }
  return feeds
}

const bytesOf = (t: ort.Tensor): Uint8Array => {
  const d = t.data as ArrayBufferView
  return new Uint8Array(d.buffer, d.byteOffset, d.byteLength)
}

const maxAbsDiff = (a: ort.Tensor, b: ort.Tensor): number => {
  const x = a.data as ArrayLike<number | bigint>
  const y = b.data as ArrayLike<number | bigint>
  let max = 0
  for (let i = 0; i < x.length; i++) max = Math.max(max, Math.abs(Number(x[i]) - Number(y[i])))
  return max
}

/** The tensors crossing the borders of [start, end), computed from scratch. */
const crossing = (idx: Segments.Index, start: number, end: number) => {
  const graph = idx.model.graph
  const inRange = idx.order.slice(start, end)
  const produced = new Set(inRange.flatMap((n) => graph.nodes[n].outputs))
  const consumedLater = new Set(idx.order.slice(end).flatMap((n) => [...graph.nodes[n].inputs, ...Onnx.outerNames(graph.nodes[n])]))
  const graphOutputs = new Set(graph.outputs.map((o) => o.name))
  const inputs = new Set<string>()
  for (const n of inRange) {
    for (const t of [...graph.nodes[n].inputs, ...Onnx.outerNames(graph.nodes[n])]) {
      if (t === "" || produced.has(t) || idx.initializers.has(t)) continue
      const p = idx.producer.get(t)
      if (p !== undefined && graph.nodes[p].opType === "Constant") continue // copied into the segment
      inputs.add(t)
    }
  }
  const outputs = new Set([...produced].filter((t) => t !== "" && (consumedLater.has(t) || graphOutputs.has(t))))
  return { inputs, outputs }
}

const cases = (Object.keys(fixtures) as ReadonlyArray<Fixture>).flatMap((name) => modes.map((m) => ({ name, ...m })))

describe.each(cases)("$name, $mode: chained segments equal the whole model", ({ name, options, relTol }) => {
  const loaded = load(name)
  const idx = loaded.index
  const n = idx.order.length
  const outputNames = loaded.model.graph.outputs.map((o) => o.name)
  const feeds = feedsOf(name, loaded)
  const sessions = new Map<string, Promise<ort.InferenceSession>>()
  let whole: ort.InferenceSession.OnnxValueMapType

  beforeAll(async () => {
    const session = await ort.InferenceSession.create(new Uint8Array(fs.readFileSync(path.join(root, fixtures[name]))), options)
    try {
      whole = await session.run(feeds)
    } finally {
      await session.release()
    }
  })
  afterAll(async () => {
    for (const s of sessions.values()) await (await s).release()
    sessions.clear()
  })

  const sessionOf = (seg: Segments.Segment) => {
    const key = `${seg.start}:${seg.end}`
    let s = sessions.get(key)
    if (s === undefined) {
      s = ort.InferenceSession.create(Onnx.encode(Segments.toModel(idx, seg)), options)
      sessions.set(key, s)
    }
    return s
  }

  const runCut = async (positions: ReadonlyArray<number>) => {
    const segments = Segments.cut(idx, positions)
    const bounds = [...new Set([0, ...positions.filter((p) => p > 0 && p < n), n])].sort((a, b) => a - b)
    expect(segments.map((s) => [s.start, s.end])).toEqual(bounds.slice(0, -1).map((b, k) => [b, bounds[k + 1]]))
    const env = new Map<string, ort.Tensor>(Object.entries(feeds))
    for (const seg of segments) {
      const expected = crossing(idx, seg.start, seg.end)
      expect(new Set(seg.inputs)).toEqual(expected.inputs)
      expect(new Set(seg.outputs)).toEqual(expected.outputs)
      const session = await sessionOf(seg)
      const missing = seg.inputs.filter((t) => !env.has(t))
      expect(missing).toEqual([])
      const out = await session.run(Object.fromEntries(seg.inputs.map((t) => [t, env.get(t)!])))
      for (const t of seg.outputs) env.set(t, out[t] as ort.Tensor)
    }
    for (const o of outputNames) {
      const got = env.get(o)!
      const want = whole[o] as ort.Tensor
      expect(got.dims).toEqual(want.dims)
      expect(got.type).toBe(want.type)
      const where = `${o} at cuts [${bounds.join(", ")}]`
      if (relTol === 0) {
        const same = Buffer.compare(bytesOf(got), bytesOf(want)) === 0
        expect(same, `${where}: not bitwise equal, max |diff| ${maxAbsDiff(got, want)}`).toBe(true)
      } else {
        const scale = Math.max(1, ...Array.from(want.data as ArrayLike<number>, Math.abs))
        expect(maxAbsDiff(got, want), `${where}: max |diff|`).toBeLessThanOrEqual(relTol * scale)
      }
    }
  }

  it("one segment (no cut), every canonical cut, and every cut at once on small models", async () => {
    await runCut([])
    await runCut(loaded.canonicalCuts)
    if (n <= 16) await runCut(Array.from({ length: n + 1 }, (_, p) => p))
  })

  test.prop([fc.uniqueArray(fc.integer({ min: 0, max: n }), { maxLength: n < 10 ? n + 1 : 6 })], { numRuns: 20 })(
    "random cuts",
    async (positions) => {
      await runCut(positions)
    }
  )
})

describe("Segments.segment", () => {
  it("tiny_mlp cut after layer1: the hidden tensor is the only crossing tensor", () => {
    const { index } = load("tiny_mlp")
    const [first, second] = Segments.cut(index, [1])
    expect(first).toEqual({ start: 0, end: 1, nodes: [0], inputs: ["x"], outputs: ["/layer1/Gemm_output_0"] })
    expect(second).toEqual({ start: 1, end: 2, nodes: [1], inputs: ["/layer1/Gemm_output_0"], outputs: ["y"] })
    const model = Segments.toModel(index, first)
    expect(model.graph.initializers.map((t) => t.name).sort()).toEqual(["layer1.bias", "layer1.weight"])
    expect(model.graph.inputs.map((v) => v.name)).toEqual(["x"])
    expect(model.graph.outputs.map((v) => v.name)).toEqual(["/layer1/Gemm_output_0"])
  })

  it("twice: the middle of two calls, with a read", () => {
    const { index } = load("twice")
    // nodes: inp, act, shared, act_1, shared_1, out
    expect(Segments.segment(index, 2, 4)).toEqual({
      start: 2,
      end: 4,
      nodes: [2, 3],
      inputs: ["/act/Relu_output_0"],
      outputs: ["/act_1/Relu_output_0"]
    })
    expect(Segments.segment(index, 2, 4, ["/shared/Gemm_output_0"]).outputs).toEqual([
      "/shared/Gemm_output_0",
      "/act_1/Relu_output_0"
    ])
    expect(() => Segments.segment(index, 2, 4, ["y"])).toThrow(/not produced/)
  })
})
