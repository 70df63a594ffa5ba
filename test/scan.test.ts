/**
 * The scan interpreter (`Scan`):
 * (1) on random intervention graphs (`testing.experiment`, and random chains
 *     of tensor operations, valid or not) over random modules of every
 *     fixture and stories260K, with random batch, sequence length and
 *     invokes, the scanned shape and dtype of every intervention value equal
 *     those of the executed run (`Local`), and scan fails exactly when the
 *     run fails;
 * (2) validation errors carry the user's line: a set of the wrong shape, an
 *     index past a dimension, a matmul with the wrong inner size, a set
 *     needing a later value;
 * (3) scanning stories260K on 300 tokens reports every module's shapes and
 *     creates no onnxruntime session.
 */
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest"
import { fc, test } from "@fast-check/vitest"
import { readFileSync } from "node:fs"
import { Effect, Exit } from "effect"
import * as ort from "onnxruntime-node"
import { Errors, type Envoy, Graph, NNsight, Tensor, type TensorProxy } from "../src/index.js"
import * as Local from "../src/backends/Local.js"
import * as Scan from "../src/backends/Scan.js"
import * as Tracer from "../src/core/Tracer.js"
import * as Loaded from "../src/models/Loaded.js"
import { batchTensors } from "../src/models/NNsight.js"
import * as Shapes from "../src/models/Shapes.js"
import * as Arb from "../src/testing.js"

type Feeds = Record<string, Tensor>

const ids = (batch: number, seq: number, vocab: number, seed: number): Tensor =>
  Tensor.from(
    Array.from({ length: batch }, (_, r) => Array.from({ length: seq }, (_, c) => BigInt((seed * 31 + r * 7 + c * 13) % vocab))),
    "int64"
  )
const floats = (shape: ReadonlyArray<number>, seed: number): Tensor =>
  new Tensor("float32", shape, Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, k) => Math.sin(seed + k)))
const llama = (batch: number, seq: number, vocab: number, seed: number): Feeds => ({
  input_ids: ids(batch, seq, vocab, seed),
  attention_mask: Tensor.from(Array.from({ length: batch }, () => Array.from({ length: seq }, () => 1n)), "int64"),
  position_ids: Tensor.from(Array.from({ length: batch }, () => Array.from({ length: seq }, (_, c) => BigInt(c))), "int64")
})

interface Subject {
  readonly name: string
  readonly path: string
  readonly maxSeq: number
  readonly input: (batch: number, seq: number, seed: number) => Feeds
}

const subjects: ReadonlyArray<Subject> = [
  { name: "tiny_mlp", path: "test/fixtures/tiny_mlp/model.onnx", maxSeq: 1, input: (b, _, seed) => ({ x: floats([b, 5], seed) }) },
  { name: "twice", path: "test/fixtures/twice/model.onnx", maxSeq: 1, input: (b, _, seed) => ({ x: floats([b, 4], seed) }) },
  { name: "tiny_gpt2", path: "test/fixtures/tiny_gpt2/model.onnx", maxSeq: 16, input: (b, s, seed) => ({ input_ids: ids(b, s, 64, seed) }) },
  { name: "llama_tiny", path: "test/fixtures/llama_tiny/model.onnx", maxSeq: 10, input: (b, s, seed) => llama(b, s, 64, seed) },
  {
    name: "stories260K",
    path: "models/stories260K/onnx/model.onnx",
    maxSeq: 12,
    input: (b, s, seed) => {
      const f: Feeds = llama(b, s, 512, seed)
      for (let k = 0; k < 5; k++) for (const kv of ["key", "value"]) f[`past_key_values.${k}.${kv}`] = new Tensor("float32", [b, 4, 0, 8], new Float32Array(0))
      return f
    }
  }
]

const nets = new Map<string, NNsight>()

beforeAll(async () => {
  for (const s of subjects) nets.set(s.name, await NNsight.load(s.path))
}, 120_000)

afterAll(async () => {
  for (const n of nets.values()) await n.close()
})

/** Records `fn` over `inputs` (one invoke each). */
const recordInvokes = (net: NNsight, inputs: ReadonlyArray<Feeds>, fn: (m: Envoy, invoke: number) => unknown) =>
  Tracer.record<Feeds, unknown>(
    net.tree.root,
    (m, t) => inputs.map((input, k) => t.invoke(input, () => fn(m, k))),
    { hasInput: false }
  )

/** The graph with every node that has a value made a result, so a run reports them all. */
const everything = (graph: Graph.Graph): Graph.Graph => ({
  ...graph,
  result: {
    _tag: "List",
    items: graph.nodes.filter((n) => n._tag !== "Set" && n._tag !== "Stop").map((n) => ({ _tag: "Ref" as const, id: n.id }))
  }
})

type Run = { readonly ok: true; readonly values: ReadonlyMap<number, unknown> } | { readonly ok: false; readonly error: unknown }
type Scanned = { readonly ok: true; readonly values: ReadonlyMap<number, Shapes.Fake> } | { readonly ok: false; readonly error: unknown }

const execute = async (net: NNsight, graph: Graph.Graph, inputs: ReadonlyArray<Feeds>): Promise<Run> => {
  const batch = batchTensors(inputs)
  const exit = await Effect.runPromiseExit(Local.execute(net.runtime, { graph: everything(graph), ...batch }))
  if (Exit.isSuccess(exit)) return { ok: true, values: exit.value.values }
  return { ok: false, error: exit.cause }
}

const scan = (net: NNsight, graph: Graph.Graph, inputs: ReadonlyArray<Feeds>): Scanned => {
  const batch = batchTensors(inputs)
  const fakes = Object.fromEntries(Object.entries(batch.feeds).map(([k, t]) => [k, Shapes.of(t)]))
  try {
    return { ok: true, values: Scan.run(net.runtime.loaded, { graph, inputs: fakes, rows: batch.rows }).values }
  } catch (e) {
    return { ok: false, error: e }
  }
}

const compare = (graph: Graph.Graph, run: Run, scanned: Scanned, what: string): number => {
  if (!run.ok || !scanned.ok) {
    if (run.ok !== scanned.ok) {
      expect.fail(
        `${what}\nscan ${scanned.ok ? "succeeded" : `failed: ${(scanned as { error: unknown }).error}`}, ` +
          `run ${run.ok ? "succeeded" : `failed: ${String((run as { error: unknown }).error)}`}\n${Graph.format(graph)}`
      )
    }
    return 0
  }
  let n = 0
  for (const [id, v] of run.values) {
    // tensors (and the first of a multi-output op); JavaScript scalars are not tensors
    const t = Array.isArray(v) ? v[0] : v
    if (!(t instanceof Tensor)) continue
    const f = scanned.values.get(id)
    if (f === undefined) expect.fail(`${what}: no scanned value for %${id}`)
    const label = `${what}: %${id} ${Graph.label(graph.nodes[id])}`
    if (f.dtype !== t.dtype || !Shapes.shapeEquals(f.shape, t.shape)) {
      expect.fail(`${label}: scanned ${Shapes.format(f)}, ran ${t.dtype}[${t.shape.join(", ")}]\n${Graph.format(graph)}`)
    }
    n++
  }
  return n
}

// ---------------------------------------------------------------------------
// (1) scanned = executed
// ---------------------------------------------------------------------------

describe("scan equals the executed run on random experiments (testing.experiment)", () => {
  for (const s of subjects) {
    test.prop(
      [
        fc.integer({ min: 1, max: 2 }),
        fc.integer({ min: 1, max: s.maxSeq }),
        fc.integer({ min: 1, max: 2 }),
        fc.integer({ min: 0, max: 100 }),
        fc.constant(null).chain(() => Arb.experiment(nets.get(s.name)!.tree, { withSets: true }))
      ],
      { numRuns: s.name === "stories260K" ? 5 : 8 }
    )(s.name, async (batch, seq, invokes, seed, e) => {
      const net = nets.get(s.name)!
      const inputs = Array.from({ length: invokes }, (_, k) => s.input(batch, seq, seed + k))
      const { graph } = invokes === 1 ? net.record(inputs[0], (m) => e.fn(m)) : recordInvokes(net, inputs, (m) => e.fn(m))
      const n = compare(graph, await execute(net, graph, inputs), scan(net, graph, inputs), e.description)
      expect(n).toBeGreaterThan(0)
    })
  }
})

/** One random tensor operation, valid or not for the tensor it meets. */
type Step = { readonly name: string; readonly apply: (x: TensorProxy, m: Envoy) => TensorProxy }

const item = fc.constantFrom<ReadonlyArray<string | number | null>>(
  [":", -1],
  [0],
  ["...", 0],
  [":", "1:"],
  ["::2"],
  [null, ":"],
  [":", 5],
  [0, 0, 0, 0],
  ["...", "-2:", null],
  [3]
)
const axis = fc.integer({ min: -3, max: 2 })
const step = (name: string, apply: (x: TensorProxy) => TensorProxy): Step => ({ name, apply })
const steps: fc.Arbitrary<Step> = fc.oneof(
  item.map((it) => step(`at(${JSON.stringify(it)})`, (x) => x.at(...it))),
  fc.tuple(axis, axis).map(([a, b]) => step(`transpose(${a}, ${b})`, (x) => x.transpose(a, b))),
  fc.integer({ min: 1, max: 4 }).map((k) => step(`reshape(${k}, -1)`, (x) => x.reshape(k, -1))),
  fc.constant(step("reshape(-1)", (x) => x.reshape(-1))),
  fc.tuple(axis, fc.boolean()).map(([a, k]) => step(`sum(${a}, ${k})`, (x) => x.sum(a, k))),
  fc.tuple(axis, fc.boolean()).map(([a, k]) => step(`max(${a}, ${k})`, (x) => x.max(a, k))),
  axis.map((a) => step(`argmax(${a})`, (x) => x.argmax(a))),
  axis.map((a) => step(`softmax(${a})`, (x) => x.softmax(a))),
  axis.map((a) => step(`unsqueeze(${a})`, (x) => x.unsqueeze(a))),
  axis.map((a) => step(`squeeze(${a})`, (x) => x.squeeze(a))),
  fc.integer({ min: 1, max: 5 }).map((k) => step(`topk(${k}).values`, (x) => x.topk(k).values)),
  fc.constant(step("matmul(x^T)", (x) => x.matmul(x.transpose()))),
  fc.constant(step("matmul(x)", (x) => x.matmul(x))),
  fc.constant(step("to(int64).exp()", (x) => x.to("int64").exp())),
  fc.constant(step("to(float64)", (x) => x.to("float64"))),
  fc.constant(step("where(gt(0), 0)", (x) => x.where(x.gt(0), 0))),
  fc.constant(step("gt(0).and(true)", (x) => x.gt(0).and(true))),
  fc.constant(step("eq(1).not()", (x) => x.eq(1).not())),
  axis.map((a) => step(`cat([x], ${a})`, (x) => x.cat([x], a))),
  fc.constant(step("shape", (x) => x.shape)),
  fc.constant(step("expand(2, ...)", (x) => x.unsqueeze(0).expand(2, 1, 1, 1).sum(0))),
  fc.array(fc.integer({ min: 1, max: 3 }), { maxLength: 3 }).map((shape) =>
    step(`add(ones[${shape}])`, (x) => x.add(Tensor.from(new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(1), "float32", shape)))
  ),
  fc.integer({ min: -2, max: 2 }).map((k) => step(`mul(${k}).neg().tanh()`, (x) => x.mul(k).neg().tanh()))
)

describe("scan equals the executed run, and fails exactly when it does, on random chains of operations", () => {
  for (const s of subjects) {
    const tree = () => nets.get(s.name)!.tree
    test.prop(
      [
        fc.integer({ min: 1, max: 2 }),
        fc.integer({ min: 1, max: s.maxSeq }),
        fc.integer({ min: 1, max: 2 }),
        fc.constant(null).chain(() => Arb.modulePath(tree())),
        fc.array(steps, { minLength: 1, maxLength: 3 }),
        fc.option(fc.constantFrom<ReadonlyArray<string | number>>([":", -1], [0], ["...", "1:"], [":", 0, 0]), { nil: undefined })
      ],
      { numRuns: s.name === "stories260K" ? 10 : 16 }
    )(s.name, async (batch, seq, invokes, path, chain, setAt) => {
      const net = nets.get(s.name)!
      const inputs = Array.from({ length: invokes }, (_, k) => s.input(batch, seq, k))
      const fn = (m: Envoy) => {
        const e = Arb.envoyAt(m, path)
        const out = chain.reduce<TensorProxy>((x, st) => st.apply(x, m), e.output)
        if (setAt !== undefined) e.output.setAt(setAt, e.output.at(...setAt).mul(2))
        return { out, read: e.output }
      }
      const what = `${path}.output.${chain.map((c) => c.name).join(".")}${setAt ? `; setAt(${JSON.stringify(setAt)})` : ""}`
      let graph: Graph.Graph
      try {
        graph = invokes === 1 ? net.record(inputs[0], fn).graph : recordInvokes(net, inputs, fn).graph
      } catch {
        return // the recorder refused it (a malformed index)
      }
      compare(graph, await execute(net, graph, inputs), scan(net, graph, inputs), what)
    })
  }
})

describe("Apply and Param", () => {
  it("logit lens and parameters (stories260K), on the whole sequence and on its last position", async () => {
    const net = nets.get("stories260K")!
    const inputs = [subjects[4].input(2, 7, 1)]
    const { graph } = net.record(inputs[0], (m) => {
      const h = m.model.layers[1].output
      return {
        lens: m.lm_head.call(m.model.norm.call(h)),
        last: m.lm_head.call(m.model.norm.call(h.at(":", "-1:"))),
        mlp: m.model.layers[0].mlp.call(h.at(0, ":")),
        w: m.lm_head.weight,
        q: m.model.layers[0].self_attn.q_proj.weight,
        n: m.model.norm.weight
      }
    })
    const scanned = scan(net, graph, inputs)
    expect(compare(graph, await execute(net, graph, inputs), scanned, "apply")).toBeGreaterThan(5)
    const refs = (graph.result as { fields: Record<string, { id: number }> }).fields
    const fmt = (k: string) => Shapes.format((scanned as { values: ReadonlyMap<number, Shapes.Fake> }).values.get(refs[k].id)!)
    expect(fmt("lens")).toBe("float32[2, 7, 512]")
    expect(fmt("last")).toBe("float32[2, 1, 512]")
    expect(fmt("mlp")).toBe("float32[7, 64]")
    expect(fmt("w")).toBe("float32[512, 64]")
  })
})

describe("the scanner", () => {
  it("takes Tensors as inputs, scans node by node, and reports shapes past a stop", async () => {
    const net = nets.get("tiny_gpt2")!
    const input = subjects[2].input(2, 6, 0)
    const { graph } = net.record(input, (m, t) => {
      const a = m.transformer.h[0].output
      t.stop()
      return { a, b: m.lm_head.output.at(":", -1), s: m.lm_head.output.shape }
    })
    const scanner = Scan.make(net.runtime.loaded, { inputs: input, rows: [{ start: 0, count: 2 }] })
    const shapes = graph.nodes.map((n) => scanner.add(n))
    const outcome = scanner.finish()
    expect(shapes.filter((f) => f !== undefined).length).toBe(outcome.values.size)
    const refs = (graph.result as { fields: Record<string, { id: number }> }).fields
    expect(Shapes.format(outcome.values.get(refs.a.id)!)).toBe("float32[2, 6, 32]")
    expect(Shapes.format(outcome.values.get(refs.b.id)!)).toBe("float32[2, 64]")
    expect(outcome.values.get(refs.s.id)!.value).toEqual([2, 6, 64])
    expect(outcome.hooks.get(Scan.hookKey({ module: "lm_head", call: 0, point: "output", index: 0 }))!.shape).toEqual([2, 6, 64])
    // the Effect form
    const viaEffect = await Effect.runPromise(Scan.execute(net.runtime.loaded, { graph, inputs: input, rows: [{ start: 0, count: 2 }] }))
    expect(viaEffect.values.size).toBe(outcome.values.size)
  })

  it("conditions: both branches are scanned, a branch's failure is not the run's; loops fail as Local fails them", () => {
    const net = nets.get("tiny_mlp")!
    const input = subjects[0].input(2, 1, 0)
    const site = "here.ts:1:1"
    const hook: Graph.Node = { _tag: "Hook", id: 0, site, ref: { module: "layer1", call: 0, invoke: 0, point: "output", index: 0 } }
    const pred: Graph.Node = { _tag: "Scalar", id: 1, site, value: true }
    const bad = { _tag: "Op", id: 3, site, op: "Index", args: [0], attrs: { items: [0, 12] } } as unknown as Graph.Node
    const good = { _tag: "Op", id: 4, site, op: "Mul", args: [0, 1], attrs: {} } as unknown as Graph.Node
    const cond = { _tag: "Cond", id: 2, site, predicate: 1, then: [bad], otherwise: [good] } as unknown as Graph.Node
    const graph = { nodes: [hook, pred, cond], invokes: 1, result: { _tag: "Ref", id: 4 } } as unknown as Graph.Graph
    const out = Scan.run(net.runtime.loaded, { graph, inputs: input, rows: [{ start: 0, count: 2 }] })
    expect(out.values.has(3)).toBe(false)
    expect(Shapes.format(out.values.get(4)!)).toBe("float32[2, 10]")
    const loop = { _tag: "Iter", id: 2, site, over: 0, body: [] } as unknown as Graph.Node
    const looped = { nodes: [hook, pred, loop], invokes: 1, result: { _tag: "Value", value: null } } as unknown as Graph.Graph
    expect(scanError(net, looped, [input])).toBeInstanceOf(Errors.InvalidValue)
  })

  it("hooks on later forward passes (generation steps) use that pass's inputs", () => {
    const net = nets.get("stories260K")!
    const prompt = subjects[4].input(1, 7, 0)
    const stepInputs = (step: number): Record<string, Shapes.Fake> => {
      if (step === 0) return prompt
      const past = 7 + step - 1
      const f: Record<string, Shapes.Fake> = {
        input_ids: { dtype: "int64", shape: [1, 1] },
        attention_mask: { dtype: "int64", shape: [1, past + 1] },
        position_ids: { dtype: "int64", shape: [1, 1] }
      }
      for (let k = 0; k < 5; k++) for (const kv of ["key", "value"]) f[`past_key_values.${k}.${kv}`] = { dtype: "float32", shape: [1, 4, past, 8] }
      return f
    }
    const site = "here.ts:1:1"
    const nodes: ReadonlyArray<Graph.Node> = [0, 1, 2].map((call) => ({
      _tag: "Hook" as const,
      id: call,
      site,
      ref: { module: "model.layers.0.self_attn", call, invoke: 0, point: "output" as const, index: 1 }
    }))
    const scanner = Scan.make(net.runtime.loaded, { inputs: stepInputs, rows: [{ start: 0, count: 1 }] })
    expect(nodes.map((n) => Shapes.format(scanner.add(n)!))).toEqual(["float32[1, 4, 7, 8]", "float32[1, 4, 8, 8]", "float32[1, 4, 9, 8]"])
  })

  it("lists operators without a shape rule", () => {
    expect(Scan.unsupportedOps(nets.get("stories260K")!.runtime.loaded.model)).toEqual([])
  })
})

// ---------------------------------------------------------------------------
// (2) validation errors name the user's line
// ---------------------------------------------------------------------------

const scanError = (net: NNsight, graph: Graph.Graph, inputs: ReadonlyArray<Feeds>): unknown => {
  const r = scan(net, graph, inputs)
  expect(r.ok).toBe(false)
  return (r as { error: unknown }).error
}

const siteOf = (graph: Graph.Graph, pick: (n: Graph.Node) => boolean): string => {
  const node = graph.nodes.find(pick)!
  expect(node.site).toMatch(/scan\.test\.ts:\d+:\d+$/)
  return node.site
}

describe("validation", () => {
  it("a set with the wrong shape", async () => {
    const net = nets.get("tiny_gpt2")!
    const input = subjects[2].input(1, 5, 0)
    const { graph } = net.record(input, (m) => {
      m.transformer.h[0].output.set(Tensor.from(new Float32Array(4 * 32), "float32", [1, 4, 32]))
      return m.lm_head.output
    })
    const error = scanError(net, graph, [input])
    expect(error).toBeInstanceOf(Errors.InvalidValue)
    expect((error as Errors.InvalidValue).site).toBe(siteOf(graph, (n) => n._tag === "Set"))
    expect((error as Errors.InvalidValue).message).toContain("[1, 4, 32]")
    expect((error as Errors.InvalidValue).message).toContain("[1, 5, 32]")
    // the run fails the same way
    const run = await execute(net, graph, [input])
    expect(run.ok).toBe(false)
  })

  it("a set on one invoke's rows is checked against those rows", () => {
    const net = nets.get("tiny_gpt2")!
    const a = subjects[2].input(1, 5, 0)
    const b = subjects[2].input(2, 5, 1)
    const ok = recordInvokes(net, [a, b], (m, k) => {
      if (k === 1) m.transformer.h[0].output.set(Tensor.from(new Float32Array(2 * 5 * 32), "float32", [2, 5, 32]))
    })
    expect(scan(net, ok.graph, [a, b]).ok).toBe(true)
    const bad = recordInvokes(net, [a, b], (m, k) => {
      if (k === 0) m.transformer.h[0].output.set(Tensor.from(new Float32Array(2 * 5 * 32), "float32", [2, 5, 32]))
    })
    expect(scanError(net, bad.graph, [a, b])).toBeInstanceOf(Errors.InvalidValue)
  })

  it("indexing past a dimension", async () => {
    const net = nets.get("tiny_mlp")!
    const input = subjects[0].input(2, 1, 0)
    const { graph } = net.record(input, (m) => m.layer1.output.at(0, 12))
    const error = scanError(net, graph, [input])
    expect(error).toBeInstanceOf(Errors.InvalidValue)
    expect((error as Errors.InvalidValue).site).toBe(siteOf(graph, (n) => n._tag === "Op" && n.op === "Index"))
    expect((error as Errors.InvalidValue).reason).toBe("index 12 is out of bounds for dimension 1 with size 10")
    const run = await execute(net, graph, [input])
    expect(run.ok).toBe(false)
  })

  it("a matmul with the wrong inner size", async () => {
    const net = nets.get("tiny_mlp")!
    const input = subjects[0].input(2, 1, 0)
    const { graph } = net.record(input, (m) => m.layer1.output.matmul(m.layer2.weight)) // [2, 10] x [2, 10]
    const error = scanError(net, graph, [input])
    expect(error).toBeInstanceOf(Errors.InvalidValue)
    expect((error as Errors.InvalidValue).site).toBe(siteOf(graph, (n) => n._tag === "Op" && n.op === "MatMul"))
    expect((error as Errors.InvalidValue).reason).toContain("inner dimensions do not match")
    const run = await execute(net, graph, [input])
    expect(run.ok).toBe(false)
    // transposed, it fits
    const fits = net.record(input, (m) => m.layer1.output.matmul(m.layer2.weight.transpose()))
    expect(scan(net, fits.graph, [input]).ok).toBe(true)
  })

  it("a set that needs a value computed later in the forward pass", async () => {
    const net = nets.get("twice")!
    const input = subjects[1].input(1, 1, 0)
    const { graph } = net.record(input, (m) => {
      m.inp.output.set(m.out.output.sum())
    })
    const error = scanError(net, graph, [input])
    expect(error).toBeInstanceOf(Errors.OutOfOrder)
    expect((error as Errors.OutOfOrder).site).toBe(siteOf(graph, (n) => n._tag === "Set"))
    const run = await execute(net, graph, [input])
    expect(run.ok).toBe(false)
    expect(Exit.isExit(run) || !run.ok).toBe(true)
  })

  it("unknown modules and input names are the run's errors", () => {
    const net = nets.get("tiny_mlp")!
    const input = subjects[0].input(1, 1, 0)
    const { graph } = net.record(input, (m) => m.layer1.output)
    const wrong = { ...graph, nodes: graph.nodes.map((n) => (n._tag === "Hook" ? { ...n, ref: { ...n.ref, module: "layer9" } } : n)) }
    expect(scanError(net, wrong, [input])).toBeInstanceOf(Errors.UnknownModule)
    const e = Scan.validate(net.runtime.loaded, { graph, inputs: { y: { dtype: "float32", shape: [1, 5] } }, rows: [{ start: 0, count: 1 }] })
    expect(e).toBeInstanceOf(Errors.InvalidInput)
    const f = Scan.validate(net.runtime.loaded, { graph, inputs: { x: { dtype: "float32", shape: [1, 6] } }, rows: [{ start: 0, count: 1 }] })
    expect(f).toBeInstanceOf(Errors.InvalidInput)
    expect(f?.message).toContain("/layer1/Gemm")
  })
})

// ---------------------------------------------------------------------------
// (3) stories260K on 300 tokens: every module's shapes, no session
// ---------------------------------------------------------------------------

describe("scan creates no onnxruntime session", () => {
  it("stories260K, 300 tokens: all module shapes, symbolic or concrete", async () => {
    const create = vi.spyOn(ort.InferenceSession, "create")
    try {
      const loaded = Loaded.fromBytes(new Uint8Array(readFileSync("models/stories260K/onnx/model.onnx")))
      const feeds = subjects[4].input(1, 300, 0)
      const inputs = Object.fromEntries(Object.entries(feeds).map(([k, t]) => [k, Shapes.of(t)]))
      const graph = Tracer.record<Feeds, unknown>(loaded.tree.root, (m) => ({
        h: m.model.layers[2].output,
        last: m.model.layers[2].output.at(":", -1),
        lens: m.lm_head.call(m.model.norm.call(m.model.layers[2].output.at(":", "-1:")))
      }), { input: feeds, hasInput: true }).graph
      const t0 = performance.now()
      const out = Scan.run(loaded, { graph, inputs, rows: [{ start: 0, count: 1 }] })
      const ms = performance.now() - t0
      const mods = Scan.modules(loaded, out.tensors)
      expect(mods.size).toBe(loaded.tree.modules.size)
      for (const [path, calls] of mods) {
        for (const c of calls) for (const f of [...c.inputs, ...c.outputs]) expect(f, path).toBeDefined()
      }
      expect(Shapes.format(mods.get("model.layers.2")![0].outputs[0])).toBe("float32[1, 300, 64]")
      expect(Shapes.format(mods.get("lm_head")![0].outputs[0])).toBe("float32[1, 300, 512]")
      expect(Shapes.format(out.values.get(1)!)).toBe("float32[1, 300, 64]")
      const lens = [...out.values.values()].at(-1)!
      expect(Shapes.format(lens)).toBe("float32[1, 1, 512]")
      expect(ms).toBeLessThan(2000)

      const seq = Shapes.symbol("sequence_length")
      const symbolic = Scan.run(loaded, {
        graph,
        inputs: Object.fromEntries(Object.entries(inputs).map(([k, f]) => [k, { ...f, shape: f.shape.map((d, i) => (i === 1 && d === 300 ? seq : d)) }])),
        rows: [{ start: 0, count: 1 }]
      })
      expect(Shapes.format(symbolic.values.get(1)!)).toBe("float32[1, sequence_length, 64]")
      expect(create).not.toHaveBeenCalled()
    } finally {
      create.mockRestore()
    }
  })
})
