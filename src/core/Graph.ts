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
 * A JSON value living in the graph: a number, string, list... (nnsight's
 * builtins), e.g. a prompt, a loop's items, a counter.
 *
 * @since 0.1.0
 */
export const Value = Schema.TaggedStruct("Value", { id: Schema.Number, site: Site, value: Schema.Json })

/**
 * A new mutable list (`s.list()`), with initial items.
 *
 * @since 0.1.0
 */
export const ListNew = Schema.TaggedStruct("ListNew", { id: Schema.Number, site: Site, items: Schema.Array(Schema.Number) })

/**
 * A new mutable dictionary (`s.dict()`).
 *
 * @since 0.1.0
 */
export const DictNew = Schema.TaggedStruct("DictNew", { id: Schema.Number, site: Site })

/**
 * Appends a value to a list (`list.append(x)`); a dictionary entry when `key` is set.
 *
 * @since 0.1.0
 */
export const Append = Schema.TaggedStruct("Append", {
  id: Schema.Number,
  site: Site,
  target: Schema.Number,
  value: Schema.Number,
  key: Schema.NullOr(Schema.String)
})

/**
 * Gives a variable a new value (`v.set(x)`): nodes recorded after it that
 * read `target` see `value`; nodes recorded before it still see the old one.
 * Variables live across a session's traces and loop passes (weights being
 * trained, running totals).
 *
 * @since 0.1.0
 */
export const Assign = Schema.TaggedStruct("Assign", { id: Schema.Number, site: Site, target: Schema.Number, value: Schema.Number })

/**
 * Runs a local TypeScript function on values (`apply(fn, ...args)`); `fn`
 * indexes the recording's function table, which never crosses the wire.
 *
 * @since 0.1.0
 */
export const Call = Schema.TaggedStruct("Call", { id: Schema.Number, site: Site, fn: Schema.Number, args: Schema.Array(Schema.Number) })

/**
 * Prints values when the graph runs (`log(...)`).
 *
 * @since 0.1.0
 */
export const Log = Schema.TaggedStruct("Log", { id: Schema.Number, site: Site, args: Schema.Array(Schema.Number) })

/**
 * The gradient of a node's value (a module input/output read, a parameter,
 * or a value the interventions use, such as a session variable) in the
 * first `Backward` recorded after this node.
 *
 * @since 0.1.0
 */
export const Grad = Schema.TaggedStruct("Grad", { id: Schema.Number, site: Site, of: Schema.Number })

/**
 * Replaces the gradient of a node's value in the next `Backward`: what flows
 * further back is the new value.
 *
 * @since 0.1.0
 */
export const SetGrad = Schema.TaggedStruct("SetGrad", { id: Schema.Number, site: Site, of: Schema.Number, value: Schema.Number })

/**
 * Back-propagates from a value (its gradient seeded with ones) through the
 * interventions and the model, once the forward pass is done.
 *
 * @since 0.1.0
 */
export const Backward = Schema.TaggedStruct("Backward", { id: Schema.Number, site: Site, loss: Schema.Number })

/**
 * Runs `then` when the predicate holds (a true JS value, or a tensor whose
 * elements are all true), else `otherwise`.
 *
 * @since 0.1.0
 */
export interface Cond {
  readonly _tag: "Cond"
  readonly id: number
  readonly site: string
  readonly predicate: number
  readonly then: ReadonlyArray<Node>
  readonly otherwise: ReadonlyArray<Node>
}

/**
 * Runs `body` once per item of `over` (a list, or a tensor's rows); inside
 * the body, the node `id` is the current item. `Stop` in the body ends the loop.
 *
 * @since 0.1.0
 */
export interface Iter {
  readonly _tag: "Iter"
  readonly id: number
  readonly site: string
  readonly over: number
  readonly body: ReadonlyArray<Node>
}

/**
 * A trace inside a session: one forward pass of the model over the inputs of
 * its invokes (node ids), with `body` interleaved. `steps` > 1 makes it a generation.
 *
 * @since 0.1.0
 */
export interface Trace {
  readonly _tag: "Trace"
  readonly id: number
  readonly site: string
  readonly inputs: ReadonlyArray<number>
  readonly steps: number
  readonly options: Schema.Json
  readonly body: ReadonlyArray<Node>
}

const Cond: Schema.Codec<Cond> = Schema.TaggedStruct("Cond", {
  id: Schema.Number,
  site: Site,
  predicate: Schema.Number,
  then: Schema.Array(Schema.suspend((): Schema.Codec<Node> => Node)),
  otherwise: Schema.Array(Schema.suspend((): Schema.Codec<Node> => Node))
})

const Iter: Schema.Codec<Iter> = Schema.TaggedStruct("Iter", {
  id: Schema.Number,
  site: Site,
  over: Schema.Number,
  body: Schema.Array(Schema.suspend((): Schema.Codec<Node> => Node))
})

const Trace: Schema.Codec<Trace> = Schema.TaggedStruct("Trace", {
  id: Schema.Number,
  site: Site,
  inputs: Schema.Array(Schema.Number),
  steps: Schema.Number,
  options: Schema.Json,
  body: Schema.Array(Schema.suspend((): Schema.Codec<Node> => Node))
})

/**
 * Any node.
 *
 * @since 0.1.0
 */
export type Node =
  | typeof Hook.Type
  | typeof Constant.Type
  | typeof Scalar.Type
  | typeof Op.Type
  | typeof Set.Type
  | typeof Apply.Type
  | typeof Param.Type
  | typeof Stop.Type
  | typeof Generated.Type
  | typeof Value.Type
  | typeof ListNew.Type
  | typeof DictNew.Type
  | typeof Append.Type
  | typeof Assign.Type
  | typeof Call.Type
  | typeof Log.Type
  | typeof Grad.Type
  | typeof SetGrad.Type
  | typeof Backward.Type
  | Cond
  | Iter
  | Trace

/**
 * Schema of {@link Node}.
 *
 * @since 0.1.0
 */
export const Node: Schema.Codec<Node> = Schema.Union([
  Hook,
  Constant,
  Scalar,
  Op,
  Set,
  Apply,
  Param,
  Stop,
  Generated,
  Value,
  ListNew,
  DictNew,
  Append,
  Assign,
  Call,
  Log,
  Grad,
  SetGrad,
  Backward,
  Cond,
  Iter,
  Trace
])

/**
 * Every node of a node list, nested bodies included, in order.
 *
 * @example
 * Graph.flatten(graph.nodes).length
 *
 * @since 0.1.0
 */
export const flatten = (nodes: ReadonlyArray<Node>): ReadonlyArray<Node> => {
  const out: Array<Node> = []
  const walk = (list: ReadonlyArray<Node>) => {
    for (const n of list) {
      out.push(n)
      switch (n._tag) {
        case "Cond":
          walk(n.then)
          walk(n.otherwise)
          break
        case "Iter":
        case "Trace":
          walk(n.body)
          break
        default:
          break
      }
    }
  }
  walk(nodes)
  return out
}

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
export interface Graph {
  readonly nodes: ReadonlyArray<Node>
  readonly invokes: number
  readonly result: Result
}

/**
 * Schema of {@link Graph}.
 *
 * @since 0.1.0
 */
export const Graph: Schema.Codec<Graph> = Schema.Struct({
  nodes: Schema.Array(Node),
  invokes: Schema.Number,
  result: Result
})

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
    case "Value":
    case "DictNew":
      return []
    case "Op":
    case "Apply":
    case "Call":
    case "Log":
      return node.args
    case "Set":
      return [node.value]
    case "ListNew":
      return node.items
    case "Append":
    case "Assign":
      return [node.target, node.value]
    case "Grad":
      return [node.of]
    case "SetGrad":
      return [node.of, node.value]
    case "Backward":
      return [node.loss]
    case "Cond":
      return [node.predicate]
    case "Iter":
      return [node.over]
    case "Trace":
      return node.inputs
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
    case "Value":
      return `%${node.id} = ${JSON.stringify(node.value)}`
    case "ListNew":
      return `%${node.id} = list(${node.items.map((x) => `%${x}`).join(", ")})`
    case "DictNew":
      return `%${node.id} = dict()`
    case "Append":
      return `%${node.id} = %${node.target}${node.key === null ? ".append" : `[${JSON.stringify(node.key)}] =`}(%${node.value})`
    case "Assign":
      return `%${node.id} = %${node.target} := %${node.value}`
    case "Call":
      return `%${node.id} = apply(fn#${node.fn}${node.args.map((x) => `, %${x}`).join("")})`
    case "Log":
      return `%${node.id} = log(${node.args.map((x) => `%${x}`).join(", ")})`
    case "Grad":
      return `%${node.id} = %${node.of}.grad`
    case "SetGrad":
      return `%${node.id} = %${node.of}.grad := %${node.value}`
    case "Backward":
      return `%${node.id} = %${node.loss}.backward()`
    case "Cond":
      return `%${node.id} = if %${node.predicate}`
    case "Iter":
      return `%${node.id} = for %${node.id} in %${node.over}`
    case "Trace":
      return `%${node.id} = trace(${node.inputs.map((x) => `%${x}`).join(", ")})${node.steps > 1 ? ` x${node.steps} steps` : ""}`
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
  const lines: Array<string> = []
  const walk = (list: ReadonlyArray<Node>, indent: string) => {
    for (const n of list) {
      const l = indent + label(n)
      lines.push(n.site === "" ? l : `${l.padEnd(48)} at ${n.site}`)
      if (n._tag === "Cond") {
        walk(n.then, indent + "  ")
        if (n.otherwise.length > 0) {
          lines.push(`${indent}else`)
          walk(n.otherwise, indent + "  ")
        }
      } else if (n._tag === "Iter" || n._tag === "Trace") walk(n.body, indent + "  ")
    }
  }
  walk(graph.nodes, "")
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
