/**
 * The module tree recovered from exporter scopes, checked against what
 * PyTorch says about the same models (test/fixtures/<name>/reference.json):
 * module paths, call counts, contiguous node ranges, hook points, and the
 * values a trace reads at every module call, within 1e-4 of PyTorch's hooks.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import * as fs from "node:fs"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import { Tensor } from "../src/core/Tensor.js"
import type * as DType from "../src/core/DType.js"
import * as Loaded from "../src/models/Loaded.js"
import * as ModuleTree from "../src/models/ModuleTree.js"
import * as Onnx from "../src/models/Onnx.js"
import * as OnnxBuilder from "../src/models/OnnxBuilder.js"
import { NNsight } from "../src/models/NNsight.js"

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..")

interface RefTensor {
  readonly dtype: DType.DType
  readonly shape: ReadonlyArray<number>
  readonly data: ReadonlyArray<number | boolean>
}
interface RefHook {
  readonly module: string
  readonly call: number
  readonly input: ReadonlyArray<RefTensor>
  readonly output: ReadonlyArray<RefTensor>
}
interface Reference {
  readonly modules: ReadonlyArray<string>
  readonly module_types: Readonly<Record<string, string>>
  readonly calls?: Readonly<Record<string, number>>
  readonly inputs: Readonly<Record<string, RefTensor>>
  readonly hooks: ReadonlyArray<RefHook>
}

const fixtures = {
  tiny_mlp: "test/fixtures/tiny_mlp/model.onnx",
  twice: "test/fixtures/twice/model.onnx",
  tiny_gpt2: "test/fixtures/tiny_gpt2/model.onnx",
  llama_tiny: "test/fixtures/llama_tiny/model.onnx",
  stories260K: "models/stories260K/onnx/model.onnx"
} as const
type Fixture = keyof typeof fixtures
const names = Object.keys(fixtures) as ReadonlyArray<Fixture>

const onnxPath = (name: Fixture) => path.join(root, fixtures[name])
const reference = (name: Fixture): Reference =>
  JSON.parse(fs.readFileSync(path.join(root, "test/fixtures", name, "reference.json"), "utf8"))
const loaded = new Map(names.map((n) => [n, Loaded.fromBytes(new Uint8Array(fs.readFileSync(onnxPath(n))))]))
const loadedOf = (name: Fixture): Loaded.Loaded => loaded.get(name)!
const refs = new Map(names.map((n) => [n, reference(n)]))
const refOf = (name: Fixture): Reference => refs.get(name)!

const toTensor = (t: RefTensor): Tensor => Tensor.from(t.data as ReadonlyArray<number>, t.dtype, t.shape)

/** Every named input of a fixture run (stories260K also needs empty KV caches). */
const inputsOf = (name: Fixture): Record<string, Tensor> => {
  const feeds: Record<string, Tensor> = {}
  for (const [k, v] of Object.entries(refOf(name).inputs)) feeds[k] = toTensor(v)
  for (const v of loadedOf(name).model.graph.inputs) {
    if (v.name.startsWith("past_key_values.")) feeds[v.name] = Tensor.from(new Float32Array(0), "float32", [1, 4, 0, 8])
  }
  return feeds
}

/** The path of the module a node's scope names (exporter scope parts, `layers.0` split). */
const scopePath = (nodeName: string): string | undefined => ModuleTree.scopeOf(nodeName)?.join(".")
const within = (p: string, module: string) => p === module || p.startsWith(module + ".")

/** Checks shape, then max |actual - expected| <= tolerance. */
const expectClose = (what: string, actual: Tensor, expected: RefTensor, tolerance: number): void => {
  expect(actual.shape, `${what}: shape`).toEqual(expected.shape)
  const data = actual.data as ArrayLike<number | bigint | boolean>
  let max = 0
  for (let i = 0; i < expected.data.length; i++) max = Math.max(max, Math.abs(Number(data[i]) - Number(expected.data[i])))
  expect(max, `${what}: max |diff|`).toBeLessThanOrEqual(tolerance)
}

describe("module paths equal PyTorch's named_modules()", () => {
  it.each(names)("%s", (name) => {
    const ref = refOf(name)
    const { tree, model } = loadedOf(name)
    const ours = ModuleTree.paths(tree)
    expect(new Set(ours).size).toBe(ours.length)
    const expected = new Set(ref.modules)
    const missing = ref.modules.filter((m) => !ours.includes(m))
    const extra = ours.filter((m) => !expected.has(m))
    expect(extra).toEqual([])
    // The only modules we lack are node-less ones: in eval mode Dropout is the
    // identity and exports no node, so there is no scope to recover it from.
    expect(missing.map((m) => ref.module_types[m])).toEqual(missing.map(() => "Dropout"))
    const scoped = model.graph.nodes.map((n) => scopePath(n.name)).filter((p): p is string => p !== undefined)
    for (const m of missing) expect(scoped.filter((p) => within(p, m))).toEqual([])
    expect(missing).toEqual(
      name === "tiny_gpt2"
        ? [
          "transformer.drop",
          "transformer.h.0.attn.attn_dropout",
          "transformer.h.0.attn.resid_dropout",
          "transformer.h.0.mlp.dropout",
          "transformer.h.1.attn.attn_dropout",
          "transformer.h.1.attn.resid_dropout",
          "transformer.h.1.mlp.dropout"
        ]
        : []
    )
    // Pre-order: a module comes after its parent. (Siblings come in call
    // order, which ONNX keeps; PyTorch lists them in registration order,
    // which it does not: llama registers input_layernorm after mlp.)
    ours.forEach((p, k) => {
      const parent = p.split(".").slice(0, -1).join(".")
      if (parent !== "") expect(ours.indexOf(parent), p).toBeLessThan(k)
    })
    // Containers are ModuleLists, never called.
    for (const m of ["transformer.h", "model.layers"]) {
      const module = ModuleTree.find(tree, m)
      if (module === undefined) continue
      expect(module.type).toBe("ModuleList")
      expect(module.calls).toEqual([])
    }
  })

  it.each(names.filter((n) => refOf(n).calls !== undefined))("%s: call counts", (name) => {
    const calls = refOf(name).calls!
    const { tree } = loadedOf(name)
    for (const p of ModuleTree.paths(tree)) expect([p, ModuleTree.find(tree, p)!.calls.length]).toEqual([p, calls[p]])
  })
})

describe("twice: repeated calls", () => {
  const { tree } = loadedOf("twice")
  const calls = (p: string) => ModuleTree.find(tree, p)!.calls

  it("shared and act have two calls, inp and out one", () => {
    expect(calls("shared").length).toBe(2)
    expect(calls("act").length).toBe(2)
    expect(calls("inp").length).toBe(1)
    expect(calls("out").length).toBe(1)
  })

  it("each call's hook points chain x -> inp -> act -> shared -> act -> shared -> out -> y", () => {
    const chain = [calls("inp")[0], calls("act")[0], calls("shared")[0], calls("act")[1], calls("shared")[1], calls("out")[0]]
    expect(chain[0].inputs).toEqual(["x"])
    for (let k = 1; k < chain.length; k++) expect(chain[k].inputs).toEqual([chain[k - 1].outputs[0]])
    for (const c of chain) expect(c.outputs.length).toBe(1)
    expect(chain[chain.length - 1].outputs).toEqual(["y"])
  })

  it("call k holds the nodes of scope name_k", () => {
    const { model } = loadedOf("twice")
    const nodeNames = (c: ModuleTree.Call) => tree.order.slice(c.start, c.end).map((i) => model.graph.nodes[i].name)
    expect(nodeNames(calls("act")[0])).toEqual(["/act/Relu"])
    expect(nodeNames(calls("act")[1])).toEqual(["/act_1/Relu"])
    expect(nodeNames(calls("shared")[0])).toEqual(["/shared/Gemm"])
    expect(nodeNames(calls("shared")[1])).toEqual(["/shared_1/Gemm"])
  })
})

describe("linear order", () => {
  it.each(names)("%s: a permutation and a topological order", (name) => {
    const { tree, model } = loadedOf(name)
    const graph = model.graph
    expect([...tree.order].sort((a, b) => a - b)).toEqual(graph.nodes.map((_, i) => i))
    const available = new Set([...graph.inputs.map((v) => v.name), ...graph.initializers.map((t) => t.name), ""])
    const late: Array<string> = []
    for (const i of tree.order) {
      const node = graph.nodes[i]
      for (const t of [...node.inputs, ...Onnx.outerNames(node)]) if (!available.has(t)) late.push(`${node.name} <- ${t}`)
      for (const o of node.outputs) available.add(o)
    }
    expect(late).toEqual([])
    for (const o of graph.outputs) expect(available.has(o.name)).toBe(true)
  })

  // Models whose modules are each called once: a call's range holds exactly
  // the nodes scoped inside the module, plus unscoped nodes (exporter
  // Constants) all of whose consumers are inside it.
  it.each(names.filter((n) => n !== "twice"))("%s: every module call is the contiguous range of its scope", (name) => {
    const { tree, model } = loadedOf(name)
    const nodes = model.graph.nodes
    const consumers = new Map<string, Array<number>>()
    nodes.forEach((n, i) => n.inputs.forEach((t) => consumers.set(t, [...(consumers.get(t) ?? []), i])))
    const position = new Map(tree.order.map((n, p) => [n, p]))
    for (const p of ModuleTree.paths(tree)) {
      const module = ModuleTree.find(tree, p)!
      if (module.calls.length === 0) continue
      expect(module.calls.length).toBe(1)
      const { start, end } = module.calls[0]
      expect(0 <= start && start < end && end <= nodes.length).toBe(true)
      const scopedInside = nodes.flatMap((n, i) => (within(scopePath(n.name) ?? "\0", p) ? [i] : []))
      const outside = scopedInside.filter((i) => !(start <= position.get(i)! && position.get(i)! < end))
      expect([p, outside.map((i) => nodes[i].name)]).toEqual([p, []])
      const stray: Array<string> = []
      for (const i of tree.order.slice(start, end)) {
        const s = scopePath(nodes[i].name)
        if (s !== undefined) {
          if (!within(s, p)) stray.push(nodes[i].name)
          continue
        }
        const uses = nodes[i].outputs.flatMap((o) => consumers.get(o) ?? [])
        if (uses.some((c) => !(start <= position.get(c)! && position.get(c)! < end))) stray.push(nodes[i].name)
      }
      expect([p, stray]).toEqual([p, []])
    }
  })
})

// Where PyTorch's output[0] sits in llama_tiny's graph (fixtures README, `-v`).
describe("llama_tiny: outputs[0] is the value the module returns", () => {
  const { tree } = loadedOf("llama_tiny")
  const out0 = (p: string) => ModuleTree.find(tree, p)!.calls[0].outputs[0]
  it.each([0, 1])("layer %i", (n) => {
    expect(out0(`model.layers.${n}.input_layernorm`)).toBe(`/model/layers.${n}/input_layernorm/Mul_1_output_0`)
    expect(out0(`model.layers.${n}.post_attention_layernorm`)).toBe(`/model/layers.${n}/post_attention_layernorm/Mul_1_output_0`)
    expect(out0(`model.layers.${n}.self_attn`)).toBe(`/model/layers.${n}/self_attn/o_proj/MatMul_output_0`)
    expect(out0(`model.layers.${n}`)).toBe(`/model/layers.${n}/Add_1_output_0`)
  })
})

describe("stories260K", () => {
  const { tree, model } = loadedOf("stories260K")
  const call = (p: string) => ModuleTree.find(tree, p)!.calls[0]

  it("prints like PyTorch, folding the identical layers", () => {
    const text = ModuleTree.format(tree)
    expect(text).toContain("(0-4): 5 x ")
    expect(text).toContain("(embed_tokens): Embedding(512, 64)")
    expect(text).toContain("(q_proj): Linear(in_features=64, out_features=64, bias=False)")
  })

  it("decoder layers: input is the residual stream, outputs are the stream then present key and value", () => {
    const position = new Map(tree.order.map((n, p) => [n, p]))
    for (let n = 0; n < 5; n++) {
      const c = call(`model.layers.${n}`)
      const previous = n === 0 ? call("model.embed_tokens").outputs[0] : call(`model.layers.${n - 1}`).outputs[0]
      expect(c.inputs[0]).toBe(previous)
      const next = n < 4 ? call(`model.layers.${n + 1}`) : call("model.norm")
      const readers = tree.order.slice(next.start, next.end).filter((i) => model.graph.nodes[i].inputs.includes(c.outputs[0]))
      expect(readers.length).toBeGreaterThan(0)
      for (const i of readers) expect(position.get(i)! >= next.start).toBe(true)
      expect(c.outputs[1]).toBe(`present.${n}.key`)
      expect(c.outputs[2]).toBe(`present.${n}.value`)
    }
  })
})

describe("a model without scopes", () => {
  const build = () => {
    const b = OnnxBuilder.make({ opset: 14 })
    const x = b.input("x", "float32", [2, 3])
    const a = b.node("Relu", [x], { name: "a" })
    const w = b.initializer("w", "float32", [3, 2], Float32Array.of(1, 2, 3, 4, 5, 6))
    const m = b.node("MatMul", [a, w], { name: "b" })
    const y = b.node("Neg", [m], { name: "c" })
    b.output(y, "float32", [2, 2])
    return { model: b.build(), y }
  }

  it("gets a flat tree: the root holds every node", () => {
    const { model, y } = build()
    const tree = Loaded.fromModel(model).tree
    expect(tree.root.children).toEqual([])
    expect(ModuleTree.paths(tree)).toEqual([])
    expect(tree.root.calls).toEqual([{ start: 0, end: 3, inputs: ["x"], outputs: [y] }])
    expect([...tree.order].sort()).toEqual([0, 1, 2])
  })

  it("still runs and traces", async () => {
    const { model, y } = build()
    const net = await NNsight.load(Onnx.encode(model))
    try {
      const x = Tensor.from([[1, -1, 2], [-3, 0, 1]], "float32")
      // relu(x) @ w, negated: [1, 0, 2] -> -[11, 14]; [0, 0, 1] -> -[5, 6]
      const out = await net.run(x)
      expect(Object.keys(out)).toEqual([y])
      expect([...(out[y].data as Float32Array)]).toEqual([-11, -14, -5, -6])
      const traced = await net.trace(x, (m) => ({ input: m.input, output: m.output }))
      expect([...(traced.input.data as Float32Array)]).toEqual([1, -1, 2, -3, 0, 1])
      expect([...(traced.output.data as Float32Array)]).toEqual([-11, -14, -5, -6])
    } finally {
      await net.close()
    }
  })
})

// Each reference hook: a trace reads the module call's first input and output
// (`output[0]` of a PyTorch tuple), compared with PyTorch within 1e-4.
const TOLERANCE = 1e-4
const walk = (m: unknown, p: string): any => p.split(".").reduce((e: any, k) => e[k], m)

describe.each(["tiny_mlp", "twice", "tiny_gpt2", "llama_tiny", "stories260K"] as const)("hook values of %s equal PyTorch's", (name) => {
  const ref = refOf(name)
  const tree = loadedOf(name).tree
  let net: NNsight
  let inputs: Record<string, Tensor>
  beforeAll(async () => {
    net = await NNsight.load(onnxPath(name))
    inputs = inputsOf(name)
  })
  afterAll(async () => {
    await net?.close()
  })

  const label = (h: RefHook) => `${h.module} call ${h.call}`
  const inTree = ref.hooks.filter((h) => ModuleTree.find(tree, h.module) !== undefined)
  const absent = ref.hooks.filter((h) => ModuleTree.find(tree, h.module) === undefined)

  if (inTree.length > 0) {
    it.each(inTree.map((h) => [label(h), h] as const))("%s", async (_, h) => {
      const out = await net.trace(inputs, (m) => {
        let e = walk(m, h.module)
        for (let k = 0; k < h.call; k++) e = e.next()
        return { input: e.input, output: e.output, outputs: e.outputs }
      })
      // llama's rotary_emb(x, position_ids) reads x for its dtype only, so the
      // graph has no x there: its first ONNX input is position_ids, PyTorch's input[1].
      const expectedInput = h.module === "model.rotary_emb" ? h.input[1] : h.input[0]
      expectClose("input", out.input, expectedInput, TOLERANCE)
      expectClose("output", out.output, h.output[0], TOLERANCE)
      // stories260K's layers and attention also give present key/value as outputs 1 and 2.
      if (name === "stories260K") {
        expect(out.outputs.length).toBeGreaterThanOrEqual(h.output.length)
        h.output.forEach((t, k) => expectClose(`outputs[${k}]`, out.outputs[k], t, TOLERANCE))
      }
    })
  }

  if (absent.length > 0) {
    // Dropout in eval mode exports no node: no module to hook, and nothing lost,
    // since its output is its input (the previous module's output).
    it.each(absent.map((h) => [label(h), h] as const))("%s (node-less Dropout: not in the tree)", async (_, h) => {
      expect(ref.module_types[h.module]).toBe("Dropout")
      expect(h.output[0]).toEqual(h.input[0])
      await expect(net.trace(inputs, (m) => walk(m, h.module).output)).rejects.toMatchObject({ _tag: "UnknownModule" })
    })
  }
})
