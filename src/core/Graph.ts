/**
 * The intervention graph: what a trace records, as plain immutable data.
 *
 * A trace's builder callback runs once and records nodes; nothing executes
 * then. Interpreters (local onnxruntime, scan, remote) fold the graph. Nodes
 * refer to earlier nodes by `id` (their index), so the node list is always in
 * a valid execution order. Every node carries the `site` (file:line:column)
 * of the user code that recorded it, for error messages.
 *
 * @example
 * import * as Graph from "nnsight-ts/Graph"
 * const json = Graph.encode(graph)           // lossless JSON
 * Graph.equals(Graph.decode(json), graph)    // true
 * console.log(Graph.format(graph))
 *
 * @since 0.1.0
 */
import { createHash } from "node:crypto"
import { Schema } from "effect"
import * as Ops from "./Ops.js"

const Site = Schema.String

/**
 * Which tensor of a module call a hook names: the `index`-th input or output
 * of call `call` of the module at `module` (dotted path, "" for the model),
 * restricted to the batch rows of invoke `invoke`.
 *
 * @since 0.1.0
 */
export const HookRef = Schema.Struct({
  module: Schema.String,
  call: Schema.Number,
  invoke: Schema.Number,
  point: Schema.Literals(["input", "output"]),
  index: Schema.Number
})

/**
 * @since 0.1.0
 */
export type HookRef = typeof HookRef.Type

/**
 * A tensor literal, JSON-safe: dtype, shape and the little-endian bytes of its
 * elements in base64 (strings: the JSON array of them).
 *
 * @since 0.1.0
 */
export const Literal = Schema.Struct({
  dtype: Schema.String,
  shape: Schema.Array(Schema.Number),
  data: Schema.String
})

/**
 * @since 0.1.0
 */
export type Literal = typeof Literal.Type

/**
 * Reads a module's input or output tensor (nnsight's `.input` / `.output`).
 *
 * @since 0.1.0
 */
export const Hook = Schema.TaggedStruct("Hook", { id: Schema.Number, site: Site, ref: HookRef })

/**
 * A constant tensor given by the user.
 *
 * @since 0.1.0
 */
export const Constant = Schema.TaggedStruct("Constant", { id: Schema.Number, site: Site, value: Literal })

/**
 * A JavaScript number or boolean used as an operand. It takes the dtype of the
 * tensor it meets, as Python scalars do in PyTorch (`x * 2` stays float32).
 *
 * @since 0.1.0
 */
export const Scalar = Schema.TaggedStruct("Scalar", {
  id: Schema.Number,
  site: Site,
  value: Schema.Union([Schema.Number, Schema.Boolean])
})

/**
 * A tensor operation from the ONNX-based vocabulary of `Ops`.
 *
 * @since 0.1.0
 */
export const Op = Schema.TaggedStruct("Op", {
  id: Schema.Number,
  site: Site,
  op: Schema.Literals(Ops.names),
  args: Schema.Array(Schema.Number),
  attrs: Schema.Record(Schema.String, Schema.Json)
})

/**
 * Replaces a module's input or output tensor with a value (nnsight's swap).
 *
 * @since 0.1.0
 */
export const Set = Schema.TaggedStruct("Set", { id: Schema.Number, site: Site, ref: HookRef, value: Schema.Number })

/**
 * Runs a module call ad hoc on new inputs (`envoy.call(x)`), giving its first output.
 *
 * @since 0.1.0
 */
export const Apply = Schema.TaggedStruct("Apply", {
  id: Schema.Number,
  site: Site,
  module: Schema.String,
  call: Schema.Number,
  invoke: Schema.Number,
  args: Schema.Array(Schema.Number)
})

/**
 * A module's parameter (`envoy.weight`), in PyTorch's layout.
 *
 * @since 0.1.0
 */
export const Param = Schema.TaggedStruct("Param", {
  id: Schema.Number,
  site: Site,
  module: Schema.String,
  name: Schema.String
})

/**
 * Stops the model's forward pass once every earlier node has run.
 *
 * @since 0.1.0
 */
export const Stop = Schema.TaggedStruct("Stop", { id: Schema.Number, site: Site })

/**
 * The token ids a generation produced (prompt included), for an invoke's rows
 * (nnsight's `model.generator.output`).
 *
 * @since 0.1.0
 */
export const Generated = Schema.TaggedStruct("Generated", { id: Schema.Number, site: Site, invoke: Schema.Number })

/**
 * Any node.
 *
 * @since 0.1.0
 */
export const Node = Schema.Union([Hook, Constant, Scalar, Op, Set, Apply, Param, Stop, Generated])

/**
 * @since 0.1.0
 */
export type Node = typeof Node.Type

/**
 * What a trace returns, with node references where values will be.
 *
 * @since 0.1.0
 */
export type Result =
  | { readonly _tag: "Ref"; readonly id: number }
  | { readonly _tag: "Record"; readonly fields: { readonly [k: string]: Result } }
  | { readonly _tag: "List"; readonly items: ReadonlyArray<Result> }
  | { readonly _tag: "Steps"; readonly items: ReadonlyArray<Result> }
  | { readonly _tag: "Value"; readonly value: Schema.Json }

/**
 * Schema of {@link Result}.
 *
 * @since 0.1.0
 */
export const Result: Schema.Codec<Result> = Schema.Union([
  Schema.TaggedStruct("Ref", { id: Schema.Number }),
  Schema.TaggedStruct("Record", { fields: Schema.Record(Schema.String, Schema.suspend(() => Result)) }),
  Schema.TaggedStruct("List", { items: Schema.Array(Schema.suspend(() => Result)) }),
  // one item per generation step; steps that did not run are left out
  Schema.TaggedStruct("Steps", { items: Schema.Array(Schema.suspend(() => Result)) }),
  Schema.TaggedStruct("Value", { value: Schema.Json })
])

/**
 * A whole trace: its nodes, how many invokes it batches, and its result.
 *
 * @since 0.1.0
 */
export const Graph = Schema.Struct({
  nodes: Schema.Array(Node),
  invokes: Schema.Number,
  result: Result
})

/**
 * @since 0.1.0
 */
export type Graph = typeof Graph.Type

/**
 * The graph as JSON-safe data.
 *
 * @example
 * JSON.stringify(Graph.encode(graph))
 *
 * @since 0.1.0
 */
export const encode = (graph: Graph): unknown => Schema.encodeSync(Graph)(graph)

/**
 * Decodes (and validates) a graph from JSON-safe data.
 *
 * @example
 * Graph.decode(JSON.parse(text))
 *
 * @since 0.1.0
 */
export const decode = (u: unknown): Graph => Schema.decodeUnknownSync(Graph)(u)

/**
 * Nodes referenced by a node (its dependencies).
 *
 * @example
 * Graph.dependencies(node) // [3, 4]
 *
 * @since 0.1.0
 */
export const dependencies = (node: Node): ReadonlyArray<number> => {
  switch (node._tag) {
    case "Hook":
    case "Constant":
    case "Scalar":
    case "Param":
    case "Stop":
    case "Generated":
      return []
    case "Op":
    case "Apply":
      return node.args
    case "Set":
      return [node.value]
  }
}

/**
 * References of a result, in order.
 *
 * @since 0.1.0
 */
export const resultRefs = (result: Result): ReadonlyArray<number> => {
  switch (result._tag) {
    case "Ref":
      return [result.id]
    case "Record":
      return Object.values(result.fields).flatMap(resultRefs)
    case "List":
    case "Steps":
      return result.items.flatMap(resultRefs)
    case "Value":
      return []
  }
}

const hookLabel = (ref: HookRef): string =>
  `${ref.module === "" ? "<model>" : ref.module}.${ref.point}${ref.index === 0 ? "" : `[${ref.index}]`}` +
  `${ref.call === 0 ? "" : `@call${ref.call}`}${ref.invoke === 0 ? "" : `#${ref.invoke}`}`

/**
 * One line describing a node, e.g. `%3 = Mul(%1, %2)`.
 *
 * @since 0.1.0
 */
export const label = (node: Node): string => {
  switch (node._tag) {
    case "Hook":
      return `%${node.id} = ${hookLabel(node.ref)}`
    case "Constant":
      return `%${node.id} = Constant<${node.value.dtype}[${node.value.shape.join(",")}]>`
    case "Scalar":
      return `%${node.id} = ${String(node.value)}`
    case "Op": {
      const attrs = Object.entries(node.attrs)
      const a = attrs.length === 0 ? "" : `{${attrs.map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ")}}`
      return `%${node.id} = ${node.op}${a}(${node.args.map((x) => `%${x}`).join(", ")})`
    }
    case "Set":
      return `%${node.id} = set ${hookLabel(node.ref)} := %${node.value}`
    case "Apply":
      return `%${node.id} = ${node.module}${node.call === 0 ? "" : `@call${node.call}`}(${node.args.map((x) => `%${x}`).join(", ")})`
    case "Param":
      return `%${node.id} = ${node.module === "" ? "" : node.module + "."}${node.name}`
    case "Stop":
      return `%${node.id} = stop`
    case "Generated":
      return `%${node.id} = generator.output${node.invoke === 0 ? "" : `#${node.invoke}`}`
  }
}

/**
 * A readable listing of the graph, one node a line, with its user site.
 *
 * @example
 * console.log(Graph.format(graph))
 * // %0 = model.layers.1.output
 * // %1 = Mul(%0, %2)            at demo.ts:12:5
 *
 * @since 0.1.0
 */
export const format = (graph: Graph): string => {
  const lines = graph.nodes.map((n) => {
    const l = label(n)
    return n.site === "" ? l : `${l.padEnd(48)} at ${n.site}`
  })
  const refs = resultRefs(graph.result)
  lines.push(`return ${refs.map((r) => `%${r}`).join(", ")}`)
  return lines.join("\n")
}

const stripSites = (u: unknown): unknown => {
  if (Array.isArray(u)) return u.map(stripSites)
  if (u !== null && typeof u === "object") {
    const out: Record<string, unknown> = {}
    for (const k of Object.keys(u).sort()) if (k !== "site") out[k] = stripSites((u as Record<string, unknown>)[k])
    return out
  }
  return u
}

/**
 * A structural hash: equal for graphs that do the same thing, whatever lines
 * of code recorded them (sites are left out).
 *
 * @example
 * Graph.hash(a) === Graph.hash(b)
 *
 * @since 0.1.0
 */
export const hash = (graph: Graph): string =>
  createHash("sha256").update(JSON.stringify(stripSites(encode(graph)))).digest("hex")

/**
 * Structural equality (sites included).
 *
 * @since 0.1.0
 */
export const equals = (a: Graph, b: Graph): boolean => JSON.stringify(encode(a)) === JSON.stringify(encode(b))
