/**
 * Properties of tracing, over random modules, positions, values and inputs:
 * (a) reads change nothing: a trace returns what plain onnxruntime returns;
 * (b) set-then-read gives the value set, a read recorded before the set the original;
 * (c) patching a module with its own activation changes no output;
 * (d) invokes batched in one trace equal separate traces (left padding included);
 * (e) graphs survive the JSON round trip with the same structural hash.
 */
import { afterAll, beforeAll, describe, expect } from "vitest"
import { fc, test } from "@fast-check/vitest"
import { readFileSync } from "node:fs"
import * as ort from "onnxruntime-node"
import { type Envoy, Graph, LanguageModel, NNsight, Tensor, type TensorProxy } from "../src/index.js"

const sessionOptions: ort.InferenceSession.SessionOptions = { extra: { session: { "intra_op.allow_spinning": "0" } } }

/** |a - b| <= tol * max(1, |b|) elementwise, same shape and dtype. */
const expectClose = (actual: Tensor, expected: Tensor, tol = 1e-5): void => {
  expect(actual.shape).toEqual(expected.shape)
  expect(actual.dtype).toBe(expected.dtype)
  const a = actual.toNumbers()
  const b = expected.toNumbers()
  for (let i = 0; i < a.length; i++) {
    if (a[i] === b[i] || (Number.isNaN(a[i]) && Number.isNaN(b[i]))) continue
    const d = Math.abs(a[i] - b[i]) / Math.max(1, Math.abs(b[i]))
    if (!(d <= tol)) expect.fail(`element ${i}: got ${a[i]}, want ${b[i]} (scaled diff ${d} > ${tol})`)
  }
}
const expectExact = (actual: Tensor, expected: Tensor): void => {
  expect(actual.shape).toEqual(expected.shape)
  expect(actual.dtype).toBe(expected.dtype)
  if (!actual.equals(expected)) expect(actual.toNumbers()).toEqual(expected.toNumbers())
}

/** Deterministic pseudo-random floats in [-3, 3) (mulberry32), so shrinking stays cheap. */
const randomFloats = (seed: number, n: number): Float32Array => {
  let s = seed >>> 0
  const out = new Float32Array(n)
  for (let i = 0; i < n; i++) {
    s = (s + 0x6d2b79f5) >>> 0
    let t = s
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    out[i] = ((((t ^ (t >>> 14)) >>> 0) / 4294967296) * 6 - 3)
  }
  return out
}
const randomTensor = (seed: number, shape: ReadonlyArray<number>): Tensor =>
  new Tensor("float32", shape, randomFloats(seed, shape.reduce((a, b) => a * b, 1)))

const mod = (m: Envoy, path: string): Envoy => (path === "" ? m : path.split(".").reduce<Envoy>((e, k) => e[k], m))
/**
 * The envoys of module calls within one trace. `.next()` moves a module's
 * call for the rest of the trace, so calls are reached in order: asking for
 * an earlier call than the current one gives the current one.
 */
const walker = (m: Envoy) => {
  const current = new Map<string, number>()
  return (path: string, call: number): Envoy => {
    let e = mod(m, path)
    for (let k = current.get(path) ?? 0; k < call; k++) {
      e = e.next()
      current.set(path, k + 1)
    }
    return e
  }
}

type Feeds = Record<string, Tensor>
const ids = (rows: ReadonlyArray<ReadonlyArray<number>>): Tensor => Tensor.from(rows.map((r) => r.map((x) => BigInt(x))), "int64")

interface Site {
  readonly path: string
  readonly call: number
  readonly shape: ReadonlyArray<number>
  readonly original: Tensor
}

/** One model under test: how to make random inputs and run it on plain onnxruntime. */
interface Subject {
  readonly name: string
  readonly model: () => NNsight | LanguageModel
  /** A fixed input (batch 2 where the model allows). */
  readonly fixed: () => unknown
  /** A random input of `batch` rows, `seq` positions. */
  readonly input: (seed: number, batch: number, seq: number) => unknown
  /** The same input as onnxruntime feeds. */
  readonly feeds: (input: unknown) => Record<string, ort.Tensor>
  readonly maxSeq: number
}

const floatFeeds = (width: number) => (seed: number, batch: number): Feeds => ({ x: randomTensor(seed, [batch, width]) })
const tokenRows = (seed: number, batch: number, seq: number, vocab: number): Array<Array<number>> => {
  const f = randomFloats(seed, batch * seq)
  return Array.from({ length: batch }, (_, r) => Array.from({ length: seq }, (_, c) => Math.floor(((f[r * seq + c] + 3) / 6) * vocab) % vocab))
}
const llamaFeeds = (rows: ReadonlyArray<ReadonlyArray<number>>): Feeds => ({
  input_ids: ids(rows),
  attention_mask: ids(rows.map((r) => r.map(() => 1))),
  position_ids: ids(rows.map((r) => r.map((_, k) => k)))
})
const toOrt = (f: Feeds): Record<string, ort.Tensor> => Object.fromEntries(Object.entries(f).map(([k, v]) => [k, v.toOrt()]))

const models: Record<string, NNsight | LanguageModel> = {}
const sessions: Record<string, ort.InferenceSession> = {}

const subjects: ReadonlyArray<Subject> = [
  {
    name: "tiny_mlp",
    model: () => models.tiny_mlp,
    fixed: () => floatFeeds(5)(1, 2),
    input: (seed, batch) => floatFeeds(5)(seed, batch),
    feeds: (i) => toOrt(i as Feeds),
    maxSeq: 1
  },
  {
    name: "twice",
    model: () => models.twice,
    fixed: () => floatFeeds(4)(2, 2),
    input: (seed, batch) => floatFeeds(4)(seed, batch),
    feeds: (i) => toOrt(i as Feeds),
    maxSeq: 1
  },
  {
    name: "tiny_gpt2",
    model: () => models.tiny_gpt2,
    fixed: () => ({ input_ids: ids(tokenRows(3, 2, 6, 64)) }),
    input: (seed, batch, seq) => ({ input_ids: ids(tokenRows(seed, batch, seq, 64)) }),
    feeds: (i) => toOrt(i as Feeds),
    maxSeq: 16
  },
  {
    name: "llama_tiny",
    model: () => models.llama_tiny,
    fixed: () => llamaFeeds(tokenRows(4, 2, 6, 64)),
    input: (seed, batch, seq) => llamaFeeds(tokenRows(seed, batch, seq, 64)),
    feeds: (i) => toOrt(i as Feeds),
    maxSeq: 12
  },
  {
    name: "stories260K",
    model: () => models.stories260K,
    fixed: () => tokenRows(5, 2, 7, 512),
    input: (seed, batch, seq) => tokenRows(seed, batch, seq, 512),
    feeds: (i) => {
      const rows = i as ReadonlyArray<ReadonlyArray<number>>
      const f: Record<string, ort.Tensor> = toOrt(llamaFeeds(rows))
      for (let k = 0; k < 5; k++) {
        for (const kv of ["key", "value"]) f[`past_key_values.${k}.${kv}`] = new ort.Tensor("float32", new Float32Array(0), [rows.length, 4, 0, 8])
      }
      return f
    },
    maxSeq: 16
  }
]

/** Per subject: every module call whose first output is a float tensor, with its value on the fixed input. */
const sites: Record<string, ReadonlyArray<Site>> = {}

beforeAll(async () => {
  for (const s of subjects) {
    const model =
      s.name === "stories260K" ? await LanguageModel.load("models/stories260K") : await NNsight.load(`test/fixtures/${s.name}/model.onnx`)
    models[s.name] = model
    const bytes =
      s.name === "stories260K" ? readFileSync("models/stories260K/onnx/model.onnx") : readFileSync(`test/fixtures/${s.name}/model.onnx`)
    sessions[s.name] = await ort.InferenceSession.create(bytes, sessionOptions)
    const calls = [...model.tree.modules.values()].flatMap((mm) => mm.calls.map((_, call) => ({ path: mm.path, call })))
    const saved = await (model as NNsight).trace(s.fixed() as Feeds, (m) => {
      const at = walker(m)
      return calls.map((c) => at(c.path, c.call).output)
    })
    sites[s.name] = calls
      .map((c, k) => ({ ...c, shape: saved[k].shape, original: saved[k] }))
      .filter((c) => c.original.dtype === "float32" && c.original.size > 0)
  }
}, 120_000)

afterAll(async () => {
  for (const s of Object.values(sessions)) await s.release()
  for (const m of Object.values(models)) await m.close()
})

const rootOutputs = (model: NNsight | LanguageModel): ReadonlyArray<string> => model.tree.root.calls[0].outputs

// ---------------------------------------------------------------------------

describe("(a) a trace with reads only returns what plain onnxruntime returns", () => {
  for (const s of subjects) {
    test.prop(
      [fc.integer(), fc.integer({ min: 1, max: 3 }), fc.integer({ min: 1, max: s.maxSeq }), fc.uniqueArray(fc.nat(200), { maxLength: 6 })],
      { numRuns: s.name === "stories260K" ? 5 : 6 }
    )(`${s.name}`, async (seed, batch, seq, picks) => {
      const model = s.model()
      const candidates = sites[s.name]
      // sorted: a module's calls are reached in order
      const reads = picks
        .map((p) => candidates[p % candidates.length])
        .sort((x, y) => (x.path < y.path ? -1 : x.path > y.path ? 1 : x.call - y.call))
      const input = s.input(seed, batch, seq)
      const names = rootOutputs(model)
      const out = await (model as NNsight).trace(input as Feeds, (m) => {
        const at = walker(m)
        return { reads: reads.map((r) => at(r.path, r.call).output), outs: mod(m, "").outputs }
      })
      const plain = await sessions[s.name].run(s.feeds(input))
      names.forEach((name, k) => expectClose(out.outs[k], Tensor.fromOrt(plain[name])))
      expect(out.reads.length).toBe(reads.length)
    })
  }
})

describe("(b) set-then-read gives the value set; a read recorded before the set gives the original", () => {
  for (const s of subjects) {
    test.prop([fc.nat(), fc.integer(), fc.option(fc.integer({ min: -64, max: 63 }), { nil: undefined })], {
      numRuns: s.name === "stories260K" ? 5 : 8
    })(`${s.name}`, async (pick, seed, position) => {
      const model = s.model()
      const site = sites[s.name][pick % sites[s.name].length]
      const positional = position !== undefined && site.shape.length >= 2 && site.shape[1] > 0
      const p = positional ? (((position % site.shape[1]) + site.shape[1]) % site.shape[1]) - (position < 0 ? site.shape[1] : 0) : 0
      const v = positional ? randomTensor(seed, [site.shape[0], ...site.shape.slice(2)]) : randomTensor(seed, site.shape)
      const { before, after } = await (model as NNsight).trace(s.fixed() as Feeds, (m) => {
        const e = walker(m)(site.path, site.call)
        const before = e.output
        if (positional) e.output.setAt([":", p], v)
        else e.output.set(v)
        return { before, after: e.output }
      })
      expectClose(before, site.original)
      if (positional) {
        expectExact(after.at(":", p), v)
        // the other positions keep the original
        const other = p === 0 || p === -site.shape[1] ? 1 : 0
        if (site.shape[1] > 1) expectClose(after.at(":", other), site.original.at(":", other))
      } else expectExact(after, v)
    })
  }
})

describe("(c) patching a module with its own activation changes no output", () => {
  for (const s of subjects) {
    test.prop([fc.nat(), fc.boolean(), fc.option(fc.integer({ min: -64, max: 63 }), { nil: undefined })], {
      numRuns: s.name === "stories260K" ? 5 : 8
    })(`${s.name}`, async (pick, sameTrace, position) => {
      const model = s.model() as NNsight
      const site = sites[s.name][pick % sites[s.name].length]
      const input = s.fixed() as Feeds
      const positional = position !== undefined && site.shape.length >= 2 && site.shape[1] > 0
      const p = positional ? position % site.shape[1] : 0
      const patch = (e: Envoy, x: TensorProxy) => (positional ? e.output.setAt([":", p], x) : e.output.set(x))
      const read = (e: Envoy) => (positional ? e.output.at(":", p) : e.output)
      const plain = await model.trace(input, (m) => mod(m, "").outputs)
      const patched = sameTrace
        ? await model.trace(input, (m) => {
            const e = walker(m)(site.path, site.call)
            patch(e, read(e))
            return mod(m, "").outputs
          })
        : await model.trace((m, t) => {
            const e = walker(m)(site.path, site.call)
            const x = t.invoke(input, () => read(e))
            return t.invoke(input, () => {
              patch(e, x)
              return mod(m, "").outputs
            })
          })
      plain.forEach((t, k) => expectClose(patched[k], t))
    })
  }
})

describe("(d) two invokes batched equal two separate traces", () => {
  for (const s of subjects.filter((x) => x.maxSeq > 1)) {
    test.prop(
      [fc.integer(), fc.integer(), fc.integer({ min: 1, max: s.name === "stories260K" ? 1 : 2 }), fc.integer({ min: 1, max: 2 }), fc.integer({ min: 1, max: s.maxSeq }), fc.nat()],
      { numRuns: s.name === "stories260K" ? 5 : 6 }
    )(`${s.name}, prompts of the same length`, async (seedA, seedB, rowsA, rowsB, seq, pick) => {
      const model = s.model() as NNsight
      const site = sites[s.name][pick % sites[s.name].length]
      const a = s.input(seedA, rowsA, seq) as Feeds
      const b = s.input(seedB, s.name === "stories260K" ? 1 : rowsB, seq) as Feeds
      const read = (m: Envoy, e: Envoy) => ({ logits: mod(m, "").output, h: e.output })
      const batched = await model.trace((m, t) => {
        const e = walker(m)(site.path, site.call)
        return [t.invoke(a, () => read(m, e)), t.invoke(b, () => read(m, e))]
      })
      const alone = [await model.trace(a, (m) => read(m, walker(m)(site.path, site.call))), await model.trace(b, (m) => read(m, walker(m)(site.path, site.call)))]
      for (const k of [0, 1]) {
        expectClose(batched[k].logits, alone[k].logits, 1e-4)
        expectClose(batched[k].h, alone[k].h, 1e-4)
      }
    })
  }

  test.prop([fc.integer(), fc.integer(), fc.integer({ min: 1, max: 16 }), fc.integer({ min: 1, max: 16 })], { numRuns: 5 })(
    "stories260K, prompts of different lengths (left padding): last-position logits",
    async (seedA, seedB, lenA, lenB) => {
      const model = models.stories260K as LanguageModel
      const a = tokenRows(seedA, 1, lenA, 512)[0]
      const b = tokenRows(seedB, 1, lenB, 512)[0]
      const last = (m: Envoy) => m.lm_head.output.at(":", -1)
      const batched = await model.trace((m, t) => [t.invoke(a, () => last(m)), t.invoke(b, () => last(m))])
      const alone = [await model.trace(a, last), await model.trace(b, last)]
      expectClose(batched[0], alone[0], 1e-4)
      expectClose(batched[1], alone[1], 1e-4)
      // several prompts in one invoke pad the same way
      const rows = await model.trace([a, b], last)
      expectClose(rows.at("0:1"), alone[0], 1e-4)
      expectClose(rows.at("1:2"), alone[1], 1e-4)
    }
  )
})

// ---------------------------------------------------------------------------

type Action =
  | { readonly _tag: "read"; readonly site: number; readonly point: "input" | "output" }
  | { readonly _tag: "scalar"; readonly op: "add" | "mul" | "sub" | "div"; readonly value: number }
  | { readonly _tag: "constant"; readonly values: ReadonlyArray<number> }
  | { readonly _tag: "index"; readonly items: ReadonlyArray<string | number | null> }
  | { readonly _tag: "unary"; readonly op: "softmax" | "relu" | "sum" | "mean" | "argmax" | "clone" | "shape" }
  | { readonly _tag: "set"; readonly site: number; readonly positional: boolean }
  | { readonly _tag: "call"; readonly site: number }
  | { readonly _tag: "param"; readonly site: number }

const finite = fc.double({ noNaN: true, noDefaultInfinity: true }).map((x) => x + 0) // -0 is 0 in JSON
const action: fc.Arbitrary<Action> = fc.oneof(
  fc.record({ _tag: fc.constant("read" as const), site: fc.nat(), point: fc.constantFrom("input" as const, "output" as const) }),
  fc.record({ _tag: fc.constant("scalar" as const), op: fc.constantFrom("add" as const, "mul" as const, "sub" as const, "div" as const), value: fc.oneof(finite, fc.integer()) }),
  fc.record({ _tag: fc.constant("constant" as const), values: fc.array(fc.float({ noNaN: true }), { minLength: 1, maxLength: 4 }) }),
  fc.record({
    _tag: fc.constant("index" as const),
    items: fc
      .array(fc.constantFrom(":", "...", "1:3", "::2", "-3:", 0, -1, 2, null), { minLength: 1, maxLength: 3 })
      .filter((items) => items.filter((i) => i === "...").length <= 1)
  }),
  fc.record({ _tag: fc.constant("unary" as const), op: fc.constantFrom("softmax" as const, "relu" as const, "sum" as const, "mean" as const, "argmax" as const, "clone" as const, "shape" as const) }),
  fc.record({ _tag: fc.constant("set" as const), site: fc.nat(), positional: fc.boolean() }),
  fc.record({ _tag: fc.constant("call" as const), site: fc.nat() }),
  fc.record({ _tag: fc.constant("param" as const), site: fc.nat() })
)

/** Replays random actions as a trace callback, returning a random result shape. */
const program = (s: Subject, actions: ReadonlyArray<Action>, shape: number) => (m: Envoy) => {
  const candidates = sites[s.name]
  const model = s.model()
  const at = walker(m)
  const proxies: Array<TensorProxy> = []
  const last = (): TensorProxy => proxies[proxies.length - 1] ?? mod(m, "").output
  for (const a of actions) {
    switch (a._tag) {
      case "read": {
        const site = candidates[a.site % candidates.length]
        proxies.push(at(site.path, site.call)[a.point])
        break
      }
      case "scalar":
        proxies.push(last()[a.op](a.value))
        break
      case "constant":
        proxies.push(last().mul(Tensor.from([...a.values], "float32")))
        break
      case "index":
        proxies.push(last().at(...a.items))
        break
      case "unary":
        proxies.push(a.op === "shape" ? last().shape : last()[a.op]())
        break
      case "set": {
        const site = candidates[a.site % candidates.length]
        const e = at(site.path, site.call)
        if (a.positional) e.output.setAt([":", -1], last())
        else e.output.set(last())
        break
      }
      case "call": {
        const site = candidates[a.site % candidates.length]
        proxies.push(at(site.path, site.call).call(last()))
        break
      }
      case "param": {
        const withParams = [...model.tree.modules.values()].filter((x) => x.parameters.length > 0)
        const owner = withParams[a.site % withParams.length]
        // `envoy[name]` with a string-typed name is typed Envoy; a parameter is a TensorProxy
        const param = mod(m, owner.path)[owner.parameters[a.site % owner.parameters.length].name] as unknown as TensorProxy
        proxies.push(param)
        break
      }
    }
  }
  switch (shape % 4) {
    case 0:
      return last()
    case 1:
      return proxies
    case 2:
      return { first: proxies[0], last: last(), n: proxies.length, label: "x", none: undefined }
    default:
      return [{ nested: proxies.slice(0, 2) }, 3.5, true, null]
  }
}

describe("(e) Graph.decode(JSON round trip of Graph.encode(g)) equals g, with the same hash", () => {
  for (const s of subjects) {
    test.prop([fc.array(action, { maxLength: 12 }), fc.nat(), fc.boolean()], { numRuns: 20 })(`${s.name}`, (actions, shape, withStop) => {
      const model = s.model()
      const fn = program(s, actions, shape)
      const { graph } = (model as NNsight).record(s.fixed() as Feeds, (m, t) => {
        const r = fn(m)
        if (withStop) t.stop()
        return r
      })
      const text = JSON.stringify(Graph.encode(graph))
      const back = Graph.decode(JSON.parse(text))
      expect(back).toEqual(graph)
      expect(Graph.equals(back, graph)).toBe(true)
      expect(Graph.hash(back)).toBe(Graph.hash(graph))
      expect(JSON.stringify(Graph.encode(back))).toBe(text)
    })
  }

  test("non-finite scalars (masking with -Infinity, NaN) survive the round trip and hash apart", () => {
    const model = models.tiny_mlp as NNsight
    const input = subjects[0].fixed() as Feeds
    const record = (value: number) => model.record(input, (m) => m.layer1.output.add(value)).graph
    for (const value of [-Infinity, Infinity, NaN]) {
      const graph = record(value)
      const back = Graph.decode(JSON.parse(JSON.stringify(Graph.encode(graph))))
      expect(back).toEqual(graph)
    }
    const hashes = new Set([-Infinity, Infinity, NaN, 0].map((v) => Graph.hash(record(v))))
    expect(hashes.size).toBe(4)
  })
})
