/**
 * Shape and dtype inference (`Shapes`):
 * (1) symbolic dims: normal form, printing, arithmetic;
 * (2) `inferModel` on every fixture, stories260K and a generated GPT-2 with
 *     a KV cache equals what onnxruntime produces for every tensor of the
 *     graph (a probe copy of the model makes every node output a graph
 *     output), over random batch, sequence and past lengths; the symbolic
 *     inference, evaluated at the same sizes, agrees;
 * (3) stories260K with symbolic inputs: `present.N.key` is
 *     [batch_size, 4, past_sequence_length+sequence_length, 8];
 * (4) single operators against onnxruntime (rules beyond the fixtures);
 * (5) typed errors; speed on a GPT-2-small-sized graph.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { fc, test } from "@fast-check/vitest"
import { readFileSync } from "node:fs"
import * as ort from "onnxruntime-node"
import * as Onnx from "../src/models/Onnx.js"
import * as OnnxBuilder from "../src/models/OnnxBuilder.js"
import * as Shapes from "../src/models/Shapes.js"
import * as Gpt2 from "../bench/models/gpt2.js"

const S = Shapes.symbol
const P = Shapes.parseDim
const sessionOptions: ort.InferenceSession.SessionOptions = {
  graphOptimizationLevel: "disabled",
  extra: { session: { "intra_op.allow_spinning": "0" } }
}

describe("symbolic dims", () => {
  it("normalize, print and compare by normal form", () => {
    const s = S("sequence_length")
    const p = S("past_sequence_length")
    expect(String(Shapes.add(p, s))).toBe("past_sequence_length+sequence_length")
    expect(Shapes.dimEquals(Shapes.add(s, p), Shapes.add(p, s))).toBe(true)
    expect(Shapes.sub(Shapes.add(s, 3), s)).toBe(3)
    expect(Shapes.formatDim(P("2*b*s - 1"))).toBe("2*b*s-1")
    expect(Shapes.formatDim(Shapes.neg(P("a+1")))).toBe("-a-1")
    expect(Shapes.dimEquals(Shapes.mul(P("a+b"), P("a-b")), P("a*a-b*b"))).toBe(true)
    expect(Shapes.divExact(P("a*a-b*b"), P("a+b"))).toEqual(P("a-b"))
    expect(Shapes.divExact(P("4*b*s*64"), Shapes.mul(S("b"), S("s")))).toBe(256)
    expect(Shapes.divExact(P("s"), 2)).toBeUndefined()
    expect(Shapes.formatDim(Shapes.floorDiv(S("s"), 2))).toBe("((s)//2)")
    expect(Shapes.decideEqual(S("s"), -1)).toBe(false)
    expect(Shapes.lessThan(S("s"), P("s+p+1"))).toBe(true)
    expect(Shapes.substitute(P("p+s"), { p: 0, s: 7 })).toBe(7)
  })

  test.prop([fc.integer({ min: -5, max: 5 }), fc.integer({ min: -5, max: 5 }), fc.integer({ min: 0, max: 9 }), fc.integer({ min: 0, max: 9 })])(
    "arithmetic agrees with numbers after substitution",
    (c1, c2, a, b) => {
      const x = Shapes.add(Shapes.mul(c1, S("a")), Shapes.mul(c2, S("b")))
      const y = Shapes.add(S("a"), 1)
      const env = { a, b }
      const num = (d: Shapes.Dim) => Shapes.substitute(d, env)
      expect(num(Shapes.add(x, y))).toBe((num(x) as number) + (num(y) as number))
      expect(num(Shapes.mul(x, y))).toBe((num(x) as number) * (num(y) as number))
      const q = Shapes.divExact(Shapes.mul(x, y), y)
      expect(q === undefined ? undefined : Shapes.dimEquals(q, x)).toBe(true)
    }
  )
})

// ---------------------------------------------------------------------------
// Models against onnxruntime
// ---------------------------------------------------------------------------

interface Sizes {
  readonly batch: number
  readonly seq: number
  readonly past: number
}

interface Subject {
  readonly name: string
  readonly model: () => Onnx.Model
  readonly maxSeq: number
  readonly maxPast: number
  /** Fakes of the inputs, concrete or symbolic. */
  readonly inputs: (s: { batch: Shapes.Dim; seq: Shapes.Dim; past: Shapes.Dim }) => Record<string, Shapes.Fake>
}

const llamaInputs = (s: { batch: Shapes.Dim; seq: Shapes.Dim }): Record<string, Shapes.Fake> => ({
  input_ids: { dtype: "int64", shape: [s.batch, s.seq] },
  attention_mask: { dtype: "int64", shape: [s.batch, s.seq] },
  position_ids: { dtype: "int64", shape: [s.batch, s.seq] }
})

const kvInputs = (layers: number, heads: number, headDim: number) => (s: { batch: Shapes.Dim; seq: Shapes.Dim; past: Shapes.Dim }) => {
  const out: Record<string, Shapes.Fake> = {
    ...llamaInputs(s),
    attention_mask: { dtype: "int64", shape: [s.batch, Shapes.add(s.past, s.seq)] }
  }
  for (let k = 0; k < layers; k++) {
    for (const kv of ["key", "value"]) out[`past_key_values.${k}.${kv}`] = { dtype: "float32", shape: [s.batch, heads, s.past, headDim] }
  }
  return out
}

const read = (path: string) => () => Onnx.decode(readFileSync(path))
let gpt2Tiny: Onnx.Model | undefined

const subjects: ReadonlyArray<Subject> = [
  { name: "tiny_mlp", model: read("test/fixtures/tiny_mlp/model.onnx"), maxSeq: 1, maxPast: 0, inputs: (s) => ({ x: { dtype: "float32", shape: [s.batch, 5] } }) },
  { name: "twice", model: read("test/fixtures/twice/model.onnx"), maxSeq: 1, maxPast: 0, inputs: (s) => ({ x: { dtype: "float32", shape: [s.batch, 4] } }) },
  {
    name: "tiny_gpt2",
    model: read("test/fixtures/tiny_gpt2/model.onnx"),
    maxSeq: 16,
    maxPast: 0,
    inputs: (s) => ({ input_ids: { dtype: "int64", shape: [s.batch, s.seq] } })
  },
  { name: "llama_tiny", model: read("test/fixtures/llama_tiny/model.onnx"), maxSeq: 12, maxPast: 0, inputs: llamaInputs },
  { name: "stories260K", model: read("models/stories260K/onnx/model.onnx"), maxSeq: 20, maxPast: 6, inputs: kvInputs(5, 4, 8) },
  {
    name: "gpt2 (generated, KV cache)",
    model: () => (gpt2Tiny ??= Gpt2.build(Gpt2.tiny, 0)),
    maxSeq: 8,
    maxPast: 8,
    inputs: kvInputs(2, 4, 8)
  }
]

/** The model with every node output also a graph output (name only; onnxruntime fills in the type). */
const probe = (model: Onnx.Model): Onnx.Model => {
  const have = new Set(model.graph.outputs.map((o) => o.name))
  const extra: Array<Onnx.ValueInfo> = []
  for (const n of model.graph.nodes) {
    for (const o of n.outputs) {
      if (o === "" || have.has(o)) continue
      have.add(o)
      extra.push({ name: o, docString: "", metadataProps: [] })
    }
  }
  return { ...model, graph: { ...model.graph, outputs: [...model.graph.outputs, ...extra] } }
}

/** Random data that fits each input (token ids 0, masks 1, positions counting on from the past). */
const feedsFor = (fakes: Record<string, Shapes.Fake>, past: number): Record<string, ort.Tensor> => {
  const out: Record<string, ort.Tensor> = {}
  for (const [name, f] of Object.entries(fakes)) {
    const dims = f.shape as ReadonlyArray<number>
    const n = dims.reduce((a, b) => a * b, 1)
    if (f.dtype === "int64") {
      const data = new BigInt64Array(n)
      if (name === "attention_mask") data.fill(1n)
      if (name === "position_ids") for (let k = 0; k < n; k++) data[k] = BigInt(past + (k % dims[dims.length - 1]))
      out[name] = new ort.Tensor("int64", data, dims)
    } else {
      out[name] = new ort.Tensor("float32", Float32Array.from({ length: n }, (_, k) => Math.sin(k)), dims)
    }
  }
  return out
}

const sessions = new Map<string, ort.InferenceSession>()
const models = new Map<string, Onnx.Model>()

beforeAll(async () => {
  for (const s of subjects) {
    const m = s.model()
    models.set(s.name, m)
    sessions.set(s.name, await ort.InferenceSession.create(Onnx.encode(probe(m)), sessionOptions))
  }
}, 120_000)

afterAll(async () => {
  for (const s of sessions.values()) await s.release()
})

describe("inferModel equals onnxruntime on every tensor", () => {
  for (const s of subjects) {
    test.prop(
      [fc.integer({ min: 1, max: 3 }), fc.integer({ min: 1, max: s.maxSeq }), fc.integer({ min: 0, max: s.maxPast })],
      { numRuns: 8 }
    )(s.name, async (batch, seq, past) => {
      const model = models.get(s.name)!
      const sizes: Sizes = { batch, seq, past }
      const fakes = s.inputs(sizes)
      const inferred = Shapes.inferModel(model, fakes)
      const out = await sessions.get(s.name)!.run(feedsFor(fakes, past))
      const symbolic = Shapes.inferModel(model, s.inputs({ batch: S("batch"), seq: S("seq"), past: S("past") }))
      const bind = { batch, seq, past }
      let checked = 0
      for (const [name, t] of Object.entries(out)) {
        const f = inferred.get(name)
        expect(f, name).toBeDefined()
        if (f!.shape.join(",") !== t.dims.join(",") || f!.dtype !== t.type) {
          expect.fail(`${name}: inferred ${Shapes.format(f!)}, onnxruntime ${t.type}[${t.dims.join(", ")}] (${JSON.stringify(sizes)})`)
        }
        if (f!.value !== undefined && (t.type === "int64" || t.type === "int32" || t.type === "bool")) {
          expect(f!.value.map(Number), `${name} contents`).toEqual(Array.from(t.data as ArrayLike<number | bigint>, Number))
        }
        const g = symbolic.get(name)!
        const evaluated = g.shape.map((d) => Shapes.substitute(d, bind))
        if (evaluated.every((d) => typeof d === "number")) expect(evaluated, `${name} (symbolic: ${Shapes.format(g)})`).toEqual(t.dims)
        expect(g.dtype).toBe(t.type)
        checked++
      }
      expect(checked).toBeGreaterThan(0)
    })
  }
})

describe("symbolic shapes", () => {
  it("stories260K: present.N.* have past_sequence_length+sequence_length positions, logits sequence_length", () => {
    const model = models.get("stories260K")!
    const b = S("batch_size")
    const s = S("sequence_length")
    const p = S("past_sequence_length")
    const fakes = Shapes.inferModel(model, kvInputs(5, 4, 8)({ batch: b, seq: s, past: p }))
    const present = fakes.get("present.0.key")!
    expect(present.dtype).toBe("float32")
    expect(Shapes.shapeEquals(present.shape, [b, 4, P("past_sequence_length+sequence_length"), 8])).toBe(true)
    expect(Shapes.format(present)).toBe("float32[batch_size, 4, past_sequence_length+sequence_length, 8]")
    expect(Shapes.format(fakes.get("logits")!)).toBe("float32[batch_size, sequence_length, 512]")
    // declared inputs alone give the same (attention_mask then has its own symbol)
    const declared = Shapes.inferModel(model, {})
    expect(Shapes.format(declared.get("logits")!)).toBe("float32[batch_size, sequence_length, 512]")
  })

  it("concrete where the input is concrete", () => {
    const model = models.get("stories260K")!
    const fakes = Shapes.inferModel(model, kvInputs(5, 4, 8)({ batch: 2, seq: 300, past: 0 }))
    expect(Shapes.format(fakes.get("present.4.value")!)).toBe("float32[2, 4, 300, 8]")
    expect(Shapes.format(fakes.get("logits")!)).toBe("float32[2, 300, 512]")
    const half = Shapes.inferModel(model, kvInputs(5, 4, 8)({ batch: 1, seq: S("sequence_length"), past: 0 }))
    expect(Shapes.format(half.get("present.4.value")!)).toBe("float32[1, 4, sequence_length, 8]")
  })
})

// ---------------------------------------------------------------------------
// Single operators
// ---------------------------------------------------------------------------

interface OpCase {
  readonly op: string
  readonly opset?: number
  readonly inputs: ReadonlyArray<{ readonly dtype: "float32" | "int64" | "bool"; readonly shape: ReadonlyArray<number>; readonly data?: ReadonlyArray<number> } | null>
  readonly attributes?: Readonly<Record<string, Onnx.AttributeValue>>
  readonly outputs?: number
}

const f32 = (...shape: Array<number>) => ({ dtype: "float32" as const, shape })
const i64 = (data: ReadonlyArray<number>, shape: ReadonlyArray<number> = [data.length]) => ({ dtype: "int64" as const, shape, data })

const cases: ReadonlyArray<OpCase> = [
  { op: "Gemm", inputs: [f32(3, 5), f32(4, 5), f32(4)], attributes: { transB: 1n } },
  { op: "Gemm", inputs: [f32(5, 3), f32(5, 4)], attributes: { transA: 1n } },
  { op: "MatMul", inputs: [f32(2, 1, 3, 4), f32(5, 4, 6)] },
  { op: "MatMul", inputs: [f32(4), f32(2, 4, 6)] },
  { op: "MatMul", inputs: [f32(2, 3, 4), f32(4)] },
  { op: "Conv", inputs: [f32(1, 3, 9, 8), f32(4, 3, 3, 2)], attributes: { strides: [2n, 1n], pads: [1n, 0n, 1n, 0n], dilations: [1n, 2n] } },
  { op: "Conv", inputs: [f32(2, 4, 7), f32(6, 2, 3)], attributes: { group: 2n, auto_pad: "SAME_UPPER", strides: [2n] } },
  { op: "Einsum", inputs: [f32(2, 3, 4), f32(2, 4, 5)], attributes: { equation: "bij,bjk->bik" } },
  { op: "Einsum", inputs: [f32(2, 3, 4)], attributes: { equation: "...ij->...ji" } },
  { op: "Einsum", inputs: [f32(3, 4), f32(4)], attributes: { equation: "ij,j" } },
  { op: "Flatten", inputs: [f32(2, 3, 4, 5)], attributes: { axis: 2n } },
  { op: "Flatten", inputs: [f32(2, 3, 4)], attributes: { axis: 0n } },
  { op: "Tile", inputs: [f32(2, 3), i64([2, 3])] },
  { op: "Pad", inputs: [f32(2, 3), i64([1, 0, 2, 3])] },
  { op: "TopK", inputs: [f32(3, 7), i64([2])], outputs: 2, attributes: { axis: 1n } },
  { op: "OneHot", inputs: [i64([1, 0, 2], [3]), i64([4], []), { dtype: "float32", shape: [2], data: [0, 1] }], attributes: { axis: 0n } },
  { op: "LayerNormalization", opset: 17, inputs: [f32(2, 3, 4), f32(3, 4), f32(3, 4)], attributes: { axis: -2n }, outputs: 3 },
  { op: "Split", opset: 13, inputs: [f32(2, 7), i64([3, 4])], attributes: { axis: 1n }, outputs: 2 },
  { op: "Split", opset: 11, inputs: [f32(6, 2)], outputs: 3 },
  { op: "Split", opset: 18, inputs: [f32(2, 7)], attributes: { axis: 1n, num_outputs: 3n }, outputs: 3 },
  { op: "Squeeze", opset: 11, inputs: [f32(1, 3, 1)], attributes: { axes: [0n] } },
  { op: "Unsqueeze", opset: 11, inputs: [f32(3)], attributes: { axes: [0n, -1n] } },
  { op: "ReduceSum", opset: 13, inputs: [f32(2, 3, 4), i64([-1, 0])], attributes: { keepdims: 0n } },
  { op: "ReduceMean", opset: 18, inputs: [f32(2, 3, 4), i64([1])] },
  { op: "ReduceMax", inputs: [f32(2, 3, 4)], attributes: { keepdims: 0n } },
  { op: "ArgMax", inputs: [f32(2, 3, 4)], attributes: { axis: -1n, keepdims: 0n } },
  { op: "Slice", inputs: [f32(5, 6), i64([4, -1]), i64([-100, -9223372036854775807]), i64([0, 1]), i64([-1, -2])] },
  { op: "Slice", inputs: [f32(5, 6), i64([-3]), i64([100]), i64([1])] },
  { op: "Gather", inputs: [f32(5, 6), i64([0, -1, 2, 2], [2, 2])], attributes: { axis: 1n } },
  { op: "GatherElements", inputs: [f32(3, 4), i64([0, 1, 2, 0, 1, 2], [3, 2])], attributes: { axis: 1n } },
  { op: "GatherND", inputs: [f32(2, 3, 4), i64([0, 1, 1, 2], [2, 2])] },
  { op: "Expand", inputs: [f32(3, 1), i64([2, 1, 4])] },
  { op: "Range", inputs: [i64([2], []), i64([11], []), i64([3], [])] },
  { op: "Trilu", inputs: [f32(2, 4, 4)] },
  { op: "Where", inputs: [{ dtype: "bool", shape: [3, 1], data: [1, 0, 1] }, f32(1, 4), f32(3, 4)] },
  { op: "Transpose", inputs: [f32(2, 3, 4)] },
  { op: "Resize", opset: 13, inputs: [f32(1, 2, 3, 4), null, { dtype: "float32", shape: [4], data: [1, 1, 2, 0.5] }] },
  { op: "Resize", opset: 13, inputs: [f32(1, 2, 3, 4), null, null, i64([1, 2, 5, 7])] },
  { op: "Size", inputs: [f32(2, 3)] },
  { op: "NonZero", inputs: [i64([0, 1, 1, 0, 3, 0], [2, 3])] },
  { op: "Max", inputs: [f32(2, 1), f32(3), f32(1, 1)] },
  { op: "Sum", inputs: [f32(2, 1), f32(3)] },
  { op: "Dropout", inputs: [f32(2, 3)], outputs: 2 },
  { op: "Softmax", inputs: [f32(2, 3)], attributes: { axis: 0n } },
  { op: "CumSum", inputs: [f32(2, 3), i64([1], [])] },
  { op: "BatchNormalization", inputs: [f32(2, 3, 4), f32(3), f32(3), f32(3), f32(3)] },
  { op: "Erf", inputs: [f32(2, 3)] },
  { op: "Mod", inputs: [i64([5, -7, 9]), i64([3], [1])], attributes: { fmod: 0n } },
  { op: "CastLike", inputs: [f32(2), i64([1])] },
  { op: "Shape", opset: 15, inputs: [f32(2, 3, 4, 5)], attributes: { start: 1n, end: -1n } }
]

describe("single operators against onnxruntime", () => {
  for (const c of cases) {
    it(`${c.op} ${JSON.stringify(c.inputs.map((i) => i?.shape ?? null))} ${JSON.stringify(c.attributes ?? {}, (_, v) => (typeof v === "bigint" ? Number(v) : v))}`, async () => {
      const b = OnnxBuilder.make({ opset: c.opset ?? 17 })
      const feeds: Record<string, ort.Tensor> = {}
      const fakes: Record<string, Shapes.Fake> = {}
      const names = c.inputs.map((inp, k) => {
        if (inp === null) return ""
        const name = b.input(`x${k}`, inp.dtype, inp.shape)
        const n = inp.shape.reduce((x, y) => x * y, 1)
        const data = inp.data ?? Array.from({ length: n }, (_, j) => (j % 5) - 1)
        feeds[name] =
          inp.dtype === "int64" ? new ort.Tensor("int64", BigInt64Array.from(data, (v) => BigInt(v)), inp.shape)
          : inp.dtype === "bool" ? new ort.Tensor("bool", Uint8Array.from(data), inp.shape)
          : new ort.Tensor("float32", Float32Array.from(data), inp.shape)
        fakes[name] = { dtype: inp.dtype, shape: inp.shape, ...(inp.data !== undefined ? { value: inp.data } : {}) }
        return name
      })
      const outs = b.node(c.op, names, { outputs: c.outputs ?? 1, attributes: c.attributes ?? {}, name: c.op }) as string | ReadonlyArray<string>
      const outNames = typeof outs === "string" ? [outs] : outs
      for (const o of outNames) b.output(o)
      const model = b.build()
      const session = await ort.InferenceSession.create(Onnx.encode(model), sessionOptions)
      try {
        const got = await session.run(feeds)
        const inferred = Shapes.inferModel(model, fakes)
        for (const o of outNames) {
          const f = inferred.get(o)!
          expect(`${f.dtype}[${f.shape.join(", ")}]`, o).toBe(`${got[o].type}[${got[o].dims.join(", ")}]`)
        }
      } finally {
        await session.release()
      }
    })
  }
})

describe("If", () => {
  const build = (condFromInput: boolean) => {
    const b = OnnxBuilder.make({ opset: 14 })
    const x = b.input("x", "float32", [2, 3])
    const cond = condFromInput ? b.input("c", "bool", []) : b.node("Constant", [], { attributes: { value: Onnx.makeTensor("", "bool", [], [false]) } })
    const thenG = b.subgraph("then", (g) => g.output(g.node("Transpose", [x])))
    const elseG = b.subgraph("else", (g) => g.output(g.node("ReduceSum", [x], { attributes: { keepdims: 0n } })))
    const y = b.node("If", [cond], { attributes: { then_branch: thenG, else_branch: elseG } })
    b.output(y, "float32")
    return { model: b.build(), y }
  }
  it("takes the branch a known condition names; the then branch otherwise; agrees with onnxruntime", async () => {
    const known = build(false)
    expect(Shapes.inferModel(known.model, {}).get(known.y)!.shape).toEqual([])
    const unknown = build(true)
    expect(Shapes.inferModel(unknown.model, {}).get(unknown.y)!.shape).toEqual([3, 2])
    const session = await ort.InferenceSession.create(Onnx.encode(unknown.model), sessionOptions)
    const out = await session.run({ x: new ort.Tensor("float32", new Float32Array(6), [2, 3]), c: new ort.Tensor("bool", Uint8Array.of(1), []) })
    expect(out[unknown.y].dims).toEqual([3, 2])
    await session.release()
  })
})

// ---------------------------------------------------------------------------
// Errors and speed
// ---------------------------------------------------------------------------

describe("errors", () => {
  it("an operator without a rule is a typed error naming it and its node", () => {
    const b = OnnxBuilder.make()
    const x = b.input("x", "float32", [2])
    b.output(b.node("FancyOp", [x], { name: "/block/FancyOp" }), "float32")
    const model = b.build()
    let error: unknown
    try {
      Shapes.inferModel(model, {})
    } catch (e) {
      error = e
    }
    expect(error).toBeInstanceOf(Shapes.UnknownOperator)
    expect((error as Shapes.UnknownOperator).opType).toBe("FancyOp")
    expect((error as Shapes.UnknownOperator).node).toBe("/block/FancyOp")
    expect((error as Error).message).toContain("FancyOp")
  })

  it("shapes that do not fit name the node", () => {
    const model = models.get("tiny_mlp")!
    let error: unknown
    try {
      Shapes.inferModel(model, { x: { dtype: "float32", shape: [2, 6] } })
    } catch (e) {
      error = e
    }
    expect(error).toBeInstanceOf(Shapes.ShapeError)
    expect((error as Shapes.ShapeError).node).toBe("/layer1/Gemm")
  })
})

describe("speed", () => {
  it("a GPT-2-small-sized graph (12 blocks, ~2000 nodes) on 300 tokens scans in milliseconds", () => {
    const model = Gpt2.build({ vocabSize: 256, nPositions: 1024, nEmbd: 64, nLayer: 12, nHead: 4 }, 0)
    expect(model.graph.nodes.length).toBeGreaterThan(1900)
    const inputs = kvInputs(12, 4, 16)({ batch: 1, seq: 300, past: 0 })
    const times: Array<number> = []
    let logits: Shapes.Fake | undefined
    for (let k = 0; k < 7; k++) {
      const t0 = performance.now()
      logits = Shapes.inferModel(model, inputs).get("logits")
      times.push(performance.now() - t0)
    }
    expect(Shapes.format(logits!)).toBe("float32[1, 300, 256]")
    times.sort((a, b) => a - b)
    // typically 4-15 ms; the bound leaves room for a loaded machine
    expect(times[0]).toBeLessThan(100)
  })
})
