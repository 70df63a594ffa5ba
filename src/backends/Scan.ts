/**
 * The scan interpreter: folds an intervention graph over *fake tensors*
 * (dtype and, possibly symbolic, shape; see `Shapes`) instead of running the
 * model. It gives the shape and dtype of every module input and output and
 * of every intervention value, and fails, with the typed error and the
 * user's line (`site`) a run would fail with, on interventions that do not
 * fit: a set whose value does not broadcast to the tensor it replaces, an
 * index past a dimension, a matmul whose inner sizes differ, a dtype an
 * operation does not take, a set that needs a value computed later. It
 * creates no onnxruntime session and reads no weights (only their dims).
 *
 * Semantics mirror the local interpreter (`Local`):
 * - a hook reads the tensor's fake narrowed to the invoke's rows (when
 *   there are several invokes and its first dimension is the batch size);
 * - operands are prepared as `Local` does (scalars take the other operand's
 *   dtype, broadcasting ops, MatMul and Concat promote dtypes, `Where`'s
 *   condition becomes bool), then each operation has a rule in a typed
 *   table ({@link opRules}, `satisfies Record<Ops.OpName, OpRule>`);
 * - a set must broadcast to the (narrowed) hook shape and be castable to
 *   its dtype; a set never changes the shape or dtype of what it replaces,
 *   so the forward pass's shapes do not change;
 * - `Apply` re-infers the module's node range with its arguments as first
 *   inputs (and reuses the forward's fakes when they fit unchanged);
 * - `Param` is the initializer's shape, transposed for `transposed` ones;
 * - `Stop` computes nothing: scan reports shapes even for values a stopped
 *   run leaves unavailable;
 * - hooks on calls past a module's calls per pass (generation steps) read
 *   that pass's forward, from the inputs `Options.inputs(step)` gives;
 * - conditions: both branches are scanned, but a branch's failure is not
 *   reported (it may never run); loops and nested traces fail as in `Local`.
 *
 * Errors are plain throws of `Errors.TraceError` in {@link run} and
 * {@link make} (node by node, for shapes while tracing), typed failures in
 * {@link execute} (an Effect, as `Local.execute`), or returned by
 * {@link validate}.
 *
 * @example
 * import * as Scan from "./Scan.js"
 * const out = Scan.run(loaded, { graph, inputs: { x: { dtype: "float32", shape: [2, 5] } }, rows: [{ start: 0, count: 2 }] })
 * out.values.get(3)   // { dtype: "float32", shape: [2, 10] }
 *
 * @since 0.1.0
 */
import { Effect } from "effect"
import * as DType from "../core/DType.js"
import * as Errors from "../core/Errors.js"
import * as Graph from "../core/Graph.js"
import * as Index from "../core/Index.js"
import * as Ops from "../core/Ops.js"
import { decodeItems } from "../core/Tracer.js"
import type * as Loaded from "../models/Loaded.js"
import type * as ModuleTree from "../models/ModuleTree.js"
import * as Onnx from "../models/Onnx.js"
import * as Shapes from "../models/Shapes.js"

type Fake = Shapes.Fake
type Dim = Shapes.Dim

/**
 * Rows of the batch that belong to one invoke (as `Local.Rows`).
 *
 * @since 0.1.0
 */
export interface Rows {
  readonly start: number
  readonly count: number
}

/**
 * The model inputs as fakes (a `Tensor` fits: it has `dtype` and `shape`).
 *
 * @since 0.1.0
 */
export type Inputs = ReadonlyMap<string, Fake> | Readonly<Record<string, Fake>>

/**
 * One scan: the graph, the batched model inputs as fakes, and each invoke's rows.
 *
 * @since 0.1.0
 */
export interface Request {
  readonly graph: Graph.Graph
  readonly inputs: Inputs
  readonly rows: ReadonlyArray<Rows>
}

/**
 * What a scan gives.
 *
 * @since 0.1.0
 */
export interface Outcome {
  /** The fake of every node that has a value (all but `Set` and `Stop`), by node id. */
  readonly values: ReadonlyMap<number, Fake>
  /** The fake of every hook point the graph reads or sets, whole batch, by {@link hookKey}. */
  readonly hooks: ReadonlyMap<string, Fake>
  /** The fake of every tensor of the model's forward pass, by ONNX name. */
  readonly tensors: ReadonlyMap<string, Fake>
}

/**
 * The key of a hook point (module, call, point, index), as `Local` keys them.
 *
 * @example
 * Scan.hookKey({ module: "layer1", call: 0, invoke: 0, point: "output", index: 0 }) // "layer1|0|output|0"
 *
 * @since 0.1.0
 */
export const hookKey = (ref: Pick<Graph.HookRef, "module" | "call" | "point" | "index">): string => {
  // interpreters ask for the key of the same (immutable) ref at every step
  let key = hookKeys.get(ref)
  if (key === undefined) hookKeys.set(ref, (key = `${ref.module}|${ref.call}|${ref.point}|${ref.index}`))
  return key
}
const hookKeys = new WeakMap<object, string>()

// ---------------------------------------------------------------------------
// The forward pass
// ---------------------------------------------------------------------------

const forwardCache = new WeakMap<Loaded.Loaded, Map<string, ReadonlyMap<string, Fake>>>()

const inputKey = (inputs: ReadonlyMap<string, Fake>): string =>
  [...inputs].map(([n, f]) => `${n}:${Shapes.format(f)}`).sort().join(";")

const entries = (inputs: Inputs): ReadonlyMap<string, Fake> =>
  inputs instanceof Map ? (inputs as ReadonlyMap<string, Fake>) : new Map(Object.entries(inputs as Record<string, Fake>))

/**
 * The fakes of every tensor of the forward pass for these model inputs.
 * Inputs are checked as `Local` checks feeds (unknown names and missing
 * inputs fail with `Errors.InvalidInput`) and converted to the declared
 * dtypes; inputs that do not fit the model fail with `InvalidInput`; an
 * operator without a shape rule fails with `Errors.ExecutionError` (see
 * {@link unsupportedOps}). Cached per model and input shapes.
 *
 * @example
 * Scan.forward(loaded, { input_ids: { dtype: "int64", shape: [1, Shapes.symbol("sequence_length")] }, ... })
 *
 * @since 0.1.0
 */
export const forward = (loaded: Loaded.Loaded, inputs: Inputs): ReadonlyMap<string, Fake> => {
  const graph = loaded.model.graph
  const given = new Map<string, Fake>()
  const declared = new Map(graph.inputs.map((v) => [v.name, v]))
  for (const [name, f] of entries(inputs)) {
    const v = declared.get(name)
    if (v === undefined) {
      throw new Errors.InvalidInput({ site: "", reason: `the model has no input "${name}"; its inputs are ${[...declared.keys()].join(", ")}` })
    }
    const want = DType.fromOnnx(Onnx.tensorType(v)?.elemType ?? 0)
    given.set(name, { dtype: want ?? f.dtype, shape: [...f.shape] })
  }
  const initializers = new Set(graph.initializers.map((t) => t.name))
  const missing = graph.inputs.filter((v) => !given.has(v.name) && !initializers.has(v.name))
  if (missing.length > 0) {
    throw new Errors.InvalidInput({ site: "", reason: `missing model inputs: ${missing.map((v) => v.name).join(", ")}` })
  }
  let cache = forwardCache.get(loaded)
  if (cache === undefined) forwardCache.set(loaded, (cache = new Map()))
  const key = inputKey(given)
  const hit = cache.get(key)
  if (hit !== undefined) return hit
  let tensors: Map<string, Fake>
  try {
    tensors = Shapes.inferModel(loaded.model, given)
  } catch (e) {
    if (e instanceof Shapes.ShapeError) {
      throw new Errors.InvalidInput({ site: "", reason: `the inputs do not fit the model: ${e.message}` })
    }
    if (e instanceof Shapes.UnknownOperator) throw new Errors.ExecutionError({ site: "", reason: `cannot scan this model: ${e.message}` })
    throw e
  }
  if (cache.size >= 8) cache.delete(cache.keys().next().value!)
  cache.set(key, tensors)
  return tensors
}

/**
 * The operators of a model (subgraphs included) that have no shape rule:
 * empty when the model can be scanned.
 *
 * @since 0.1.0
 */
export const unsupportedOps = (model: Onnx.Model): ReadonlyArray<string> => {
  // every trace asks; a large model's walk costs about half a millisecond
  const known = unsupportedCache.get(model)
  if (known !== undefined) return known
  const out = new Set<string>()
  const walk = (g: Onnx.Graph) => {
    for (const n of g.nodes) {
      if ((n.domain !== "" && n.domain !== "ai.onnx") || !Shapes.isKnownOp(n.opType)) out.add(n.domain === "" ? n.opType : `${n.domain}.${n.opType}`)
      for (const s of Onnx.subgraphs(n)) walk(s)
    }
  }
  walk(model.graph)
  const list = [...out]
  unsupportedCache.set(model, list)
  return list
}

const unsupportedCache = new WeakMap<Onnx.Model, ReadonlyArray<string>>()

/**
 * The fakes of every module call's inputs and outputs (what `model.scan`
 * reports), by module path, from the forward's fakes.
 *
 * @example
 * Scan.modules(loaded, Scan.forward(loaded, inputs)).get("model.layers.0")?.[0].outputs[0]
 *
 * @since 0.1.0
 */
export const modules = (
  loaded: Loaded.Loaded,
  tensors: ReadonlyMap<string, Fake>
): ReadonlyMap<string, ReadonlyArray<{ readonly inputs: ReadonlyArray<Fake>; readonly outputs: ReadonlyArray<Fake> }>> => {
  const out = new Map<string, ReadonlyArray<{ readonly inputs: ReadonlyArray<Fake>; readonly outputs: ReadonlyArray<Fake> }>>()
  const get = (name: string) => tensors.get(name)!
  for (const m of loaded.tree.modules.values()) {
    out.set(m.path, m.calls.map((c) => ({ inputs: c.inputs.map(get), outputs: c.outputs.map(get) })))
  }
  return out
}

// ---------------------------------------------------------------------------
// Intervention operations
// ---------------------------------------------------------------------------

type Attrs = Readonly<Record<string, unknown>>

/**
 * What an operation gives: one fake, or several (TopK).
 *
 * @since 0.1.0
 */
export type Value = Fake | ReadonlyArray<Fake>

/**
 * The rule of one intervention operation: the fake of its result from the
 * fakes of its (prepared) operands. Throws `Shapes.ShapeError` (or an
 * `Index` error) when they do not fit.
 *
 * @since 0.1.0
 */
export type OpRule = (args: ReadonlyArray<Fake>, attrs: Attrs, op: Ops.OpName) => Value

const bad = (op: string, reason: string): never => {
  throw new Shapes.ShapeError({ opType: op, node: "", reason })
}

/**
 * Dtypes onnxruntime's CPU kernels do not take, per operation (measured;
 * strings are refused everywhere but Identity/Concat/Reshape-like moves).
 */
const unsupported: Partial<Record<Ops.OpName, ReadonlyArray<DType.DType>>> = (() => {
  const ints = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"] as const
  const floatOnly = [...ints]
  return {
    Add: ["bool"],
    Sub: ["bool"],
    Mul: ["bool"],
    Div: ["bool"],
    Pow: ["int8", "int16", "uint8", "uint16", "uint32", "uint64", "bool"],
    Mod: ["bool"],
    Neg: ["uint8", "uint16", "uint32", "uint64", "bool"],
    Abs: ["bool"],
    Exp: floatOnly,
    Log: floatOnly,
    Sqrt: floatOnly,
    Tanh: floatOnly,
    Sigmoid: floatOnly,
    Relu: ["int16", "int64", "uint8", "uint16", "uint32", "uint64", "bool"],
    MatMul: ["int8", "int16", "uint8", "uint16", "bool"],
    Softmax: floatOnly,
    LogSoftmax: floatOnly,
    ArgMax: ["int16", "uint16", "uint32", "uint64", "bool"],
    TopK: ["uint16", "uint32", "uint64", "bool"],
    ReduceSum: ["int8", "int16", "uint8", "uint16", "uint32", "uint64", "bool"],
    ReduceMean: ["int8", "int16", "uint8", "uint16", "uint32", "uint64", "bool"],
    ReduceMax: ["int16", "uint16", "uint32", "uint64", "bool"],
    ReduceL2: ["int8", "int16", "uint8", "uint16", "uint32", "uint64", "bool"],
    Less: ["bool"],
    LessOrEqual: ["bool"],
    Greater: ["bool"],
    GreaterOrEqual: ["bool"],
    Not: DType.all.filter((d) => d !== "bool"),
    And: DType.all.filter((d) => d !== "bool"),
    Or: DType.all.filter((d) => d !== "bool"),
    Where: ["int8", "int16", "uint16", "uint32", "uint64", "bool"]
  }
})()

const movesOnly: ReadonlySet<Ops.OpName> = new Set<Ops.OpName>([
  "Identity", "Concat", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Index", "SetIndex", "Shape", "Expand", "Select", "Cast", "Equal"
])

const checkDtype = (op: Ops.OpName, args: ReadonlyArray<Fake>) => {
  const list = unsupported[op] ?? []
  const checked = op === "Where" ? args.slice(1) : args
  for (const a of checked) {
    if ((a.dtype === "string" && !movesOnly.has(op)) || list.includes(a.dtype)) {
      bad(op, `${op} does not take ${a.dtype} tensors`)
    }
  }
}

const same: OpRule = (args) => ({ dtype: args[0].dtype, shape: args[0].shape })

const elementwise: OpRule = (args, _, op) => ({ dtype: args[0].dtype, shape: Shapes.broadcast(args.map((a) => a.shape), op) })

const comparison: OpRule = (args, _, op) => ({ dtype: "bool", shape: Shapes.broadcast(args.map((a) => a.shape), op) })

const axisOf = (args: ReadonlyArray<Fake>, attrs: Attrs, op: string): number =>
  Shapes.normAxis(attrs.axis as number, args[0].shape.length, op)

const reduction: OpRule = (args, attrs, op) => {
  const rank = args[0].shape.length
  const axes = (attrs.axes as ReadonlyArray<number> | undefined)?.map((a) => Shapes.normAxis(a, rank, op))
  return { dtype: args[0].dtype, shape: Shapes.reduce(args[0].shape, axes, Boolean(attrs.keepdims), op) }
}

const isPlainDims = (shape: ReadonlyArray<Dim>): shape is ReadonlyArray<number> => Shapes.concrete(shape) !== undefined

/**
 * The shape `x[items]` has (Python indexing, as `Index.resolve`), for
 * concrete or symbolic shapes; an index past a known dimension fails with
 * the `Index` error `Tensor.at` gives.
 *
 * @example
 * Scan.indexShape([2, Shapes.symbol("n"), 8], [":", -1]) // [2, 8]
 *
 * @since 0.1.0
 */
export const indexShape = (shape: ReadonlyArray<Dim>, items: ReadonlyArray<Index.Item>): ReadonlyArray<Dim> => {
  const specs = Index.parse(items)
  if (isPlainDims(shape)) return Index.resolve(specs, shape).shape
  // symbolic: the same walk as Index.resolve, bounds assumed in range where unknown
  const consuming = specs.filter((s) => s._tag === "Int" || s._tag === "Slice").length
  if (consuming > shape.length) {
    throw new Index.TooManyIndices({ given: consuming, rank: shape.length, message: `too many indices for tensor of dimension ${shape.length} (got ${consuming})` })
  }
  const out: Array<Dim> = []
  let dim = 0
  const full = (n: number) => {
    for (let i = 0; i < n; i++) out.push(shape[dim++])
  }
  let sawEllipsis = false
  for (const s of specs) {
    switch (s._tag) {
      case "NewAxis":
        out.push(1)
        break
      case "Ellipsis":
        sawEllipsis = true
        full(shape.length - consuming)
        break
      case "Int": {
        const size = shape[dim]
        if (typeof size === "number" && (s.index < -size || s.index >= size)) {
          throw new Index.IndexOutOfRange({ index: s.index, dim, size, message: `index ${s.index} is out of bounds for dimension ${dim} with size ${size}` })
        }
        dim++
        break
      }
      case "Slice": {
        const size = shape[dim++]
        out.push(Shapes.sliceLength(size, s.start, s.stop, s.step).count)
        break
      }
    }
  }
  if (!sawEllipsis) full(shape.length - dim)
  return out
}

/**
 * The rule of every intervention operation (`Ops.OpName`).
 *
 * @since 0.1.0
 */
export const opRules = {
  Add: elementwise,
  Sub: elementwise,
  Mul: elementwise,
  Div: elementwise,
  Pow: elementwise,
  Mod: elementwise,
  Neg: same,
  Abs: same,
  Exp: same,
  Log: same,
  Sqrt: same,
  Tanh: same,
  Sigmoid: same,
  Relu: same,
  MatMul: (args, _, op) => ({ dtype: args[0].dtype, shape: Shapes.matmul(args[0].shape, args[1].shape, op) }),
  Softmax: (args, attrs, op) => {
    axisOf(args, attrs, op)
    return same(args, attrs, op)
  },
  LogSoftmax: (args, attrs, op) => {
    axisOf(args, attrs, op)
    return same(args, attrs, op)
  },
  ArgMax: (args, attrs, op) => ({ dtype: "int64", shape: Shapes.reduce(args[0].shape, [axisOf(args, attrs, op)], Boolean(attrs.keepdims), op) }),
  TopK: (args, attrs, op) => {
    const axis = axisOf(args, attrs, op)
    const k = attrs.k as number
    const size = args[0].shape[axis]
    if (!Number.isInteger(k) || k < 0) bad(op, `k must be a non-negative integer, got ${k}`)
    if (typeof size === "number" && k > size) bad(op, `k = ${k} is larger than the size ${size} of dimension ${axis} (shape [${args[0].shape.map(Shapes.formatDim).join(", ")}])`)
    const shape = args[0].shape.map((d, i) => (i === axis ? k : d))
    return [{ dtype: args[0].dtype, shape }, { dtype: "int64", shape }]
  },
  Select: () => bad("Select", "internal: Select is handled by the interpreter"),
  ReduceSum: reduction,
  ReduceMean: reduction,
  ReduceMax: reduction,
  ReduceL2: reduction,
  Identity: (args) => args[0],
  Concat: (args, attrs, op) => ({ dtype: args[0].dtype, shape: Shapes.concat(args.map((a) => a.shape), attrs.axis as number, op) }),
  Equal: comparison,
  Less: comparison,
  LessOrEqual: comparison,
  Greater: comparison,
  GreaterOrEqual: comparison,
  Not: same,
  And: elementwise,
  Or: elementwise,
  Where: (args, _, op) => ({ dtype: args[1].dtype, shape: Shapes.broadcast(args.map((a) => a.shape), op) }),
  Cast: (args, attrs, op) => {
    const to = attrs.to
    if (!DType.isDType(to)) return bad(op, `unknown dtype ${JSON.stringify(to)}`)
    if ((to === "string") !== (args[0].dtype === "string")) bad(op, `cannot convert ${args[0].dtype} to ${to}`)
    return { dtype: to, shape: args[0].shape }
  },
  Reshape: (args, attrs, op) => ({ dtype: args[0].dtype, shape: Shapes.reshape(args[0].shape, attrs.shape as ReadonlyArray<number>, { zeroCopies: false, opType: op }), ...(args[0].value ? { value: args[0].value } : {}) }),
  Transpose: (args, attrs, op) => {
    const rank = args[0].shape.length
    let perm: ReadonlyArray<number>
    if (attrs.perm !== undefined) perm = (attrs.perm as ReadonlyArray<number>).map((a) => Shapes.normAxis(a, rank, op))
    else {
      const [a, b] = (attrs.swap as ReadonlyArray<number>).map((d) => Shapes.normAxis(d, rank, op))
      const p = Array.from({ length: rank }, (_, i) => i)
      p[a] = b
      p[b] = a
      perm = p
    }
    return { dtype: args[0].dtype, shape: Shapes.transpose(args[0].shape, perm, op) }
  },
  Unsqueeze: (args, attrs, op) => ({ dtype: args[0].dtype, shape: Shapes.unsqueeze(args[0].shape, attrs.axes as ReadonlyArray<number>, op) }),
  Squeeze: (args, attrs, op) => ({ dtype: args[0].dtype, shape: Shapes.squeeze(args[0].shape, attrs.axes as ReadonlyArray<number> | undefined, op) }),
  Index: (args, attrs) => ({ dtype: args[0].dtype, shape: indexShape(args[0].shape, decodeItems(attrs.items)) }),
  SetIndex: (args, attrs, op) => {
    const selection = indexShape(args[0].shape, decodeItems(attrs.items))
    const why = Shapes.broadcastsTo(args[1].shape, selection)
    if (why !== undefined) bad(op, why)
    checkCast(args[1].dtype, args[0].dtype, op)
    return { dtype: args[0].dtype, shape: args[0].shape }
  },
  Shape: (args) => ({ dtype: "int64", shape: [args[0].shape.length], value: args[0].shape }),
  Expand: (args, attrs, op) => ({ dtype: args[0].dtype, shape: Shapes.broadcast([args[0].shape, attrs.shape as ReadonlyArray<number>], op) })
} as const satisfies Record<Ops.OpName, OpRule>

const checkCast = (from: DType.DType, to: DType.DType, op: string) => {
  if ((from === "string") !== (to === "string")) bad(op, `a ${from} value cannot be stored in a ${to} tensor`)
}

const promote = (dtypes: ReadonlyArray<DType.DType>): DType.DType => {
  const rank: Record<DType.DType, number> = {
    bool: 0, uint8: 1, int8: 2, int16: 3, uint16: 3, int32: 4, uint32: 5, int64: 6, uint64: 6, float16: 7, float32: 8, float64: 9, string: 10
  }
  return dtypes.reduce((a, b) => (rank[b] > rank[a] ? b : a))
}

// ---------------------------------------------------------------------------
// The interpreter
// ---------------------------------------------------------------------------

type Val = Fake | ReadonlyArray<Fake> | number | boolean

const isFake = (v: Val | undefined): v is Fake => typeof v === "object" && v !== null && !Array.isArray(v)

const scalarFake = (v: number | boolean): Fake =>
  typeof v === "boolean" ? { dtype: "bool", shape: [], value: [v ? 1 : 0] } : { dtype: "float32", shape: [], value: [Math.fround(v)] }

const asFake = (v: Val): Fake => (isFake(v) ? v : Array.isArray(v) ? (v as ReadonlyArray<Fake>)[0] : scalarFake(v as number | boolean))

const castFake = (f: Fake, dtype: DType.DType): Fake => (f.dtype === dtype ? f : { dtype, shape: f.shape })

interface HookSite {
  readonly key: string
  readonly tensor: string
  /** Position in the linear order, plus (n + 1) per earlier forward pass. */
  readonly position: number
  readonly step: number
  readonly point: "input" | "output"
}

/**
 * The module call, tensor and forward pass a hook reference names: call `c`
 * of a module run `k` times per forward pass is its call `c % k` in pass
 * `c / k`. Throws `Errors.UnknownModule` or `Errors.ModuleIndexOutOfRange`
 * with the node's line (read only then: formatting a stack is not free).
 * `Local` and the scan resolve hooks alike through it.
 *
 * @example
 * Scan.hookCall(loaded, { module: "model.layers.0", call: 0, invoke: 0, point: "output", index: 0 }, node).tensor
 *
 * @since 0.1.0
 */
export const hookCall = (
  loaded: Loaded.Loaded,
  ref: Graph.HookRef,
  at: { readonly site: string }
): { readonly call: ModuleTree.Call; readonly tensor: string; readonly step: number } => {
  const module = loaded.tree.modules.get(ref.module)
  if (module === undefined) {
    const parts = ref.module.split(".")
    throw new Errors.UnknownModule({ path: parts.slice(0, -1).join("."), name: parts[parts.length - 1], available: [], site: at.site })
  }
  const perPass = module.calls.length
  const call = perPass === 0 || ref.call < 0 ? undefined : module.calls[ref.call % perPass]
  if (call === undefined) {
    throw new Errors.ModuleIndexOutOfRange({ path: ref.module, what: "call", index: ref.call, size: module.calls.length, site: at.site })
  }
  const list = ref.point === "input" ? call.inputs : call.outputs
  if (ref.index < 0 || ref.index >= list.length) {
    throw new Errors.ModuleIndexOutOfRange({ path: ref.module, what: ref.point, index: ref.index, size: list.length, site: at.site })
  }
  return { call, tensor: list[ref.index], step: Math.floor(ref.call / perPass) }
}

const resolveHook = (loaded: Loaded.Loaded, ref: Graph.HookRef, at: { readonly site: string }): HookSite => {
  const { call, tensor, step } = hookCall(loaded, ref, at)
  const local = ref.point === "input" ? call.start : call.end
  return { key: hookKey(ref), tensor, position: step * (loaded.tree.order.length + 1) + local, step, point: ref.point }
}

const toTraceError = (site: string, e: unknown): Errors.TraceError => {
  if (Errors.isTraceError(e)) return e
  if (e instanceof Shapes.ShapeError) return new Errors.InvalidValue({ site, reason: e.node === "" ? e.reason : e.message })
  const tagged = e as { _tag?: string; message?: string }
  if (tagged?._tag === "InvalidIndex" || tagged?._tag === "IndexOutOfRange" || tagged?._tag === "TooManyIndices") {
    return new Errors.InvalidValue({ site, reason: tagged.message ?? String(e) })
  }
  if (e instanceof Shapes.UnknownOperator) return new Errors.ExecutionError({ site, reason: `cannot scan: ${e.message}` })
  throw e
}

/**
 * A scan in progress, one node at a time (for shapes while tracing, e.g.
 * `proxy.shape`): `add` each node in id order, then `finish` for the
 * whole-graph checks. Both throw the `Errors.TraceError` a run would fail with.
 *
 * @example
 * const scanner = Scan.make(loaded, { inputs, rows: [{ start: 0, count: 1 }] })
 * for (const node of graph.nodes) scanner.add(node)?.shape
 * const outcome = scanner.finish()
 *
 * @since 0.1.0
 */
export interface Scanner {
  /** The fake of every tensor of the (first) forward pass. */
  readonly tensors: ReadonlyMap<string, Fake>
  /** The fakes of the nodes added so far. */
  readonly values: ReadonlyMap<number, Fake>
  /** The fakes of the hook points used so far. */
  readonly hooks: ReadonlyMap<string, Fake>
  /** Scans the next node; its fake, when it has a tensor value. */
  add(node: Graph.Node): Fake | undefined
  /** Checks what needs the whole graph (sets needing later values) and gives the outcome. */
  finish(): Outcome
}

/**
 * Options of {@link make}.
 *
 * @since 0.1.0
 */
export interface Options {
  /**
   * The model inputs; a function gives each forward pass's inputs (pass
   * `step` of a generation), for hooks on calls past the first pass.
   */
  readonly inputs: Inputs | ((step: number) => Inputs)
  readonly rows: ReadonlyArray<Rows>
  /** Fakes of nodes defined outside this graph (a session's values). */
  readonly externals?: ReadonlyMap<number, Fake>
  /** The token ids `Generated` gives, per invoke: default `[rows, generated_length]`. */
  readonly generated?: (invoke: number) => Fake
}

/**
 * Starts a scan: infers the forward pass for the inputs (see {@link forward}).
 *
 * Besides the tensor nodes, graphs may hold builtins (values, lists, calls
 * of local functions, logs: no fakes, and tensor nodes that need them get
 * none) and conditions: both branches are scanned, tolerantly (a branch
 * that may never run reports no error; its nodes that fail get no fake).
 * Loops and nested traces fail as `Local` fails them.
 *
 * @since 0.1.0
 */
export const make = (loaded: Loaded.Loaded, options: Options): Scanner => {
  const { rows } = options
  const inputsOf = typeof options.inputs === "function" ? (options.inputs as (step: number) => Inputs) : () => options.inputs as Inputs
  const tensors = forward(loaded, inputsOf(0))
  const passes = new Map<number, ReadonlyMap<string, Fake>>([[0, tensors]])
  const tensorsOf = (step: number) => {
    let t = passes.get(step)
    if (t === undefined) passes.set(step, (t = forward(loaded, inputsOf(step))))
    return t
  }
  const nodes: Array<{ readonly node: Graph.Node; readonly guarded: boolean; readonly guard?: number }> = []
  const batch = rows.reduce((a, r) => a + r.count, 0)
  const invokes = rows.length
  const values = new Map<number, Val>()
  const out = new Map<number, Fake>()
  for (const [id, f] of options.externals ?? []) {
    values.set(id, f)
    out.set(id, f)
  }
  const hooks = new Map<string, Fake>()
  const sites = new Map<string, HookSite>()

  const narrow = (f: Fake, r: Rows | undefined): Fake => {
    if (invokes <= 1 || r === undefined || f.shape.length === 0 || !Shapes.dimEquals(f.shape[0], batch)) return f
    return { dtype: f.dtype, shape: [r.count, ...f.shape.slice(1)] }
  }
  const hookFake = (node: Graph.Node & { readonly ref: Graph.HookRef }) => {
    const site = resolveHook(loaded, node.ref, node)
    sites.set(site.key, site)
    const whole = tensorsOf(site.step).get(site.tensor)
    if (whole === undefined) throw new Errors.ExecutionError({ site: node.site, reason: `internal: no shape for tensor "${site.tensor}"` })
    hooks.set(site.key, whole)
    return { site, whole, part: narrow(whole, rows[node.ref.invoke]) }
  }

  const operands = (node: Graph.Node & { _tag: "Op" }): ReadonlyArray<Fake> => {
    const raw = node.args.map((a) => values.get(a)!)
    const tensorArgs = raw.filter(isFake)
    const dtypeArgs = node.op === "Where" ? tensorArgs.filter((_, k) => !(isFake(raw[0]) && k === 0)) : tensorArgs
    const target = dtypeArgs.length > 0 ? promote(dtypeArgs.map((t) => t.dtype)) : undefined
    const promoting = Ops.broadcasting.has(node.op) || node.op === "MatMul" || node.op === "Concat"
    return raw.map((v, k) => {
      if (node.op === "Where" && k === 0) return isFake(v) ? castFake(v, "bool") : asFake(v)
      if (Array.isArray(v)) return (v as ReadonlyArray<Fake>)[0]
      if (isFake(v)) return promoting ? castFake(v, target ?? v.dtype) : v
      const s = v as number | boolean
      return castFake(scalarFake(s), target ?? (typeof s === "boolean" ? "bool" : "float32"))
    })
  }

  const param = (node: Graph.Node & { _tag: "Param" }): Fake => {
    const module = loaded.tree.modules.get(node.module)
    const p = module?.parameters.find((q) => q.name === node.name)
    const init = p && loaded.model.graph.initializers.find((t) => t.name === p.initializer)
    if (p === undefined || init === undefined) {
      throw new Errors.UnknownModule({ path: node.module, name: node.name, available: module?.parameters.map((q) => q.name) ?? [], site: node.site })
    }
    const dtype = DType.fromOnnx(init.dataType)
    if (dtype === undefined) throw new Errors.InvalidValue({ site: node.site, reason: `parameter ${node.name} has an unsupported element type` })
    const dims = init.dims.map(Number)
    return { dtype, shape: p.transposed ? [dims[1], dims[0]] : dims }
  }

  const apply = (node: Graph.Node & { _tag: "Apply" }): Fake => {
    const module = loaded.tree.modules.get(node.module)
    const perPass = module?.calls.length ?? 0
    const call = module === undefined || perPass === 0 ? undefined : module.calls[node.call % perPass]
    if (module === undefined || call === undefined) {
      throw new Errors.UnknownModule({ path: "", name: node.module, available: [], site: node.site })
    }
    const forwardFakes = tensorsOf(Math.floor(node.call / perPass))
    const fed = new Map<string, Fake>()
    call.inputs.forEach((name, k) => {
      if (k >= node.args.length) return
      const want = forwardFakes.get(name)
      const v = asFake(values.get(node.args[k])!)
      if (want !== undefined) checkCast(v.dtype, want.dtype, `${node.module}.call`)
      fed.set(name, want === undefined ? v : castFake(v, want.dtype))
    })
    const result = call.outputs[0]
    const unchanged = [...fed].every(([name, f]) => Shapes.shapeEquals(f.shape, forwardFakes.get(name)?.shape ?? []))
    if (unchanged) return stripValue(forwardFakes.get(result)!)
    const env = new Map(forwardFakes)
    for (const [name, f] of fed) env.set(name, f)
    const graphNodes = loaded.model.graph.nodes
    const range: Array<Onnx.Node> = []
    for (let p = call.start; p < call.end; p++) range.push(graphNodes[loaded.tree.order[p]])
    try {
      Shapes.inferNodes(range, env)
    } catch (e) {
      if (e instanceof Shapes.ShapeError) {
        throw new Errors.InvalidValue({ site: node.site, reason: `${node.module}.call() does not take these arguments: ${e.message}` })
      }
      throw e
    }
    return stripValue(env.get(result)!)
  }

  /** Whether every node this one reads has a value (builtins and failed guarded nodes have none). */
  const known = (ids: ReadonlyArray<number>) => ids.every((d) => values.has(d))

  const step = (node: Graph.Node): void => {
    // builtins and control flow, matched by tag name so that graphs without them type-check too
    const tag: string = node._tag
    const any = node as unknown as Record<string, unknown>
    switch (tag) {
      case "Constant": {
        const lit = any.value as Graph.Literal
        if (!DType.isDType(lit.dtype)) throw new Errors.InvalidValue({ site: node.site, reason: `unknown dtype "${lit.dtype}"` })
        values.set(node.id, { dtype: lit.dtype, shape: [...lit.shape] })
        return
      }
      case "Scalar":
        values.set(node.id, any.value as number | boolean)
        return
      case "Value": {
        const v = any.value
        if (typeof v === "number" || typeof v === "boolean") values.set(node.id, v)
        return
      }
      case "Param":
        values.set(node.id, param(node as Graph.Node & { _tag: "Param" }))
        return
      case "Hook": {
        const { part } = hookFake(node as Graph.Node & { readonly ref: Graph.HookRef })
        values.set(node.id, stripValue(part))
        return
      }
      case "Generated": {
        const invoke = any.invoke as number
        const f = options.generated?.(invoke) ?? { dtype: "int64" as const, shape: [rows[invoke]?.count ?? batch, Shapes.symbol("generated_length")] }
        values.set(node.id, f)
        return
      }
      case "Set": {
        const set = node as Graph.Node & { _tag: "Set" }
        const { whole, part } = hookFake(set)
        if (!known([set.value])) return
        const value = asFake(values.get(set.value)!)
        const batched = invokes > 1 && whole.shape.length > 0 && Shapes.dimEquals(whole.shape[0], batch)
        const why = Shapes.broadcastsTo(value.shape, batched ? part.shape : whole.shape)
        const label = `${set.ref.module}.${set.ref.point}`
        if (why !== undefined) throw new Errors.InvalidValue({ site: node.site, reason: `cannot set ${label}: ${why}` })
        if ((value.dtype === "string") !== (whole.dtype === "string")) {
          throw new Errors.InvalidValue({ site: node.site, reason: `cannot set ${label}: a ${value.dtype} value cannot be stored in a ${whole.dtype} tensor` })
        }
        return
      }
      case "Op": {
        const op = node as Graph.Node & { _tag: "Op" }
        if (!known(op.args)) return
        if (op.op === "Select") {
          const v = values.get(op.args[0])
          const k = op.attrs.index as number
          const picked = Array.isArray(v) ? (v as ReadonlyArray<Fake>)[k] : k === 0 ? asFake(v!) : undefined
          if (picked === undefined) throw new Errors.InvalidValue({ site: node.site, reason: `Select: the value has no output ${k}` })
          values.set(node.id, picked)
          return
        }
        const args = operands(op)
        if (args.some((a) => !isFake(a))) return
        checkDtype(op.op, args)
        const rule: OpRule = opRules[op.op]
        values.set(node.id, rule(args, op.attrs, op.op))
        return
      }
      case "Assign": {
        // later readers of the variable see the new value's shape
        const target = any.target as number
        const value = any.value as number
        if (known([value])) values.set(target, values.get(value)!)
        return
      }
      case "Apply": {
        const a = node as Graph.Node & { _tag: "Apply" }
        if (!known(a.args)) return
        values.set(node.id, apply(a))
        return
      }
      case "Iter":
        throw new Errors.InvalidValue({
          site: node.site,
          reason: "a loop cannot run inside a forward pass: loop over traces in a session, or over steps with t.all / envoy.iter"
        })
      case "Trace":
        throw new Errors.InvalidValue({ site: node.site, reason: "a trace cannot run inside another trace" })
      default:
        // Stop, ListNew, DictNew, Append, Call, Log, Cond (its branches are added separately): no tensor
        return
    }
  }

  const addOne = (node: Graph.Node, guard: number | undefined): Fake | undefined => {
    nodes.push({ node, guarded: guard !== undefined, ...(guard === undefined ? {} : { guard }) })
    try {
      step(node)
    } catch (e) {
      // a branch may never run: its failures are not the run's
      if (guard === undefined) throw toTraceError(node.site, e)
      values.delete(node.id)
    }
    const v = values.get(node.id)
    let f: Fake | undefined
    if (v !== undefined && (isFake(v) || Array.isArray(v) || typeof v === "number" || typeof v === "boolean")) {
      f = asFake(v as Val)
      out.set(node.id, f)
    }
    const any = node as unknown as Record<string, unknown>
    if ((node._tag as string) === "Cond") {
      for (const child of [...(any.then as ReadonlyArray<Graph.Node>), ...(any.otherwise as ReadonlyArray<Graph.Node>)]) addOne(child, node.id)
    }
    return f
  }

  const finish = (): Outcome => {
    checkOrder(nodes, sites)
    return { values: out, hooks, tensors }
  }
  return { tensors, values: out, hooks, add: (node) => addOne(node, undefined), finish }
}

/**
 * Scans a graph; throws the `Errors.TraceError` a run would fail with.
 *
 * @example
 * const { values } = Scan.run(loaded, { graph, inputs, rows: [{ start: 0, count: 1 }] })
 *
 * @since 0.1.0
 */
export const run = (loaded: Loaded.Loaded, req: Request): Outcome => {
  const scanner = make(loaded, req)
  for (const node of req.graph.nodes) scanner.add(node)
  return scanner.finish()
}

const stripValue = (f: Fake): Fake => (f.value === undefined ? f : { dtype: f.dtype, shape: f.shape })

/**
 * Fails with `Errors.OutOfOrder` where a set needs a value that the forward
 * pass only computes after the point the set applies at (as `Local` does).
 * Sets inside conditions are not checked (their branch may not run).
 */
const checkOrder = (
  nodes: ReadonlyArray<{ readonly node: Graph.Node; readonly guarded: boolean; readonly guard?: number }>,
  sites: ReadonlyMap<string, HookSite>
): void => {
  const ready = new Map<number, number>()
  const at = (id: number) => ready.get(id) ?? -1
  const setsSoFar = new Map<string, Array<number>>()
  let stop: { readonly id: number; readonly position: number } | undefined
  for (const { node, guard } of nodes) {
    let r = guard === undefined ? -1 : at(guard)
    switch (node._tag) {
      case "Hook": {
        const key = hookKey(node.ref)
        r = Math.max(r, sites.get(key)?.position ?? -1)
        for (const s of setsSoFar.get(key) ?? []) r = Math.max(r, at(s))
        break
      }
      case "Set": {
        const key = hookKey(node.ref)
        r = Math.max(r, sites.get(key)?.position ?? -1, at(node.value))
        setsSoFar.set(key, [...(setsSoFar.get(key) ?? []), node.id])
        break
      }
      case "Stop":
        if (stop === undefined && guard === undefined) {
          let p = -1
          for (const [id, v] of ready) if (id < node.id) p = Math.max(p, v)
          stop = { id: node.id, position: p }
        }
        break
      default:
        for (const d of Graph.dependencies(node)) r = Math.max(r, at(d))
        break
    }
    ready.set(node.id, r)
  }
  for (const { node, guarded } of nodes) {
    if (node._tag !== "Set" || guarded) continue
    const site = sites.get(hookKey(node.ref))
    if (site === undefined) continue
    if (stop !== undefined && node.id > stop.id && site.position >= stop.position) continue
    if (at(node.value) > site.position) {
      throw new Errors.OutOfOrder({
        site: node.site,
        reason: `this set on ${node.ref.module || "the model"}.${node.ref.point} needs a value that is only computed later in the forward pass`
      })
    }
  }
}

/**
 * Scans a graph as an Effect with typed errors (the form `Local.execute` has).
 *
 * @example
 * const outcome = yield* Scan.execute(loaded, { graph, inputs, rows })
 *
 * @since 0.1.0
 */
export const execute = (loaded: Loaded.Loaded, req: Request): Effect.Effect<Outcome, Errors.TraceError> =>
  Effect.try({ try: () => run(loaded, req), catch: (e) => toTraceError("", e) })

/**
 * Checks a graph against the model before running it: `undefined` when it
 * fits, else the error the run would fail with.
 *
 * @example
 * const error = Scan.validate(loaded, { graph, inputs: feeds, rows })
 * if (error) return yield* error
 *
 * @since 0.1.0
 */
export const validate = (loaded: Loaded.Loaded, req: Request): Errors.TraceError | undefined => {
  try {
    run(loaded, req)
    return undefined
  } catch (e) {
    return toTraceError("", e)
  }
}
