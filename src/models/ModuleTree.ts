/**
 * The module tree of an ONNX model, recovered from the node-name scopes that
 * PyTorch's exporter writes (`/model/layers.0/self_attn/q_proj/MatMul`), and
 * each module's hook points.
 *
 * Hook-point order (a contract the rest of nnsight-ts relies on):
 * - **inputs** of a module call are the tensors its nodes consume that are
 *   produced outside it (graph inputs included, parameters excluded), ordered
 *   by first use in the exporter's node order, which is the order the PyTorch
 *   `forward` touched them; shape-only tensors (derived from `Shape` and
 *   constants alone) come last. So `inputs[0]` is the main activation: the
 *   residual stream of a decoder layer, not its cos/sin or mask.
 * - **outputs** are the tensors it produces that only nodes outside it
 *   consume, in production order; then those that are only graph outputs
 *   (KV-cache `present` tensors); then those it also uses itself (shared
 *   intermediates); shape-only tensors last. So `outputs[0]` continues the
 *   forward path, as `module.output[0]` does in PyTorch.
 *
 * Nodes without a scope (exporter `Constant`s and `Identity`s) belong to the
 * innermost module that contains all their consumers. A model without scopes
 * gets a flat tree: a root module holding every node.
 *
 * @example
 * import * as ModuleTree from "./ModuleTree.js"
 * const tree = ModuleTree.build(model.graph)
 * ModuleTree.find(tree, "model.layers.0")?.calls[0].outputs[0]
 * console.log(ModuleTree.format(tree))
 *
 * @since 0.1.0
 */
import * as Describe from "./Describe.js"
import * as Linearize from "./Linearize.js"

/**
 * The parts of an ONNX graph the module tree reads. `Onnx.Graph` satisfies it.
 *
 * @since 0.1.0
 */
export interface GraphLike {
  readonly nodes: ReadonlyArray<NodeLike>
  readonly inputs: ReadonlyArray<{ readonly name: string }>
  readonly outputs: ReadonlyArray<{ readonly name: string }>
  readonly initializers: ReadonlyArray<{ readonly name: string; readonly dims: ReadonlyArray<number | bigint> }>
}

/**
 * The parts of an ONNX node the module tree reads.
 *
 * @since 0.1.0
 */
export interface NodeLike {
  readonly name: string
  readonly opType: string
  readonly inputs: ReadonlyArray<string>
  readonly outputs: ReadonlyArray<string>
}

/**
 * One call of a module: its nodes (positions in the linear order, a
 * contiguous range `[start, end)`), and its hook points.
 *
 * @since 0.1.0
 */
export interface Call {
  readonly start: number
  readonly end: number
  readonly inputs: ReadonlyArray<string>
  readonly outputs: ReadonlyArray<string>
}

/**
 * A parameter of a module: an initializer consumed by the module's own nodes.
 * `transposed` is set when the exporter stored a `Linear` weight as `[in, out]`
 * (PyTorch keeps `[out, in]`).
 *
 * @since 0.1.0
 */
export interface Parameter {
  readonly name: string
  readonly initializer: string
  readonly transposed: boolean
}

/**
 * A module of the tree.
 *
 * @since 0.1.0
 */
export interface Module {
  /** Dotted path as PyTorch's `named_modules()` writes it ("" for the root). */
  readonly path: string
  /** The last part of the path (`"q_proj"`, `"0"`). */
  readonly name: string
  /** Class name, inferred from the module's operators or given by the loader. */
  readonly type: string
  /** The arguments PyTorch's repr shows in parentheses (`in_features=64, ...`). */
  readonly extra: string
  readonly children: ReadonlyArray<Module>
  readonly calls: ReadonlyArray<Call>
  readonly parameters: ReadonlyArray<Parameter>
}

/**
 * A module tree, with the linear node order its calls refer to.
 *
 * @since 0.1.0
 */
export interface Tree {
  readonly root: Module
  /** `order[i]` is the index in `graph.nodes` of the i-th node in linear order. */
  readonly order: ReadonlyArray<number>
  /** Every module by path. */
  readonly modules: ReadonlyMap<string, Module>
}

/**
 * Options of {@link build}.
 *
 * @since 0.1.0
 */
export interface Options {
  /** Class names by module path, overriding the inferred ones (e.g. from config.json). */
  readonly typeNames?: (path: string, inferred: string) => string
}

/**
 * The module path a node name's scope gives, or `undefined` when it has none.
 * Repeated calls of a module appear as `name_1`, `name_2` scopes; they are
 * returned with a call index.
 *
 * @example
 * ModuleTree.scopeOf("/model/layers.0/self_attn/q_proj/MatMul")
 * // ["model", "layers", "0", "self_attn", "q_proj"]
 *
 * @since 0.1.0
 */
export const scopeOf = (nodeName: string): ReadonlyArray<string> | undefined => {
  if (!nodeName.startsWith("/")) return undefined
  const parts = nodeName.split("/").slice(1, -1)
  const path: Array<string> = []
  for (const part of parts) {
    if (part === "") continue
    for (const p of part.split(".")) if (p !== "") path.push(p)
  }
  return path
}

const joinPath = (parts: ReadonlyArray<string>): string => parts.join(".")

/** Scope parts as the exporter wrote them (`layers.0` stays one part). */
const rawScopeOf = (nodeName: string): ReadonlyArray<string> | undefined =>
  nodeName.startsWith("/") ? nodeName.split("/").slice(1, -1).filter((p) => p !== "") : undefined

interface RawModule {
  readonly part: string
  readonly children: Array<RawModule>
  readonly childIndex: Map<string, RawModule>
  /** Node indices (into graph.nodes) of this scope's own nodes. */
  readonly own: Array<number>
}

const newRaw = (part: string): RawModule => ({ part, children: [], childIndex: new Map(), own: [] })

/** A logical module: one PyTorch module, with one raw scope per call. */
interface Logical {
  readonly name: string
  readonly path: string
  readonly instances: Array<RawModule>
  readonly children: Array<Logical>
  readonly byName: Map<string, Logical>
}

const childOf = (parent: Logical, name: string): Logical => {
  let child = parent.byName.get(name)
  if (child === undefined) {
    child = { name, path: parent.path === "" ? name : `${parent.path}.${name}`, instances: [], children: [], byName: new Map() }
    parent.byName.set(name, child)
    parent.children.push(child)
  }
  return child
}

const commonPrefix = (a: ReadonlyArray<string>, b: ReadonlyArray<string>): ReadonlyArray<string> => {
  let i = 0
  while (i < a.length && i < b.length && a[i] === b[i]) i++
  return a.slice(0, i)
}

const subtreeNodes = (m: RawModule): Array<number> => {
  const out = [...m.own]
  for (const c of m.children) out.push(...subtreeNodes(c))
  return out
}

/**
 * Whether a tensor is computed from shapes and constants only. Such tensors
 * (sequence lengths, reshape targets) are bookkeeping, not activations.
 */
const shapeOnlyTensors = (graph: GraphLike): ReadonlySet<string> => {
  const result = new Set<string>()
  for (const node of graph.nodes) {
    const isSource = node.opType === "Shape" || node.opType === "Constant" || node.opType === "Size"
    const fromShapes = node.inputs.length > 0 && node.inputs.every((i) => i === "" || result.has(i))
    if (isSource || fromShapes) for (const o of node.outputs) result.add(o)
  }
  return result
}

/**
 * Builds the module tree of a graph.
 *
 * A module PyTorch called k times appears in the exporter's scopes as
 * `name`, `name_1`, ..., `name_{k-1}`; such scopes are merged into one module
 * with k calls when they share parameters, or, having none, run the same
 * operators.
 *
 * @example
 * const tree = ModuleTree.build(Onnx.decode(bytes).graph)
 * tree.root.children.map((m) => m.name) // ["model", "lm_head"]
 *
 * @since 0.1.0
 */
export const build = (graph: GraphLike, options: Options = {}): Tree => {
  const nodes = graph.nodes
  const producer = new Map<string, number>()
  const consumers = new Map<string, Array<number>>()
  nodes.forEach((node, i) => {
    for (const o of node.outputs) if (o !== "") producer.set(o, i)
    for (const inp of node.inputs) {
      if (inp === "") continue
      let list = consumers.get(inp)
      if (list === undefined) consumers.set(inp, (list = []))
      list.push(i)
    }
  })
  const initializers = new Map(graph.initializers.map((t) => [t.name, t]))

  // Raw scopes: scoped nodes from their names; unscoped ones from their
  // consumers, visited in reverse so a chain of unscoped nodes resolves.
  const scopes: Array<ReadonlyArray<string> | undefined> = nodes.map((n) => rawScopeOf(n.name))
  for (let i = nodes.length - 1; i >= 0; i--) {
    if (scopes[i] !== undefined) continue
    let scope: ReadonlyArray<string> | undefined
    for (const o of nodes[i].outputs) {
      for (const c of consumers.get(o) ?? []) {
        const s = scopes[c] ?? []
        scope = scope === undefined ? s : commonPrefix(scope, s)
      }
    }
    scopes[i] = scope ?? []
  }
  const rawRoot = newRaw("")
  nodes.forEach((_, i) => {
    let m = rawRoot
    for (const part of scopes[i]!) {
      let child = m.childIndex.get(part)
      if (child === undefined) {
        child = newRaw(part)
        m.childIndex.set(part, child)
        m.children.push(child)
      }
      m = child
    }
    m.own.push(i)
  })

  const order = Linearize.contiguous(nodes, rawRoot)
  const position = new Int32Array(nodes.length)
  order.forEach((nodeIndex, pos) => (position[nodeIndex] = pos))
  const graphOutputs = new Set(graph.outputs.map((o) => o.name))
  const shapeOnly = shapeOnlyTensors(graph)

  const signature = (raw: RawModule) => {
    const sub = subtreeNodes(raw)
    return {
      params: new Set(sub.flatMap((i) => nodes[i].inputs.filter((t) => initializers.has(t)))),
      ops: sub.map((i) => nodes[i].opType).sort().join(",")
    }
  }
  const sameModule = (a: RawModule, b: RawModule) => {
    const sa = signature(a)
    const sb = signature(b)
    if (sa.params.size > 0 || sb.params.size > 0) return [...sb.params].some((t) => sa.params.has(t))
    return sa.ops === sb.ops
  }

  // Merge raw scopes into logical modules: `layers.0` becomes the container
  // `layers` (a ModuleList, never called itself) holding `0`, and `name_k`
  // scopes become further calls of `name`.
  const place = (parent: Logical, raw: RawModule) => {
    const parts = raw.part.split(".").filter((p) => p !== "")
    let target = parent
    for (const p of parts.slice(0, -1)) target = childOf(target, p)
    const last = parts[parts.length - 1]
    const repeated = /^(.*)_(\d+)$/.exec(last)
    const base = repeated ? target.byName.get(repeated[1]) : undefined
    if (base !== undefined && base.instances.length > 0 && !target.byName.has(last) && sameModule(base.instances[0], raw)) {
      base.instances.push(raw)
      return
    }
    childOf(target, last).instances.push(raw)
  }
  const expand = (logical: Logical) => {
    for (const inst of logical.instances) for (const raw of inst.children) place(logical, raw)
    logical.children.forEach(expand)
  }
  const logicalRoot: Logical = { name: "", path: "", instances: [rawRoot], children: [], byName: new Map() }
  expand(logicalRoot)

  const hookPoints = (raw: RawModule): Call | undefined => {
    const subtree = subtreeNodes(raw)
    if (subtree.length === 0) return undefined
    const inside = new Set(subtree)
    const byOriginal = subtree.sort((a, b) => a - b)
    let start = Infinity
    let end = -Infinity
    for (const i of subtree) {
      start = Math.min(start, position[i])
      end = Math.max(end, position[i] + 1)
    }
    const inputs: Array<string> = []
    const seen = new Set<string>()
    for (const i of byOriginal) {
      for (const t of nodes[i].inputs) {
        if (t === "" || seen.has(t) || initializers.has(t)) continue
        const p = producer.get(t)
        if (p !== undefined && inside.has(p)) continue
        seen.add(t)
        inputs.push(t)
      }
    }
    const consumedOutside: Array<string> = []
    const onlyGraphOutput: Array<string> = []
    const alsoInside: Array<string> = []
    for (const i of byOriginal) {
      for (const t of nodes[i].outputs) {
        if (t === "") continue
        const uses = consumers.get(t) ?? []
        if (uses.some((c) => !inside.has(c))) (uses.some((c) => inside.has(c)) ? alsoInside : consumedOutside).push(t)
        else if (graphOutputs.has(t)) onlyGraphOutput.push(t)
      }
    }
    // a tensor the module still uses itself is an intermediate the exporter
    // shared (a cast of the input, rotary cos/sin), not what it returns
    onlyGraphOutput.push(...alsoInside)
    const shapeOnlyLast = (list: ReadonlyArray<string>) => [
      ...list.filter((t) => !shapeOnly.has(t)),
      ...list.filter((t) => shapeOnly.has(t))
    ]
    return { start, end, inputs: shapeOnlyLast(inputs), outputs: shapeOnlyLast([...consumedOutside, ...onlyGraphOutput]) }
  }

  const freeze = (m: Logical): Module => {
    const children = m.children.map(freeze)
    const calls =
      m.path === ""
        ? [{
          start: 0,
          end: nodes.length,
          inputs: graph.inputs.filter((i) => !initializers.has(i.name)).map((i) => i.name),
          outputs: graph.outputs.map((o) => o.name)
        }]
        : m.instances.flatMap((raw) => hookPoints(raw) ?? [])
    const own = (m.instances[0]?.own ?? []).map((i) => nodes[i])
    const { type, extra, parameters } = Describe.infer(m.path, own, children, initializers)
    const finalType = options.typeNames ? options.typeNames(m.path, type) : type
    return { path: m.path, name: m.name, type: finalType, extra, children, calls, parameters }
  }

  const root = freeze(logicalRoot)
  const modules = new Map<string, Module>()
  const index = (m: Module) => {
    modules.set(m.path, m)
    m.children.forEach(index)
  }
  index(root)
  return { root, order, modules }
}

/**
 * The module at a dotted path, if any.
 *
 * @example
 * ModuleTree.find(tree, "model.layers.0.mlp")
 *
 * @since 0.1.0
 */
export const find = (tree: Tree, path: string): Module | undefined => tree.modules.get(path)

/**
 * Every module path, pre-order, children in the order the forward pass first
 * calls them (PyTorch's `named_modules()` uses registration order, which ONNX
 * does not keep), root excluded.
 *
 * @since 0.1.0
 */
export const paths = (tree: Tree): ReadonlyArray<string> => {
  const out: Array<string> = []
  const walk = (m: Module) => {
    if (m.path !== "") out.push(m.path)
    m.children.forEach(walk)
  }
  walk(tree.root)
  return out
}

/**
 * Prints the tree as PyTorch's `print(model)` does, folding runs of
 * identical ModuleList children as `(0-4): 5 x Block(...)`.
 *
 * @example
 * console.log(ModuleTree.format(tree))
 * // LlamaForCausalLM(
 * //   (model): LlamaModel(
 * //     (embed_tokens): Embedding(512, 64)
 * // ...
 *
 * @since 0.1.0
 */
export const format = (tree: Tree): string => formatModule(tree.root)

const formatModule = (m: Module): string => {
  if (m.children.length === 0) return `${m.type}(${m.extra})`
  const lines: Array<string> = []
  const reprs = m.children.map(formatModule)
  const numeric = m.children.every((c) => /^\d+$/.test(c.name))
  let i = 0
  while (i < m.children.length) {
    let j = i + 1
    if (numeric) while (j < m.children.length && reprs[j] === reprs[i]) j++
    const label = j - i > 1 ? `(${m.children[i].name}-${m.children[j - 1].name}): ${j - i} x ` : `(${m.children[i].name}): `
    lines.push(indent(label + reprs[i]))
    i = j
  }
  const head = m.extra === "" ? `${m.type}(` : `${m.type}(\n  ${m.extra}`
  return `${head}\n${lines.join("\n")}\n)`
}

const indent = (s: string): string =>
  s
    .split("\n")
    .map((l) => "  " + l)
    .join("\n")
